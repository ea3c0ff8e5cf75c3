"""State shared by every command: the parsed flags, the printer, the transport, and the confirmation prompt."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from ..config import ClientConfig, RetryConfig, TransferConfig
from ..errors import ConfigError
from ..s3_dirpath_utils import parse_s3_url
from ..transport.context import S3Transport
from .output import Output

__all__ = ["CommandError", "Context", "UsageError", "age_cutoff", "format_duration", "parse_duration", "s3_url"]

log = logging.getLogger(__name__)

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class UsageError(Exception):
    """A malformed command line (bad URL, bad value): exit status 2."""


class CommandError(Exception):
    """The command could not do what was asked, for a reason already explained in the message: exit 1."""


def s3_url(url: str, *, require_key: bool = False, what: str = "URL") -> tuple[str, str]:
    """``(bucket, key)`` of an ``s3://`` argument; a malformed one is a usage error (exit 2)."""
    if not url.lower().startswith("s3:"):
        raise UsageError(f"{what} {url!r} is not an S3 URL; expected s3://<bucket>/<key>")
    try:
        return parse_s3_url(url, require_key=require_key)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``2h``, ``1d``, ``1w`` (a bare number is seconds) -> a timedelta.

    Raises:
        argparse.ArgumentTypeError: for anything else (argparse turns it into a usage error).
    """
    raw = text.strip().lower()
    unit = raw[-1:] if raw[-1:] in _DURATION_UNITS else "s"
    number = raw[:-1] if raw[-1:] in _DURATION_UNITS else raw
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}; expected e.g. 30m, 2h, 1d") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: it must not be negative")
    return timedelta(seconds=value * _DURATION_UNITS[unit])


def format_duration(delta: timedelta) -> str:
    """The largest whole unit: ``timedelta(hours=24)`` -> ``1d``, ``timedelta(minutes=90)`` -> ``90m``."""
    seconds = delta.total_seconds()
    for unit in ("w", "d", "h", "m"):
        size = _DURATION_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def age_cutoff(older_than: timedelta) -> datetime:
    """The instant before which something counts as older than ``older_than``."""
    return datetime.now(timezone.utc) - older_than


@dataclass
class Context:
    """What a command runs with. The transport is built on first use, so usage errors need no client."""

    args: argparse.Namespace
    out: Output
    _transport: S3Transport | None = field(default=None, repr=False)

    @property
    def transport(self) -> S3Transport:
        """The transport built from the global flags, then the environment (``AWS_*``, ``S3CKPT_*``)."""
        if self._transport is None:
            overrides: dict[str, object] = {}
            for name in ("endpoint_url", "region", "profile"):
                value = getattr(self.args, name, None)
                if value:
                    overrides[name] = value
            if getattr(self.args, "no_verify_ssl", False):
                overrides["verify"] = False
            try:
                client = ClientConfig.from_env(**overrides)
                attempts = getattr(self.args, "max_attempts", None)
                retry = RetryConfig.from_env(**({"max_attempts": attempts} if attempts else {}))
                self._transport = S3Transport.create(client=client, retry=retry, transfer=TransferConfig.from_env())
            except ConfigError as exc:
                raise UsageError(str(exc)) from None
        return self._transport

    @property
    def dry_run(self) -> bool:
        return bool(getattr(self.args, "dry_run", False))

    def confirm(self, question: str) -> None:
        """Ask before deleting; returns if the user agreed (or passed ``-y``), else raises CommandError.

        Without a terminal on stdin there is nobody to ask: refuse rather than guess, so a script that
        forgot ``-y`` deletes nothing.
        """
        if getattr(self.args, "yes", False):
            return
        stdin = sys.stdin
        try:
            interactive = stdin is not None and stdin.isatty()
        except (AttributeError, ValueError, OSError):
            interactive = False
        if not interactive:
            raise CommandError(
                "refusing to delete without confirmation: stdin is not a terminal. Pass -y/--yes to confirm, "
                "or --dry-run to see the plan"
            )
        print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
        answer = stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            raise CommandError("aborted; nothing was deleted")

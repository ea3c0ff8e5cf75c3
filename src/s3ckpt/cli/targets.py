"""What an ``s3://`` argument names: one object, one logical checkpoint, or a prefix of many; and which
checkpoint a resume would pick."""

from __future__ import annotations

import importlib
import inspect
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..catalog import GROUP_MARKER_SUFFIX, CheckpointEntry, list_checkpoints
from ..errors import CheckpointCorruptedError, CheckpointNotFoundError, S3CheckpointError, S3NotFoundError
from ..layout import manifest_key
from ..s3_dirpath_utils import build_s3_url
from ..transport import ops
from ..transport.context import S3Transport
from ..transport.ops import ObjectInfo
from .context import s3_url

__all__ = ["Target", "entry_keys", "find_target", "list_described", "resume_pick"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One thing an argument names: an object (``info``), or a multi-object checkpoint (``entry``)."""

    url: str
    bucket: str
    key: str
    info: ObjectInfo | None = None
    entry: CheckpointEntry | None = None


def _parent_url(bucket: str, key: str) -> str:
    stripped = key.rstrip("/")
    parent = stripped.rsplit("/", 1)[0] + "/" if "/" in stripped else ""
    return build_s3_url(bucket, parent)


def find_target(t: S3Transport, url: str) -> Target | None:
    """Resolve ``url`` to an object, or to the model-parallel group / sharded directory it names.

    Returns None when it names neither (it may still be a prefix with checkpoints under it).

    Raises:
        UsageError: a malformed URL.
        S3NotFoundError: the bucket does not exist.
    """
    bucket, key = s3_url(url)
    if not key:
        ops.check_bucket(t, bucket)
        return None
    if not key.endswith("/"):
        try:
            return Target(url, bucket, key, info=ops.head(t, bucket, key))
        except S3NotFoundError:
            pass  # a rank-less model-parallel name or a sharded directory has no object of its own
    wanted = build_s3_url(bucket, key).rstrip("/")
    for entry in list_checkpoints(t, _parent_url(bucket, key)):
        if entry.url.rstrip("/") == wanted:
            return Target(entry.url, bucket, key, entry=entry)
    return None


def list_described(t: S3Transport, url: str) -> list[CheckpointEntry]:
    """``list_checkpoints`` with manifests (step and epoch), or without them if one cannot be read: a single
    damaged manifest must not hide every checkpoint (``verify`` names it)."""
    try:
        return list_checkpoints(t, url, with_manifests=True)
    except CheckpointCorruptedError as exc:
        log.warning("%s; listing without manifests", exc)
        return list_checkpoints(t, url)


def entry_keys(t: S3Transport, bucket: str, entry: CheckpointEntry) -> list[str]:
    """Every key that belongs to ``entry``, commit markers first (so deleting in this order uncommits it
    before any data goes: a crash midway leaves an uncommitted leftover that ``gc`` removes, never a
    committed checkpoint with missing pieces).
    """
    _, key = s3_url(entry.url)
    if entry.kind == "sharded":
        listed = sorted(o.key for o in ops.list_objects(t, bucket, key))
        markers = [k for k in listed if k.endswith("/.metadata")]
        return markers + [k for k in listed if k not in markers]
    if entry.kind == "model_parallel":
        keys = [key + GROUP_MARKER_SUFFIX]
        for k in entry.keys:
            keys += [k, manifest_key(k)]
        return keys
    return [entry.keys[0], manifest_key(entry.keys[0])]


def _local_resume_pick(entries: list[CheckpointEntry]) -> CheckpointEntry | None:
    """The rules Lightning's resume follows: a committed ``*end.ckpt`` (the end of training), else the
    newest committed ``*last.ckpt``, else the newest committed checkpoint."""
    committed = [e for e in entries if e.committed]
    for suffix in ("end.ckpt", "last.ckpt"):
        named = [e for e in committed if e.name.endswith(suffix)]
        if named:
            return max(named, key=lambda e: (e.last_modified.timestamp() if e.last_modified else 0.0, e.step or -1))
    return committed[0] if committed else None  # list_checkpoints orders newest step, then time, first


def _rules_from_library() -> Callable[..., Any] | None:
    """``s3ckpt.distributed``'s resume finder (the non-collective one where present), or None."""
    try:
        module = importlib.import_module("s3ckpt.distributed")
    except ImportError:
        return None
    found = getattr(module, "find_resume_checkpoint", None) or getattr(module, "resolve_resume_path", None)
    return found if callable(found) else None


def resume_pick(t: S3Transport, url: str, entries: list[CheckpointEntry]) -> str | None:
    """URL of the checkpoint a resume from ``url`` would load, or None.

    Asks :mod:`s3ckpt.distributed` (the rules training uses) where it is available, so ``ls`` marks exactly
    what a resume would pick; otherwise applies the same rules itself. A finished run's ``*end.ckpt`` is
    marked (training refuses to resume past it unless told to).
    """
    finder = _rules_from_library()
    if finder is not None:
        wanted = {"resume_ignore_no_checkpoint": True, "resume_past_end": True, "transport": t}
        params = inspect.signature(finder).parameters
        kwargs = {k: v for k, v in wanted.items() if k in params}
        quiet = logging.getLogger("s3ckpt.distributed")
        level = quiet.level
        try:
            # Its warnings ("skipping an incomplete checkpoint", "training from scratch") are meant for a
            # training log; `ls` shows the same facts in its table.
            quiet.setLevel(logging.ERROR)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = finder(url, **kwargs)
            return str(getattr(result, "url", result)) if result else None
        except CheckpointNotFoundError:
            return None
        except S3CheckpointError:
            raise
        except Exception as exc:  # an interface in flux must not break `ls`: fall back to the same rules
            log.debug("%s failed (%s); using the local resume rules", getattr(finder, "__name__", finder), exc)
        finally:
            quiet.setLevel(level)
    entry = _local_resume_pick(entries)
    return entry.url if entry else None

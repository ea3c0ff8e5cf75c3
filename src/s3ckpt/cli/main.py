"""The ``s3ckpt`` command line: argument parsing, dispatch, logging and the exit-status contract.

Exit status: 0 success, 1 error (the reason on one ``s3ckpt: error:`` line of stderr), 2 usage error (bad
flags or a malformed ``s3://`` URL), 3 (``verify`` only) nothing to verify against: no checksum stored with the
object and no manifest, which is not a corruption, 130 interrupted. Tracebacks only with ``-v``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..errors import S3AccessDeniedError, S3CheckpointError
from .context import CommandError, Context, UsageError, parse_duration
from .output import PROG, Output, StderrHandler

__all__ = ["build_parser", "main"]

Command = Callable[[Context, argparse.Namespace], int]

# Commands whose arguments belong to another program (the server, the demo, the benchmarks): everything
# after the command name is handed over untouched.
_PASSTHROUGH = ("server", "demo", "bench")
_VALUE_OPTIONS = ("--endpoint-url", "--region", "--profile", "--max-attempts")
_DAY = timedelta(days=1)


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The flags every command takes, before or after the command name (``aws``-style).

    The copies on each subcommand default to SUPPRESS so that they never overwrite a value given before it.
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    g = parser.add_argument_group("global options")
    g.add_argument(
        "--endpoint-url", metavar="URL", default=default(None), help="S3 endpoint (default: AWS_ENDPOINT_URL)"
    )
    g.add_argument("--region", default=default(None), help="region (default: AWS_REGION / AWS_DEFAULT_REGION)")
    g.add_argument("--profile", default=default(None), help="named profile from ~/.aws/config (default: AWS_PROFILE)")
    g.add_argument(
        "--max-attempts",
        type=_positive,
        metavar="N",
        default=default(None),
        help="attempts per request before giving up (default: S3CKPT_MAX_ATTEMPTS or 10)",
    )
    g.add_argument(
        "--no-verify-ssl", action="store_true", default=default(False), help="do not verify TLS certificates (unsafe)"
    )
    g.add_argument("--json", action="store_true", default=default(False), help="print one JSON object per line")
    g.add_argument("-q", "--quiet", action="store_true", default=default(False), help="print only errors")
    g.add_argument("-v", "--verbose", action="count", default=default(0), help="more logging (-vv: debug)")


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _deleting(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted; change nothing")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def build_parser() -> argparse.ArgumentParser:
    """The full ``s3ckpt`` argument parser."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect, verify, copy and clean up PyTorch / Lightning checkpoints on S3.",
        epilog="Exit status: 0 ok, 1 error, 2 usage error, 3 unverifiable (verify). "
        "Credentials come from the standard AWS chain.",
    )
    _global_options(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help_text, description=help_text)

    p = add("ls", "list the checkpoints under a prefix (* marks what a resume would load)")
    p.add_argument("url", metavar="URL", help="s3://bucket/prefix")
    p.add_argument("--bytes", action="store_true", help="sizes in bytes instead of KiB/MiB/GiB")

    p = add("inspect", "show what a checkpoint holds (keys, tensors, dtypes, step) without downloading it")
    p.add_argument("url", metavar="URL", help="s3://bucket/key of a checkpoint, or a sharded checkpoint directory")

    p = add("verify", "check checkpoints against their recorded checksum (exit 1 on a mismatch, 3 if unverifiable)")
    p.add_argument("url", metavar="URL", help="a checkpoint, or a prefix: every checkpoint under it")

    p = add("cp", "copy checkpoints: S3 to local, local to S3, or S3 to S3")
    p.add_argument("src", metavar="SRC", help="s3://bucket/key or a local path")
    p.add_argument("dst", metavar="DST", help="s3://bucket/key or a local path (ending in / for a directory)")
    p.add_argument("-r", "--recursive", action="store_true", help="copy every object under a prefix / directory")
    p.add_argument("--dry-run", action="store_true", help="print what would be copied; copy nothing")
    p.add_argument("--no-verify", action="store_true", help="download without checking the recorded CRC32C")
    p.add_argument("--no-manifest", action="store_true", help="write no s3ckpt manifest next to uploaded objects")
    p.add_argument("--stream", action="store_true", help="S3 to S3 through this machine, never a server-side copy")

    p = add("rm", "delete one checkpoint (a file and its manifest, a model-parallel group, a sharded directory)")
    p.add_argument("url", metavar="URL", help="s3://bucket/key of the checkpoint")
    _deleting(p)

    p = add("prune", "keep the newest N committed checkpoints under a prefix, delete the others")
    p.add_argument("url", metavar="URL", help="s3://bucket/prefix")
    p.add_argument("--keep", type=_non_negative, required=True, metavar="N", help="committed checkpoints to keep")
    p.add_argument(
        "--include-uncommitted", action="store_true", help="also delete incomplete checkpoints older than --older-than"
    )
    p.add_argument(
        "--older-than", type=parse_duration, default=_DAY, metavar="AGE", help="for --include-uncommitted (default 24h)"
    )
    _deleting(p)

    p = add("gc", "abort stale multipart uploads and delete uncommitted leftovers older than an age")
    p.add_argument("url", metavar="URL", help="s3://bucket[/prefix]")
    p.add_argument(
        "--older-than", type=parse_duration, default=_DAY, metavar="AGE", help="e.g. 30m, 2h, 1d (default 24h)"
    )
    _deleting(p)

    for name, text in (
        ("server", "run the embedded local S3 server in the foreground (see `s3ckpt server --help`)"),
        ("demo", "save, kill, resume and inspect a training run against a local server"),
        ("bench", "run the benchmarks (from a source checkout)"),
    ):
        p = sub.add_parser(name, parents=[common], help=text, description=text, add_help=False)
    return parser


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """``(our part, their part)`` if the command is a passthrough one, else None."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            return None
        if token in _VALUE_OPTIONS:
            i += 2
        elif token.startswith("-"):
            i += 1
        else:
            return (argv[: i + 1], argv[i + 1 :]) if token in _PASSTHROUGH else None
    return None


def _run_passthrough(command: str, rest: list[str]) -> int:
    if command == "server":
        from ..server import main as server_main

        return int(server_main(rest) or 0)
    module = "s3ckpt.demo" if command == "demo" else "benchmarks.run"
    try:
        entry = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        repo_bench = Path.cwd() / "benchmarks" / "run.py"
        if command == "bench" and exc.name in ("benchmarks", module) and repo_bench.is_file():
            sys.path.insert(0, str(Path.cwd()))  # `s3ckpt bench` from a source checkout, as `make bench`
            entry = importlib.import_module(module)
        elif exc.name in (module, module.split(".")[0]):
            if command == "bench":
                raise CommandError(
                    f"`{PROG} bench` runs from a source checkout: cd to the repository root (its benchmarks/ "
                    "folder is not installed with the package)"
                ) from None
            raise CommandError(f"`{PROG} {command}` is not available: {module} is missing from this install") from None
        else:
            raise CommandError(f"`{PROG} {command}` cannot start: {exc} (install the missing package)") from None
    return int(entry.main(rest) or 0)


def _commands() -> dict[str, Command]:
    # Imported on use: the commands load torch (inspect, verify), which `--help`, usage errors and the
    # server passthrough never need.
    from .cleanup import cmd_gc, cmd_prune, cmd_rm
    from .cp_cmd import cmd_cp
    from .inspect_cmd import cmd_inspect
    from .listing import cmd_ls, cmd_verify

    return {
        "ls": cmd_ls,
        "inspect": cmd_inspect,
        "verify": cmd_verify,
        "cp": cmd_cp,
        "rm": cmd_rm,
        "prune": cmd_prune,
        "gc": cmd_gc,
    }


def _exit_code(exc: SystemExit) -> int:
    return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip()) or "unknown error"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``s3ckpt`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    split = _split_passthrough(args_list)
    parser = build_parser()
    try:
        args = parser.parse_args(split[0] if split else args_list)
    except SystemExit as exc:  # argparse: --help, --version, usage errors (already printed)
        return _exit_code(exc)
    out = Output(json=args.json, quiet=args.quiet, verbose=args.verbose)
    logger = logging.getLogger("s3ckpt")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    handler = StderrHandler()
    logger.handlers = [handler]
    logger.propagate = False  # the CLI owns stderr while it runs; restored below for embedding programs
    logger.setLevel(logging.ERROR if args.quiet else [logging.WARNING, logging.INFO][min(args.verbose, 1)])
    if args.verbose >= 2:
        logger.setLevel(logging.DEBUG)
    try:
        if split is not None:
            return _run_passthrough(args.command, split[1])
        return _commands()[args.command](Context(args, out), args)
    except SystemExit as exc:
        return _exit_code(exc)
    except UsageError as exc:
        out.error(_one_line(str(exc)))
        return 2
    except KeyboardInterrupt:
        out.error("interrupted")
        return 130
    except BrokenPipeError:  # `s3ckpt ls ... | head`: the reader left; not an error worth a message
        try:
            # Python flushes stdout again at exit; pointing it at /dev/null keeps that from failing too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except Exception as exc:
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        out.error(_describe(exc))
        return 1
    finally:
        logger.handlers = saved[2]
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _describe(exc: BaseException) -> str:
    """The error line: our own messages as they are, anything else with its type and a hint."""
    if isinstance(exc, CommandError):
        return _one_line(str(exc))
    if isinstance(exc, S3AccessDeniedError):
        return f"access denied: {_one_line(str(exc))}"
    if isinstance(exc, S3CheckpointError):
        return _one_line(str(exc))
    if isinstance(exc, OSError):
        return _one_line(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    return f"unexpected {type(exc).__name__}: {_one_line(str(exc))} (run with -v for the traceback)"

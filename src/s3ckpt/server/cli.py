"""The foreground server behind ``s3ckpt server`` and ``python -m s3ckpt.server``: start one, print the
``export`` lines that point AWS SDKs and the s3ckpt CLI at it, and stop it on Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType

from . import __doc__ as _PACKAGE_DOC  # its first line is the --help description
from .flags import ServerError
from .local import LocalS3Server


def main(argv: Sequence[str] | None = None) -> int:
    """Run a server in the foreground, print its ``export`` lines, stop on Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m s3ckpt.server", description=_PACKAGE_DOC.splitlines()[0])
    parser.add_argument("--port", type=int, help="S3 port (default: a free one)")
    parser.add_argument("--data-dir", help="keep data here (default: a temporary directory, removed on exit)")
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    args = parser.parse_args(argv)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then installs no handler.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    server = LocalS3Server(args.data_dir, port=args.port, host=args.host)
    try:
        with server:
            for bucket in args.bucket:
                server.create_bucket(bucket)
            # The secret goes to stdout only: the user asked for it, to paste into a shell.
            for key, value in server.env().items():
                print(f"export {key}={shlex.quote(value)}")
            print(f"# weed pid {server.pid}, log {server.log_path}; Ctrl-C to stop", file=sys.stderr)
            sys.stdout.flush()
            while server.running:
                time.sleep(0.5)
            print(f"weed exited unexpectedly:\n{server._log_tail()}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 0
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

"""An embedded local S3 server (SeaweedFS) for the demo, the tests and the benchmarks.

:class:`LocalS3Server` runs ``weed mini`` (master, volume server, filer and S3 gateway in one process) on
free loopback ports with its own data directory and credentials. ``weed mini`` rather than ``weed server``:
measured here it answers S3 in ~0.9 s instead of 2.3-3.3 s (no Raft bootstrap wait) and exits on SIGTERM in
1-3 s instead of ~30 s. Run ``python -m s3ckpt.server`` for a foreground server and its ``export`` lines.

SeaweedFS quirk worth knowing in tests: the first write into a new bucket takes ~0.2 s (the master sleeps
200 ms while it grows the bucket's first volume), later writes take milliseconds.

Modules: :mod:`.flags` (identities, weed settings, the error type), :mod:`.process` (finding weed, ports,
the child's death signal, cleanup after dead servers), :mod:`.local` (:class:`LocalS3Server`) and
:mod:`.cli` (the foreground server behind ``s3ckpt server``).
"""

from __future__ import annotations

from .cli import main
from .flags import DEFAULT_ACCESS_KEY, READ_ONLY_ACTIONS, Identity, ServerError, ServerFlags
from .local import LocalS3Server
from .process import find_weed

__all__ = [
    "DEFAULT_ACCESS_KEY",
    "READ_ONLY_ACTIONS",
    "Identity",
    "LocalS3Server",
    "ServerError",
    "ServerFlags",
    "find_weed",
    "main",
]

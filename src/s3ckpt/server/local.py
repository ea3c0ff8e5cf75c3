"""LocalS3Server: one ``weed mini`` on free loopback ports with its own data directory and credentials, from
start (write the identities, launch, wait for a signed ListBuckets) to stop (SIGTERM, then SIGKILL), plus the
boto3 clients and environment that point at it. Servers still running at interpreter exit are stopped."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import os
import random
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .flags import DEFAULT_ACCESS_KEY, Identity, ServerError, ServerFlags
from .process import (
    _GRPC_OFFSET,
    _LIBC,
    _TMP_PREFIX,
    _child_setup,
    _pick_ports,
    _remove_stale_sockets,
    _sweep_orphaned_dirs,
    _weed_env,
    find_weed,
    log_tail,
    stop_group,
    write_identities,
)

log = logging.getLogger(__name__)

_REGION = "us-east-1"
_START_ATTEMPTS = 3  # another process can take a port between our probe and weed's bind
_STOP_GRACE_S = 3.0
_PORT_CLASH = ("not available", "address already in use")


class LocalS3Server:
    """A SeaweedFS S3 server on free loopback ports, for the demo, tests and benchmarks.

    Use as a context manager or call :meth:`start` and :meth:`stop`. The weed process runs in its own
    process group, dies with the process (Linux) and is stopped at interpreter exit. :meth:`kill` crashes it
    (SIGKILL) and :meth:`restart` brings it back on the same ports with the same data, for fault tests; a
    restart takes about 1-2 s until S3 answers, and the first write succeeds within another second or two.

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
            write_identities(self.data_dir / "s3.json", self._identities)
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

    def kill(self) -> None:
        """Crash the server: SIGKILL weed's whole process group at once, with no shutdown of any kind.

        Unlike :meth:`stop`, the data directory and the ports are kept, so :meth:`restart` brings the same
        server back on the same endpoint (what a store that crashes and is restarted by its supervisor looks
        like to a client: connections refused for a while, then the same data). Idempotent.
        """
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None and proc.poll() is None:
                stop_group(proc, None)
                log.info("weed pid %d killed (SIGKILL)", proc.pid)

    def restart(
        self,
        *,
        crash: bool = True,
        extra_flags: Sequence[str] | None = None,
        identities: Sequence[Identity] | None = None,
    ) -> float:
        """Stop weed (SIGKILL if ``crash``, else SIGTERM as :meth:`stop`) and start it again on the same ports
        with the same data directory and identities; wait until S3 answers a signed ListBuckets.

        Args:
            crash: SIGKILL (default, a crash) rather than a graceful stop.
            extra_flags: replace the raw flags given at construction from now on (e.g. to restart with
                smaller volumes); ``None`` keeps them.
            identities: replace the identities besides the admin one (rotate a key: the new one valid, the
                old one gone); ``None`` keeps them.

        Returns:
            Seconds from the kill until S3 answered again. Writes may take a little longer: the master first
            has to hear from the volume server (see ``ServerFlags``).

        Raises:
            ServerError: never started, or weed did not come back within ``startup_timeout_s``.
        """
        if not self._ports:
            raise ServerError("server not started")
        ports = dict(self._ports)
        t0 = time.monotonic()
        if crash:
            self.kill()
        with self._lock:
            if not crash:
                self._kill(_STOP_GRACE_S)
            if extra_flags is not None:
                self._flags = dataclasses.replace(self._flags, extra=tuple(extra_flags))
            if identities is not None:
                self._identities = (self._identities[0], *identities)
            # A SIGKILLed weed leaves its unix sockets behind; the new one must be able to create them.
            _remove_stale_sockets(ports.values())
            (self.data_dir / "weed" / "mini.options").unlink(missing_ok=True)
            write_identities(self.data_dir / "s3.json", self._identities)
            try:
                if not self._launch(find_weed(), ports, time.monotonic() + self._timeout_s):
                    raise ServerError(f"weed could not bind its old ports again:\n{self._log_tail()}")
            except BaseException:
                self._stop_locked(_STOP_GRACE_S)
                raise
            _LIVE.add(self)
        elapsed = time.monotonic() - t0
        log.info("local S3 at %s restarted in %.2fs", self.endpoint_url, elapsed)
        return elapsed

    def _stop_locked(self, grace_s: float) -> None:
        _LIVE.discard(self)
        self._kill(grace_s)
        if self._given_dir is None and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _kill(self, grace_s: float) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            t0 = time.monotonic()
            stop_group(proc, grace_s)
            log.info("weed pid %d stopped in %.2fs", proc.pid, time.monotonic() - t0)
        _remove_stale_sockets(self._ports.values())
        self._ports = {}

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
        return log_tail(self.log_path, since, lines)

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
            secret_key = next((i.secret_key for i in self._identities if i.access_key == access_key), None)
        if secret_key is None:
            raise ValueError(f"no identity with access key {access_key!r}")
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

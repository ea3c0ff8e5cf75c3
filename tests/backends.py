"""The S3 implementations the test suite runs against, chosen with ``S3CKPT_TEST_BACKEND``:

* ``seaweedfs`` (default): the embedded SeaweedFS server (:class:`~s3ckpt.server.LocalS3Server`); every test.
* ``moto``: moto's standalone S3 server (``python -m moto.server``, a real HTTP server in its own process on
  127.0.0.1, in memory); the tests marked ``portable``.
* ``external``: an endpoint named by the standard AWS variables (``AWS_ENDPOINT_URL``, or none for AWS S3;
  ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``); the ``portable``
  tests, each in a bucket of its own (names start with ``S3CKPT_TEST_BUCKET_PREFIX``, set it to make them
  globally unique) that is emptied and deleted at the end of the session. ``S3CKPT_TEST_CAPABILITIES``
  (comma-separated) narrows what it is assumed to support (default: everything AWS S3 does), e.g. for MinIO.

A test that needs something a backend lacks is marked ``@pytest.mark.needs("capability", ...)``; on a
backend without it the test is deselected and the run prints which tests and why (never a silent skip).
A test that uses SeaweedFS-only parts of the ``s3_server`` fixture (identities, restart, pid, log) simply
lacks the ``portable`` marker and runs on SeaweedFS only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from s3ckpt.server.process import _LIBC, _child_setup

BACKEND_ENV = "S3CKPT_TEST_BACKEND"
BACKENDS = ("seaweedfs", "moto", "external")

# What an S3 implementation may or may not do, as far as s3ckpt's tests care; each one is probed with plain
# boto3 by tests/integration/test_backend_capabilities.py, which fails if a claim below is wrong.
CAPABILITIES: dict[str, str] = {
    "multipart": "multipart uploads (Create/UploadPart/Complete/Abort, ListMultipartUploads)",
    "conditional_writes": "If-None-Match: * on PutObject and CompleteMultipartUpload (412 when the key exists)",
    "if_match_reads": "If-Match on GetObject (412 once the object changed)",
    "full_object_crc32c": "a FULL_OBJECT CRC32C on multipart uploads, returned by HeadObject",
    "composite_checksums": "COMPOSITE part checksums on multipart uploads, returned by GetObjectAttributes",
    "object_attributes": "GetObjectAttributes with Checksum and ObjectParts",
    "server_side_copy": "CopyObject with x-amz-checksum-algorithm: CRC32C keeps the source's CRC32C on the copy",
    "checksum_validation": "the store rejects a body whose x-amz-checksum-* does not match (BadDigest)",
    "conditional_copy": "CopyObject and UploadPartCopy honour x-amz-copy-source-if-match (412 on a changed source)",
}
ALL_CAPABILITIES = frozenset(CAPABILITIES)

# SeaweedFS 4.48: GetObjectAttributes lists parts (sizes) but no part checksums, and no Checksum attribute.
SEAWEEDFS_CAPABILITIES = ALL_CAPABILITIES - {"composite_checksums"}

_REASONS = pytest.StashKey[dict[str, list[str]]]()


class TestS3(Protocol):
    """What the tests need from an S3 server; :class:`~s3ckpt.server.LocalS3Server` is one."""

    @property
    def endpoint_url(self) -> str: ...
    @property
    def region(self) -> str: ...
    @property
    def access_key(self) -> str: ...
    @property
    def secret_key(self) -> str: ...
    def create_bucket(self, name: str) -> str: ...
    def env(self) -> dict[str, str]: ...
    def client(self, *, config: Config | None = None) -> Any: ...


def selected_backend() -> str:
    """The backend named by ``S3CKPT_TEST_BACKEND`` (default ``seaweedfs``)."""
    name = os.environ.get(BACKEND_ENV, "seaweedfs").strip().lower() or "seaweedfs"
    if name not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def capabilities(backend: str) -> frozenset[str]:
    """What ``backend`` supports (see :data:`CAPABILITIES`)."""
    if backend == "moto":
        return MotoS3Server.CAPABILITIES
    if backend == "external":
        raw = os.environ.get("S3CKPT_TEST_CAPABILITIES")
        if raw is None:
            return ALL_CAPABILITIES
        caps = frozenset(c.strip() for c in raw.split(",") if c.strip())
        if unknown := caps - ALL_CAPABILITIES:
            raise ValueError(f"S3CKPT_TEST_CAPABILITIES: unknown {sorted(unknown)}; known: {sorted(CAPABILITIES)}")
        return caps
    return SEAWEEDFS_CAPABILITIES


def _client(
    endpoint_url: str | None,
    region: str,
    key: str | None,
    secret: str | None,
    token: str | None,
    config: Config | None = None,
) -> Any:
    base = Config(s3={"addressing_style": "path"} if endpoint_url else {})
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        aws_session_token=token,
        config=base.merge(config) if config is not None else base,
    )


def _create_bucket(client: Any, name: str, region: str) -> str:
    kwargs: dict[str, Any] = {"Bucket": name}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoS3Server:
    """moto's standalone server (``python -m moto.server``) in a child process on a free loopback port.

    A real HTTP server (werkzeug, threaded), so every request crosses a socket as with any S3 store. moto does
    not check signatures; any credentials work.
    """

    # Measured on moto 5.2.5: a composite checksum comes back without its "-<parts>" suffix and without part
    # checksums; GetObjectAttributes has no ObjectParts; a wrong x-amz-checksum-* is stored, not refused;
    # x-amz-copy-source-if-match is ignored.
    CAPABILITIES = frozenset(
        {"multipart", "conditional_writes", "if_match_reads", "full_object_crc32c", "server_side_copy"}
    )

    def __init__(self, log_path: Path, startup_timeout_s: float = 30.0) -> None:
        self._log_path = log_path
        self._timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._port = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def region(self) -> str:
        return "us-east-1"

    @property
    def access_key(self) -> str:
        return "s3ckpt-moto"

    @property
    def secret_key(self) -> str:
        return "s3ckpt-moto-secret"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    def start(self) -> MotoS3Server:
        deadline = time.monotonic() + self._timeout_s
        for _attempt in range(3):  # another process may take the port between the probe and moto's bind
            self._port = _free_port()
            with open(self._log_path, "ab") as out:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self._port)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: stop() signals moto and nothing else
                    # and it dies with pytest, even a SIGKILLed one (as the SeaweedFS server does)
                    preexec_fn=functools.partial(_child_setup, os.getpid()) if _LIBC is not None else None,
                )
            probe = _client(self.endpoint_url, self.region, self.access_key, self.secret_key, None)
            while self._proc.poll() is None and time.monotonic() < deadline:
                try:
                    probe.list_buckets()
                    return self
                except (BotoCoreError, ClientError):
                    time.sleep(0.1)
            self.stop()
            if time.monotonic() >= deadline:
                break
        raise RuntimeError(f"moto server did not start; see {self._log_path}:\n{self._log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def client(self, *, config: Config | None = None) -> Any:
        return _client(self.endpoint_url, self.region, self.access_key, self.secret_key, None, config)

    def create_bucket(self, name: str) -> str:
        return _create_bucket(self.client(), name, self.region)


class ExternalS3:
    """An endpoint someone else runs, named by the standard AWS variables (never logged)."""

    def __init__(self) -> None:
        session = boto3.session.Session()
        creds = session.get_credentials()
        if creds is None:
            raise RuntimeError(f"{BACKEND_ENV}=external needs credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
        frozen = creds.get_frozen_credentials()
        self._key, self._secret, self._token = frozen.access_key, frozen.secret_key, frozen.token
        self._endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        self._region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.created: list[str] = []

    @property
    def endpoint_url(self) -> str | None:  # type: ignore[override]
        return self._endpoint

    @property
    def region(self) -> str:
        return self._region

    @property
    def access_key(self) -> str:
        return str(self._key)

    @property
    def secret_key(self) -> str:
        return str(self._secret)

    @property
    def session_token(self) -> str | None:
        return self._token

    def env(self) -> dict[str, str]:
        env = {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        env |= {"AWS_REGION": self._region, "AWS_DEFAULT_REGION": self._region}
        if self._endpoint:
            env["AWS_ENDPOINT_URL"] = self._endpoint
        if self._token:
            env["AWS_SESSION_TOKEN"] = self._token
        return env

    def client(self, *, config: Config | None = None) -> Any:
        return _client(self._endpoint, self._region, self._key, self._secret, self._token, config)

    def create_bucket(self, name: str) -> str:
        _create_bucket(self.client(), name, self._region)
        self.created.append(name)
        return name

    def stop(self) -> None:
        """Empty and delete every bucket this session created (multipart uploads included)."""
        c = self.client()
        for name in self.created:
            with contextlib.suppress(ClientError):
                for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=name):
                    for u in page.get("Uploads", []):
                        c.abort_multipart_upload(Bucket=name, Key=u["Key"], UploadId=u["UploadId"])
                for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
                    objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                    if objs:
                        c.delete_objects(Bucket=name, Delete={"Objects": objs, "Quiet": True})
                c.delete_bucket(Bucket=name)


@contextlib.contextmanager
def running_backend(name: str, tmp: Path) -> Iterator[Any]:
    """Start the named non-SeaweedFS backend for the session and stop it afterwards."""
    server: MotoS3Server | ExternalS3
    if name == "moto":
        server = MotoS3Server(tmp / "moto.log").start()
    elif name == "external":
        server = ExternalS3()
    else:
        raise ValueError(name)
    try:
        yield server
    finally:
        server.stop()


def deselect_unsupported(config: Any, items: list[Any], backend: str) -> None:
    """Deselect what ``backend`` cannot run, and remember why for :func:`deselection_report`.

    * on moto/external: tests that use a server (the ``s3_server`` fixture, or a tier that starts its own
      SeaweedFS) but are not marked ``portable``;
    * on every backend: tests marked ``needs(capability, ...)`` with a capability the backend lacks.
    """
    caps = capabilities(backend)
    keep, dropped = [], []
    reasons: dict[str, list[str]] = {}
    for item in items:
        why = None
        if (
            backend != "seaweedfs"
            and _needs_a_server(item)
            and item.get_closest_marker("portable") is None
            and os.environ.get("S3CKPT_TEST_ALL") != "1"  # to explore a backend: try every test on it
        ):
            why = "SeaweedFS only (not marked portable)"
        for mark in item.iter_markers("needs"):
            if unknown := set(mark.args) - ALL_CAPABILITIES:
                raise ValueError(f"{item.nodeid}: unknown capability {sorted(unknown)}; known: {sorted(CAPABILITIES)}")
            if missing := sorted(set(mark.args) - caps):
                why = f"needs {', '.join(missing)}, which {backend} lacks"
        if why is None:
            keep.append(item)
        else:
            dropped.append(item)
            reasons.setdefault(why, []).append(item.nodeid)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    config.stash[_REASONS] = reasons


def _needs_a_server(item: Any) -> bool:
    tiers = ("integration", "reliability", "distributed")
    return "s3_server" in item.fixturenames or any(item.get_closest_marker(t) for t in tiers)


def deselection_report(config: Any) -> list[str]:
    """One line per reason: how many tests were deselected on this backend and why (names for capabilities)."""
    lines = []
    for why, ids in sorted(config.stash.get(_REASONS, {}).items()):
        names = "" if why.startswith("SeaweedFS only") else ": " + ", ".join(i.rsplit("::", 1)[-1] for i in ids)
        lines.append(f"deselected {len(ids)} on {selected_backend()}, {why}{names}")
    return lines

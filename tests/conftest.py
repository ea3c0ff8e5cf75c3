"""Shared fixtures: one real S3 server per test session, a fresh bucket per test.

The server is started here, never assumed: a test that needs S3 gets it from these fixtures. Which server
(SeaweedFS by default, moto, or an external endpoint) is chosen by ``S3CKPT_TEST_BACKEND``; tests/backends.py
has the plumbing and the capability rules.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from importlib import metadata

import pytest
from packaging.version import Version

from s3ckpt.config import ClientConfig, RetryConfig, TransferConfig
from s3ckpt.server import READ_ONLY_ACTIONS, Identity, LocalS3Server
from s3ckpt.transport import S3Transport
from tests import backends

_counter = itertools.count()

# A second identity on the shared server that may read and list but not write (access-denied tests).
READER = Identity(
    name="reader", access_key="s3ckpt-reader", secret_key=f"reader-{uuid.uuid4().hex}", actions=READ_ONLY_ACTIONS
)


# What the session runs on and which versions it really imported (the min-versions job relies on this).
_VERSIONS = ("boto3", "botocore", "s3transfer", "crc32c", "torch", "lightning", "moto")
BACKEND = backends.selected_backend()


def _lightning_before_2_6() -> bool:
    try:
        return Version(metadata.version("lightning")) < Version("2.6")
    except metadata.PackageNotFoundError:
        return False


# Lightning < 2.6 also saves last.ckpt at the end of every training epoch, even at a step where no top-k
# checkpoint was saved (2.6 saves last only together with one). Tests that count saves add this (0 or 1) for
# each epoch end that falls between two checkpoint steps.
EPOCH_END_LAST_SAVES = int(_lightning_before_2_6())


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"s3ckpt test backend: {BACKEND}", "versions: " + ", ".join(_installed())]


def _installed() -> list[str]:
    out = []
    for name in _VERSIONS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return out


def pytest_configure(config: pytest.Config) -> None:
    """``S3CKPT_EXPECT_VERSIONS="boto3==X lightning==Y"``: refuse to run unless exactly those are imported."""
    want = os.environ.get("S3CKPT_EXPECT_VERSIONS", "").split()
    got = dict(v.split("==") for v in _installed())
    wrong = [w for w in want if got.get(w.split("==")[0]) != w.split("==")[1]]
    if wrong:
        raise pytest.UsageError(f"S3CKPT_EXPECT_VERSIONS: wanted {wrong}, imported {sorted(got.items())}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    backends.deselect_unsupported(config, items, BACKEND)


def pytest_report_collectionfinish(config: pytest.Config) -> list[str]:
    return backends.deselection_report(config)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3Server]:
    """The session's S3 server: the embedded SeaweedFS, or the backend ``S3CKPT_TEST_BACKEND`` names (any of
    them offers what :class:`tests.backends.TestS3` lists)."""
    if BACKEND != "seaweedfs":
        with backends.running_backend(BACKEND, tmp_path_factory.mktemp(BACKEND)) as other:
            yield other
        return
    server = LocalS3Server(data_dir=tmp_path_factory.mktemp("seaweedfs"), identities=(READER,))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def new_bucket_name(prefix: str = "t") -> str:
    """A fresh bucket name; ``S3CKPT_TEST_BUCKET_PREFIX`` is put in front (global uniqueness on AWS)."""
    front = os.environ.get("S3CKPT_TEST_BUCKET_PREFIX", "")
    return f"{front}{prefix}-{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def bucket(s3_server: LocalS3Server) -> str:
    """A new, empty bucket on the shared server."""
    return s3_server.create_bucket(new_bucket_name())


def client_config_for(server: LocalS3Server, **overrides: object) -> ClientConfig:
    """Client settings for the server's admin identity; ``overrides`` replace any field."""
    fields: dict[str, object] = {
        "endpoint_url": server.endpoint_url,
        "region": server.region,
        "access_key_id": server.access_key,
        "secret_access_key": server.secret_key,
        "session_token": getattr(server, "session_token", None),
    }
    return ClientConfig(**{**fields, **overrides})  # type: ignore[arg-type]


def reader_client_config(server: LocalS3Server, **overrides: object) -> ClientConfig:
    """Client settings of the read-only identity."""
    return client_config_for(server, access_key_id=READER.access_key, secret_access_key=READER.secret_key, **overrides)


@pytest.fixture
def transport(s3_server: LocalS3Server) -> S3Transport:
    """A transport to the shared server with small parts (5 MiB) so multipart paths run on small data."""
    return S3Transport.create(
        client=client_config_for(s3_server),
        retry=RetryConfig(max_attempts=5, base_delay_s=0.05, max_delay_s=0.5, deadline_s=30),
        transfer=TransferConfig(chunk_size_MB=5, max_write_concurrency=4, max_read_concurrency=4, read_chunk_size_MB=5),
    )


@pytest.fixture
def s3_env(s3_server: LocalS3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point the standard AWS environment variables at the shared server for this test."""
    env = s3_server.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import s3ckpt.checkpoint as ck

    monkeypatch.setattr(ck, "_default_transport", None)
    return env

"""Shared fixtures: one real SeaweedFS server per test session, a fresh bucket per test.

The server is started here, never assumed: a test that needs S3 gets it from these fixtures.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator

import pytest

from s3ckpt.config import ClientConfig, RetryConfig, TransferConfig
from s3ckpt.server import READ_ONLY_ACTIONS, Identity, LocalS3Server
from s3ckpt.transport import S3Transport

_counter = itertools.count()

# A second identity on the shared server that may read and list but not write (access-denied tests).
READER = Identity(
    name="reader", access_key="s3ckpt-reader", secret_key=f"reader-{uuid.uuid4().hex}", actions=READ_ONLY_ACTIONS
)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3Server]:
    """The embedded SeaweedFS server, shared by the whole session."""
    server = LocalS3Server(data_dir=tmp_path_factory.mktemp("seaweedfs"), identities=(READER,))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def new_bucket_name(prefix: str = "t") -> str:
    return f"{prefix}-{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def bucket(s3_server: LocalS3Server) -> str:
    """A new, empty bucket on the shared server."""
    name = new_bucket_name()
    s3_server.create_bucket(name)
    return name


def client_config_for(server: LocalS3Server, **overrides: object) -> ClientConfig:
    """Client settings for the server's admin identity; ``overrides`` replace any field."""
    fields: dict[str, object] = {
        "endpoint_url": server.endpoint_url,
        "region": server.region,
        "access_key_id": server.access_key,
        "secret_access_key": server.secret_key,
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

"""Pytest fixtures for fault injection: a :class:`FaultProxy` in front of the session's real SeaweedFS server,
and transports that talk to S3 through it.

Import them into a ``conftest.py`` (``from tests.faults.fixtures import *``) to use them in a directory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from s3ckpt.config import ClientConfig, RetryConfig, TransferConfig
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport

from .proxy import FaultProxy

__all__ = [
    "FAST_RETRY",
    "SMALL_PARTS",
    "fault_proxy",
    "faulty_transport",
    "make_faulty_transport",
    "transport_via",
]

FAST_RETRY = RetryConfig(max_attempts=10, base_delay_s=0.02, max_delay_s=0.5, deadline_s=30)
"""Retries fast enough for tests: 10 attempts, 20 ms backoff scale, 0.5 s cap, 30 s deadline."""

SMALL_PARTS = TransferConfig(chunk_size_MB=5, max_write_concurrency=4, max_read_concurrency=4, read_chunk_size_MB=5)
"""5 MiB parts and ranges, 4 in flight: multipart paths run on a few MiB of data."""

# Fixed, so a failing run can be replayed with the same probabilistic faults (thread scheduling aside).
PROXY_SEED = 20_240_601


def transport_via(
    proxy: FaultProxy,
    server: LocalS3Server,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    retry: RetryConfig = FAST_RETRY,
    transfer: TransferConfig = SMALL_PARTS,
    **client_overrides: Any,
) -> S3Transport:
    """An S3Transport whose endpoint is ``proxy`` (it signs for the proxy's host:port) with ``server``'s
    credentials, or the given ones."""
    client = ClientConfig(
        endpoint_url=proxy.url,
        region=server.region,
        access_key_id=access_key or server.access_key,
        secret_access_key=secret_key or server.secret_key,
        **client_overrides,
    )
    return S3Transport.create(client=client, retry=retry, transfer=transfer)


@pytest.fixture
def fault_proxy(s3_server: LocalS3Server) -> Iterator[FaultProxy]:
    """A fresh fault-injecting proxy in front of the session's SeaweedFS, stopped (threads joined) after the
    test."""
    proxy = FaultProxy(s3_server.endpoint_url, seed=PROXY_SEED).start()
    try:
        yield proxy
    finally:
        proxy.stop()
        leftover = [t.name for t in threading.enumerate() if t.name.startswith("fault-proxy")]
        assert not leftover, f"fault proxy threads still running after stop(): {leftover}"
        assert not proxy.errors, f"the fault proxy itself failed: {proxy.errors!r}"


@pytest.fixture
def make_faulty_transport(fault_proxy: FaultProxy, s3_server: LocalS3Server) -> Callable[..., S3Transport]:
    """Build transports through the test's proxy: ``make_faulty_transport(retry=RetryConfig(...))``."""

    def make(**kwargs: Any) -> S3Transport:
        return transport_via(fault_proxy, s3_server, **kwargs)

    return make


@pytest.fixture
def faulty_transport(make_faulty_transport: Callable[..., S3Transport]) -> S3Transport:
    """A transport through :func:`fault_proxy` with fast retries (:data:`FAST_RETRY`) and 5 MiB parts."""
    return make_faulty_transport()

"""The handle every transfer function takes: a client factory, a retry policy and the transfer knobs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..config import ClientConfig, RetryConfig, TransferConfig
from .client import ClientFactory
from .retry import Retrier

__all__ = ["S3Transport"]

T = TypeVar("T")


@dataclass
class S3Transport:
    """Bytes to and from S3: the one object the upper layers hold.

    It builds no client until the first request, so constructing it is free and it pickles cleanly
    (the client is rebuilt in each process).

    Attributes:
        clients: builds the per-process botocore client.
        retrier: the retry policy and its counters.
        transfer: part sizes and concurrency.
    """

    clients: ClientFactory
    retrier: Retrier
    transfer: TransferConfig = field(default_factory=TransferConfig)

    @classmethod
    def create(
        cls,
        client: ClientConfig | None = None,
        retry: RetryConfig | None = None,
        transfer: TransferConfig | None = None,
    ) -> S3Transport:
        """Build a transport; unset configs come from the environment (see each config's ``from_env``)."""
        transfer = transfer if transfer is not None else TransferConfig.from_env()
        pool = max(transfer.max_read_concurrency, transfer.max_write_concurrency) + 4
        clients = ClientFactory(client, max_pool_connections=pool)
        retrier = Retrier(retry, endpoint=clients.endpoint_description)
        return cls(clients=clients, retrier=retrier, transfer=transfer)

    def with_transfer(self, transfer: TransferConfig) -> S3Transport:
        """The same client and retry policy with other transfer knobs."""
        return S3Transport(clients=self.clients, retrier=self.retrier, transfer=transfer)

    def call(
        self,
        op: str,
        bucket: str,
        key: str | None,
        fn: Callable[[Any], T],
        *,
        deadline_s: float | None = None,
        on_retry: Callable[[BaseException], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> T:
        """Run ``fn(client)`` under the retry policy; errors come out translated (see ``retry.py``).

        A refusal that fresh credentials may cure (expired or rotated keys) rebuilds this process's client,
        which resolves the credential chain again, and retries once.
        """
        used: list[Any] = []

        def attempt() -> T:
            client = self.clients.get()
            used.append(client)
            return fn(client)

        return self.retrier.call(
            attempt,
            op=op,
            bucket=bucket,
            key=key,
            deadline_s=deadline_s,
            on_retry=on_retry,
            cancelled=cancelled,
            refresh_credentials=lambda: self.clients.refresh(used[-1]),
        )

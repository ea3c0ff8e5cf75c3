"""S3 client construction: one botocore client per process, built from :class:`ClientConfig`.

boto3 already implements the AWS credential chain (environment, profile, SSO, container and instance roles)
and refreshes temporary credentials on its own, so we never re-implement it: we only add what boto3 does
not do (``AWS_REGION``, a default region for custom endpoints, path-style addressing, our retry layer).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any

import boto3
import botocore.config

from ..config import ClientConfig
from . import redact

__all__ = ["ClientFactory"]

log = logging.getLogger(__name__)

# Connections kept per client: enough for the largest concurrency knob plus a few metadata calls.
_MIN_POOL = 10


class ClientFactory:
    """Builds and caches a botocore S3 client for the current process.

    A botocore client is thread-safe, but its connection pool must not cross ``fork``: a child that reused
    the parent's sockets would interleave bytes on them. The cache is therefore keyed by process id, and
    a forked child builds its own client on first use.

    The factory pickles without its client (only the config travels), so it can be sent to worker
    processes.
    """

    def __init__(self, config: ClientConfig | None = None, *, max_pool_connections: int = _MIN_POOL) -> None:
        self.config = config if config is not None else ClientConfig.from_env()
        self.max_pool_connections = max(_MIN_POOL, max_pool_connections)
        self._lock = threading.Lock()
        self._client: Any = None
        self._pid: int | None = None
        self._unchecksummed: ClientFactory | None = None

    def without_request_checksums(self) -> ClientFactory:
        """These settings with no request checksums at all (botocore adds none, not even its default CRC32),
        for uploads whose integrity the caller carries itself; made once, so its client is reused."""
        if self.config.checksum_algorithm == "none":
            return self
        with self._lock:
            if self._unchecksummed is None:
                config = dataclasses.replace(self.config, checksum_algorithm="none")
                self._unchecksummed = ClientFactory(config, max_pool_connections=self.max_pool_connections)
            return self._unchecksummed

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "max_pool_connections": self.max_pool_connections}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"], max_pool_connections=state["max_pool_connections"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"ClientFactory({self.config!r})"

    @property
    def endpoint_description(self) -> str:
        """Where requests go, for error messages (never includes credentials)."""
        return self.config.endpoint_url or f"AWS S3 ({self.region or 'default region'})"

    @property
    def region(self) -> str | None:
        cfg = self.config
        if cfg.region:
            return cfg.region
        # A custom endpoint (SeaweedFS, MinIO) ignores the region, but SigV4 still needs one.
        return "us-east-1" if cfg.endpoint_url else None

    def get(self) -> Any:
        """Return this process's client, building it on first use (and again after a fork)."""
        pid = os.getpid()
        client = self._client
        if client is not None and self._pid == pid:
            return client
        with self._lock:
            if self._client is None or self._pid != pid:
                self._client = self._build()
                self._pid = pid
            return self._client

    def refresh(self, stale: Any) -> bool:
        """Forget ``stale`` (a client whose credentials were refused) so the next :meth:`get` builds a new
        one, resolving the credential chain again (environment, profile, ``credential_process``, role).

        Only if ``stale`` is still the current client: when many threads meet the same refusal, the first
        one rebuilds and the others use its client. Requests in flight on the old client finish on it.

        Returns:
            False when the keys are given explicitly in :class:`ClientConfig`: a new client would sign with
            the same ones, so a retry cannot help.
        """
        if self.config.access_key_id is not None:
            return False
        with self._lock:
            if self._client is stale and self._pid == os.getpid():
                self._client = None
                log.info("S3 credentials were refused; rebuilding the client to pick up fresh ones")
        return True

    def _build(self) -> Any:
        cfg = self.config
        session = boto3.session.Session(
            profile_name=cfg.profile,
            aws_access_key_id=cfg.access_key_id,
            aws_secret_access_key=cfg.secret_access_key,
            aws_session_token=cfg.session_token,
        )
        s3_options: dict[str, Any] = {
            "addressing_style": "path"
            if (cfg.addressing_style == "auto" and cfg.endpoint_url)
            else cfg.addressing_style,
        }
        if not cfg.sign_payload:
            # Without this botocore SHA-256-hashes every body sent over plain http (about 0.7 CPU-s per GiB);
            # body integrity is carried by the CRC32C checksums instead.
            s3_options["payload_signing_enabled"] = False
        checksum_mode = "when_supported" if cfg.checksum_algorithm != "none" else "when_required"
        bc_config = botocore.config.Config(
            region_name=self.region,
            s3=s3_options,
            # Our own retry layer (transport.retry) handles every retry, with a deadline and per-part buffers;
            # botocore's would multiply attempts and hide the request rate.
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=self.max_pool_connections,
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.read_timeout_s,
            tcp_keepalive=True,
            request_checksum_calculation=checksum_mode,
            # We verify our own full-object CRC32C after download; botocore's per-response validation would
            # hash every byte a second time.
            response_checksum_validation="when_required",
            user_agent_extra="s3ckpt",
        )
        verify: bool | str | None = cfg.verify
        if verify is False:
            log.warning(
                "TLS certificate verification is OFF for %s (ClientConfig.verify=False); "
                "use it only for a trusted test endpoint",
                cfg.endpoint_url or "AWS S3",
            )
        redact.register_secret(cfg.secret_access_key)
        redact.register_secret(cfg.session_token)
        creds = session.get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            redact.register_secret(frozen.secret_key)
            redact.register_secret(frozen.token)
        client = session.client(
            "s3",
            endpoint_url=cfg.endpoint_url,
            config=bc_config,
            verify=verify,
        )
        redact.install()
        log.debug(
            "built S3 client: endpoint=%s region=%s addressing=%s pid=%d",
            cfg.endpoint_url or "aws",
            self.region,
            s3_options["addressing_style"],
            os.getpid(),
        )
        return client

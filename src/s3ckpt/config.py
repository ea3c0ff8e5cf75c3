"""Frozen configuration dataclasses: transfer knobs, retry policy and S3 client settings.

Every field documents its unit, its limits and the environment variable that sets it when the caller does
not (``Config.from_env()``; an explicit argument always wins). Values are validated in ``__post_init__``
with messages that name the field, the bad value and the allowed range.

Memory of a transfer (the formula the knobs control):

* upload (save):  about ``(max_write_concurrency + 1) * chunk_size`` bytes in flight, whatever the object
  size: up to ``max_write_concurrency`` parts being sent plus the one being filled.
* download (load): one buffer the size of the object (an anonymous in-memory file that ``torch.load`` maps,
  so the loaded tensors share its pages instead of copying them); ranged GETs are written straight into it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .errors import ConfigError

__all__ = [
    "DEFAULT_CHUNK_SIZE_MB",
    "DEFAULT_MAX_READ_CONCURRENCY",
    "DEFAULT_MAX_WRITE_CONCURRENCY",
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MIN_PART_SIZE",
    "NEMO_CHUNK_SIZE_MB",
    "NEMO_MAX_READ_CONCURRENCY",
    "NEMO_MAX_WRITE_CONCURRENCY",
    "ClientConfig",
    "MiB",
    "RetryConfig",
    "TransferConfig",
    "adjust_part_size",
    "given_knobs",
]

MiB = 1024 * 1024
# S3 multipart limits: parts of 5 MiB to 5 GiB (the last may be smaller), at most 10,000 of them.
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_PARTS = 10_000

# Chosen by measurement (`make bench ARGS=--sweep`, tables in the README's "Benchmarks" section): on a
# 2-core host sharing its CPU with the store, 16 MiB parts x 4 writers saved fastest at 512 MiB and 1 GiB
# once the zip CRC-32s were computed on the copy (sweep-crcfill*.json), with the least client CPU (1.04 and
# 0.96 CPU-s/GB against 1.19 and 1.09 for 8 MiB x 8, the previous default); 64 MiB parts x 10 (NeMo's
# defaults) took 1.2-1.3x as long with (10+1) x 64 MiB of part buffers instead of 5 x 16 MiB. 16 MiB
# ranges x 8 readers was within 5 % of the fastest load at every size in every sweep; 15 readers were never
# faster. A remote store, where one connection carries less, may want more writers (and readers).
# NeMo's knobs still work verbatim when given (S3CheckpointIO(dirpath, chunk_size_MB=64, ...)); only the
# defaults differ from NeMo's, which are kept below for reference and for the request-budget docs.
DEFAULT_CHUNK_SIZE_MB = 16
DEFAULT_MAX_READ_CONCURRENCY = 8
DEFAULT_MAX_WRITE_CONCURRENCY = 4
# Ranged GETs of 8-16 MiB are fastest (AWS guidance; measured here: 64 MiB ranges halve GET speed).
DEFAULT_READ_CHUNK_SIZE_MB = 16
NEMO_CHUNK_SIZE_MB = 64
NEMO_MAX_READ_CONCURRENCY = 15
NEMO_MAX_WRITE_CONCURRENCY = 10

T = TypeVar("T")


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def _check_range(owner: str, name: str, value: float, lo: float, hi: float | None, unit: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{owner}.{name} must be a number, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        upper = f" and at most {hi}{unit}" if hi is not None else ""
        raise ConfigError(f"{owner}.{name}={value!r} is out of range: it must be at least {lo}{unit}{upper}")


def _coerce(raw: str, kind: Any, env_name: str) -> Any:
    try:
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        if kind in (bool, "bool"):
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError as exc:
        raise ConfigError(f"environment variable {env_name}={raw!r} is not a valid {kind}") from exc
    return raw


def _from_env(cls: type[T], overrides: Mapping[str, Any]) -> T:
    """Build ``cls`` from explicit ``overrides`` first, then each field's environment variable."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(overrides) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in overrides:
            kwargs[f.name] = overrides[f.name]
            continue
        env_name = f.metadata.get("env")
        raw = _env(env_name) if env_name else None
        if raw is not None and env_name is not None:
            kwargs[f.name] = _coerce(raw, f.metadata.get("type", str), env_name)
    return cls(**kwargs)


@dataclass(frozen=True)
class TransferConfig:
    """How bytes move: part sizes and how many requests run at once.

    Memory: a save holds about ``(max_write_concurrency + 1) * chunk_size_MB`` MiB of part buffers;
    a load holds one buffer the size of the checkpoint (see the module docstring).

    Request budget: S3 serves at least 3,500 writes and 5,500 reads per second per key prefix. With
    tensor-parallel size ``tp`` and pipeline-parallel size ``pp`` writing under one prefix, a save sends
    about ``max_write_concurrency x max(1, 100 / chunk_size_MB) x tp x pp x 1.15`` requests per second (a
    load alike with the read knobs); :func:`s3ckpt.budget.check_request_budget` checks it, with NeMo's rule
    ``concurrency * tp * pp * 1.15`` as its floor.
    """

    chunk_size_MB: int = field(default=DEFAULT_CHUNK_SIZE_MB, metadata={"env": "S3CKPT_CHUNK_SIZE_MB", "type": int})
    """Multipart part size in MiB, 5 to 5120 (S3's limits). Raised automatically for objects that would
    need more than 10,000 parts. Env ``S3CKPT_CHUNK_SIZE_MB``; default 16 (NeMo's is 64). Measured
    (512 MiB and 1 GiB, SeaweedFS on the same 2 cores): 16 MiB parts saved fastest with the least client
    CPU (8 MiB parts within 5 %); 64 MiB parts took 1.2-1.3x as long and hold (concurrency+1) x 64 MiB of
    buffers. Smaller parts mean more requests per second per prefix
    (:func:`s3ckpt.budget.check_request_budget` models it): for jobs with more than about 120 ranks
    writing under one prefix at the defaults, raise it (the budget warning says to what)."""

    max_write_concurrency: int = field(
        default=DEFAULT_MAX_WRITE_CONCURRENCY, metadata={"env": "S3CKPT_MAX_WRITE_CONCURRENCY", "type": int}
    )
    """Upload parts in flight at once, 1 to 1000. Env ``S3CKPT_MAX_WRITE_CONCURRENCY``; default 4 (NeMo's
    is 10). Measured with 16 MiB parts next to a local store: 4 writers faster than 8 at 512 MiB and 1 GiB,
    with less client CPU and half the part buffers. Against a remote store, where one connection carries
    less, raise it (8-16)."""

    max_read_concurrency: int = field(
        default=DEFAULT_MAX_READ_CONCURRENCY, metadata={"env": "S3CKPT_MAX_READ_CONCURRENCY", "type": int}
    )
    """Ranged GETs in flight at once, 1 to 1000. Env ``S3CKPT_MAX_READ_CONCURRENCY``; default 8 (NeMo's is
    15). Measured: 8 readers of 16 MiB ranges were within 5 % of the fastest load at every size, 15 never
    faster; more readers pay off only where one connection is slow (remote S3), so raise it there."""

    read_chunk_size_MB: int = field(
        default=DEFAULT_READ_CHUNK_SIZE_MB, metadata={"env": "S3CKPT_READ_CHUNK_SIZE_MB", "type": int}
    )
    """Size of each ranged GET in MiB, 1 to 5120. Env ``S3CKPT_READ_CHUNK_SIZE_MB``; default 16 (8-16 MiB
    ranges are S3's guidance and were fastest here; 64 MiB ranges halved GET throughput)."""

    def __post_init__(self) -> None:
        owner = "TransferConfig"
        _check_range(owner, "chunk_size_MB", self.chunk_size_MB, 5, 5120, " MiB")
        _check_range(owner, "max_write_concurrency", self.max_write_concurrency, 1, 1000)
        _check_range(owner, "max_read_concurrency", self.max_read_concurrency, 1, 1000)
        _check_range(owner, "read_chunk_size_MB", self.read_chunk_size_MB, 1, 5120, " MiB")
        for name in ("chunk_size_MB", "max_write_concurrency", "max_read_concurrency", "read_chunk_size_MB"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"{owner}.{name} must be a whole number, got {getattr(self, name)!r}")

    @property
    def part_size(self) -> int:
        """The configured part size in bytes."""
        return self.chunk_size_MB * MiB

    @property
    def read_chunk_size(self) -> int:
        """The ranged-GET size in bytes."""
        return self.read_chunk_size_MB * MiB

    @property
    def upload_memory_bytes(self) -> int:
        """Upper bound of the part buffers a streaming upload holds at once."""
        return (self.max_write_concurrency + 1) * self.part_size

    @classmethod
    def from_env(cls, **overrides: Any) -> TransferConfig:
        """Explicit ``overrides`` first, then ``S3CKPT_*`` environment variables, then defaults."""
        return _from_env(cls, overrides)


@dataclass(frozen=True)
class RetryConfig:
    """Retry policy applied to every S3 operation (list and delete included).

    Retried: throttling (503 SlowDown and any other 503), 500/502/504, RequestTimeout, connection resets
    and timeouts. Not retried (they fail at once): AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch,
    NoSuchBucket, NoSuchKey and other 4xx. Delay before attempt ``n`` is a random value in
    ``[0, min(max_delay_s, base_delay_s * 2**n)]`` (full jitter), and no attempt starts after
    ``deadline_s`` seconds from the first one.

    A store that is down (connection refused, connect timeout: the request never reached it) is retried
    until ``deadline_s`` whatever ``max_attempts`` says, once this transport has reached the store at
    least once, with the backoff capped at ``min(max_delay_s, 2 s)`` so work resumes within about 2 s of
    the store coming back (a crashed server restarting, a failover). Before the first answer the attempt
    count applies as usual, so a wrong endpoint fails fast.
    """

    max_attempts: int = field(default=10, metadata={"env": "S3CKPT_MAX_ATTEMPTS", "type": int})
    """Attempts per request, first one included, 1 to 100. Env ``S3CKPT_MAX_ATTEMPTS``; default 10."""

    base_delay_s: float = field(default=0.2, metadata={"env": "S3CKPT_RETRY_BASE_DELAY_S", "type": float})
    """Backoff scale in seconds, 0 to 60. Env ``S3CKPT_RETRY_BASE_DELAY_S``; default 0.2."""

    max_delay_s: float = field(default=20.0, metadata={"env": "S3CKPT_RETRY_MAX_DELAY_S", "type": float})
    """Longest single backoff in seconds, 0 to 600. Env ``S3CKPT_RETRY_MAX_DELAY_S``; default 20."""

    deadline_s: float = field(default=300.0, metadata={"env": "S3CKPT_RETRY_DEADLINE_S", "type": float})
    """Total seconds one request may spend retrying before the error is raised, 0.1 to 86400: a bound on
    how long a failing store can stall the job. Env ``S3CKPT_RETRY_DEADLINE_S``; default 300."""

    def __post_init__(self) -> None:
        owner = "RetryConfig"
        _check_range(owner, "max_attempts", self.max_attempts, 1, 100)
        _check_range(owner, "base_delay_s", self.base_delay_s, 0, 60, " s")
        _check_range(owner, "max_delay_s", self.max_delay_s, 0, 600, " s")
        _check_range(owner, "deadline_s", self.deadline_s, 0.1, 86400, " s")

    @classmethod
    def from_env(cls, **overrides: Any) -> RetryConfig:
        """Explicit ``overrides`` first, then ``S3CKPT_*`` environment variables, then defaults."""
        return _from_env(cls, overrides)


ChecksumAlgorithm = Literal["CRC32C", "none"]
AddressingStyle = Literal["auto", "path", "virtual"]


@dataclass(frozen=True)
class ClientConfig:
    """How to reach the store. Unset fields fall back to the standard AWS chain, which boto3 reads itself:
    ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
    ``~/.aws/config``, instance and container roles (refreshed automatically on long jobs).

    Credentials given here are kept out of ``repr()`` and never logged.
    """

    endpoint_url: str | None = field(default=None, metadata={"env": "AWS_ENDPOINT_URL_S3"})
    """Custom endpoint, e.g. ``http://127.0.0.1:8333``. Env ``AWS_ENDPOINT_URL_S3``, then
    ``AWS_ENDPOINT_URL``; unset means AWS S3. A custom endpoint implies path-style addressing."""

    region: str | None = field(default=None, metadata={"env": "AWS_REGION"})
    """Region name. Env ``AWS_REGION``, then ``AWS_DEFAULT_REGION`` (boto3 alone reads only the latter);
    default ``us-east-1`` when a custom endpoint is set and nothing else is."""

    profile: str | None = field(default=None, metadata={"env": "AWS_PROFILE"})
    """Named profile from ``~/.aws/config``. Env ``AWS_PROFILE``."""

    access_key_id: str | None = field(default=None, repr=False)
    """Explicit access key; prefer the environment or a profile."""

    secret_access_key: str | None = field(default=None, repr=False)
    """Explicit secret key; never logged or shown in ``repr()``."""

    session_token: str | None = field(default=None, repr=False)
    """Explicit session token for temporary credentials."""

    addressing_style: AddressingStyle = field(default="auto", metadata={"env": "S3CKPT_ADDRESSING_STYLE"})
    """``auto``, ``path`` or ``virtual``. ``auto`` means path-style for custom endpoints (botocore's rule).
    Env ``S3CKPT_ADDRESSING_STYLE``."""

    verify: bool | str | None = None
    """TLS verification: ``None``/``True`` verify (CA bundle from ``AWS_CA_BUNDLE`` if set), a path to a CA
    bundle, or ``False`` to turn verification off (logged as a warning)."""

    checksum_algorithm: ChecksumAlgorithm = field(default="CRC32C", metadata={"env": "S3CKPT_CHECKSUM"})
    """Wire and stored checksum: ``CRC32C`` sends a CRC32C per part and asks the store to keep the
    full-object CRC32C with the object (AWS S3, SeaweedFS >= 4.37). ``none`` for stores that reject
    additional checksums; the checkpoint digest is then kept only in s3ckpt's manifest.
    Env ``S3CKPT_CHECKSUM``."""

    sign_payload: bool = field(default=False, metadata={"env": "S3CKPT_SIGN_PAYLOAD", "type": bool})
    """SigV4-sign request bodies with SHA-256 even over plain http. Off by default: integrity comes from
    the CRC32C checksums, and SHA-256 over every byte costs about 0.7 CPU-s per GiB, which on a shared host
    is taken from the store. Over https botocore never signs S3 payloads. Env ``S3CKPT_SIGN_PAYLOAD``."""

    connect_timeout_s: float = field(default=10.0, metadata={"env": "S3CKPT_CONNECT_TIMEOUT_S", "type": float})
    """TCP connect timeout in seconds, 0.1 to 600. Env ``S3CKPT_CONNECT_TIMEOUT_S``; default 10."""

    read_timeout_s: float = field(default=60.0, metadata={"env": "S3CKPT_READ_TIMEOUT_S", "type": float})
    """Socket read timeout in seconds, 0.1 to 3600. Env ``S3CKPT_READ_TIMEOUT_S``; default 60."""

    def __post_init__(self) -> None:
        owner = "ClientConfig"
        if self.addressing_style not in ("auto", "path", "virtual"):
            raise ConfigError(
                f"{owner}.addressing_style={self.addressing_style!r}; expected 'auto', 'path' or 'virtual'"
            )
        if self.checksum_algorithm not in ("CRC32C", "none"):
            raise ConfigError(f"{owner}.checksum_algorithm={self.checksum_algorithm!r}; expected 'CRC32C' or 'none'")
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise ConfigError(f"{owner}.endpoint_url={self.endpoint_url!r} must start with http:// or https://")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ConfigError(f"{owner}: give both access_key_id and secret_access_key, or neither")
        _check_range(owner, "connect_timeout_s", self.connect_timeout_s, 0.1, 600, " s")
        _check_range(owner, "read_timeout_s", self.read_timeout_s, 0.1, 3600, " s")

    @classmethod
    def from_env(cls, **overrides: Any) -> ClientConfig:
        """Explicit ``overrides`` first, then environment variables, then defaults."""
        cfg = _from_env(cls, overrides)
        changes: dict[str, Any] = {}
        if cfg.endpoint_url is None and "endpoint_url" not in overrides and _env("AWS_ENDPOINT_URL"):
            changes["endpoint_url"] = _env("AWS_ENDPOINT_URL")
        if cfg.region is None and "region" not in overrides and _env("AWS_DEFAULT_REGION"):
            changes["region"] = _env("AWS_DEFAULT_REGION")
        return dataclasses.replace(cfg, **changes) if changes else cfg


def given_knobs(**knobs: int | None) -> dict[str, int]:
    """The transfer knobs a caller actually passed (``None`` means "not given": the environment variable or
    the default applies), for ``TransferConfig.from_env(**...)`` or ``dataclasses.replace``."""
    return {name: value for name, value in knobs.items() if value is not None}


def adjust_part_size(part_size: int, expected_size: int | None) -> int:
    """Return a part size within S3's limits for an object of ``expected_size`` bytes (if known).

    The part size is raised (to a whole MiB) when the object would otherwise need more than
    :data:`MAX_PARTS` parts; it is clamped to [5 MiB, 5 GiB].
    """
    size = max(MIN_PART_SIZE, min(part_size, MAX_PART_SIZE))
    if expected_size is not None and expected_size > size * MAX_PARTS:
        needed = -(-expected_size // MAX_PARTS)
        size = min(MAX_PART_SIZE, -(-needed // MiB) * MiB)
    return size

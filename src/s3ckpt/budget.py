"""S3's request-rate budget per key prefix, and spreading checkpoint keys over several prefixes.

S3 serves at least 3,500 PUT/COPY/POST/DELETE and 5,500 GET/HEAD requests per second per partitioned key
prefix; past that it answers ``503 SlowDown`` until it has split the prefix, which takes minutes. A
checkpoint save of a model-parallel job sends ``max_write_concurrency`` part uploads from each of the
``tp * pp`` ranks that write a shard, all under one checkpoint directory; a resume reads the same way.

NeMo's rule, kept here: ``concurrency * tp * pp * 1.15 <= limit``. Requests in flight stand in for requests
per second because one multipart request of the default 64 MiB part takes about a second on one connection
(60-100 MB/s), and the 15 % headroom covers the manifests, listings and retries around the parts.

The fix when the budget is exceeded: lower the concurrency, or spread the writers over several prefixes
with :func:`spread_key`, each of which S3 can serve at the full rate.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from dataclasses import dataclass

from .errors import ConfigError
from .s3_dirpath_utils import build_s3_url, parse_s3_url

__all__ = [
    "DEFAULT_HEADROOM",
    "S3_READS_PER_PREFIX",
    "S3_WRITES_PER_PREFIX",
    "RequestBudget",
    "check_request_budget",
    "spread_key",
    "spread_prefixes",
    "spread_url",
]

log = logging.getLogger(__name__)

S3_WRITES_PER_PREFIX = 3500
S3_READS_PER_PREFIX = 5500
DEFAULT_HEADROOM = 1.15


@dataclass(frozen=True)
class RequestBudget:
    """The request rates a configuration asks of one prefix, against S3's limits."""

    writes: float
    """``max_write_concurrency * tp * pp * headroom / n_prefixes``."""
    reads: float
    """``max_read_concurrency * tp * pp * readers * headroom / n_prefixes``."""
    write_limit: int = S3_WRITES_PER_PREFIX
    read_limit: int = S3_READS_PER_PREFIX

    @property
    def writes_ok(self) -> bool:
        return self.writes <= self.write_limit

    @property
    def reads_ok(self) -> bool:
        return self.reads <= self.read_limit

    @property
    def ok(self) -> bool:
        return self.writes_ok and self.reads_ok


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"check_request_budget: {name} must be a positive integer, got {value!r}")
    return value


def check_request_budget(
    max_write_concurrency: int,
    max_read_concurrency: int,
    tp: int = 1,
    pp: int = 1,
    *,
    strict: bool = False,
    headroom: float = DEFAULT_HEADROOM,
    n_prefixes: int = 1,
    readers_per_shard: int = 1,
) -> RequestBudget:
    """Check ``concurrency * tp * pp * headroom`` against 3,500 writes / 5,500 reads per second per prefix.

    Args:
        max_write_concurrency: part uploads in flight per saving rank.
        max_read_concurrency: ranged GETs in flight per loading rank.
        tp: tensor-parallel size (ranks writing distinct shards).
        pp: pipeline-parallel size.
        strict: raise instead of warning.
        headroom: factor for the requests around the parts (manifests, listings, retries).
        n_prefixes: prefixes the writers are spread over (:func:`spread_key`); each has its own limit.
        readers_per_shard: ranks reading each shard at once on resume: data-parallel replicas that load on
            their own; the number of nodes with :func:`s3ckpt.distributed_load.load_shared`.

    Returns:
        The computed rates (also when they exceed the limits and ``strict`` is off).

    Raises:
        ConfigError: an argument is not a positive number, or (``strict``) a rate exceeds its limit; the
            message names the numbers and the fix.
    """
    write_c = _positive("max_write_concurrency", max_write_concurrency)
    read_c = _positive("max_read_concurrency", max_read_concurrency)
    shards = _positive("tp", tp) * _positive("pp", pp)
    prefixes = _positive("n_prefixes", n_prefixes)
    readers = _positive("readers_per_shard", readers_per_shard)
    if isinstance(headroom, bool) or not isinstance(headroom, int | float) or not headroom >= 1.0:
        raise ConfigError(f"check_request_budget: headroom must be a number >= 1.0, got {headroom!r}")
    budget = RequestBudget(
        writes=write_c * shards * headroom / prefixes,
        reads=read_c * shards * readers * headroom / prefixes,
    )
    problems = []
    if not budget.writes_ok:
        problems.append(
            _explain("write", "max_write_concurrency", write_c, shards, 1, headroom, prefixes, S3_WRITES_PER_PREFIX)
        )
    if not budget.reads_ok:
        problems.append(
            _explain("read", "max_read_concurrency", read_c, shards, readers, headroom, prefixes, S3_READS_PER_PREFIX)
        )
    if problems:
        message = " ".join(problems)
        if strict:
            raise ConfigError(message)
        log.warning("%s", message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return budget


def _explain(
    kind: str, knob: str, concurrency: int, shards: int, readers: int, headroom: float, prefixes: int, limit: int
) -> str:
    rate = concurrency * shards * readers * headroom / prefixes
    fits = math.floor(limit * prefixes / (shards * readers * headroom))
    need = math.ceil(concurrency * shards * readers * headroom / limit)
    readers_text = f" x {readers} readers per shard" if readers > 1 else ""
    prefix_text = f" / {prefixes} prefixes" if prefixes > 1 else ""
    lower = f"lower {knob} to {fits}" if fits >= 1 else f"{knob} cannot go low enough (even 1 is too much)"
    return (
        f"S3 {kind} budget exceeded: {knob}={concurrency} x tp*pp={shards}{readers_text} x headroom {headroom:g}"
        f"{prefix_text} = {rate:,.0f} {kind}s/s per prefix, over S3's {limit:,} per prefix; S3 would answer "
        f"503 SlowDown. Fix: {lower}, or spread the checkpoint keys over at least {need} prefixes "
        "(s3ckpt.budget.spread_key)."
    )


def _tag(index: int) -> str:
    # Hashed first characters: S3 splits partitions by key prefix, and keys that differ in their first
    # bytes land in different partitions soonest. The index keeps tags unique whatever the hash.
    digest = hashlib.blake2b(f"s3ckpt-prefix-{index}".encode(), digest_size=2).hexdigest()
    return f"{digest}-{index}"


def spread_key(key: str, rank: int, n_prefixes: int) -> str:
    """``key`` under one of ``n_prefixes`` top-level prefixes, chosen by ``rank``.

    ``spread_key("run/mp_rank_03/x.ckpt", 3, 4)`` gives ``"<4 hex>-3/run/mp_rank_03/x.ckpt"``. The same rank
    always gets the same prefix, so a rank finds its own files again on resume. With ``n_prefixes <= 1``
    the key is returned unchanged.

    Trade-off: the checkpoints no longer share one directory. List or resume each spread prefix
    (:func:`spread_prefixes`), and write model-parallel group markers under the prefix of the rank that
    commits; use it only when :func:`check_request_budget` says one prefix is not enough.

    Raises:
        ConfigError: ``rank`` is negative.
    """
    if n_prefixes <= 1:
        return key
    if rank < 0:
        raise ConfigError(f"spread_key: rank must be >= 0, got {rank}")
    return f"{_tag(rank % n_prefixes)}/{key.lstrip('/')}"


def spread_url(url: str, rank: int, n_prefixes: int) -> str:
    """:func:`spread_key` on the key of an ``s3://bucket/key`` URL (the bucket stays)."""
    bucket, key = parse_s3_url(url, require_key=True)
    return build_s3_url(bucket, spread_key(key, rank, n_prefixes))


def spread_prefixes(prefix: str, n_prefixes: int) -> list[str]:
    """Every prefix :func:`spread_key` may put ``prefix`` under, in index order (for listing)."""
    if n_prefixes <= 1:
        return [prefix]
    return [f"{_tag(i)}/{prefix.lstrip('/')}" for i in range(n_prefixes)]

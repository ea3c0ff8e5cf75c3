"""S3's request-rate budget per key prefix, and spreading checkpoint keys over several prefixes.

S3 serves at least 3,500 PUT/COPY/POST/DELETE and 5,500 GET/HEAD requests per second per partitioned key
prefix; past that it answers ``503 SlowDown`` until it has split the prefix, which takes minutes. A
checkpoint save of a model-parallel job sends ``max_write_concurrency`` part uploads from each of the
``tp * pp`` ranks that write a shard, all under one checkpoint directory; a resume reads the same way.

The model: each connection sends about ``connection_MBps / part_size_MB`` requests per second (a part
of 16 MiB at ~100 MiB/s per connection is ~6 requests/s), so a rank with ``concurrency`` connections sends
``concurrency x max(1, connection_MBps / part_size_MB)`` per second, and ``tp * pp`` ranks (x readers per
shard on a load) share one prefix; 15 % headroom covers manifests, listings and retries:

    requests/s per prefix = concurrency x max(1, connection_MBps / part_MB) x tp x pp x 1.15 / n_prefixes

against 3,500 writes and 5,500 reads per second. Smaller parts (or ranges) mean more requests per byte.
NeMo's rule ``concurrency * tp * pp * 1.15 <= limit`` (one request per connection per second, true of
its 64 MiB parts on a slow connection) is the floor of this model and what you get without part sizes.

The fix when the budget is exceeded, which the warning names with numbers: larger parts
(``chunk_size_MB`` / ``read_chunk_size_MB``), lower concurrency, or spread the writers over several
prefixes with :func:`spread_key`, each of which S3 can serve at the full rate.

A sharded (DCP) save is the same model with every rank a writer: each writing rank streams ``files_per_rank``
files, each with ``max_write_concurrency`` parts in flight, under the prefix its ``PrefixStrategy`` gives it.
:func:`check_shard_budget` takes the busiest prefix:

    writes/s = ranks on that prefix x max_write_concurrency x files_per_rank x max(1, connection_MBps / part_MB)
               x 1.15

and names ``S3StorageWriter(prefix_strategy=NumericPrefixStrategy(n))`` with the ``n`` that fits as the fix.
``S3StorageWriter`` runs it on the coordinator before any rank writes, when it knows how many ranks write.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConfigError
from .s3_dirpath_utils import build_s3_url, parse_s3_url

__all__ = [
    "DEFAULT_CONNECTION_MBPS",
    "DEFAULT_HEADROOM",
    "S3_READS_PER_PREFIX",
    "S3_WRITES_PER_PREFIX",
    "RequestBudget",
    "ShardBudget",
    "check_request_budget",
    "check_shard_budget",
    "spread_key",
    "spread_prefixes",
    "spread_url",
]

log = logging.getLogger(__name__)

S3_WRITES_PER_PREFIX = 3500
S3_READS_PER_PREFIX = 5500
DEFAULT_HEADROOM = 1.15
# Throughput of one S3 connection in MiB/s, for the request-rate model: AWS quotes 85-90 MB/s per
# connection from EC2, and one loopback connection to SeaweedFS reached about the same per part here.
DEFAULT_CONNECTION_MBPS = 100.0


@dataclass(frozen=True)
class RequestBudget:
    """The request rates a configuration asks of one prefix, against S3's limits."""

    writes: float
    """Write requests per second per prefix: ``max_write_concurrency x write_rate x tp x pp x headroom /
    n_prefixes``, where ``write_rate = max(1, connection_MBps / part_size_MB)`` (1 without a part size)."""
    reads: float
    """Read requests per second per prefix: as ``writes`` with the read concurrency and range size, times the
    readers per shard."""
    write_limit: int = S3_WRITES_PER_PREFIX
    read_limit: int = S3_READS_PER_PREFIX
    write_rate: float = 1.0
    """Requests per second one write connection sends (``max(1, connection_MBps / part_size_MB)``)."""
    read_rate: float = 1.0
    """Requests per second one read connection sends (``max(1, connection_MBps / read_size_MB)``)."""

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


def _number(name: str, value: object, at_least: float | None = None, unit: str = "") -> float:
    """``value`` as a real number above 0 (or ``>= at_least``); booleans and NaN are refused."""
    number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    if not (number > 0 if at_least is None else number >= at_least):  # NaN fails both
        what = "a positive number" if at_least is None else f"a number >= {at_least}"
        raise ConfigError(f"check_request_budget: {name} must be {what}{unit}, got {value!r}")
    return number


def _rate(owner: str, size_MB: float | None, connection_MBps: float) -> float:
    """Requests per second of one connection moving parts of ``size_MB`` (NeMo's floor: 1)."""
    if size_MB is None:
        return 1.0
    return max(1.0, connection_MBps / _number(owner, size_MB, unit=" of MiB"))


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
    part_size_MB: float | None = None,
    read_size_MB: float | None = None,
    connection_MBps: float = DEFAULT_CONNECTION_MBPS,
) -> RequestBudget:
    """Check the requests per second a configuration sends to one prefix against 3,500 writes / 5,500 reads.

    ``concurrency x max(1, connection_MBps / part_size_MB) x tp x pp x headroom / n_prefixes`` (reads also
    x ``readers_per_shard``). Without part sizes this is NeMo's rule ``concurrency * tp * pp * 1.15``, the
    floor of the model.

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
        part_size_MB: multipart part size in MiB (``chunk_size_MB``); None for NeMo's floor.
        read_size_MB: ranged-GET size in MiB (``read_chunk_size_MB``); None for NeMo's floor.
        connection_MBps: throughput of one connection in MiB/s (default 100, AWS's per-connection figure).

    Returns:
        The computed rates (also when they exceed the limits and ``strict`` is off).

    Raises:
        ConfigError: an argument is not a positive number, or (``strict``) a rate exceeds its limit; the
            message names the numbers and the knob to change.
    """
    write_c = _positive("max_write_concurrency", max_write_concurrency)
    read_c = _positive("max_read_concurrency", max_read_concurrency)
    shards = _positive("tp", tp) * _positive("pp", pp)
    prefixes = _positive("n_prefixes", n_prefixes)
    readers = _positive("readers_per_shard", readers_per_shard)
    headroom = _number("headroom", headroom, at_least=1.0)
    connection_MBps = _number("connection_MBps", connection_MBps)
    write_rate = _rate("part_size_MB", part_size_MB, connection_MBps)
    read_rate = _rate("read_size_MB", read_size_MB, connection_MBps)
    budget = RequestBudget(
        writes=write_c * write_rate * shards * headroom / prefixes,
        reads=read_c * read_rate * shards * readers * headroom / prefixes,
        write_rate=write_rate,
        read_rate=read_rate,
    )
    problems = []
    if not budget.writes_ok:
        problems.append(
            _explain(
                "write",
                ("max_write_concurrency", write_c),
                ("chunk_size_MB", part_size_MB),
                write_rate,
                shards,
                1,
                headroom,
                prefixes,
                S3_WRITES_PER_PREFIX,
                connection_MBps,
            )
        )
    if not budget.reads_ok:
        problems.append(
            _explain(
                "read",
                ("max_read_concurrency", read_c),
                ("read_chunk_size_MB", read_size_MB),
                read_rate,
                shards,
                readers,
                headroom,
                prefixes,
                S3_READS_PER_PREFIX,
                connection_MBps,
            )
        )
    if problems:
        _report(" ".join(problems), strict=strict)
    return budget


def _explain(
    kind: str,
    knob: tuple[str, int],
    size_knob: tuple[str, float | None],
    rate: float,
    shards: int,
    readers: int,
    headroom: float,
    prefixes: int,
    limit: int,
    connection_MBps: float,
) -> str:
    name, concurrency = knob
    size_name, size = size_knob
    ranks = shards * readers
    total = concurrency * rate * ranks * headroom / prefixes
    fits = math.floor(limit * prefixes / (ranks * headroom * rate))
    need = math.ceil(total / limit)
    readers_text = f" x {readers} readers per shard" if readers > 1 else ""
    prefix_text = f" / {prefixes} prefixes" if prefixes > 1 else ""
    rate_text = f" x {rate:.3g} requests/s per connection ({connection_MBps:g} MiB/s / {size:g} MiB)" if size else ""
    fixes = []
    # Larger parts lower the per-connection rate, down to NeMo's floor of one request per second.
    floor = concurrency * ranks * headroom / prefixes
    if size is not None and rate > 1.0 and floor <= limit:
        per_conn = limit * prefixes / (concurrency * ranks * headroom)
        fixes.append(f"raise {size_name} to {math.ceil(connection_MBps / per_conn)} (fewer, larger requests)")
    fixes.append(f"lower {name} to {fits}" if fits >= 1 else f"{name} cannot go low enough (even 1 is too much)")
    fixes.append(f"spread the checkpoint keys over at least {need} prefixes (s3ckpt.budget.spread_key)")
    return (
        f"S3 {kind} budget exceeded: {name}={concurrency}{rate_text} x tp*pp={shards}{readers_text} x headroom "
        f"{headroom:g}{prefix_text} = {total:,.0f} {kind}s/s per prefix, over S3's {limit:,} per prefix; S3 "
        f"would answer 503 SlowDown. Fix: {', or '.join(fixes)}."
    )


@dataclass(frozen=True)
class ShardBudget:
    """The write requests per second a sharded save asks of its busiest prefix, against S3's limit."""

    writes: float
    """Write requests per second on the busiest prefix: ``ranks_on_busiest x max_write_concurrency x
    files_per_rank x write_rate x headroom``."""
    ranks: int
    """Ranks that write files (after DCP's planner dropped replicated items, a rank may write none)."""
    ranks_on_busiest: int
    """Writing ranks under the busiest prefix."""
    busiest_prefix: str
    """That prefix (``""`` when only a count of ranks was given)."""
    prefixes: int
    """Distinct prefixes the writing ranks use."""
    prefixes_needed: int
    """The ``n`` of ``NumericPrefixStrategy(n)`` that fits (ranks spread round-robin), or 0 when no number of
    prefixes can: one rank alone exceeds the limit, or more than 10,000 prefixes would be needed."""
    write_rate: float = 1.0
    """Requests per second one write connection sends (``max(1, connection_MBps / part_size_MB)``)."""
    write_limit: int = S3_WRITES_PER_PREFIX

    @property
    def ok(self) -> bool:
        return self.writes <= self.write_limit


# NumericPrefixStrategy's largest n; a job that would need more must change other knobs.
_MAX_PREFIXES = 10_000


def check_shard_budget(
    rank_prefixes: int | Sequence[str],
    max_write_concurrency: int,
    *,
    files_per_rank: int = 1,
    part_size_MB: float | None = None,
    strict: bool = False,
    headroom: float = DEFAULT_HEADROOM,
    connection_MBps: float = DEFAULT_CONNECTION_MBPS,
    where: str = "",
) -> ShardBudget:
    """Check the write requests per second a sharded save sends to its busiest prefix against 3,500.

    ``ranks on the busiest prefix x max_write_concurrency x files_per_rank x max(1, connection_MBps /
    part_size_MB) x headroom``: the single-file model (:func:`check_request_budget`) with every writing rank
    of the save a writer, and ``files_per_rank`` files uploading in parallel on each.

    Args:
        rank_prefixes: the key prefix each writing rank's files go under (``S3StorageWriter`` passes the
            checkpoint prefix plus its ``PrefixStrategy``'s folder), or a number of ranks all under one prefix.
        max_write_concurrency: part uploads in flight per file.
        files_per_rank: files each rank uploads at once (``S3StorageWriter(files_per_rank=)``).
        part_size_MB: multipart part size in MiB (``chunk_size_MB``); None for NeMo's floor (one request per
            connection per second).
        strict: raise instead of warning.
        headroom: factor for the requests around the parts (create, complete, the coordinator's HEADs).
        connection_MBps: throughput of one connection in MiB/s (default 100, AWS's per-connection figure).
        where: the checkpoint URL, for the message.

    Returns:
        The rate on the busiest prefix and the number of prefixes that would fit (also when over the limit
        and ``strict`` is off).

    Raises:
        ConfigError: an argument is not a positive number, or (``strict``) the rate exceeds the limit; the
            message names ``S3StorageWriter(prefix_strategy=NumericPrefixStrategy(n))`` with the ``n`` needed.
    """
    if isinstance(rank_prefixes, int) and not isinstance(rank_prefixes, bool):
        counts = Counter({"": _positive("rank_prefixes", rank_prefixes)})
    elif isinstance(rank_prefixes, Sequence) and not isinstance(rank_prefixes, str | bytes):
        counts = Counter(str(p) for p in rank_prefixes)
    else:
        raise ConfigError(
            f"check_shard_budget: rank_prefixes must be a number of ranks or a sequence of prefixes, got "
            f"{rank_prefixes!r}"
        )
    concurrency = _positive("max_write_concurrency", max_write_concurrency)
    files = _positive("files_per_rank", files_per_rank)
    headroom = _number("headroom", headroom, at_least=1.0)
    connection_MBps = _number("connection_MBps", connection_MBps)
    rate = _rate("part_size_MB", part_size_MB, connection_MBps)
    ranks = sum(counts.values())
    busiest, on_busiest = counts.most_common(1)[0] if counts else ("", 0)
    per_rank = concurrency * files * rate * headroom
    fits = math.floor(S3_WRITES_PER_PREFIX / per_rank)  # ranks one prefix can take
    needed = math.ceil(ranks / fits) if fits >= 1 and ranks else 0
    budget = ShardBudget(
        writes=on_busiest * per_rank,
        ranks=ranks,
        ranks_on_busiest=on_busiest,
        busiest_prefix=busiest,
        prefixes=len(counts),
        prefixes_needed=needed if needed <= _MAX_PREFIXES else 0,
        write_rate=rate,
    )
    if budget.ok:
        return budget
    _report(
        _explain_shards(budget, concurrency, files, part_size_MB, headroom, connection_MBps, fits, where), strict=strict
    )
    return budget


def _report(message: str, *, strict: bool) -> None:
    """An exceeded budget: ``ConfigError`` when strict, else a logged warning (stacklevel: the caller's caller)."""
    if strict:
        raise ConfigError(message)
    log.warning("%s", message)
    warnings.warn(message, UserWarning, stacklevel=3)


def _explain_shards(
    b: ShardBudget,
    concurrency: int,
    files: int,
    size: float | None,
    headroom: float,
    connection_MBps: float,
    fits: int,
    where: str,
) -> str:
    k = b.ranks_on_busiest
    files_text = f" x files_per_rank={files}" if files > 1 else ""
    rate_text = (
        f" x {b.write_rate:.3g} requests/s per connection ({connection_MBps:g} MiB/s / {size:g} MiB parts)"
        if size
        else ""
    )
    prefix_text = f" under {b.busiest_prefix!r}" if b.busiest_prefix else " under one prefix"
    fixes = []
    if b.prefixes_needed:
        fixes.append(
            f"spread the rank files over {b.prefixes_needed} prefixes: "
            f"S3StorageWriter(prefix_strategy=NumericPrefixStrategy({b.prefixes_needed})) "
            f"(at most {fits} writing ranks per prefix at these settings)"
        )
    # Larger parts lower the per-connection rate, down to NeMo's floor of one request per second.
    if size is not None and b.write_rate > 1.0 and k * concurrency * files * headroom <= b.write_limit:
        per_conn = b.write_limit / (k * concurrency * files * headroom)
        fixes.append(f"raise chunk_size_MB to {math.ceil(connection_MBps / per_conn)} (fewer, larger requests)")
    lower = math.floor(b.write_limit / (k * files * b.write_rate * headroom))
    if lower >= 1:
        fixes.append(f"lower max_write_concurrency to {lower}")
    if files > 1:
        fixes.append("lower files_per_rank")
    if not fixes:
        fixes.append("save from fewer ranks per prefix: even one writer per rank is too much for one prefix")
    target = f" to {where}" if where else ""
    return (
        f"S3 write budget exceeded by a sharded save{target}: {k} writing ranks{prefix_text} x "
        f"max_write_concurrency={concurrency}{files_text}{rate_text} x headroom {headroom:g} = {b.writes:,.0f} "
        f"writes/s per prefix, over S3's {b.write_limit:,} per prefix; S3 would answer 503 SlowDown. Fix: "
        f"{', or '.join(fixes)}."
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

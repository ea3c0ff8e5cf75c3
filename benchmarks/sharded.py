"""The sharded (DCP) benchmark's pure parts: its methods, records, targets, tables and chart.

``make bench ARGS=--sharded`` (:mod:`benchmarks.sharded_run`) saves and loads the same state through
``torch.distributed.checkpoint`` with 1, 2 and 4 gloo ranks (:mod:`benchmarks.sharded_worker`), beside
s3ckpt's single-file save of the same bytes and the raw PUT / GET floor. Nothing here imports torch, boto3 or
the server, so the unit tests and both virtual environments can import it cheaply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import format_ratio_matrix
from .stats import GB, Ratio, Record, fmt_size, median, summarize

__all__ = [
    "BASELINES",
    "DCP_METHODS",
    "LABELS",
    "PEER_DCP",
    "SHARDED_METHODS",
    "ShardedRatio",
    "ShardedRecord",
    "format_per_rank",
    "format_sharded_ratios",
    "format_sharded_table",
    "plot_sharded",
    "sharded_ratios",
    "summarize_sharded",
]

DCP_METHODS = ("s3ckpt-dcp", "s3torchconnector-dcp", "fsspec-dcp")
"""Sharded methods, each saved and loaded by every rank count."""
PEER_DCP = frozenset({"s3torchconnector-dcp", "fsspec-dcp"})
"""The sharded methods that run in the peers' venv (:mod:`benchmarks.peers`)."""
BASELINES = {"s3ckpt-file": "s3ckpt", "raw": "raw"}
"""One-process baselines of the same bytes -> the :mod:`benchmarks.methods` method that measures them."""
SHARDED_METHODS = (*DCP_METHODS, *BASELINES)
LABELS = {
    "s3ckpt-dcp": "s3ckpt.dcp S3StorageWriter / S3StorageReader (url): its defaults",
    "s3torchconnector-dcp": "s3torchconnector 1.5.0 dcp S3StorageWriter / S3StorageReader: its defaults "
    "(thread_count 1, dcp_optimized reader; peers venv)",
    "fsspec-dcp": "PyTorch FsspecWriter / FsspecReader over s3fs 2025.12.0: their defaults "
    "(single_file_per_rank, sync_files, thread_count 1; peers venv)",
    "s3ckpt-file": "BASELINE s3ckpt single-file S3CheckpointIO save / load of the same bytes, 1 process",
    "raw": "FLOOR raw boto3 multipart PUT / ranged GET of the same bytes, 1 process, no torch",
}
WALL_TARGETS: list[tuple[str, str, str, float, str | None]] = [
    # (op, what the DCP figure is divided by, the other method, target, the floor's method or None)
    ("save", "single-file save", "s3ckpt-file", 1.15, None),
    ("save", "raw PUT floor", "raw", 1.15, None),
    ("save", "s3torchconnector writer", "s3torchconnector-dcp", 0.9, "raw"),
    ("save", "FsspecWriter", "fsspec-dcp", 0.8, "raw"),
    ("load", "s3torchconnector reader", "s3torchconnector-dcp", 0.7, "raw"),
]
CPU_TARGET = 1.3  # save client CPU-s/GB summed over ranks / the single-file save's
SUBJECT = "s3ckpt-dcp"


@dataclass
class ShardedRecord(Record):
    """A :class:`~benchmarks.stats.Record` of one method, op, size and rank count.

    The inherited figures are over all ranks: ``wall_s`` timed on rank 0 from a barrier before the operation
    to one after it; ``cpu_s_per_gb`` the user+system CPU of every rank between those barriers, summed, per
    10^9 bytes of the whole state; ``peak_rss_bytes`` the largest rank's peak above its resident set just
    before the operation (on save that holds its share of the state; on load the tensors loaded into).
    """

    ranks: int = 1
    rank_cpu_s_per_gb: float | None = None
    """The busiest rank's CPU-s per GB of its own share (median over the rounds)."""
    rank_peak_rss_bytes: int | None = None
    """The largest rank's peak above its resident set before the state was built: its share plus buffers."""
    rss_bound_bytes: int | None = None
    """That rank's bound: its share of the state + ``(max_write_concurrency + 1) x chunk_size_MB`` (s3ckpt)."""
    rss_over_bound: float | None = None
    """Max over ranks of peak / bound (median over the rounds); <= 1 is within the bound."""
    per_rank: list[dict[str, Any]] | None = None
    """Per rank, medians over the rounds: ``cpu_s_per_gb`` (of its share), ``peak_rss_bytes``, ``bound_bytes``."""


def _rank_median(runs: Sequence[Mapping[str, Any]], key: str, i: int) -> float | None:
    return median(r["ranks"][i].get(key) for r in runs if len(r.get("ranks") or []) > i)


def summarize_sharded(
    method: str,
    op: str,
    nbytes: int,
    ranks: int,
    runs: Sequence[Mapping[str, Any]],
    *,
    settings: Mapping[str, Any] | None = None,
) -> ShardedRecord:
    """Median :class:`ShardedRecord` of one configuration's runs (a run: a leader's or worker's result dict).

    A DCP run carries ``ranks``: one dict per rank with ``cpu_s``, ``local_bytes``, ``peak_rss_bytes`` (above
    the resident set before the state was built) and ``bound_bytes``; a one-process baseline has none.
    """
    base = summarize(method, op, nbytes, runs, settings=settings, label=LABELS.get(method, ""))
    rec = ShardedRecord(**{k: getattr(base, k) for k in base.__dataclass_fields__}, ranks=ranks)
    ok = [r for r in runs if not r.get("error") and r.get("ranks")]
    if not ok:
        return rec
    per_rank: list[dict[str, Any]] = []
    for i in range(ranks):
        cpu = _rank_median(ok, "cpu_s", i)
        share = _rank_median(ok, "local_bytes", i)
        peak = _rank_median(ok, "peak_rss_bytes", i)
        bound = _rank_median(ok, "bound_bytes", i)
        per_rank.append(
            {
                "rank": i,
                "cpu_s_per_gb": cpu / (share / GB) if cpu is not None and share else None,
                "local_bytes": int(share) if share is not None else None,
                "peak_rss_bytes": int(peak) if peak is not None else None,
                "bound_bytes": int(bound) if bound is not None else None,
            }
        )
    rec.per_rank = per_rank
    cpus = [p["cpu_s_per_gb"] for p in per_rank if p["cpu_s_per_gb"] is not None]
    rec.rank_cpu_s_per_gb = max(cpus) if cpus else None
    peaks = [p for p in per_rank if p["peak_rss_bytes"] is not None]
    if peaks:
        rec.rank_peak_rss_bytes = max(p["peak_rss_bytes"] for p in peaks)
    # The bound check per round (a rank's worst round is not averaged away by another rank's), then the median.
    over = []
    for r in ok:
        ratios = [x["peak_rss_bytes"] / x["bound_bytes"] for x in r["ranks"] if x.get("bound_bytes")]
        if ratios:
            over.append(max(ratios))
    if over:
        rec.rss_over_bound = median(over)
        worst = max((p for p in per_rank if p["bound_bytes"]), key=lambda p: p["peak_rss_bytes"] / p["bound_bytes"])
        rec.rss_bound_bytes = worst["bound_bytes"]
    return rec


@dataclass(frozen=True)
class ShardedRatio(Ratio):
    """A :class:`~benchmarks.stats.Ratio` for one state size and rank count."""

    size_bytes: int = 0
    ranks: int = 0


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def sharded_ratios(records: Iterable[ShardedRecord]) -> list[ShardedRatio]:
    """Issue 19's targets for s3ckpt's DCP writer and reader, per state size and rank count.

    ``value <= target`` passes. Against the one-process baselines of the same bytes (``s3ckpt-file``,
    ``raw``) and the sharded peers at the same rank count, on medians and on minimums:

    * save wall / single-file save <= 1.15, save wall / raw PUT floor <= 1.15
    * save wall / s3torchconnector's writer <= 0.9, save wall / FsspecWriter's <= 0.8
    * load wall / s3torchconnector's reader <= 0.7
    * save client CPU-s/GB summed over ranks / the single-file save's <= 1.3
    * save peak RSS per rank / (its share + ``(max_write_concurrency + 1) x chunk_size_MB``) <= 1.0

    Beside each target against a peer: the raw floor's wall / that peer's (``is_target`` False), what a
    client that spent no CPU at all would reach on this store. Also reported: load against the single-file
    load and the raw GET, and load CPU-s/GB against the single-file load's.
    """
    records = list(records)
    by = {(r.method, r.op, r.bytes, r.ranks): r for r in records if r.error is None}
    tried = {r.method for r in records}  # a method left out of the run gets no rows; one that failed, "-"
    sizes = sorted({k[2] for k in by})
    out: list[ShardedRatio] = []

    def get(method: str, op: str, size: int, ranks: int, attr: str) -> float | None:
        # The one-process baselines stand beside every rank count.
        rec = by.get((method, op, size, 1 if method in BASELINES else ranks))
        return getattr(rec, attr) if rec is not None else None

    for size in sizes:
        for ranks in sorted({k[3] for k in by if k[0] == SUBJECT and k[2] == size}):
            for op, what, other, target, floor in WALL_TARGETS:
                if other not in tried:
                    continue
                for attr, stat in (("wall_s", "median"), ("wall_min_s", "min")):
                    mine = get(SUBJECT, op, size, ranks, attr)
                    theirs = get(other, op, size, ranks, attr)
                    detail = "" if theirs is not None else f"{other} not measured"
                    metric = f"{op} / {what} ({stat})"
                    out.append(
                        ShardedRatio(metric, SUBJECT, _div(mine, theirs), target, detail, size_bytes=size, ranks=ranks)
                    )
                    if floor is not None:
                        out.append(
                            ShardedRatio(
                                metric,
                                floor,
                                _div(get(floor, op, size, ranks, attr), theirs),
                                target,
                                "the store's floor (serialized bytes, 1 process, no checksums), not a target",
                                False,
                                size_bytes=size,
                                ranks=ranks,
                            )
                        )
            cpu = _div(
                get(SUBJECT, "save", size, ranks, "cpu_s_per_gb"), get("s3ckpt-file", "save", size, 1, "cpu_s_per_gb")
            )
            out.append(
                ShardedRatio(
                    "save CPU-s/GB summed / single-file", SUBJECT, cpu, CPU_TARGET, size_bytes=size, ranks=ranks
                )
            )
            rec = by.get((SUBJECT, "save", size, ranks))
            bound = ""
            if rec is not None and rec.rss_bound_bytes and rec.rank_peak_rss_bytes is not None:
                bound = (
                    f"busiest rank {fmt_size(rec.rank_peak_rss_bytes)}, bound {fmt_size(rec.rss_bound_bytes)}: "
                    "its share + (max_write_concurrency + 1) x chunk_size_MB"
                )
            rss = rec.rss_over_bound if rec is not None else None
            out.append(
                ShardedRatio("save peak RSS per rank / bound", SUBJECT, rss, 1.0, bound, size_bytes=size, ranks=ranks)
            )
            for other, what in (("s3ckpt-file", "single-file load"), ("raw", "raw GET floor")):
                if other not in tried:
                    continue
                value = _div(get(SUBJECT, "load", size, ranks, "wall_s"), get(other, "load", size, ranks, "wall_s"))
                out.append(
                    ShardedRatio(
                        f"load / {what} (median)", SUBJECT, value, 1.0, "reported", False, size_bytes=size, ranks=ranks
                    )
                )
            value = _div(
                get(SUBJECT, "load", size, ranks, "cpu_s_per_gb"), get("s3ckpt-file", "load", size, 1, "cpu_s_per_gb")
            )
            out.append(
                ShardedRatio(
                    "load CPU-s/GB summed / single-file",
                    SUBJECT,
                    value,
                    1.3,
                    "reported",
                    False,
                    size_bytes=size,
                    ranks=ranks,
                )
            )
    return out


def _num(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else "-"


def _order(records: Iterable[ShardedRecord]) -> list[ShardedRecord]:
    rank = {m: i for i, m in enumerate(SHARDED_METHODS)}
    return sorted(records, key=lambda r: (r.bytes, r.op != "save", rank.get(r.method, 99), r.ranks))


def format_sharded_table(records: Sequence[ShardedRecord]) -> str:
    """One line per method, op, size and rank count; the one-process baselines beside the sharded rows."""
    head = (
        f"{'method':<20} {'state':>8} {'ranks':>5} {'op':<4} {'wall s':>7} {'min s':>6} {'GB/s':>6} "
        f"{'CPU-s/GB':>8} {'rank CPU':>8} {'srv CPU':>7} {'peak RSS':>9} {'rank RSS':>9} {'n':>2}"
    )
    lines = [head, "-" * len(head)]
    for r in _order(records):
        lead = f"{r.method:<20} {fmt_size(r.bytes):>8} {r.ranks:>5} {r.op:<4}"
        if r.error is not None and r.wall_s is None:
            lines.append(f"{lead} not measured: {r.error.splitlines()[0][:110]}")
            continue
        rss = fmt_size(r.peak_rss_bytes) if r.peak_rss_bytes is not None else "-"
        rank_rss = fmt_size(r.rank_peak_rss_bytes) if r.rank_peak_rss_bytes is not None else "-"
        lines.append(
            f"{lead} {_num(r.wall_s, '7.2f')} {_num(r.wall_min_s, '6.2f')} {_num(r.gbps, '6.3f')} "
            f"{_num(r.cpu_s_per_gb, '8.2f')} {_num(r.rank_cpu_s_per_gb, '8.2f')} "
            f"{_num(r.server_cpu_s_per_gb, '7.2f')} {rss:>9} {rank_rss:>9} {r.n_runs:>2}"
        )
    lines.append(
        "CPU-s/GB: client CPU of every rank between the barriers, summed, per GB of the whole state; rank CPU: the "
        "busiest rank's per GB of its share; srv CPU: the server's per GB. peak RSS: the largest rank's peak above "
        "its RSS just before the operation (single-file load: includes the loaded tensors); rank RSS: above its "
        "RSS before the state was built (its share + what the save holds)."
    )
    return "\n".join(lines)


def format_per_rank(records: Sequence[ShardedRecord]) -> str:
    """Per rank (medians over the rounds): client CPU-s per GB of its share, peak RSS and its bound."""
    lines = ["per rank: CPU-s/GB of its share | peak RSS above its start (share + buffers) | bound"]
    for r in _order(records):
        if not r.per_rank or r.ranks < 1:
            continue
        cells = []
        for p in r.per_rank:
            bound = f" / {fmt_size(p['bound_bytes'])}" if p.get("bound_bytes") else ""
            peak = fmt_size(p["peak_rss_bytes"]) if p.get("peak_rss_bytes") is not None else "-"
            cells.append(f"r{p['rank']} {_num(p['cpu_s_per_gb'], '.2f')} {peak}{bound}")
        lines.append(f"  {r.method:<20} {fmt_size(r.bytes):>8} x{r.ranks} {r.op:<4} " + "; ".join(cells))
    return "\n".join(lines)


def format_sharded_ratios(ratios: Sequence[ShardedRatio]) -> str:
    """The targets as a matrix: one line per metric (and floor), one column per state size and rank count."""
    marks = {True: "ok", False: "NO", None: ""}
    lines = format_ratio_matrix(
        ratios,
        column=lambda q: (q.size_bytes, q.ranks),
        headings={(s, n): f"{fmt_size(s)} x{n}" for s, n in sorted({(q.size_bytes, q.ranks) for q in ratios})},
        row_name=lambda q: f"{q.metric} <= {q.target:g}" if q.is_target else f"  {q.method}: {q.metric}",
        corner="target (s3ckpt-dcp)",
        cell=lambda q: f"{q.value:>9.2f} {marks[q.ok]:<3}",
        cell_width=13,
    )
    lines.append(
        "Rows marked 'raw' are the store's floor beside a target: a raw PUT / GET of the same bytes from one process "
        "(serialized, no checksums) against the same peer, what a client spending no CPU would reach here."
    )
    return "\n".join(lines)


def plot_sharded(path: Path, records: Sequence[ShardedRecord], title: str) -> str | None:
    """Per state size (columns): save wall, load wall, save client CPU-s/GB and save peak RSS per rank (rows)
    against the rank count, one line per sharded method, the one-process baselines as horizontal lines.

    Returns None, or why no PNG was drawn (matplotlib missing, nothing measured).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install -e '.[bench]'"
    ok = [r for r in records if r.wall_s is not None]
    sizes = sorted({r.bytes for r in ok})
    if not sizes:
        return "nothing was measured"

    def mib(value: int | None) -> float | None:
        return value / 2**20 if value is not None else None

    # (op, title, the figure, whether the one-process baselines are drawn beside it)
    panels: list[tuple[str, str, Callable[[ShardedRecord], float | None], bool]] = [
        ("save", "save wall s (median)", lambda r: r.wall_s, True),
        ("load", "load wall s (median)", lambda r: r.wall_s, True),
        ("save", "save client CPU-s/GB, all ranks", lambda r: r.cpu_s_per_gb, True),
        ("save", "save peak RSS per rank (share + buffers), MiB", lambda r: mib(r.rank_peak_rss_bytes), False),
    ]
    colors = {"s3ckpt-dcp": "#2a6db0", "s3torchconnector-dcp": "#d07a2a", "fsspec-dcp": "#6a9a3a"}
    lines = {"s3ckpt-file": ("#2a6db0", ":"), "raw": ("#555555", "--")}
    fig, axes = plt.subplots(len(panels), len(sizes), figsize=(5.6 * len(sizes), 3.1 * len(panels)), squeeze=False)
    ranks = sorted({r.ranks for r in ok if r.method in DCP_METHODS})
    for col, size in enumerate(sizes):
        for row, (op, name, get, baselines) in enumerate(panels):
            ax = axes[row][col]
            here = [r for r in ok if r.op == op and r.bytes == size]
            for method in DCP_METHODS:
                pts = sorted((r.ranks, get(r)) for r in here if r.method == method)
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", color=colors[method], label=method)
            if baselines:
                for method, (color, style) in lines.items():
                    rec = next((r for r in here if r.method == method), None)
                    value = get(rec) if rec is not None else None
                    if value is not None:
                        ax.axhline(value, color=color, linestyle=style, label=f"{method} (1 process)")
            else:  # s3ckpt's bound: the busiest rank's share + (max_write_concurrency + 1) x chunk_size_MB
                pts = sorted((r.ranks, mib(r.rss_bound_bytes)) for r in here if r.method == SUBJECT)
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], "k:", label="s3ckpt bound")
                    ax.legend(fontsize=7)
            ax.set_title(f"{fmt_size(size)}: {name}", fontsize=9)
            ax.set_xlabel("ranks", fontsize=8)
            if ranks:
                ax.set_xticks(ranks)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None

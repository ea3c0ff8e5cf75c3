"""The pure parts of the benchmark: sizes, medians, result records and the ratios against the targets.

Nothing here imports torch, boto3 or the server, so the worker processes of both virtual environments and the
unit tests can import it cheaply.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "GB",
    "RECORD_KEYS",
    "MiB",
    "Ratio",
    "Record",
    "derived_ratios",
    "fmt_size",
    "median",
    "parse_size",
    "summarize",
    "validate_record",
]

MiB = 1024 * 1024
GB = 1e9  # throughput and CPU-per-GB use decimal gigabytes, as S3 and network figures do
RSS_SLACK = 150 * MiB  # interpreter, libraries and allocator slack allowed on top of the memory formulas

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": MiB,
    "mb": 1000**2,
    "mib": MiB,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

# The keys every result record carries (the JSON schema the issue asks for), plus the optional ones.
RECORD_KEYS = ("method", "op", "bytes", "wall_s", "gbps", "cpu_s_per_gb", "peak_rss_bytes")


def parse_size(text: str | int) -> int:
    """``"256MiB"``, ``"1GiB"``, ``"1.5GB"``, ``"64M"`` (K/M/G alone are binary) or a byte count, as bytes.

    Raises:
        ValueError: not a size, a unit we do not know, or not positive.
    """
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.match(text)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"not a size: {text!r} (examples: 256MiB, 1GiB, 1.5GB, 1048576)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def fmt_size(n: float) -> str:
    """Bytes as a short binary-unit string: ``1.00 GiB``, ``256 MiB``, ``-12.0 MiB``."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, scale in (("GiB", 1024**3), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale:
            value = n / scale
            return f"{sign}{value:.2f} {unit}" if value < 10 else f"{sign}{value:.0f} {unit}"
    return f"{sign}{n:.0f} B"


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None, or None if there are none."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


@dataclass
class Record:
    """One method and operation: the medians over its runs, and the runs themselves.

    ``wall_s`` is the operation alone (imports and building the state dict excluded); ``cpu_s_per_gb`` is the
    client process's user+system CPU over the operation, all threads, per 10^9 bytes; ``peak_rss_bytes`` is the
    process's peak resident set during the operation minus its resident set just before it (which holds the
    state dict on save, and only the interpreter and imports on load).
    """

    method: str
    op: str
    bytes: int
    wall_s: float | None
    gbps: float | None
    cpu_s_per_gb: float | None
    peak_rss_bytes: int | None
    server_cpu_s_per_gb: float | None = None
    stall_s: float | None = None
    n_runs: int = 0
    runs: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; the required keys first."""
        return asdict(self)


def summarize(
    method: str,
    op: str,
    nbytes: int,
    runs: Sequence[Mapping[str, Any]],
    *,
    settings: Mapping[str, Any] | None = None,
    label: str = "",
) -> Record:
    """Median ``Record`` of a method's runs. A run is a worker's result dict (``wall_s``, ``cpu_s``,
    ``peak_rss_bytes``, optional ``server_cpu_s``, ``stall_s``, ``error``); failed runs are kept but not
    counted, and if every run failed the record carries the first error and no numbers."""
    ok = [r for r in runs if not r.get("error")]
    errors = [str(r["error"]) for r in runs if r.get("error")]
    gb = nbytes / GB
    wall = median(r.get("wall_s") for r in ok)
    cpu = median(r.get("cpu_s") for r in ok)
    srv = median(r.get("server_cpu_s") for r in ok)
    rss = median(r.get("peak_rss_bytes") for r in ok)
    return Record(
        method=method,
        op=op,
        bytes=nbytes,
        wall_s=wall,
        gbps=gb / wall if wall else None,
        cpu_s_per_gb=cpu / gb if cpu is not None else None,
        peak_rss_bytes=int(rss) if rss is not None else None,
        server_cpu_s_per_gb=srv / gb if srv is not None else None,
        stall_s=median(r.get("stall_s") for r in ok),
        n_runs=len(ok),
        runs=[dict(r) for r in runs],
        settings=dict(settings or {}),
        label=label,
        error=None if ok else (errors[0] if errors else "no runs"),
    )


def validate_record(rec: Mapping[str, Any]) -> None:
    """Raise ValueError if ``rec`` lacks a required key or a value has the wrong type."""
    missing = [k for k in RECORD_KEYS if k not in rec]
    if missing:
        raise ValueError(f"record lacks {missing}: {rec}")
    if not isinstance(rec["method"], str) or not isinstance(rec["op"], str):
        raise ValueError("method and op must be strings")
    if not isinstance(rec["bytes"], int) or rec["bytes"] <= 0:
        raise ValueError(f"bytes must be a positive int, got {rec['bytes']!r}")
    for key in ("wall_s", "gbps", "cpu_s_per_gb", "peak_rss_bytes"):
        value = rec[key]
        if value is not None and not isinstance(value, int | float):
            raise ValueError(f"{key} must be a number or null, got {value!r}")
    if rec["wall_s"] is None and not rec.get("error"):
        raise ValueError(f"{rec['method']}/{rec['op']}: no numbers and no error saying why")


@dataclass(frozen=True)
class Ratio:
    """One derived figure against its target: ``value <= target`` passes."""

    metric: str
    method: str
    value: float | None
    target: float
    detail: str = ""

    @property
    def ok(self) -> bool | None:
        return None if self.value is None else self.value <= self.target

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def derived_ratios(records: Sequence[Record], state_bytes: int, sync_for_async: str = "s3ckpt-tuned") -> list[Ratio]:
    """The issue's targets for every s3ckpt variant and the NeMo-style reference.

    * save wall / raw PUT wall <= 1.15; load wall / raw GET wall <= 1.3
    * client CPU-s/GB / torch.save (torch.load) to (from) tmpfs <= 1.3
    * peak RSS on save (above the state) / ((write concurrency + 2) x chunk + 150 MiB) <= 1
    * peak RSS on load / (1.25 x state + 150 MiB) <= 1
    * async stall / sync save wall (``sync_for_async``, the same settings) <= 0.15
    * wall / the NeMo-style reference's wall, reported against 1.0 (lower is faster)
    """
    by = {(r.method, r.op): r for r in records if r.error is None}
    out: list[Ratio] = []

    def get(method: str, op: str, attr: str) -> float | None:
        rec = by.get((method, op))
        return getattr(rec, attr) if rec is not None else None

    for method in ("s3ckpt", "s3ckpt-tuned", "nemo-ref"):
        save, load = by.get((method, "save")), by.get((method, "load"))
        if save is None and load is None:
            continue
        for op, what, target in (("save", "raw PUT", 1.15), ("load", "raw GET", 1.3)):
            value = _div(get(method, op, "wall_s"), get("raw", op, "wall_s"))
            out.append(Ratio(f"{op} wall / {what}", method, value, target))
        for op, what in (("save", "torch.save"), ("load", "torch.load")):
            out.append(
                Ratio(
                    f"{op} CPU-s/GB / {what} tmpfs",
                    method,
                    _div(get(method, op, "cpu_s_per_gb"), get("torch-tmpfs", op, "cpu_s_per_gb")),
                    1.3,
                )
            )
        if save is not None:
            chunk = int(save.settings.get("chunk_size_MB", 64)) * MiB
            conc = int(save.settings.get("max_write_concurrency", 10))
            limit = (conc + 2) * chunk + RSS_SLACK
            detail = f"limit ({conc}+2) x {chunk // MiB} MiB + 150 MiB = {fmt_size(limit)}"
            out.append(Ratio("save peak RSS / limit", method, _div(save.peak_rss_bytes, limit), 1.0, detail))
        if load is not None:
            limit = int(1.25 * state_bytes) + RSS_SLACK
            detail = f"limit 1.25 x {fmt_size(state_bytes)} + 150 MiB = {fmt_size(limit)}"
            out.append(Ratio("load peak RSS / limit", method, _div(load.peak_rss_bytes, limit), 1.0, detail))
        if method != "nemo-ref":
            for op in ("save", "load"):
                ref = get("nemo-ref", op, "wall_s")
                out.append(Ratio(f"{op} wall / NeMo-style", method, _div(get(method, op, "wall_s"), ref), 1.0))
    async_rec = by.get(("s3ckpt-async", "save"))
    if async_rec is not None:
        sync = by.get((sync_for_async, "save")) or by.get(("s3ckpt", "save"))
        base = sync.wall_s if sync is not None else None
        detail = f"vs {sync.method} sync save" if sync is not None else "no sync save measured"
        out.append(Ratio("async stall / sync save", "s3ckpt-async", _div(async_rec.stall_s, base), 0.15, detail))
    return out

"""The incremental-save benchmark's pure parts: the states' layout, the changed regions the 5 MiB part rule
charges for, records and targets (the tables and the chart: :mod:`benchmarks.incremental_report`).

``make bench ARGS=--incremental`` (:mod:`benchmarks.incremental_run`) saves two states chained checkpoint after
checkpoint (:mod:`benchmarks.incremental_worker`): a fine-tuning state (frozen base weights, LoRA adapters
beside some of them, Adam state for the adapters only) and a full-training state of the same tensors, all of
them changing. Nothing here imports torch, boto3 or the server, so the unit tests can import it cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .stats import Ratio, Record, median, summarize

__all__ = [
    "FINE",
    "FLOORS",
    "FULL",
    "FULL_LAYOUT",
    "METHODS",
    "MIN_PART",
    "QUICK_LAYOUT",
    "STATES",
    "IncrementalRatio",
    "IncrementalRecord",
    "Layout",
    "Region",
    "changed_regions",
    "describe",
    "incremental_ratios",
    "segments",
    "store_checksum_comparison",
    "summarize_incremental",
    "upload_floor",
]

MiB = 1024 * 1024
MIN_PART = 5 * MiB  # S3: every part but the last at least 5 MiB, uploaded or copied alike
FINE, FULL = "fine-tuning", "full-training"
STATES = (FINE, FULL)
PLAIN, INC, INC_NO_CRC = "plain", "incremental-store-crc", "incremental"
METHODS = (PLAIN, INC, INC_NO_CRC)
"""Each a chain of checkpoints: save N with ``base`` = the same chain's save N-1 (``plain``: no base)."""
RAW_PUT, RAW_COMPOSE = "raw-put", "raw-compose"
FLOORS = (RAW_PUT, RAW_COMPOSE)
LABELS = {
    PLAIN: "s3ckpt.save(state, url): everything uploaded",
    INC: "the same with S3CKPT_COMPOSE_STORE_CHECKSUM=1: store CRC32C on",
    INC_NO_CRC: "s3ckpt.save(state, url, base=previous), the default: the CRC32C only in s3ckpt's manifest",
    RAW_PUT: "FLOOR raw boto3 multipart PUT of the object's bytes (16 MiB x 8, no checksums, no torch)",
    RAW_COMPOSE: "FLOOR the incremental save's own parts replayed raw: UploadPart / UploadPartCopy, 8 at a time, "
    "no checksums, no torch",
}


@dataclass(frozen=True)
class Layout:
    """A decoder-only model's fp32 state dict in PEFT's naming: per layer q/k/v/o projections of
    ``hidden x hidden``, MLP up/down of ``4 hidden x hidden``, two norms; LoRA adapters of ``rank`` on the
    ``lora_targets`` projections, right after their frozen base weights (as PEFT's state dict has them).

    At the default 2048 / 128 / 2 layers: 16 and 64 MiB frozen weights (400 MiB), 8 MiB of adapters in 4 places,
    16 MiB of Adam moments. Few layers, so the 4 adapter places per 400 MiB are denser than a 7B model's
    (64 places per 27 GB of fp32 weights): the regions the 5 MiB rule charges for weigh more here.
    """

    hidden: int = 2048
    rank: int = 128
    layers: int = 2
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")

    def model(self) -> list[tuple[str, tuple[int, ...], bool]]:
        """``(name, shape, trainable)`` in state-dict order (the order ``torch.save`` writes the records)."""
        d, r = self.hidden, self.rank
        out: list[tuple[str, tuple[int, ...], bool]] = [("model.embed_tokens.weight", (d, d), False)]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                name = f"{p}self_attn.{proj}"
                if proj in self.lora_targets:
                    out.append((f"{name}.base_layer.weight", (d, d), False))
                    out.append((f"{name}.lora_A.default.weight", (r, d), True))
                    out.append((f"{name}.lora_B.default.weight", (d, r), True))
                else:
                    out.append((f"{name}.weight", (d, d), False))
            out.append((f"{p}mlp.up_proj.weight", (4 * d, d), False))
            out.append((f"{p}mlp.down_proj.weight", (d, 4 * d), False))
            out.append((f"{p}input_layernorm.weight", (d,), False))
            out.append((f"{p}post_attention_layernorm.weight", (d,), False))
        out.append(("model.norm.weight", (d,), False))
        return out

    def trainable(self) -> list[tuple[str, tuple[int, ...]]]:
        """The tensors Adam keeps ``step``, ``exp_avg`` and ``exp_avg_sq`` for, in order."""
        return [(name, shape) for name, shape, trainable in self.model() if trainable]


FULL_LAYOUT = Layout()
QUICK_LAYOUT = Layout(hidden=512, rank=32)  # 25 MiB frozen: every changed region costs a 5 MiB part anyway


def _nbytes(shape: tuple[int, ...]) -> int:
    return 4 * math.prod(shape)


def segments(layout: Layout, state: str) -> list[tuple[str, int, bool]]:
    """The archive's records in the order ``torch.save`` writes them, ``(name, tensor bytes, changes at every
    checkpoint)``: ``data.pkl`` first (it holds ``global_step``, so it changes), the model's tensors, the Adam
    state (``step``, ``exp_avg``, ``exp_avg_sq`` per trainable tensor, all changing), the serialization id last
    (new at every save). Zip headers are left out (a few dozen bytes a record)."""
    if state not in STATES:
        raise ValueError(f"unknown state {state!r}; known: {', '.join(STATES)}")
    out = [("data.pkl", 0, True)]
    out += [(name, _nbytes(shape), trainable or state == FULL) for name, shape, trainable in layout.model()]
    for name, shape in layout.trainable():
        out += [(f"{name}:step", 4, True), (f"{name}:exp_avg", _nbytes(shape), True)]
        out.append((f"{name}:exp_avg_sq", _nbytes(shape), True))
    out.append((".data/serialization_id", 0, True))
    return out


class Region(NamedTuple):
    """Changed bytes of an object close enough together to share uploaded parts: ``[start, end)`` spans them
    and the unchanged runs under :data:`MIN_PART` between them (the planner uploads those too)."""

    start: int
    end: int
    changed: int


def changed_regions(segs: Iterable[tuple[int, bool]], min_gap: int = MIN_PART) -> tuple[list[Region], int]:
    """The isolated changed regions of an object made of ``(bytes, changed)`` segments, and its size.

    Two changed segments are one region when fewer than ``min_gap`` unchanged bytes lie between them: that gap
    cannot be copied as a part of its own. Each region is then an uploaded part of at least ``min_gap`` bytes
    (unless it ends the object), whatever it holds.
    """
    regions: list[Region] = []
    at = 0
    for n, changed in segs:
        if changed:
            if regions and at - regions[-1].end < min_gap:
                last = regions[-1]
                regions[-1] = Region(last.start, at + n, last.changed + n)
            else:
                regions.append(Region(at, at + n, n))
        at += n
    return regions, at


def upload_floor(segs: Iterable[tuple[int, bool]], min_part: int = MIN_PART) -> int:
    """The fewest bytes any composition of the object from its base can upload: each changed region in parts of
    at least ``min_part`` bytes (S3's rule), the object's last part excepted."""
    regions, total = changed_regions(segs, min_part)
    floor = sum(r.end - r.start if r.end == total else max(r.end - r.start, min_part) for r in regions)
    return min(total, floor)


def describe(layout: Layout, state: str) -> dict[str, Any]:
    """What the JSON says about a state: its tensors, what changes, the regions and the upload floor."""
    segs = segments(layout, state)
    pairs = [(n, changed) for _, n, changed in segs]
    regions, total = changed_regions(pairs)
    frozen = [_nbytes(shape) for _, shape, trainable in layout.model() if not trainable and len(shape) > 1]
    changed = sum(n for n, c in pairs if c)
    return {
        "layout": {
            "hidden": layout.hidden,
            "lora_rank": layout.rank,
            "layers": layout.layers,
            "lora_targets": list(layout.lora_targets),
        },
        "tensors": len(segs) - 2,
        "tensor_bytes": total,
        "frozen_weight_bytes": sorted(set(frozen)),
        "trainable_bytes": sum(_nbytes(s) for _, s in layout.trainable()),
        "adapter_places": len(layout.trainable()) // 2,
        "changed_bytes": changed,
        "changed_fraction": changed / total,
        "regions": len(regions),
        "region_bytes": [r.changed for r in regions],
        "upload_floor_bytes": upload_floor(pairs),
    }


@dataclass
class IncrementalRecord(Record):
    """A :class:`~benchmarks.stats.Record` of one state, method and op (``save``, ``load``, ``verify``).

    The inherited figures are medians over the rounds: ``wall_s`` the operation alone, ``cpu_s_per_gb`` the
    client process's user+system CPU (all threads) per 10^9 bytes of the state's tensors.
    """

    state: str = ""
    cpu_s: float | None = None
    """Client CPU seconds (median), and the least of the rounds."""
    cpu_min_s: float | None = None
    server_cpu_s: float | None = None
    """The weed process's user+system CPU seconds over the operation (median)."""
    sent_bytes: float | None = None
    """Bytes this client wrote to its sockets over the operation (HTTP headers and bodies), median."""
    object_bytes: int | None = None
    bytes_uploaded: float | None = None
    """``SaveStats.bytes_uploaded`` / ``bytes_copied`` (medians)."""
    bytes_copied: float | None = None
    regions: int | None = None
    """Changed regions found by comparing the saved object's records with its chain's previous one."""
    upload_floor_bytes: int | None = None


def summarize_incremental(
    state: str, method: str, op: str, nbytes: int, runs: Sequence[Mapping[str, Any]]
) -> IncrementalRecord:
    """Medians (and the minimum wall) of one state, method and op over its rounds; failed rounds are kept."""
    base = summarize(method, op, nbytes, runs, label=LABELS.get(method, ""))
    rec = IncrementalRecord(**{k: getattr(base, k) for k in base.__dataclass_fields__}, state=state)
    ok = [r for r in runs if not r.get("error")]
    rec.cpu_s = median(r.get("cpu_s") for r in ok)
    rec.cpu_min_s = min((r["cpu_s"] for r in ok if r.get("cpu_s") is not None), default=None)
    rec.server_cpu_s = median(r.get("server_cpu_s") for r in ok)
    rec.sent_bytes = median(r.get("sent_bytes") for r in ok)
    size = median(r.get("object_bytes") for r in ok)
    rec.object_bytes = int(size) if size is not None else None
    rec.bytes_uploaded = median(r.get("bytes_uploaded") for r in ok)
    rec.bytes_copied = median(r.get("bytes_copied") for r in ok)
    regions = median(r.get("regions") for r in ok)
    rec.regions = int(regions) if regions is not None else None
    floor = median(r.get("upload_floor_bytes") for r in ok)
    rec.upload_floor_bytes = int(floor) if floor is not None else None
    return rec


@dataclass(frozen=True)
class IncrementalRatio(Ratio):
    """A :class:`~benchmarks.stats.Ratio` for one state."""

    state: str = ""


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# (state, metric, the record's attribute, target, on medians only); the incremental methods over plain's.
SAVE_TARGETS: list[tuple[str, str, str, float, bool]] = [
    (FINE, "bytes sent / plain", "sent_bytes", 0.10, True),
    (FINE, "save wall / plain", "wall_s", 0.6, False),
    (FINE, "client CPU / plain", "cpu_s", 0.3, True),
    # A few KiB more are the base's HEAD and manifest GET: request headers, 0.001 of the object at most.
    (FULL, "bytes sent / plain", "sent_bytes", 1.001, True),
    (FULL, "save wall / plain", "wall_s", 1.03, False),
]
SAME_TARGET = 1.05  # loads and verifies of a composed object against a plain one: unchanged, within noise


def incremental_ratios(records: Iterable[IncrementalRecord]) -> list[IncrementalRatio]:
    """Issue 20's targets, per state, for both incremental methods (``value <= target`` passes).

    Fine-tuning: bytes sent <= 0.10 x plain, save wall <= 0.6 x, client CPU <= 0.3 x. Full training: save wall
    <= 1.03 x plain, no more bytes sent (1.001: request headers). Both: load and verify wall of the composed
    object <= 1.05 x the plain one's. Wall on medians and on minimums. Beside them, not targets: the server's
    CPU, and the floors: the raw replay of the save's parts, a raw PUT, and the fewest bytes the 5 MiB rule
    allows (:func:`upload_floor`).
    """
    recs = list(records)
    by = {(r.state, r.method, r.op): r for r in recs if r.error is None}
    floors = {(r.method, r.op): r for r in recs if r.error is None and r.method in FLOORS}
    out: list[IncrementalRatio] = []

    def get(state: str, method: str, op: str, attr: str) -> float | None:
        rec = by.get((state, method, op)) or (floors.get((method, op)) if method in FLOORS else None)
        return getattr(rec, attr) if rec is not None else None

    for state, metric, attr, target, medians_only in SAVE_TARGETS:
        stats = [("median", attr)] + ([] if medians_only else [("min", "wall_min_s")])
        for stat, a in stats:
            plain = get(state, PLAIN, "save", a)
            for method in (INC, INC_NO_CRC):
                value = _div(get(state, method, "save", a), plain)
                out.append(IncrementalRatio(f"{metric} ({stat})", method, value, target, state=state))
            if attr == "wall_s" and state == FINE:
                for floor in FLOORS:
                    value = _div(get(state, floor, "save", a), plain)
                    detail = "the store's floor for these parts, not a target"
                    out.append(IncrementalRatio(f"{metric} ({stat})", floor, value, target, detail, False, state))
        if attr == "sent_bytes":
            plain_sent = get(state, PLAIN, "save", "sent_bytes")
            floor_bytes = get(state, INC, "save", "upload_floor_bytes")
            regions = get(state, INC, "save", "regions")
            detail = f"{regions:.0f} changed regions x >= 5 MiB, not a target" if regions is not None else ""
            value = _div(floor_bytes, plain_sent)
            out.append(IncrementalRatio(f"{metric} (median)", "5 MiB rule", value, target, detail, False, state))
    for state in STATES:
        for method in (INC, INC_NO_CRC):
            value = _div(get(state, method, "save", "server_cpu_s"), get(state, PLAIN, "save", "server_cpu_s"))
            out.append(IncrementalRatio("server CPU / plain (median)", method, value, 1.0, "", False, state))
        for op in ("load", "verify"):
            for stat, attr in (("median", "wall_s"), ("min", "wall_min_s")):
                plain = get(state, PLAIN, op, attr)
                for method in (INC, INC_NO_CRC):
                    value = _div(get(state, method, op, attr), plain)
                    out.append(
                        IncrementalRatio(f"{op} wall / plain's ({stat})", method, value, SAME_TARGET, state=state)
                    )
    return out


def store_checksum_comparison(records: Iterable[IncrementalRecord]) -> list[dict[str, Any]]:
    """Per state, the composed save with the store's CRC32C off over on: wall, client and server CPU, loads."""
    by = {(r.state, r.method, r.op): r for r in records if r.error is None}
    out = []
    for state in STATES:
        row: dict[str, Any] = {"state": state}
        for op, attr in (("save", "wall_s"), ("save", "wall_min_s"), ("save", "cpu_s"), ("save", "server_cpu_s")):
            on, off = by.get((state, INC, op)), by.get((state, INC_NO_CRC, op))
            row[f"{op}_{attr}_off_over_on"] = _div(getattr(off, attr, None), getattr(on, attr, None))
        for op in ("load", "verify"):
            on, off = by.get((state, INC, op)), by.get((state, INC_NO_CRC, op))
            row[f"{op}_wall_s_off_over_on"] = _div(getattr(off, "wall_s", None), getattr(on, "wall_s", None))
        out.append(row)
    return out

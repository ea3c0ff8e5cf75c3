"""The benchmark harness's pure parts: sizes, medians, records, ratios, argument parsing. No server, no torch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks.report import format_ratios, format_table, write_json
from benchmarks.run import ALL_METHODS, DEFAULT_METHODS, QUICK_METHODS, parse_args
from benchmarks.stats import (
    RECORD_KEYS,
    MiB,
    Record,
    derived_ratios,
    fmt_size,
    median,
    parse_size,
    summarize,
    validate_record,
)
from benchmarks.workload import layer_shapes, state_bytes

GiB = 1024**3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256MiB", 256 * MiB),
        ("1GiB", GiB),
        ("1gib", GiB),
        ("64M", 64 * MiB),
        ("1.5GB", 1_500_000_000),
        ("100 MB", 100_000_000),
        ("4096", 4096),
        (1234, 1234),
        ("0.5GiB", GiB // 2),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1XB", "-5MiB", "0", "1..5G", "GiB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_fmt_size() -> None:
    assert fmt_size(GiB) == "1.00 GiB"
    assert fmt_size(256 * MiB) == "256 MiB"
    assert fmt_size(512) == "512 B"
    assert fmt_size(-12 * MiB) == "-12 MiB"


def test_median_skips_missing() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, None, 1.0, 2.0, 3.0]) == 2.5
    assert median([None, float("nan")]) is None
    assert median([]) is None


def _run(wall: float, cpu: float = 1.0, rss: int = 100 * MiB, **extra: object) -> dict[str, Any]:
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": rss, "server_cpu_s": 10.0, **extra}


def test_summarize_takes_medians_and_ignores_failed_runs() -> None:
    runs = [_run(6.0, 2.0), _run(5.0, 1.0), {"error": "boom"}, _run(7.0, 3.0, stall_s=0.5)]
    rec = summarize("s3ckpt", "save", 2 * 10**9, runs, settings={"chunk_size_MB": 16})
    assert rec.wall_s == 6.0
    assert rec.gbps == pytest.approx(2 / 6.0)
    assert rec.cpu_s_per_gb == pytest.approx(1.0)  # median 2.0 CPU-s over 2 GB
    assert rec.server_cpu_s_per_gb == pytest.approx(5.0)
    assert rec.stall_s == 0.5
    assert rec.n_runs == 3 and len(rec.runs) == 4
    assert rec.error is None
    assert rec.settings == {"chunk_size_MB": 16}


def test_summarize_all_failed_keeps_the_reason() -> None:
    rec = summarize("s3torchconnector", "save", 10**9, [{"error": "InvalidAccessKeyId"}, {"error": "x"}])
    assert rec.wall_s is None and rec.gbps is None and rec.n_runs == 0
    assert rec.error == "InvalidAccessKeyId"
    validate_record(rec.to_json())  # no numbers, but it says why


def test_record_json_schema_round_trips(tmp_path: Path) -> None:
    rec = summarize("raw", "load", GiB, [_run(0.8)], settings={"part_size_MB": 16})
    data = json.loads(json.dumps(rec.to_json()))
    for key in RECORD_KEYS:
        assert key in data
    assert list(data)[: len(RECORD_KEYS)] == list(RECORD_KEYS)
    validate_record(data)
    doc = {"name": "t", "records": [data], "ratios": []}
    write_json(tmp_path / "r.json", doc)
    assert json.loads((tmp_path / "r.json").read_text())["records"][0]["method"] == "raw"


@pytest.mark.parametrize(
    "broken",
    [
        {"op": "save", "bytes": 1, "wall_s": 1.0, "gbps": 1.0, "cpu_s_per_gb": 1.0, "peak_rss_bytes": 1},
        {"method": "m", "op": "save", "bytes": 0, "wall_s": 1.0, "gbps": 1, "cpu_s_per_gb": 1, "peak_rss_bytes": 1},
        {"method": "m", "op": "save", "bytes": 1, "wall_s": "1", "gbps": 1, "cpu_s_per_gb": 1, "peak_rss_bytes": 1},
        {
            "method": "m",
            "op": "save",
            "bytes": 1,
            "wall_s": None,
            "gbps": None,
            "cpu_s_per_gb": None,
            "peak_rss_bytes": None,
        },
    ],
)
def test_validate_record_rejects(broken: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        validate_record(broken)


def _rec(method: str, op: str, wall: float, cpu: float = 1.0, rss: int = 0, **kw: object) -> Record:
    gb = GiB / 1e9
    return Record(method, op, GiB, wall, gb / wall, cpu, rss, **kw)  # type: ignore[arg-type]


def test_derived_ratios() -> None:
    """Issue 12's targets: s3ckpt at its defaults against the best peer (median and min), s3torchconnector's
    CPU and RSS, an absolute load CPU bound, and the async stall against the snapshot and the sync save."""
    records = [
        _rec("raw", "save", 5.0),
        _rec("torch-tmpfs", "save", 0.7, cpu=0.6),
        _rec("torch-tmpfs", "load", 0.7, cpu=0.7),
        _rec("nemo", "save", 9.0, wall_min_s=8.0),
        _rec("nemo", "load", 2.0, wall_min_s=1.5),
        _rec("s3torchconnector", "save", 6.0, cpu=1.4, rss=400 * MiB, wall_min_s=5.0),
        _rec("s3torchconnector", "load", 2.5, wall_min_s=2.0),
        _rec("s3ckpt", "save", 5.1, cpu=1.2, rss=300 * MiB, wall_min_s=4.6),
        _rec("s3ckpt", "load", 1.2, cpu=1.25, rss=GiB + 100 * MiB, wall_min_s=1.1),
    ]
    async_runs = [{"max_pending_saves": 2, "stall_s": 0.12, "snapshot_s": 0.11, "sync_save_s": 5.0}]
    ratios = {(q.metric, q.method): q for q in derived_ratios(records, GiB, async_runs)}
    save_med = ratios[("save wall / best peer (median)", "s3ckpt")]
    assert save_med.value == pytest.approx(5.1 / 6.0) and save_med.ok and "s3torchconnector" in save_med.detail
    assert ratios[("save wall / best peer (min)", "s3ckpt")].value == pytest.approx(4.6 / 5.0)
    assert ratios[("save wall / best peer (min)", "s3ckpt")].ok is False  # 0.92 > 0.9
    assert ratios[("load wall / best peer (median)", "s3ckpt")].value == pytest.approx(1.2 / 2.0)
    assert ratios[("load wall / best peer (min)", "s3ckpt")].value == pytest.approx(1.1 / 1.5)
    assert ratios[("save CPU-s/GB / s3torchconnector", "s3ckpt")].value == pytest.approx(1.2 / 1.4)
    assert ratios[("save peak RSS / s3torchconnector", "s3ckpt")].value == pytest.approx(0.75)
    assert ratios[("load CPU-s/GB (absolute)", "s3ckpt")].value == pytest.approx(1.25)
    tmpfs = ratios[("save CPU-s/GB / torch.save tmpfs", "s3ckpt")]
    assert tmpfs.value == pytest.approx(2.0) and tmpfs.ok is None  # reported, not a target
    floor = ratios[("save wall / best peer (median)", "raw")]  # the server's floor, beside the target
    assert floor.value == pytest.approx(5.0 / 6.0) and floor.ok is None and "floor" in floor.detail
    stall = ratios[("async stall / snapshot", "s3ckpt-async p=2")]
    assert stall.value == pytest.approx(0.12 / 0.11) and stall.ok
    assert ratios[("async stall / sync save", "s3ckpt-async p=2")].value == pytest.approx(0.024)
    # s3ckpt with NeMo's knobs was not measured: no rows for it.
    assert not any(method == "s3ckpt-nemo-knobs" for _, method in ratios)


def test_ratio_missing_baseline_is_none() -> None:
    ratios = derived_ratios([_rec("s3ckpt", "save", 6.0)], GiB)
    peer = next(q for q in ratios if q.metric == "save wall / best peer (median)")
    assert peer.value is None and peer.ok is None and peer.detail == "no peer measured"
    assert "-" in format_ratios(ratios)


def test_sweep_pick_prefers_less_cpu_within_the_tie() -> None:
    from benchmarks.run import pick

    rows = [
        {"op": "save", "size_bytes": 1, "settings": {"c": 64}, "wall_s": 3.00, "cpu_s_per_gb": 1.5},
        {"op": "save", "size_bytes": 1, "settings": {"c": 16}, "wall_s": 3.10, "cpu_s_per_gb": 1.1},
        {"op": "save", "size_bytes": 1, "settings": {"c": 8}, "wall_s": 3.40, "cpu_s_per_gb": 1.0},
        {"op": "load", "size_bytes": 1, "settings": {"r": 4}, "wall_s": None, "cpu_s_per_gb": None},
    ]
    assert pick(rows, "save") == rows[1]  # within 5 % of the fastest, and cheaper
    assert pick(rows, "load") is None


def test_tables_render_errors_and_numbers() -> None:
    ok = _rec("s3ckpt", "save", 6.0, rss=100 * MiB)
    failed = Record("s3torchconnector", "save", GiB, None, None, None, None, error="no network\nmore")
    text = format_table([ok, failed])
    assert "s3ckpt" in text and "100 MiB" in text
    assert "not measured: no network" in text and "more" not in text


def test_workload_sizes_without_torch() -> None:
    for size in (64 * MiB, 256 * MiB, GiB):
        shapes = layer_shapes(size)
        assert 60 <= len(shapes) <= 120  # x3 tensors plus a step each: a few hundred tensors
        got = state_bytes(size)
        assert abs(got - size) / size < 0.01
        sizes = [math.prod(s) for s in shapes.values()]
        assert max(sizes) / min(sizes) > 500  # mixed: biases and norms next to big matrices


def test_sweep_robust_keeps_settings_close_to_the_fastest_at_every_size() -> None:
    from benchmarks.run import robust

    def row(size: int, c: int, wall: float) -> dict[str, object]:
        return {"op": "save", "size_bytes": size, "settings": {"c": c}, "wall_s": wall, "cpu_s_per_gb": 1.0}

    table = [row(1, 8, 3.2), row(1, 16, 3.1), row(1, 64, 3.9), row(2, 8, 6.1), row(2, 16, 6.6), row(2, 64, 7.5)]
    assert robust(table, "save") == [{"c": 8}]  # 16 is fastest at size 1 but 8 % behind at size 2
    assert robust(table, "load") == []


def test_parse_args_defaults_and_quick() -> None:
    full = parse_args([])
    assert full.size == 512 * MiB and full.runs == 5 and full.methods == DEFAULT_METHODS and full.name == "latest"
    assert not full.sweep and full.sweep_size == 512 * MiB and full.confirm_size == GiB and full.run_async
    assert "nemo" in DEFAULT_METHODS and "s3torchconnector" in DEFAULT_METHODS
    assert parse_args(["--methods", "all"]).methods == ALL_METHODS
    quick = parse_args(["--quick", "--sweep"])
    assert quick.size == 64 * MiB and quick.runs == 1 and quick.methods == QUICK_METHODS and quick.name == "quick"
    assert quick.sweep and quick.confirm_size is None and not quick.run_async
    custom = parse_args(["--size", "128MiB", "--methods", "s3ckpt,raw", "--runs", "5", "--name", "x"])
    assert custom.size == 128 * MiB and custom.methods == ["s3ckpt", "raw"] and custom.runs == 5
    assert custom.sweep_size == 128 * MiB
    assert parse_args(["--confirm-size", "0"]).confirm_size is None
    with pytest.raises(SystemExit):
        parse_args(["--methods", "s3ckpt,nope"])

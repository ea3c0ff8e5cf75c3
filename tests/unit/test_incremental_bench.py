"""The incremental benchmark's pure parts: the states' sizes and changed regions, the 5 MiB rule's floor,
records, targets, tables, chart, round plan and arguments; the worker's state, byte counter and region count
from manifests. No server."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks.incremental import (
    FINE,
    FULL,
    FULL_LAYOUT,
    INC,
    INC_NO_CRC,
    MIN_PART,
    PLAIN,
    QUICK_LAYOUT,
    RAW_COMPOSE,
    RAW_PUT,
    IncrementalRecord,
    Region,
    changed_regions,
    describe,
    incremental_ratios,
    segments,
    store_checksum_comparison,
    summarize_incremental,
    upload_floor,
)
from benchmarks.incremental_report import (
    format_incremental_ratios,
    format_incremental_table,
    format_store_checksum,
    plot_incremental,
)
from benchmarks.incremental_run import plan_round
from benchmarks.report import write_json
from benchmarks.run import parse_args
from benchmarks.stats import MiB

SIZE = 424 * MiB


def test_fine_tuning_state_sizes_changed_fraction_and_regions() -> None:
    d = describe(FULL_LAYOUT, FINE)
    assert d["frozen_weight_bytes"] == [16 * MiB, 64 * MiB]
    assert d["trainable_bytes"] == 8 * MiB and d["adapter_places"] == 4
    norms = 5 * 2048 * 4  # two per layer and the final one
    adam = 16 * MiB + 8 * 4  # exp_avg and exp_avg_sq of the adapters, a 4-byte step each
    assert d["tensor_bytes"] == 400 * MiB + norms + 8 * MiB + adam
    assert 0.05 < d["changed_fraction"] < 0.07 and d["changed_bytes"] == 8 * MiB + adam
    # data.pkl (global_step), the 4 adapter places, the Adam state at the end: 6 parts of >= 5 MiB but the last
    assert d["regions"] == 6 and d["region_bytes"] == [0, 2 * MiB, 2 * MiB, 2 * MiB, 2 * MiB, adam]
    assert d["upload_floor_bytes"] == 5 * 5 * MiB + adam
    assert d["upload_floor_bytes"] / d["tensor_bytes"] < 0.10


def test_full_training_state_changes_everything_in_one_region() -> None:
    fine, full = describe(FULL_LAYOUT, FINE), describe(FULL_LAYOUT, FULL)
    assert full["tensor_bytes"] == fine["tensor_bytes"] and full["tensors"] == fine["tensors"]
    assert full["changed_fraction"] == 1.0 and full["regions"] == 1
    assert full["upload_floor_bytes"] == full["tensor_bytes"]


def test_quick_layout_is_small_and_its_regions_merge() -> None:
    d = describe(QUICK_LAYOUT, FINE)
    assert d["tensor_bytes"] < 32 * MiB and 0.05 < d["changed_fraction"] < 0.07
    assert d["regions"] == 3  # 1 MiB weights: fewer than 5 MiB between data.pkl and the first adapters


def test_segments_follow_torch_saves_record_order() -> None:
    segs = segments(FULL_LAYOUT, FINE)
    names = [name for name, _, _ in segs]
    assert names[0] == "data.pkl" and names[-1] == ".data/serialization_id"
    assert names[1] == "model.embed_tokens.weight"
    q = names.index("model.layers.0.self_attn.q_proj.base_layer.weight")
    assert names[q + 1 : q + 3] == [
        "model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "model.layers.0.self_attn.q_proj.lora_B.default.weight",
    ]
    assert names.index("model.norm.weight") < min(i for i, n in enumerate(names) if n.endswith(":exp_avg"))
    assert not dict((n, c) for n, _, c in segs)["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match="unknown state"):
        segments(FULL_LAYOUT, "pretraining")


def test_changed_regions_merge_short_gaps_and_the_floor() -> None:
    segs = [(MiB, True), (4 * MiB, False), (MiB, True), (10 * MiB, False), (2 * MiB, True), (6 * MiB, False)]
    regions, total = changed_regions(segs)
    assert total == 24 * MiB
    assert regions == [Region(0, 6 * MiB, 2 * MiB), Region(16 * MiB, 18 * MiB, 2 * MiB)]
    assert upload_floor(segs) == 11 * MiB  # 6 MiB (the 4 MiB gap uploaded too), then 2 MiB topped up to 5
    # A region that ends the object is its last part: no top-up.
    assert upload_floor([(10 * MiB, False), (MiB, True)]) == MiB
    assert upload_floor([(MiB, True), (MiB, False)]) == 2 * MiB  # never more than the object
    assert upload_floor([(MIN_PART, False)]) == 0 and changed_regions([]) == ([], 0)


def _save(wall: float, cpu: float, sent: float, srv: float = 4.0, **kw: Any) -> dict[str, Any]:
    return {"wall_s": wall, "cpu_s": cpu, "sent_bytes": sent, "server_cpu_s": srv, "peak_rss_bytes": 0, **kw}


def test_summarize_incremental_medians_and_failures() -> None:
    runs = [
        _save(3.0, 0.5, 41 * MiB, bytes_uploaded=41 * MiB, bytes_copied=383 * MiB, regions=6, object_bytes=SIZE),
        _save(2.0, 0.4, 41 * MiB, bytes_uploaded=41 * MiB, bytes_copied=383 * MiB, regions=6, object_bytes=SIZE),
        _save(2.5, 0.3, 42 * MiB, bytes_uploaded=41 * MiB, bytes_copied=383 * MiB, regions=6, object_bytes=SIZE),
        {"error": "boom"},
    ]
    rec = summarize_incremental(FINE, INC, "save", SIZE, runs)
    assert rec.state == FINE and rec.n_runs == 3 and rec.error is None
    assert rec.wall_s == 2.5 and rec.wall_min_s == 2.0 and rec.cpu_s == 0.4 and rec.cpu_min_s == 0.3
    assert rec.sent_bytes == 41 * MiB and rec.bytes_copied == 383 * MiB and rec.regions == 6
    assert rec.object_bytes == SIZE and rec.cpu_s_per_gb == pytest.approx(0.4 / (SIZE / 1e9))
    assert "store CRC32C on" in rec.label
    failed = summarize_incremental(FULL, PLAIN, "load", SIZE, [{"error": "no such key"}])
    assert failed.wall_s is None and failed.error == "no such key"


def _rec(state: str, method: str, op: str, wall: float, **kw: Any) -> IncrementalRecord:
    return IncrementalRecord(method, op, SIZE, wall, None, None, None, wall_min_s=wall * 0.9, state=state, **kw)


def _records() -> list[IncrementalRecord]:
    return [
        _rec(FINE, PLAIN, "save", 3.0, cpu_s=0.5, sent_bytes=424 * MiB, server_cpu_s=4.0),
        _rec(FINE, INC, "save", 4.5, cpu_s=0.25, sent_bytes=41 * MiB, server_cpu_s=6.0, regions=6),
        _rec(FINE, INC_NO_CRC, "save", 1.5, cpu_s=0.1, sent_bytes=41 * MiB, server_cpu_s=2.0),
        _rec(FINE, RAW_COMPOSE, "save", 1.2),
        _rec("", RAW_PUT, "save", 2.4),
        _rec(FULL, PLAIN, "save", 3.0, sent_bytes=424 * MiB),
        _rec(FULL, INC, "save", 3.06, sent_bytes=424 * MiB + 4096),
        _rec(FULL, INC_NO_CRC, "save", 3.3, sent_bytes=424 * MiB),
        _rec(FINE, PLAIN, "load", 1.0),
        _rec(FINE, INC, "load", 1.02),
        _rec(FINE, INC_NO_CRC, "load", 1.2),
        _rec(FINE, PLAIN, "verify", 0.8),
        _rec(FINE, INC, "verify", 0.8),
    ]


def test_ratios_against_the_targets() -> None:
    records = _records()
    records[1].upload_floor_bytes = 41 * MiB
    ratios = {(q.state, q.metric, q.method): q for q in incremental_ratios(records)}
    sent = ratios[(FINE, "bytes sent / plain (median)", INC)]
    assert sent.value == pytest.approx(41 / 424) and sent.ok and sent.target == 0.10
    wall = ratios[(FINE, "save wall / plain (median)", INC)]
    assert wall.value == pytest.approx(1.5) and wall.ok is False
    assert ratios[(FINE, "save wall / plain (median)", INC_NO_CRC)].value == pytest.approx(0.5)
    assert ratios[(FINE, "save wall / plain (min)", INC_NO_CRC)].value == pytest.approx(0.5)
    floor = ratios[(FINE, "save wall / plain (median)", RAW_COMPOSE)]
    assert floor.value == pytest.approx(0.4) and floor.ok is None and "floor" in floor.detail
    assert ratios[(FINE, "save wall / plain (median)", RAW_PUT)].value == pytest.approx(0.8)
    cpu = ratios[(FINE, "client CPU / plain (median)", INC)]
    assert cpu.value == pytest.approx(0.5) and cpu.ok is False
    assert ratios[(FINE, "client CPU / plain (median)", INC_NO_CRC)].ok
    rule = ratios[(FINE, "bytes sent / plain (median)", "5 MiB rule")]
    assert rule.value == pytest.approx(41 / 424) and rule.ok is None and "6 changed regions" in rule.detail
    assert ratios[(FULL, "bytes sent / plain (median)", INC)].ok  # a few KiB of request headers allowed
    assert ratios[(FULL, "save wall / plain (median)", INC)].ok
    assert ratios[(FULL, "save wall / plain (median)", INC_NO_CRC)].ok is False
    assert ratios[(FINE, "server CPU / plain (median)", INC)].value == pytest.approx(1.5)
    load = ratios[(FINE, "load wall / plain's (median)", INC)]
    assert load.value == pytest.approx(1.02) and load.ok
    assert ratios[(FINE, "load wall / plain's (median)", INC_NO_CRC)].ok is False
    missing = ratios[(FULL, "verify wall / plain's (median)", INC)]
    assert missing.value is None and missing.ok is None


def test_store_checksum_comparison() -> None:
    rows = {r["state"]: r for r in store_checksum_comparison(_records())}
    assert rows[FINE]["save_wall_s_off_over_on"] == pytest.approx(1 / 3)
    assert rows[FINE]["save_server_cpu_s_off_over_on"] == pytest.approx(1 / 3)
    assert rows[FINE]["load_wall_s_off_over_on"] == pytest.approx(1.2 / 1.02)
    assert rows[FULL]["verify_wall_s_off_over_on"] is None
    assert "save wall 0.33" in format_store_checksum(list(rows.values()))


def test_tables_render_numbers_floors_and_failures() -> None:
    records = [*_records(), IncrementalRecord(INC, "save", SIZE, None, None, None, None, state=FULL, error="x\ny")]
    records = [r for r in records if not (r.state == FULL and r.method == INC and r.wall_s is not None)]
    table = format_incremental_table(records)
    lines = table.splitlines()
    assert [ln.split()[1] for ln in lines[2:7]] == [PLAIN, INC, INC_NO_CRC, RAW_COMPOSE, PLAIN]
    assert "any           raw-put" in table and "not measured: x" in table and "\ny" not in table
    assert "424.0" in table and "41.0" in table
    matrix = format_incremental_ratios(incremental_ratios(records))
    assert "bytes sent / plain (median) <= 0.1  incremental" in matrix and "0.097 met" in matrix
    assert "save wall / plain (median) <= 0.6  incremental " in matrix and "1.500 NOT MET" in matrix
    assert "  raw-compose: save wall / plain (median)" in matrix


def test_plot_incremental(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert plot_incremental(tmp_path / "i.png", _records(), "t") is None
    assert (tmp_path / "i.png").stat().st_size > 1000
    assert plot_incremental(tmp_path / "none.png", [], "t") == "nothing was measured"


def test_records_pass_the_json_schema(tmp_path: Path) -> None:
    rec = summarize_incremental(FINE, INC, "verify", SIZE, [_save(1.0, 0.5, 2048)])
    write_json(tmp_path / "i.json", {"records": [rec.to_json()]})
    assert json.loads((tmp_path / "i.json").read_text())["records"][0]["state"] == FINE


def test_plan_round_rotates() -> None:
    methods = [PLAIN, INC, INC_NO_CRC, RAW_PUT]
    assert plan_round(methods, 0) == methods and plan_round(methods, 1) == [INC, INC_NO_CRC, RAW_PUT, PLAIN]
    assert plan_round(methods, 4) == methods and plan_round([], 3) == []


def test_parse_args_incremental() -> None:
    full = parse_args(["--incremental"])
    assert full.runs == 5 and full.name == "incremental" and full.warmup and not full.run_async
    quick = parse_args(["--incremental", "--quick"])
    assert quick.runs == 1 and quick.name == "incremental-quick" and not quick.warmup
    assert parse_args(["--incremental", "--rounds", "3", "--name", "x"]).runs == 3
    for bad in (["--methods", "s3ckpt"], ["--size", "1GiB"], ["--sharded"]):
        with pytest.raises(SystemExit):
            parse_args(["--incremental", *bad])


def test_build_state_changes_only_what_trains() -> None:
    torch = pytest.importorskip("torch")
    from benchmarks.incremental_worker import build_state
    from benchmarks.workload import tensor_bytes

    one, two = build_state(QUICK_LAYOUT, FINE, 1), build_state(QUICK_LAYOUT, FINE, 2)
    assert tensor_bytes(one) == describe(QUICK_LAYOUT, FINE)["tensor_bytes"]
    for name, _, trainable in QUICK_LAYOUT.model():
        assert torch.equal(one["state_dict"][name], two["state_dict"][name]) is not trainable, name
    adam = one["optimizer_states"][0]["state"]
    assert len(adam) == 8 and not torch.equal(adam[0]["exp_avg"], two["optimizer_states"][0]["state"][0]["exp_avg"])
    assert bool((adam[0]["exp_avg_sq"] >= 0).all()) and one["global_step"] == 1
    full = build_state(QUICK_LAYOUT, FULL, 1)
    assert not torch.equal(
        full["state_dict"]["model.embed_tokens.weight"], one["state_dict"]["model.embed_tokens.weight"]
    )


def test_sent_bytes_counts_every_socket_write_and_restores() -> None:
    from benchmarks.incremental_worker import SentBytes

    original = socket.socket.sendall
    a, b = socket.socketpair()
    with a, b, SentBytes() as sent:
        a.sendall(b"x" * 1000)
        a.send(b"y" * 24)
        assert b.recv(2048) and sent.value == 1024
    assert socket.socket.sendall is original


def test_regions_since_reads_both_manifests(monkeypatch: pytest.MonkeyPatch) -> None:
    import s3ckpt.layout
    from benchmarks.incremental_worker import regions_since

    def rec(name: str, start: int, size: int, crc: int) -> SimpleNamespace:
        # What regions_since reads of a manifest's ZipRecord: name, offsets, size and both checksums.
        return SimpleNamespace(name=name, start=start, size=size, end=start + 64 + size + 16, crc32=crc, crc32c=crc)

    sizes = [("data.pkl", 1000), ("data/0", 16 * MiB), ("data/1", MiB), ("data/2", 16 * MiB), ("data/3", MiB)]
    starts, at = [], 0
    for _, n in sizes:
        starts.append(at)
        at += 64 + n + 16
    changed = ("data.pkl", "data/1", "data/3")
    old = [rec(name, s, n, 1) for (name, n), s in zip(sizes, starts, strict=True)]
    new = [rec(name, s, n, 2 if name in changed else 1) for (name, n), s in zip(sizes, starts, strict=True)]
    manifests = {
        "prev": SimpleNamespace(size=at + 200, records=tuple(old)),
        "new": SimpleNamespace(size=at + 200, records=tuple(new)),
    }
    monkeypatch.setattr(s3ckpt.layout, "read_manifest", lambda t, bucket, key: manifests[key])
    got = regions_since(None, "b", "prev", "new")
    # data.pkl and data/1 each topped up to a 5 MiB part; data/3 and the central directory end the object
    assert got["regions"] == 3 and got["upload_floor_bytes"] == 2 * MIN_PART + (MiB + 80 + 200)
    monkeypatch.setattr(s3ckpt.layout, "read_manifest", lambda t, bucket, key: None)
    assert "regions_error" in regions_since(None, "b", "prev", "new")

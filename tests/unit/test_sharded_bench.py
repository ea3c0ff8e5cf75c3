"""The sharded (DCP) benchmark's pure parts: records, targets, tables, chart, round plan, arguments, merging the
ranks' results. No server, no ranks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.report import write_json
from benchmarks.run import parse_args
from benchmarks.sharded import (
    SHARDED_METHODS,
    ShardedRecord,
    format_per_rank,
    format_sharded_ratios,
    format_sharded_table,
    plot_sharded,
    sharded_ratios,
    summarize_sharded,
)
from benchmarks.sharded_run import plan_round
from benchmarks.sharded_worker import merge
from benchmarks.stats import MiB

GiB = 1024**3
SIZE = 512 * MiB


def _rank(rank: int, cpu: float, share: int, peak: int, bound: int | None = None) -> dict[str, Any]:
    return {"rank": rank, "cpu_s": cpu, "local_bytes": share, "peak_rss_bytes": peak, "bound_bytes": bound}


def _dcp_run(wall: float, ranks: list[dict[str, Any]], peak_op: int = 80 * MiB) -> dict[str, Any]:
    return {
        "wall_s": wall,
        "cpu_s": sum(r["cpu_s"] for r in ranks),
        "peak_rss_bytes": peak_op,
        "server_cpu_s": 5.0,
        "ranks": ranks,
    }


def test_summarize_sharded_per_rank_medians_and_the_bound() -> None:
    share = 256 * MiB
    bound = share + 80 * MiB
    runs = [
        _dcp_run(4.0, [_rank(0, 1.0, share, 300 * MiB, bound), _rank(1, 0.5, share, 350 * MiB, bound)]),
        _dcp_run(3.0, [_rank(0, 1.2, share, 320 * MiB, bound), _rank(1, 0.7, share, 330 * MiB, bound)]),
        _dcp_run(5.0, [_rank(0, 1.1, share, 310 * MiB, bound), _rank(1, 0.6, share, 340 * MiB, bound)]),
        {"error": "rank 1: boom"},
    ]
    rec = summarize_sharded("s3ckpt-dcp", "save", SIZE, 2, runs, settings={"chunk_size_MB": 16})
    assert rec.ranks == 2 and rec.n_runs == 3 and rec.error is None
    assert rec.wall_s == 4.0 and rec.wall_min_s == 3.0
    assert rec.cpu_s_per_gb == pytest.approx(1.7 / (SIZE / 1e9))  # the median of the summed CPU
    assert rec.per_rank is not None and [p["rank"] for p in rec.per_rank] == [0, 1]
    assert rec.per_rank[0]["cpu_s_per_gb"] == pytest.approx(1.1 / (share / 1e9))
    assert rec.rank_cpu_s_per_gb == pytest.approx(1.1 / (share / 1e9))  # the busiest rank
    assert rec.rank_peak_rss_bytes == 340 * MiB
    # Per round the worst rank (350, 330, 340 MiB), then the median over the rounds.
    assert rec.rss_over_bound == pytest.approx(340 / 336) and rec.rss_bound_bytes == bound
    data = json.loads(json.dumps(rec.to_json()))
    assert data["ranks"] == 2 and data["per_rank"][1]["peak_rss_bytes"] == 340 * MiB


def test_summarize_one_process_baseline_has_no_rank_figures() -> None:
    rec = summarize_sharded("s3ckpt-file", "save", SIZE, 1, [{"wall_s": 3.0, "cpu_s": 0.5, "peak_rss_bytes": 1}])
    assert rec.wall_s == 3.0 and rec.per_rank is None and rec.rss_over_bound is None
    failed = summarize_sharded("fsspec-dcp", "save", SIZE, 2, [{"error": "peers venv: no network"}])
    assert failed.wall_s is None and failed.error == "peers venv: no network"


def _rec(method: str, op: str, ranks: int, wall: float, cpu: float = 1.0, **kw: Any) -> ShardedRecord:
    return ShardedRecord(method, op, SIZE, wall, SIZE / 1e9 / wall, cpu, 0, ranks=ranks, **kw)


def test_sharded_ratios_targets_and_floors() -> None:
    records = [
        _rec("s3ckpt-file", "save", 1, 3.0, cpu=1.0, wall_min_s=2.9),
        _rec("s3ckpt-file", "load", 1, 0.6, cpu=0.9),
        _rec("raw", "save", 1, 2.8, wall_min_s=2.7),
        _rec("raw", "load", 1, 0.7),
        _rec("s3torchconnector-dcp", "save", 2, 3.5, wall_min_s=3.4),
        _rec("s3torchconnector-dcp", "load", 2, 1.0, wall_min_s=0.9),
        _rec(
            "s3ckpt-dcp",
            "save",
            2,
            3.3,
            cpu=1.5,
            wall_min_s=3.1,
            rss_over_bound=0.9,
            rss_bound_bytes=336 * MiB,
            rank_peak_rss_bytes=300 * MiB,
        ),
        _rec("s3ckpt-dcp", "load", 2, 0.8, cpu=1.2, wall_min_s=0.75),
        ShardedRecord("fsspec-dcp", "save", SIZE, None, None, None, None, ranks=2, error="peers venv: no network"),
    ]
    ratios = {(q.metric, q.method): q for q in sharded_ratios(records)}
    assert {q.ranks for q in ratios.values()} == {2} and {q.size_bytes for q in ratios.values()} == {SIZE}
    file_med = ratios[("save / single-file save (median)", "s3ckpt-dcp")]
    assert file_med.value == pytest.approx(1.1) and file_med.ok and file_med.target == 1.15
    assert ratios[("save / single-file save (min)", "s3ckpt-dcp")].value == pytest.approx(3.1 / 2.9)
    raw = ratios[("save / raw PUT floor (median)", "s3ckpt-dcp")]
    assert raw.value == pytest.approx(3.3 / 2.8) and raw.ok is False
    s3tc = ratios[("save / s3torchconnector writer (median)", "s3ckpt-dcp")]
    assert s3tc.value == pytest.approx(3.3 / 3.5) and s3tc.ok is False  # 0.94 > 0.9
    floor = ratios[("save / s3torchconnector writer (median)", "raw")]
    assert floor.value == pytest.approx(2.8 / 3.5) and floor.ok is None and "floor" in floor.detail
    fsspec = ratios[("save / FsspecWriter (median)", "s3ckpt-dcp")]
    assert fsspec.value is None and fsspec.ok is None and "not measured" in fsspec.detail
    load = ratios[("load / s3torchconnector reader (min)", "s3ckpt-dcp")]
    assert load.value == pytest.approx(0.75 / 0.9) and load.ok is False
    assert ratios[("load / s3torchconnector reader (median)", "raw")].value == pytest.approx(0.7)
    cpu = ratios[("save CPU-s/GB summed / single-file", "s3ckpt-dcp")]
    assert cpu.value == pytest.approx(1.5) and cpu.ok is False and cpu.target == 1.3
    rss = ratios[("save peak RSS per rank / bound", "s3ckpt-dcp")]
    assert rss.value == pytest.approx(0.9) and rss.ok and "bound 336 MiB" in rss.detail
    reported = ratios[("load / single-file load (median)", "s3ckpt-dcp")]
    assert reported.value == pytest.approx(0.8 / 0.6) and reported.ok is None
    assert ratios[("load CPU-s/GB summed / single-file", "s3ckpt-dcp")].value == pytest.approx(1.2 / 0.9)


def test_tables_render_numbers_targets_and_missing_peers() -> None:
    share = 256 * MiB
    per_rank = [
        {"rank": 0, "cpu_s_per_gb": 2.0, "local_bytes": share, "peak_rss_bytes": 300 * MiB, "bound_bytes": None}
    ]
    records = [
        _rec("s3ckpt-dcp", "save", 2, 3.3, wall_min_s=3.1, rss_over_bound=1.2, rss_bound_bytes=336 * MiB),
        _rec("s3ckpt-file", "save", 1, 3.0),
        _rec("raw", "save", 1, 2.8),
        _rec("s3torchconnector-dcp", "load", 2, 1.0, per_rank=per_rank, rank_peak_rss_bytes=300 * MiB),
        ShardedRecord(
            "fsspec-dcp", "save", SIZE, None, None, None, None, ranks=2, error="peers venv: no network\ndetail"
        ),
    ]
    table = format_sharded_table(records)
    assert "not measured: peers venv: no network" in table and "detail" not in table
    lines = table.splitlines()
    order = [ln.split()[0] for ln in lines[2:7]]
    assert order == ["s3ckpt-dcp", "fsspec-dcp", "s3ckpt-file", "raw", "s3torchconnector-dcp"]  # saves, then loads
    assert "300 MiB" in format_per_rank(records)
    matrix = format_sharded_ratios(sharded_ratios(records))
    assert "512 MiB x2" in matrix
    assert "save peak RSS per rank / bound <= 1" in matrix and "1.20 NO" in matrix
    assert "  raw: save / s3torchconnector writer (median)" in matrix


def test_plot_sharded(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = [
        _rec("s3ckpt-dcp", "save", 1, 3.3),
        _rec("s3ckpt-dcp", "save", 2, 3.1),
        _rec("s3ckpt-dcp", "load", 2, 0.8),
        _rec("s3ckpt-file", "save", 1, 3.0),
        _rec("raw", "save", 1, 2.8),
    ]
    assert plot_sharded(tmp_path / "s.png", records, "t") is None
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert plot_sharded(tmp_path / "none.png", [], "t") == "nothing was measured"


def test_records_pass_the_json_schema(tmp_path: Path) -> None:
    rec = summarize_sharded("s3ckpt-dcp", "load", SIZE, 1, [_dcp_run(1.0, [_rank(0, 0.5, SIZE, 600 * MiB)])])
    write_json(tmp_path / "sharded.json", {"records": [rec.to_json()]})
    assert json.loads((tmp_path / "sharded.json").read_text())["records"][0]["ranks"] == 1


def test_plan_round_rotates_every_measurement() -> None:
    methods = list(SHARDED_METHODS)
    first = plan_round(methods, [1, 2, 4], 0)
    assert len(first) == 3 * 3 + 2 and first[0] == ("s3ckpt-dcp", 1) and first[-1] == ("raw", 1)
    second = plan_round(methods, [1, 2, 4], 1)
    assert sorted(second) == sorted(first) and second[0] == first[1] and second[-1] == first[0]
    assert plan_round(["s3ckpt-file"], [1, 2], 3) == [("s3ckpt-file", 1)]


def test_parse_args_sharded() -> None:
    full = parse_args(["--sharded"])
    assert full.sizes == [512 * MiB, GiB] and full.ranks == [1, 2, 4] and full.runs == 5
    assert full.methods == list(SHARDED_METHODS) and full.name == "sharded" and not full.run_async
    quick = parse_args(["--sharded", "--quick"])
    assert quick.sizes == [64 * MiB] and quick.ranks == [1, 2] and quick.runs == 1 and quick.name == "sharded-quick"
    assert "s3torchconnector-dcp" not in quick.methods and "s3ckpt-dcp" in quick.methods
    custom = parse_args(["--sharded", "--sizes", "64MiB,128MiB", "--ranks", "2", "--rounds", "3"])
    assert custom.sizes == [64 * MiB, 128 * MiB] and custom.ranks == [2] and custom.runs == 3
    assert parse_args(["--sharded", "--size", "256MiB"]).sizes == [256 * MiB]
    assert parse_args(["--sharded", "--methods", "s3ckpt-dcp,raw"]).methods == ["s3ckpt-dcp", "raw"]
    with pytest.raises(SystemExit):
        parse_args(["--sharded", "--methods", "s3ckpt,nope"])
    with pytest.raises(SystemExit):
        parse_args(["--sharded", "--ranks", "0"])


def _rank_result(rank: int, **kw: Any) -> dict[str, Any]:
    out = {
        "rank": rank,
        "wall_s": 2.0 + rank,
        "cpu_s": 1.0,
        "sharded_bytes": 100,
        "replicated_bytes": 8,
        "peak_rss_bytes": 300,
        "peak_op_rss_bytes": 50 + rank,
        "server_cpu_s": 4.0 if rank == 0 else None,
        "settings": {"chunk_size_MB": 16},
    }
    return {**out, **kw}


def test_merge_takes_rank0s_wall_sums_cpu_and_counts_replicas_once() -> None:
    merged = merge({"expect_bytes": 208}, [_rank_result(0), _rank_result(1)])
    assert merged["wall_s"] == 2.0 and merged["cpu_s"] == 2.0 and merged["peak_rss_bytes"] == 51
    assert merged["bytes"] == 208 and merged["server_cpu_s"] == 4.0 and merged["settings"] == {"chunk_size_MB": 16}
    assert "settings" not in merged["ranks"][0]
    wrong = merge({"expect_bytes": 216}, [_rank_result(0), _rank_result(1)])
    assert "expected 216" in wrong["error"]
    failed = merge({"expect_bytes": 208}, [_rank_result(0), {"rank": 1, "error": "rank 1: boom"}])
    assert failed["error"] == "rank 1: boom"


def test_methods_left_out_get_no_target_rows() -> None:
    records = [_rec("s3ckpt-dcp", "save", 1, 3.0), _rec("s3ckpt-file", "save", 1, 3.0)]
    metrics = {q.metric for q in sharded_ratios(records)}
    assert "save / single-file save (median)" in metrics
    assert not any("s3torchconnector" in m or "Fsspec" in m or "raw" in m for m in metrics)


def test_missing_peers_venv_is_recorded_not_fatal() -> None:
    from types import SimpleNamespace

    from benchmarks.peers import PeerEnv
    from benchmarks.sharded_run import ShardedBench

    bench = SimpleNamespace(peers=PeerEnv(None, error="could not create the peers venv: no network"))
    saved, loaded = ShardedBench(bench).pair("fsspec-dcp", 2, "k", SIZE)  # type: ignore[arg-type]
    assert saved == loaded and saved["error"] == "peers venv: could not create the peers venv: no network"
    rec = summarize_sharded("fsspec-dcp", "save", SIZE, 2, [saved])
    assert "not measured: peers venv: could not create" in format_sharded_table([rec])

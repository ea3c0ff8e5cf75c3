"""``make bench ARGS=--sharded``: sharded (DCP) saves and loads at several rank counts, beside the single-file
save and the raw floor of the same bytes.

For every state size (``--sizes``, default 512MiB,1GiB), each round (``--runs``/``--rounds``, default 5) takes
in turn, the order rotated every round: s3ckpt's ``S3StorageWriter``/``S3StorageReader``, s3torchconnector
1.5.0's and PyTorch's ``FsspecWriter``/``FsspecReader`` over s3fs, each at 1, 2 and 4 ranks (``--ranks``),
each at its defaults, then s3ckpt's single-file save and load of the same bytes and the raw multipart PUT /
ranged GET (one process each). Every measurement runs in fresh processes (:mod:`benchmarks.sharded_worker`,
:mod:`benchmarks.methods`); every load reads what the save just before it wrote. Prints the table, the
per-rank figures and the targets (:mod:`benchmarks.sharded`), and writes ``results/<name>.json`` and ``.png``
(default name ``sharded``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import report
from .forkserver import ForkServer
from .peers import PeerEnv, ensure_peers, peers_doc
from .run import _SEQ, BUCKET, FIXED_SETTINGS, Bench, _log, bench_session, failed
from .sharded import (
    BASELINES,
    DCP_METHODS,
    PEER_DCP,
    ShardedRecord,
    format_per_rank,
    format_sharded_ratios,
    format_sharded_table,
    plot_sharded,
    sharded_ratios,
    summarize_sharded,
)
from .stats import GB, MiB, fmt_size
from .workload import state_bytes

__all__ = ["main_sharded", "plan_round"]


def plan_round(methods: list[str], ranks: list[int], round_index: int) -> list[tuple[str, int]]:
    """The measurements of one round at one size, (method, ranks): every sharded method at every rank count,
    then the one-process baselines; rotated by the round's index so no method always goes first."""
    entries = [(m, n) for n in ranks for m in methods if m in DCP_METHODS]
    entries += [(m, 1) for m in methods if m in BASELINES]
    k = round_index % len(entries) if entries else 0
    return entries[k:] + entries[:k]


class ShardedBench:
    """Runs sharded measurements through a fork server per interpreter; one-process ones through ``Bench``."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.forks: dict[str, ForkServer] = {}

    def close(self) -> None:
        for fork in self.forks.values():
            fork.close()
        self.forks.clear()

    def _python(self, method: str) -> tuple[str | None, str | None]:
        if method not in PEER_DCP:
            return sys.executable, None
        peers = self.bench.peers
        if peers is None or peers.python is None:
            return None, (peers.error if peers else None) or "peers venv not requested"
        return peers.python, None

    def worker(self, method: str, op: str, ranks: int, key: str, size: int) -> dict[str, Any]:
        """One save or load by ``ranks`` fresh rank processes; its merged result (``error`` on failure)."""
        python, why = self._python(method)
        if python is None:
            return {"error": f"peers venv: {why}"}
        b = self.bench
        seq = f"dcp-{next(_SEQ)}"
        timeout = 180 + size / (10 * MiB)
        spec = {
            "method": method,
            "op": op,
            "ranks": ranks,
            "size": size,
            "expect_bytes": state_bytes(size),
            "bucket": BUCKET,
            "key": key,
            "endpoint": b.server.endpoint_url,
            "region": b.server.region,
            "server_pid": b.server.pid,
            "store": str(b.workdir / f"{seq}.store"),
            "out": str(b.workdir / f"{seq}.json"),
            "env": b.server.env(),
            "timeout_s": timeout,
        }
        spec_path = b.workdir / f"{seq}.spec.json"
        spec_path.write_text(json.dumps(spec))
        t0 = time.monotonic()
        error = self._run(python, spec_path, timeout + 60)
        try:
            result: dict[str, Any] = json.loads(Path(spec["out"]).read_text())
        except (OSError, ValueError):
            result = {"error": error or "the ranks wrote no result"}
        what = f"{method} x{ranks} {op} {fmt_size(size)}"
        if result.get("error"):
            _log(f"[{b.elapsed():6.0f}s] {what}: FAILED {str(result['error']).splitlines()[0][:300]}")
        else:
            gb = size / GB
            cpus = " ".join(f"{r['cpu_s'] / max(r['local_bytes'], 1) * GB:.2f}" for r in result["ranks"])
            _log(
                f"[{b.elapsed():6.0f}s] {what}: {result['wall_s']:.2f} s, {gb / result['wall_s']:.3f} GB/s, "
                f"CPU {result['cpu_s'] / gb:.2f} s/GB (per rank {cpus}), "
                f"rank RSS +{fmt_size(max(r['peak_rss_bytes'] for r in result['ranks']))}; "
                f"rank 0 untimed {result['ranks'][0].get('phases_s')}, in all {time.monotonic() - t0:.1f} s"
            )
        return result

    def _run(self, python: str, spec_path: Path, timeout: float) -> str | None:
        return self.bench._run(
            python, spec_path, timeout, module="benchmarks.sharded_worker", forks=self.forks, log_name="forkserver-dcp"
        )

    def pair(self, method: str, ranks: int, key: str, size: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Save, then load what was saved (skipped if the save failed)."""
        if method in BASELINES:
            worker = BASELINES[method]
            saved, loaded = self.bench.pair(worker, FIXED_SETTINGS[worker], key, size)
            return saved, loaded or {"error": "not loaded"}
        saved = self.worker(method, "save", ranks, key, size)
        if str(saved.get("error", "")).startswith("peers venv:"):
            return saved, saved
        if saved.get("error"):
            return saved, {"error": f"not loaded: the save failed ({str(saved['error']).splitlines()[0][:200]})"}
        return saved, self.worker(method, "load", ranks, key, size)


def main_sharded(args: argparse.Namespace) -> int:
    """Run the sharded benchmark (see the module docstring); 0 when it completed (a peer that could not run is
    recorded, not fatal)."""
    from . import bench_server

    started = time.time()
    sizes, ranks, methods = args.sizes, args.ranks, args.methods
    _log(
        f"sharded benchmark {args.name!r}: states {', '.join(fmt_size(state_bytes(s)) for s in sizes)}, ranks "
        f"{','.join(map(str, ranks))}, {args.runs} round(s), methods {','.join(methods)}"
    )
    peers: PeerEnv | None = None
    if PEER_DCP & set(methods):
        peers = ensure_peers(install=not args.no_peer_install)
        if peers.python is None:
            _log(f"peers unavailable, their rows will say why: {peers.error}")
    machine = report.machine_info()
    runs: dict[tuple[str, str, int, int], list[dict[str, Any]]] = {}
    phases: dict[str, float] = {}
    try:
        with bench_session(args, peers, "s3ckpt-bench-sharded-") as (bench, stack):
            sharded = ShardedBench(bench)
            stack.callback(sharded.close)
            phases["setup"] = time.time() - started
            for r in range(args.runs):
                for size in sizes:
                    for method, n in plan_round(methods, ranks, r):
                        key = f"sharded/r{r}/{size}/{method}-x{n}"
                        saved, loaded = sharded.pair(method, n, key, size)
                        runs.setdefault((method, "save", size, n), []).append(saved)
                        runs.setdefault((method, "load", size, n), []).append(loaded)
                    bench.clean()
                phases[f"round_{r + 1}"] = time.time() - started - sum(phases.values())
            server_meta = bench_server.server_info(bench.server, tuned=True)
    except Exception as exc:
        return failed(exc)
    records: list[ShardedRecord] = []
    for (method, op, size, n), rs in runs.items():
        settings = next((r["settings"] for r in rs if r.get("settings")), None)
        if method in BASELINES:
            settings = FIXED_SETTINGS[BASELINES[method]]
        records.append(summarize_sharded(method, op, state_bytes(size), n, rs, settings=settings))
    ratios = sharded_ratios(records)
    machine["load_avg_at_end"] = os.getloadavg()
    doc = {
        **report.results_head(args.name, started, phases, benchmark="sharded"),
        "settings": {
            "sizes": sizes,
            "state_bytes": [state_bytes(s) for s in sizes],
            "ranks": ranks,
            "runs": args.runs,
            "methods": methods,
            "state": "benchmarks.workload's tensors (weights, exp_avg, exp_avg_sq: DTensors sharded on dim 0 over "
            "a 1-D CPU DeviceMesh, gloo; the step scalars replicated), the same bytes as the single-file rows",
            "processes": "each measurement in fresh processes: the ranks forked for it by a child of a fork server "
            "that has done the imports" + (" (a new interpreter per measurement: --spawn)" if args.spawn else ""),
            "measurement": "wall: rank 0, from a barrier before the operation to one after it; CPU: each rank's "
            "user+system CPU (all threads) between those barriers, summed (CPU-s/GB: per GB of the whole state) "
            "and per rank (per GB of its share); peak RSS: VmHWM reset before the operation, minus the RSS just "
            "before it (peak_rss_bytes) or before the state was built (per-rank peak_rss_bytes, checked against "
            "the bound); methods alternate, order rotated every round; median and min over the rounds",
            "threads": "one intra-op thread per rank when ranks > 1 (as torchrun's OMP_NUM_THREADS=1)",
            "bytes": "tensor bytes of the whole state; GB = 1e9 bytes",
        },
        "machine": machine,
        "server": server_meta,
        "peers": peers_doc(peers),
        "records": [r.to_json() for r in records],
        "ratios": [q.to_json() for q in ratios],
    }
    json_path = args.results_dir / f"{args.name}.json"
    report.write_json(json_path, doc)
    sizes_text = ", ".join(fmt_size(state_bytes(s)) for s in sizes)
    title = (
        f"s3ckpt bench '{args.name}': sharded (DCP) saves and loads, {sizes_text},\n"
        f"{','.join(map(str, ranks))} gloo ranks, {args.runs} rounds; {machine['cores']} cores, {machine['cpu_model']}"
    )
    png_note = plot_sharded(json_path.with_suffix(".png"), records, title)
    print(format_sharded_table(records))
    print()
    print(format_per_rank(records))
    print()
    print(format_sharded_ratios(ratios))
    if peers is not None and peers.python is None:
        print(f"\npeers not measured: {peers.error}")
    report.print_footer(json_path, png_note, doc, machine)
    return 0

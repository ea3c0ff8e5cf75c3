"""``make bench`` / ``s3ckpt bench``: s3ckpt side by side with what users would pick instead, and the limits.

Starts a tuned embedded SeaweedFS, then measures every method's save and load of the same state dict, each
measurement in a fresh process (:mod:`benchmarks.methods`), the methods taken in turn (round-robin, the order
rotated every round) and the median of ``--runs`` runs reported. Writes ``benchmarks/results/<name>.json`` and
``.png`` and prints the table and the ratios against the targets.

    python -m benchmarks.run                      # 1 GiB, 3 runs, every method (about 8 minutes)
    python -m benchmarks.run --quick              # 64 MiB, 1 run, no peers venv: a smoke test
    python -m benchmarks.run --size 256MiB --methods s3ckpt,raw --runs 5 --name small
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import report
from .forkserver import ForkServer
from .peers import PeerEnv, ensure_peers, peer_requirements
from .stats import GB, MiB, Record, derived_ratios, fmt_size, median, parse_size, summarize
from .workload import state_bytes

__all__ = ["ALL_METHODS", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
ALL_METHODS = [
    "s3ckpt",
    "s3ckpt-tuned",
    "s3ckpt-async",
    "nemo-ref",
    "lightning-s3fs",
    "s3torchconnector",
    "torch-tmpfs",
    "raw",
]
QUICK_METHODS = ["s3ckpt", "s3ckpt-tuned", "s3ckpt-async", "nemo-ref", "torch-tmpfs", "raw"]
PEER_METHODS = {"lightning-s3fs", "s3torchconnector"}
SAVE_ONLY = {"s3ckpt-async"}
DEFAULTS = {"chunk_size_MB": 64, "max_write_concurrency": 10, "max_read_concurrency": 15}
FIXED_SETTINGS: dict[str, dict[str, Any]] = {
    "s3ckpt": DEFAULTS,
    "nemo-ref": DEFAULTS,
    "lightning-s3fs": {"fsspec": "s3fs defaults (50 MiB blocks)"},
    "s3torchconnector": {"part_size_MB": 8},
    "torch-tmpfs": {},
    "raw": {"part_size_MB": 16, "concurrency": 8, "client": "boto3 low-level, unsigned payload, no checksums"},
}
SAVE_GRID = [{"chunk_size_MB": c, "max_write_concurrency": w} for c in (8, 16, 32) for w in (4, 8)]
LOAD_GRID = [{"max_read_concurrency": r} for r in (4, 8)]
BUCKET = "bench"
_SEQ = itertools.count(1)  # unique spec and result file names across every Bench of the run


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Bench:
    """One benchmark run: the server, the interpreters, and the workers it starts."""

    def __init__(
        self,
        args: argparse.Namespace,
        server: Any,
        peers: PeerEnv | None,
        workdir: Path,
        forks: dict[str, ForkServer] | None = None,
    ) -> None:
        self.args = args
        self.server = server
        self.peers = peers
        self.workdir = workdir
        self.tmpfs = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else workdir
        self.t0 = time.monotonic()
        # The workers' environment: none of the caller's AWS or s3ckpt settings (an AWS_ENDPOINT_URL_S3 would
        # win over ours); the server's endpoint and credentials travel in each spec.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3CKPT_"))}
        self.forks: dict[str, ForkServer] = forks if forks is not None else {}

    def _run(self, python: str, spec_path: Path, timeout: float) -> str | None:
        """Run one spec in a fresh process; return an error if no result can be expected."""
        if self.args.spawn:
            cmd = [python, "-m", "benchmarks.methods", str(spec_path)]
            try:
                proc = subprocess.run(cmd, cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return f"timed out after {timeout:.0f} s"
            return None if proc.returncode in (0, 3) else f"worker exited {proc.returncode}: {proc.stderr[-400:]}"
        fork = self.forks.get(python)
        if fork is None:
            log = self.workdir / f"forkserver-{len(self.forks)}.log"
            fork = self.forks[python] = ForkServer(python, REPO_ROOT, self.env, log)
        status, killed = fork.run(spec_path, timeout)
        if killed:
            return f"timed out after {timeout:.0f} s"
        if status not in (0, 3 << 8):
            return f"worker ended with wait status {status}: {fork.log_tail(6)}"
        return None

    def close(self) -> None:
        """Stop the fork servers."""
        for fork in self.forks.values():
            fork.close()
        self.forks.clear()

    def worker(self, method: str, op: str, settings: dict[str, Any], key: str, size: int) -> dict[str, Any]:
        """Run one measurement in a fresh process and return its result dict (``error`` on failure)."""
        python = sys.executable
        if method in PEER_METHODS:
            if self.peers is None or self.peers.python is None:
                return {"error": self.peers.error if self.peers else "peers venv not requested"}
            python = self.peers.python
        seq = next(_SEQ)
        spec = {
            "method": method,
            "op": op,
            "settings": settings,
            "size": size,
            "expect_bytes": state_bytes(size),
            "bucket": BUCKET,
            "key": key,
            "endpoint": self.server.endpoint_url,
            "region": self.server.region,
            "server_pid": self.server.pid,
            "tmpfs_dir": str(self.tmpfs),
            "out": str(self.workdir / f"result-{seq}.json"),
            "env": self.server.env(),
        }
        spec_path = self.workdir / f"spec-{seq}.json"
        spec_path.write_text(json.dumps(spec))
        timeout = 120 + size / (20 * MiB)
        error = self._run(python, spec_path, timeout)
        result: dict[str, Any]
        try:
            result = json.loads(Path(spec["out"]).read_text())
        except (OSError, ValueError):
            result = {"error": error or "the worker wrote no result"}
        gb = size / GB
        what = f"{method} {op} {fmt_size(size)}"
        if result.get("error"):
            _log(f"[{self.elapsed():6.0f}s] {what}: FAILED {result['error'].splitlines()[0][:200]}")
        else:
            stall = f" stall {result['stall_s']:.2f} s" if "stall_s" in result else ""
            _log(
                f"[{self.elapsed():6.0f}s] {what}: {result['wall_s']:.2f} s, {gb / result['wall_s']:.3f} GB/s, "
                f"CPU {result['cpu_s'] / gb:.2f} s/GB, RSS +{fmt_size(result['peak_rss_bytes'])}{stall}"
            )
        return result

    def pair(
        self, method: str, settings: dict[str, Any], key: str, size: int
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Save then (unless save-only) load one object; the load is skipped if the save failed."""
        saved = self.worker(method, "save", settings, key, size)
        loaded = None
        if method not in SAVE_ONLY:
            if saved.get("error"):
                loaded = {"error": f"not loaded: the save failed ({saved['error'].splitlines()[0][:200]})"}
            else:
                loaded = self.worker(method, "load", settings, key, size)
        if method == "torch-tmpfs":
            (self.tmpfs / (key.replace("/", "_") + ".pt")).unlink(missing_ok=True)
        return saved, loaded

    def clean(self) -> None:
        """Delete every object and compact the volumes, between rounds (not timed)."""
        from . import bench_server

        bench_server.empty_bucket(self.server, BUCKET)
        bench_server.vacuum(self.server)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def sweep(bench: Bench, size: int, runs: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Save over :data:`SAVE_GRID` and load over :data:`LOAD_GRID`, round-robin; best by median wall time."""
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in range(runs):
        load_key = None
        for i, cfg in enumerate(SAVE_GRID):
            key = f"sweep/r{r}-save{i}"
            res = bench.worker("s3ckpt-tuned", "save", {**DEFAULTS, **cfg}, key, size)
            results.setdefault(("save", json.dumps(cfg)), []).append(res)
            if not res.get("error") and (load_key is None or cfg["chunk_size_MB"] == 16):
                load_key = key
        for cfg in LOAD_GRID:
            if load_key is None:
                break
            res = bench.worker("s3ckpt-tuned", "load", {**DEFAULTS, **cfg}, load_key, size)
            results.setdefault(("load", json.dumps(cfg)), []).append(res)
        bench.clean()
    table = [
        {
            "op": op,
            "settings": json.loads(cfg),
            "wall_s": median(r.get("wall_s") for r in rs if not r.get("error")),
            "runs": [r.get("wall_s") for r in rs],
        }
        for (op, cfg), rs in results.items()
    ]
    best = dict(DEFAULTS)
    for op in ("save", "load"):
        measured = [row for row in table if row["op"] == op and row["wall_s"] is not None]
        if measured:
            best.update(min(measured, key=lambda row: row["wall_s"])["settings"])
    return best, table


def compare_servers(args: argparse.Namespace, workdir: Path, size: int, main_bench: Bench) -> dict[str, Any]:
    """One raw PUT against a server with s3ckpt's default flags, and one against the tuned server."""
    from . import bench_server

    out: dict[str, Any] = {"size_bytes": size}
    with bench_server.start_server(workdir / "weed-default", tuned=False) as server:
        bench_server.warm_up(server, BUCKET)
        bench = Bench(args, server, None, workdir, forks=main_bench.forks)
        bench.t0 = main_bench.t0
        out["default"] = bench.worker("raw", "save", FIXED_SETTINGS["raw"], "compare/default", size)
    out["tuned"] = main_bench.worker("raw", "save", FIXED_SETTINGS["raw"], "compare/tuned", size)
    for which in ("default", "tuned"):
        res = out[which]
        if not res.get("error"):
            res["gbps"] = size / GB / res["wall_s"]
            if res.get("server_cpu_s") is not None:
                res["server_cpu_s_per_gb"] = res["server_cpu_s"] / (size / GB)
    main_bench.clean()
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="s3ckpt bench", description=__doc__.splitlines()[0])
    p.add_argument("--size", default=None, help="state dict size, e.g. 256MiB, 1GiB (default 1GiB; --quick 64MiB)")
    p.add_argument("--quick", action="store_true", help="small size, 1 run each, no peers venv")
    p.add_argument("--runs", type=int, default=None, help="runs per method (median reported; default 3)")
    p.add_argument("--methods", default=None, help=f"comma-separated, or 'all': {','.join(ALL_METHODS)}")
    p.add_argument("--name", default=None, help="results/<name>.json and .png (default 'latest'; --quick 'quick')")
    p.add_argument("--sweep-size", default=None, help="state size for the settings sweep (default min(size, 256MiB))")
    p.add_argument("--sweep-runs", type=int, default=None, help="runs per sweep setting (default 2; --quick 1)")
    p.add_argument("--no-server-compare", action="store_true", help="skip the default-vs-tuned server raw PUT")
    p.add_argument("--no-peer-install", action="store_true", help="use the peers venv only if it already exists")
    p.add_argument("--spawn", action="store_true", help="a new interpreter per measurement, not a forked child")
    p.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    args = p.parse_args(argv)
    args.size = parse_size(args.size or ("64MiB" if args.quick else "1GiB"))
    args.runs = args.runs or (1 if args.quick else 3)
    args.sweep_runs = args.sweep_runs or (1 if args.quick else 2)
    args.sweep_size = parse_size(args.sweep_size) if args.sweep_size else min(args.size, 256 * MiB)
    args.name = args.name or ("quick" if args.quick else "latest")
    if args.methods in (None, "") or args.methods == "all":
        args.methods = list(QUICK_METHODS if args.quick and args.methods is None else ALL_METHODS)
    else:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(args.methods) - set(ALL_METHODS))
        if unknown:
            p.error(f"unknown method(s) {unknown}; known: {', '.join(ALL_METHODS)}")
    if args.runs < 1 or args.sweep_runs < 1:
        p.error("--runs and --sweep-runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when it completed (a peer that could not run is recorded, not fatal)."""
    from . import bench_server  # boto3 and the server only when benchmarking, not for --help or the tests

    args = parse_args(argv)
    started = time.time()
    size, methods = args.size, args.methods
    nbytes = state_bytes(size)
    _log(f"benchmark {args.name!r}: state {fmt_size(nbytes)}, {args.runs} run(s), methods {','.join(methods)}")
    peers = ensure_peers(install=not args.no_peer_install) if PEER_METHODS & set(methods) else None
    machine = report.machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="s3ckpt-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(bench_server.start_server(workdir / "weed", tuned=True))
            bench_server.warm_up(server, BUCKET)
            bench = Bench(args, server, peers, workdir)
            stack.callback(bench.close)
            phases: dict[str, float] = {"setup": time.time() - started}
            compare = None if args.no_server_compare else compare_servers(args, workdir, size, bench)
            phases["server_compare"] = time.time() - started - sum(phases.values())
            tuned: dict[str, Any] = dict(DEFAULTS)
            sweep_table: list[dict[str, Any]] = []
            if {"s3ckpt-tuned", "s3ckpt-async"} & set(methods):
                tuned, sweep_table = sweep(bench, args.sweep_size, args.sweep_runs)
                _log(f"[{bench.elapsed():6.0f}s] best settings: {tuned}")
            phases["sweep"] = time.time() - started - sum(phases.values())
            settings = {**FIXED_SETTINGS, "s3ckpt-tuned": tuned, "s3ckpt-async": tuned}
            runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for r in range(args.runs):
                order = methods[r % len(methods) :] + methods[: r % len(methods)]
                for method in order:
                    saved, loaded = bench.pair(method, settings[method], f"{method}/r{r}", size)
                    runs.setdefault((method, "save"), []).append(saved)
                    if loaded is not None:
                        runs.setdefault((method, "load"), []).append(loaded)
                bench.clean()
                phases[f"round_{r + 1}"] = time.time() - started - sum(phases.values())
            server_meta = bench_server.server_info(server, tuned=True)
    except Exception as exc:
        traceback.print_exc()
        _log(f"benchmark failed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    records: list[Record] = []
    for method in methods:
        for op in ("save", "load"):
            if (method, op) in runs:
                rec = summarize(method, op, nbytes, runs[(method, op)], settings=settings[method])
                rec.label = report.LABELS.get(method, "")
                records.append(rec)
    ratios = derived_ratios(records, nbytes)
    machine["load_avg_at_end"] = os.getloadavg()
    doc = {
        "name": args.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "total_s": round(time.time() - started, 1),
        "phases_s": {k: round(v, 1) for k, v in phases.items()},
        "settings": {
            "requested_size": size,
            "state_bytes": nbytes,
            "runs": args.runs,
            "methods": methods,
            "quick": args.quick,
            "sweep_size": args.sweep_size,
            "sweep_runs": args.sweep_runs,
            "tuned_settings": tuned,
            "bytes": "tensor bytes of the state dict (the same for every method); GB = 1e9 bytes",
            "processes": "a new interpreter per measurement" if args.spawn else "a child forked per measurement",
            "measurement": "each figure in a fresh process; medians; wall = operation only; CPU = client "
            "user+system over the operation, all threads; peak RSS = VmHWM minus RSS before the operation "
            "(save: above the state dict; load: above a fresh process, includes the loaded tensors)",
        },
        "machine": machine,
        "server": {**server_meta, "default_vs_tuned_raw_put": compare},
        "peers": None if peers is None else {**peers.__dict__, "requirements": peer_requirements()},
        "sweep": sweep_table,
        "records": [r.to_json() for r in records],
        "ratios": [q.to_json() for q in ratios],
    }
    json_path = args.results_dir / f"{args.name}.json"
    report.write_json(json_path, doc)
    title = f"s3ckpt bench '{args.name}': {fmt_size(nbytes)} state, median of {args.runs}, {machine['cpu_model']}"
    png_note = report.plot(args.results_dir / f"{args.name}.png", records, title)
    print(report.format_table(records))
    print()
    print(report.format_ratios(ratios))
    print(f"\nsettings of s3ckpt-tuned / s3ckpt-async (sweep at {fmt_size(args.sweep_size)}): {tuned}")
    print("server flags: " + " ".join(server_meta["command_flags"]))
    if compare:
        print(report.format_compare(compare))
    phase_text = ", ".join(f"{k} {v:.0f}" for k, v in doc["phases_s"].items())
    print(f"\nwrote {json_path}" + (f"; no PNG: {png_note}" if png_note else f" and {json_path.with_suffix('.png')}"))
    print(
        f"total {doc['total_s']:.0f} s ({phase_text}); "
        f"load average {machine['load_avg_at_start']} -> {machine['load_avg_at_end']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

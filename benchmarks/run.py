"""``make bench`` / ``s3ckpt bench``: s3ckpt at its defaults side by side with what users would pick instead.

Starts a tuned embedded SeaweedFS, then measures every method's save and load of the same state dict, each
measurement in a fresh process (:mod:`benchmarks.methods`), the methods taken in turn (round-robin, the order
rotated every round); each figure's median and minimum over ``--runs`` rounds are reported. Then a run of
consecutive async saves (the stall a training step sees). ``--sweep`` first measures s3ckpt over a grid of
part size x write concurrency (saves) and range size x read concurrency (loads), the table behind the
defaults. Writes ``benchmarks/results/<name>.json`` and ``.png`` and prints the tables and the targets.

    python -m benchmarks.run                          # 512 MiB, 5 rounds, the peers, async
    python -m benchmarks.run --sweep                  # the defaults sweep first (512 MiB, confirmations at 1 GiB)
    python -m benchmarks.run --quick                  # 64 MiB, 1 run, no peers venv: a smoke test
    python -m benchmarks.run --size 1GiB --methods s3ckpt,raw --runs 5 --name big
    python -m benchmarks.run --sharded                # sharded (DCP): 512 MiB and 1 GiB, 1/2/4 ranks, 5 rounds
    python -m benchmarks.run --sharded --sizes 64MiB --ranks 1,2 --rounds 1   # a short sharded run
    python -m benchmarks.run --incremental            # incremental saves (base=) vs plain: 424 MiB, 5 rounds
    python -m benchmarks.run --incremental --quick    # the same on 26 MiB states, 1 round, no warm-up

``--sharded`` runs :mod:`benchmarks.sharded_run` instead: s3ckpt's DCP writer and reader against
s3torchconnector's and PyTorch's fsspec ones at several rank counts, beside s3ckpt's single-file save and the
raw PUT / GET of the same bytes (``results/sharded.json`` and ``.png``). ``--incremental`` runs
:mod:`benchmarks.incremental_run`: chains of plain and incremental saves of a fine-tuning and a full-training
state, with their loads and verifies and the store's floors (``results/incremental.json`` and ``.png``).
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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import report
from .forkserver import ForkServer
from .peers import PeerEnv, ensure_peers, peers_doc
from .sharded import PEER_DCP as SHARDED_PEERS
from .sharded import SHARDED_METHODS
from .stats import GB, MiB, Record, derived_ratios, fmt_size, median, parse_size, summarize
from .workload import state_bytes

__all__ = ["ALL_METHODS", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
ALL_METHODS = [
    "s3ckpt",
    "s3ckpt-nemo-knobs",
    "nemo",
    "s3torchconnector",
    "lightning-s3fs",
    "nemo-ref",
    "torch-tmpfs",
    "raw",
]
DEFAULT_METHODS = ["s3ckpt", "s3ckpt-nemo-knobs", "nemo", "s3torchconnector", "lightning-s3fs", "torch-tmpfs", "raw"]
QUICK_METHODS = ["s3ckpt", "s3ckpt-nemo-knobs", "nemo-ref", "torch-tmpfs", "raw"]
PEER_METHODS = {"lightning-s3fs", "s3torchconnector", "nemo"}
NEMO_KNOBS = {"chunk_size_MB": 64, "max_write_concurrency": 10, "max_read_concurrency": 15}
FIXED_SETTINGS: dict[str, dict[str, Any]] = {
    "s3ckpt": {},  # S3CheckpointIO(dirpath): no knob given, the defaults
    "s3ckpt-nemo-knobs": NEMO_KNOBS,  # NeMo's YAML pasted verbatim
    "nemo": {},  # NeMo 3.0.0 S3CheckpointIO(dirpath): its defaults (64 MiB x 10 write, x 15 read)
    "nemo-ref": NEMO_KNOBS,
    "lightning-s3fs": {"fsspec": "s3fs defaults (50 MiB blocks)"},
    "s3torchconnector": {"part_size_MB": 8},  # S3ClientConfig's default part size
    "torch-tmpfs": {},
    "raw": {"part_size_MB": 16, "concurrency": 8, "client": "boto3 low-level, unsigned payload, no checksums"},
}
# The defaults sweep (--sweep): saves over part size x write concurrency, loads over range x read concurrency.
SAVE_GRID = [{"chunk_size_MB": c, "max_write_concurrency": w} for c in (8, 16, 32, 64) for w in (4, 8, 10)]
LOAD_GRID = [{"read_chunk_size_MB": r, "max_read_concurrency": c} for r in (8, 16) for c in (4, 8, 15)]
# A setting within this fraction of the fastest median counts as fastest; the cheapest in CPU of those wins.
TIE = 0.05
ASYNC_SETTINGS = {"saves": 10, "interval_factor": 1.2}
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

    def _run(
        self,
        python: str,
        spec_path: Path,
        timeout: float,
        *,
        module: str = "benchmarks.methods",
        forks: dict[str, ForkServer] | None = None,
        log_name: str = "forkserver",
    ) -> str | None:
        """Run one spec in a fresh process of ``module`` (a fork of its server, or spawned with ``--spawn``);
        return an error if no result can be expected. ``forks``: the servers of ``module`` (default: this
        bench's own, of ``benchmarks.methods``)."""
        if self.args.spawn:
            cmd = [python, "-m", module, str(spec_path)]
            try:
                proc = subprocess.run(cmd, cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return f"timed out after {timeout:.0f} s"
            return None if proc.returncode in (0, 3) else f"worker exited {proc.returncode}: {proc.stderr[-400:]}"
        servers = self.forks if forks is None else forks
        fork = servers.get(python)
        if fork is None:
            log = self.workdir / f"{log_name}-{len(servers)}.log"
            fork = servers[python] = ForkServer(python, REPO_ROOT, self.env, log, module=module)
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


@contextlib.contextmanager
def bench_session(
    args: argparse.Namespace, peers: PeerEnv | None, prefix: str
) -> Iterator[tuple[Bench, contextlib.ExitStack]]:
    """A fresh work directory, the tuned server in it (warmed up) and a :class:`Bench` on it; with the exit
    stack, on which the caller's own closers run before the bench's and the server's. Removes the directory."""
    from . import bench_server

    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(bench_server.start_server(workdir / "weed", tuned=True))
            bench_server.warm_up(server, BUCKET)
            bench = Bench(args, server, peers, workdir)
            stack.callback(bench.close)
            yield bench, stack
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def failed(exc: Exception) -> int:
    """Report a benchmark that stopped (call it in the ``except`` block); the exit status, 1."""
    traceback.print_exc()
    _log(f"benchmark failed: {type(exc).__name__}: {exc}")
    return 1


def _row(op: str, cfg: dict[str, Any], size: int, rs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rs if not r.get("error")]
    gb = size / GB
    cpu = median(r.get("cpu_s") for r in ok)
    rss = median(r.get("peak_rss_bytes") for r in ok)
    return {
        "op": op,
        "size_bytes": size,
        "settings": cfg,
        "wall_s": median(r.get("wall_s") for r in ok),
        "wall_min_s": min((r["wall_s"] for r in ok), default=None),
        "cpu_s_per_gb": cpu / gb if cpu is not None else None,
        "peak_rss_bytes": int(rss) if rss is not None else None,
        "runs": [r.get("wall_s") for r in rs],
        "errors": [r["error"][:200] for r in rs if r.get("error")],
    }


def pick(table: list[dict[str, Any]], op: str, size: int | None = None) -> dict[str, Any] | None:
    """The fastest setting by median wall; of those within :data:`TIE` of it, the one with the least CPU."""
    rows = [r for r in table if r["op"] == op and r["wall_s"] is not None and (size is None or r["size_bytes"] == size)]
    if not rows:
        return None
    best = min(r["wall_s"] for r in rows)
    close = [r for r in rows if r["wall_s"] <= best * (1 + TIE)]
    return min(close, key=lambda r: (r["cpu_s_per_gb"] if r["cpu_s_per_gb"] is not None else 1e9, r["wall_s"]))


def robust(table: list[dict[str, Any]], op: str) -> list[dict[str, Any]]:
    """The settings within :data:`TIE` of the fastest median at every size they were measured at, measured at
    every size the sweep has (the sweep and its confirmations): the candidates for a default."""
    rows = [r for r in table if r["op"] == op and r["wall_s"] is not None]
    sizes = sorted({r["size_bytes"] for r in rows})
    best = {size: min(r["wall_s"] for r in rows if r["size_bytes"] == size) for size in sizes}
    close: dict[str, set[int]] = {}
    for r in rows:
        if r["wall_s"] <= best[r["size_bytes"]] * (1 + TIE):
            close.setdefault(json.dumps(r["settings"], sort_keys=True), set()).add(r["size_bytes"])
    return [json.loads(k) for k, v in close.items() if v == set(sizes)]


def sweep(
    bench: Bench,
    size: int,
    runs: int,
    confirm_size: int | None,
    confirm_runs: int,
    save_grid: list[dict[str, Any]] | None = None,
    load_grid: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Saves over :data:`SAVE_GRID` and loads over :data:`LOAD_GRID` at ``size``, round-robin (order rotated
    every run); then the best two of each, the defaults and NeMo's knobs again at ``confirm_size``."""
    from s3ckpt.config import TransferConfig

    defaults = TransferConfig()
    default_save = {"chunk_size_MB": defaults.chunk_size_MB, "max_write_concurrency": defaults.max_write_concurrency}
    default_load = {
        "read_chunk_size_MB": defaults.read_chunk_size_MB,
        "max_read_concurrency": defaults.max_read_concurrency,
    }

    def one(
        sz: int, save_grid: list[dict[str, Any]], load_grid: list[dict[str, Any]], n: int, tag: str
    ) -> list[dict[str, Any]]:
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in range(n):
            order = save_grid[r % len(save_grid) :] + save_grid[: r % len(save_grid)]
            load_key = None
            for i, cfg in enumerate(order):
                key = f"sweep/{tag}-r{r}-save{i}"
                res = bench.worker("s3ckpt", "save", cfg, key, sz)
                results.setdefault(("save", json.dumps(cfg, sort_keys=True)), []).append(res)
                # Loads read the object saved with the default parts (the store keeps one chunk per part,
                # so the part size a checkpoint was saved with shapes its ranged reads), else the first one.
                if not res.get("error") and (load_key is None or cfg == default_save):
                    load_key = key
            lorder = load_grid[r % len(load_grid) :] + load_grid[: r % len(load_grid)]
            for cfg in lorder:
                if load_key is None:
                    break
                res = bench.worker("s3ckpt", "load", cfg, load_key, sz)
                results.setdefault(("load", json.dumps(cfg, sort_keys=True)), []).append(res)
            bench.clean()
        return [_row(op, json.loads(cfg), sz, rs) for (op, cfg), rs in results.items()]

    table = one(size, save_grid or SAVE_GRID, load_grid or LOAD_GRID, runs, "a")
    confirm: list[dict[str, Any]] = []
    if confirm_size:

        def top(op: str, default: dict[str, Any], extra: dict[str, Any]) -> list[dict[str, Any]]:
            rows = sorted((r for r in table if r["op"] == op and r["wall_s"] is not None), key=lambda r: r["wall_s"])
            cands = [r["settings"] for r in rows[:2]] + [default, extra]
            return [json.loads(c) for c in dict.fromkeys(json.dumps(c, sort_keys=True) for c in cands)]

        nemo_save = {"chunk_size_MB": 64, "max_write_concurrency": 10}
        nemo_load = {"read_chunk_size_MB": 16, "max_read_concurrency": 15}
        confirm = one(
            confirm_size, top("save", default_save, nemo_save), top("load", default_load, nemo_load), confirm_runs, "c"
        )
    full = table + confirm
    return {
        "size_bytes": size,
        "runs": runs,
        "confirm_size_bytes": confirm_size,
        "confirm_runs": confirm_runs,
        "rule": f"fastest median wall; of the settings within {TIE:.0%} of it, the least client CPU-s/GB",
        "table": full,
        "best_save": (pick(table, "save") or {}).get("settings"),
        "best_load": (pick(table, "load") or {}).get("settings"),
        "best_save_confirm": (pick(confirm, "save") or {}).get("settings") if confirm else None,
        "best_load_confirm": (pick(confirm, "load") or {}).get("settings") if confirm else None,
        "robust_save": robust(full, "save"),
        "robust_load": robust(full, "load"),
        "defaults": {**default_save, **default_load},
    }


def async_phase(bench: Bench, size: int, pendings: Sequence[int], interval: float) -> list[dict[str, Any]]:
    """One run of consecutive async saves per ``max_pending_saves`` value (see ``methods._async_run``)."""
    out = []
    for pending in pendings:
        settings = {**ASYNC_SETTINGS, "interval_factor": interval, "max_pending_saves": pending}
        res = bench.worker("s3ckpt-async", "save", settings, f"async/p{pending}", size)
        res["max_pending_saves"] = pending
        out.append(res)
        bench.clean()
    return out


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


_GRID_ARGS = ("sweep_parts", "sweep_writers", "sweep_ranges", "sweep_readers")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="s3ckpt bench", description=__doc__.splitlines()[0])
    p.add_argument("--size", default=None, help="state dict size, e.g. 256MiB, 1GiB (default 512MiB; --quick 64MiB)")
    p.add_argument("--quick", action="store_true", help="small size, 1 run each, no peers venv, no async run")
    p.add_argument(
        "--runs", "--rounds", type=int, default=None, help="rounds of every method (median and min; default 5)"
    )
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated, or 'all': {','.join(ALL_METHODS)}; with --sharded: {','.join(SHARDED_METHODS)}",
    )
    p.add_argument(
        "--sharded",
        action="store_true",
        help="the sharded (DCP) benchmark instead: DCP writers and readers at --ranks, beside the single-file save",
    )
    p.add_argument(
        "--incremental",
        action="store_true",
        help="the incremental-save benchmark instead: plain vs s3ckpt.save(base=) on fine-tuning and full-training",
    )
    p.add_argument("--sizes", default=None, help="--sharded: total state sizes (default 512MiB,1GiB; --quick 64MiB)")
    p.add_argument("--ranks", default=None, help="--sharded: rank counts (default 1,2,4; --quick 1,2)")
    p.add_argument("--name", default=None, help="results/<name>.json and .png (default 'latest'; --quick 'quick')")
    p.add_argument("--sweep", action="store_true", help="first sweep part size x concurrency (the defaults' table)")
    p.add_argument("--sweep-size", default=None, help="state size of the sweep (default 512MiB; --quick 64MiB)")
    p.add_argument("--sweep-runs", type=int, default=None, help="runs per sweep setting (default 2; --quick 1)")
    p.add_argument("--sweep-parts", default="8,16,32,64", help="sweep: part sizes in MiB (default 8,16,32,64)")
    p.add_argument("--sweep-writers", default="4,8,10", help="sweep: write concurrencies (default 4,8,10)")
    p.add_argument("--sweep-ranges", default="8,16", help="sweep: ranged-GET sizes in MiB (default 8,16)")
    p.add_argument("--sweep-readers", default="4,8,15", help="sweep: read concurrencies (default 4,8,15)")
    p.add_argument("--confirm-size", default=None, help="size of the sweep's confirmations (default 1GiB; 0: none)")
    p.add_argument("--confirm-runs", type=int, default=None, help="runs per confirmation (default 1)")
    p.add_argument("--no-async", action="store_true", help="skip the run of consecutive async saves")
    p.add_argument("--async-pending", default="2,1", help="max_pending_saves values of the async runs (default 2,1)")
    p.add_argument(
        "--async-interval",
        type=float,
        default=ASYNC_SETTINGS["interval_factor"],
        help="training time between "
        "async saves, as a multiple of one sync save (default 1.2: uploads keep up; 1.0: only just, on average)",
    )
    p.add_argument("--server-compare", action="store_true", help="also a raw PUT against a default-flag server")
    p.add_argument("--no-peer-install", action="store_true", help="use the peers venv only if it already exists")
    p.add_argument("--spawn", action="store_true", help="a new interpreter per measurement, not a forked child")
    p.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    args = p.parse_args(argv)
    args.size_given = args.size is not None
    args.size = parse_size(args.size or ("64MiB" if args.quick else "512MiB"))
    args.runs = args.runs or (1 if args.quick else 5)
    args.sweep_runs = args.sweep_runs or (1 if args.quick else 2)
    args.sweep_size = parse_size(args.sweep_size) if args.sweep_size else min(args.size, 512 * MiB)
    if args.confirm_size in (None, ""):
        args.confirm_size = None if args.quick else 1024 * MiB
    else:
        args.confirm_size = None if args.confirm_size == "0" else parse_size(args.confirm_size)
    args.confirm_runs = args.confirm_runs or 1
    args.async_pending = [int(x) for x in str(args.async_pending).split(",") if x.strip()]
    ints = {k: [int(x) for x in str(getattr(args, k)).split(",") if x.strip()] for k in _GRID_ARGS}
    args.save_grid = [
        {"chunk_size_MB": c, "max_write_concurrency": w} for c in ints["sweep_parts"] for w in ints["sweep_writers"]
    ]
    args.load_grid = [
        {"read_chunk_size_MB": r, "max_read_concurrency": c}
        for r in ints["sweep_ranges"]
        for c in ints["sweep_readers"]
    ]
    args.run_async = not (args.no_async or args.quick)
    if args.sharded and args.incremental:
        p.error("--sharded and --incremental are two benchmarks: run one at a time")
    if args.sharded:
        return _sharded_args(p, args)
    if args.incremental:
        return _incremental_args(p, args)
    args.name = args.name or ("quick" if args.quick else "latest")
    if args.methods in (None, ""):
        args.methods = list(QUICK_METHODS if args.quick else DEFAULT_METHODS)
    elif args.methods == "all":
        args.methods = list(ALL_METHODS)
    else:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(args.methods) - set(ALL_METHODS))
        if unknown:
            p.error(f"unknown method(s) {unknown}; known: {', '.join(ALL_METHODS)}")
    if args.runs < 1 or args.sweep_runs < 1:
        p.error("--runs and --sweep-runs must be at least 1")
    return args


def _sharded_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The --sharded defaults and checks: sizes, rank counts, methods, name."""
    if args.sizes:
        args.sizes = [parse_size(x) for x in args.sizes.split(",") if x.strip()]
    elif args.size_given:  # --size alone: that one size
        args.sizes = [args.size]
    else:
        args.sizes = [64 * MiB] if args.quick else [512 * MiB, 1024 * MiB]
    args.ranks = [int(x) for x in (args.ranks or ("1,2" if args.quick else "1,2,4")).split(",") if x.strip()]
    if not args.sizes or not args.ranks or min(args.ranks) < 1:
        p.error("--sizes and --ranks need at least one value each; rank counts start at 1")
    args.name = args.name or ("sharded-quick" if args.quick else "sharded")
    if args.methods in (None, "", "all"):
        quick = [m for m in SHARDED_METHODS if m not in SHARDED_PEERS]
        args.methods = quick if args.quick and args.methods != "all" else list(SHARDED_METHODS)
    else:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(args.methods) - set(SHARDED_METHODS))
        if unknown:
            p.error(f"unknown sharded method(s) {unknown}; known: {', '.join(SHARDED_METHODS)}")
    args.run_async = False
    return args


def _incremental_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The --incremental defaults and checks: its own states (--quick: the small ones) and methods."""
    if args.methods not in (None, "") or args.sizes or args.size_given:
        p.error("--incremental measures its own states and methods: drop --methods, --size and --sizes")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    args.name = args.name or ("incremental-quick" if args.quick else "incremental")
    args.warmup = not args.quick  # a round not counted, so every counted save has a composed base
    args.run_async = False
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when it completed (a peer that could not run is recorded, not fatal)."""
    from . import bench_server  # boto3 and the server only when benchmarking, not for --help or the tests

    args = parse_args(argv)
    if args.sharded:
        from .sharded_run import main_sharded

        return main_sharded(args)
    if args.incremental:
        from .incremental_run import main_incremental

        return main_incremental(args)
    started = time.time()
    size, methods = args.size, args.methods
    nbytes = state_bytes(size)
    _log(f"benchmark {args.name!r}: state {fmt_size(nbytes)}, {args.runs} round(s), methods {','.join(methods)}")
    peers = ensure_peers(install=not args.no_peer_install) if PEER_METHODS & set(methods) else None
    machine = report.machine_info()
    sweep_doc: dict[str, Any] | None = None
    async_runs: list[dict[str, Any]] = []
    try:
        with bench_session(args, peers, "s3ckpt-bench-") as (bench, _):
            server = bench.server
            phases: dict[str, float] = {"setup": time.time() - started}
            compare = compare_servers(args, bench.workdir, size, bench) if args.server_compare else None
            if args.sweep:
                sweep_doc = sweep(
                    bench,
                    args.sweep_size,
                    args.sweep_runs,
                    args.confirm_size,
                    args.confirm_runs,
                    args.save_grid,
                    args.load_grid,
                )
                phases["sweep"] = time.time() - started - sum(phases.values())
                _log(
                    f"[{bench.elapsed():6.0f}s] sweep: best save {sweep_doc['best_save']}, "
                    f"load {sweep_doc['best_load']}"
                )
            settings = dict(FIXED_SETTINGS)
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
            if args.run_async:
                async_runs = async_phase(bench, size, args.async_pending, args.async_interval)
                phases["async"] = time.time() - started - sum(phases.values())
            server_meta = bench_server.server_info(server, tuned=True)
    except Exception as exc:
        return failed(exc)
    records: list[Record] = []
    for method in methods:
        for op in ("save", "load"):
            if (method, op) in runs:
                rec = summarize(method, op, nbytes, runs[(method, op)], settings=settings[method])
                rec.label = report.LABELS.get(method, "")
                records.append(rec)
    ratios = derived_ratios(records, nbytes, async_runs)
    machine["load_avg_at_end"] = os.getloadavg()
    doc = {
        **report.results_head(args.name, started, phases),
        "settings": {
            "requested_size": size,
            "state_bytes": nbytes,
            "runs": args.runs,
            "methods": methods,
            "quick": args.quick,
            "async": {**ASYNC_SETTINGS, "interval_factor": args.async_interval, "max_pending_saves": args.async_pending}
            if args.run_async
            else None,
            "bytes": "tensor bytes of the state dict (the same for every method); GB = 1e9 bytes",
            "processes": "a new interpreter per measurement" if args.spawn else "a child forked per measurement",
            "measurement": "each figure in a fresh process; methods alternate (order rotated every round); "
            "median and min over the rounds; wall = operation only; CPU = client user+system over the "
            "operation, all threads; peak RSS = VmHWM minus RSS before the operation (save: above the state "
            "dict; load: above a fresh process, includes the loaded tensors). The host is shared: compare "
            "figures within one run",
        },
        "machine": machine,
        "server": {**server_meta, "default_vs_tuned_raw_put": compare},
        "peers": peers_doc(peers),
        "sweep": sweep_doc,
        "records": [r.to_json() for r in records],
        "async": async_runs,
        "ratios": [q.to_json() for q in ratios],
    }
    json_path = args.results_dir / f"{args.name}.json"
    report.write_json(json_path, doc)
    title = f"s3ckpt bench '{args.name}': {fmt_size(nbytes)} state, {args.runs} rounds (median), {machine['cpu_model']}"
    png_note = report.plot(args.results_dir / f"{args.name}.png", records, title, async_runs)
    if sweep_doc:
        print(report.format_sweep(sweep_doc))
        print()
    print(report.format_table(records))
    if async_runs:
        print()
        print(report.format_async(async_runs))
    print()
    print(report.format_ratios(ratios))
    print("server flags: " + " ".join(server_meta["command_flags"]))
    if compare:
        print(report.format_compare(compare))
    report.print_footer(json_path, png_note, doc, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())

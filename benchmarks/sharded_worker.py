"""One sharded (DCP) measurement: ``python -m benchmarks.sharded_worker SPEC.json``.

The process that reads the spec (a child of a fork server that has done the imports,
:mod:`benchmarks.forkserver`, or with ``--spawn`` a new interpreter) forks ``spec['ranks']`` rank processes,
fresh for this one measurement, waits for them and writes the merged result to ``spec['out']``. Each rank:

1. joins a gloo group (a FileStore rendezvous in the work directory, no ports) and a 1-D CPU DeviceMesh; with
   more than one rank it runs one intra-op thread, as torchrun's ``OMP_NUM_THREADS=1`` does;
2. constructs the method's writer or reader outside the timed part (s3ckpt's also opens its connection with a
   HeadBucket, as the single-file harness does);
3. builds its share of :mod:`benchmarks.workload`'s state (the same ~330 tensors, weights and two Adam moments,
   as the single-file benchmark) as DTensors sharded on dim 0, cut as DTensor cuts uneven shards, plus the
   replicated ``step`` scalars; for a load, zero-filled tensors of the same layout, resident as a model is;
4. barrier; reads its CPU (``getrusage``, all threads), resident set and the server's CPU and resets its peak
   resident set; ``dcp.save`` / ``dcp.load``; barrier; reads them again. Rank 0's wall time between its two
   barriers is the operation's (the slowest rank sets it); each rank's CPU is its own between them;
5. after a load, compares every tensor with what the save wrote (outside the timed part).

Only the standard library and torch at module level: the peers' ranks run in a venv without s3ckpt.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from benchmarks.methods import _cpu, _peak_rss, _reset_peak, _rss, _server_cpu
from benchmarks.workload import layer_shapes

__all__ = ["PREIMPORT", "build_state", "main"]

MiB = 1024 * 1024
GRACE_S = 20.0  # after one rank fails, how long the others get to fail too (a collective raises on every rank)
_PR_SET_PDEATHSIG = 1
# What the fork server imports before forking (missing ones are skipped: each venv has only its methods).
PREIMPORT = (
    "torch",
    "torch.distributed",
    "torch.distributed.checkpoint",
    "torch.distributed.tensor",
    "torch.distributed.device_mesh",
    "boto3",
    "s3ckpt.dcp",
    "s3torchconnector",
    "s3torchconnector.dcp",
    "fsspec",
    "s3fs",
    "torch.distributed.checkpoint._fsspec_filesystem",
    "benchmarks.workload",
    "benchmarks.methods",
)

Spec = dict[str, Any]


# -- the state ---------------------------------------------------------------------------------------------


def _fill(t: Any, pool: Any, offset: int) -> Any:
    """Copy slices of the random pool into ``t`` (much faster than generating every byte), deterministically."""
    flat = t.view(-1)
    for start in range(0, flat.numel(), pool.numel()):
        n = min(pool.numel(), flat.numel() - start)
        src = offset % (pool.numel() - n + 1)
        flat[start : start + n].copy_(pool[src : src + n])
        offset += 7919
    return t


def _pool() -> Any:
    import torch

    return torch.empty(8 * MiB).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))


def _values(pool: Any, index: int, rank: int, local_shape: tuple[int, ...]) -> Any:
    """The saved values of tensor ``index``'s shard on ``rank``: they depend on nothing else."""
    import torch

    return _fill(torch.empty(local_shape), pool, index * 7919 + rank * 104729)


def build_state(nbytes: int, rank: int, mesh: Any, zeros: bool = False) -> dict[str, Any]:
    """This rank's share of the workload of ``nbytes``: weights, ``exp_avg`` and ``exp_avg_sq`` as DTensors
    sharded on dim 0, and a replicated ``step`` each; zero-filled for a load (the tensors loaded into)."""
    import torch
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    pool = None if zeros else _pool()

    def shard(index: int, shape: tuple[int, ...]) -> Any:
        local_shape, _ = compute_local_shape_and_global_offset(shape, mesh, [Shard(0)])
        local = torch.zeros(local_shape) if pool is None else _values(pool, index, rank, tuple(local_shape))
        stride = tuple(int(torch.Size(shape)[i + 1 :].numel()) for i in range(len(shape)))
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=stride)

    shapes = layer_shapes(nbytes)
    return {
        "model": {name: shard(i, shape) for i, (name, shape) in enumerate(shapes.items())},
        "optim": {
            "state": {
                name: {
                    "step": torch.tensor(0.0 if zeros else 1000.0),
                    "exp_avg": shard(100_000 + i, shape),
                    "exp_avg_sq": shard(200_000 + i, shape),
                }
                for i, (name, shape) in enumerate(shapes.items())
            }
        },
        "epoch": 0 if zeros else 3,
    }


def _local_bytes(state: dict[str, Any]) -> tuple[int, int]:
    """(bytes of this rank's DTensor shards, bytes of its plain, replicated tensors)."""
    import torch
    from torch.distributed.tensor import DTensor

    sharded = replicated = 0

    def walk(obj: Any) -> None:
        nonlocal sharded, replicated
        if isinstance(obj, DTensor):
            local = obj.to_local()
            sharded += local.numel() * local.element_size()
        elif isinstance(obj, torch.Tensor):
            replicated += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)

    walk(state)
    return sharded, replicated


def _check(loaded: dict[str, Any], nbytes: int, rank: int) -> None:
    """Every tensor of a loaded state against the values :func:`build_state` saved."""
    pool = _pool()
    for i, name in enumerate(layer_shapes(nbytes)):
        opt = loaded["optim"]["state"][name]
        for index, t in ((i, loaded["model"][name]), (100_000 + i, opt["exp_avg"]), (200_000 + i, opt["exp_avg_sq"])):
            local = t.to_local()
            if not local.equal(_values(pool, index, rank, tuple(local.shape))):
                raise AssertionError(f"{name} (tensor {index}) differs from what was saved")
        if float(opt["step"]) != 1000.0:
            raise AssertionError(f"{name}: step {float(opt['step'])}, saved 1000")
    if loaded["epoch"] != 3:
        raise AssertionError(f"epoch {loaded['epoch']!r}, saved 3")


# -- the methods -------------------------------------------------------------------------------------------


def _prepare(spec: Spec) -> tuple[Callable[[dict[str, Any]], None], int | None, dict[str, Any]]:
    """Construct the method's writer or reader outside the timed part.

    Returns the operation, the bytes the method's own memory formula allows a rank on top of its share (s3ckpt's
    save: ``(max_write_concurrency + 1) x chunk_size_MB`` per file; None where there is no formula), and the
    settings it runs with.
    """
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    method, op = spec["method"], spec["op"]
    url = f"s3://{spec['bucket']}/{spec['key']}"
    if method == "s3ckpt-dcp":
        from s3ckpt.dcp import S3StorageReader, S3StorageWriter

        if op == "save":
            w = S3StorageWriter(url)  # no knob given: s3ckpt's defaults (the environment names the server)
            w.transport.clients.get().head_bucket(Bucket=spec["bucket"])
            t = w.transport.transfer
            settings = {
                "chunk_size_MB": t.chunk_size_MB,
                "max_write_concurrency": t.max_write_concurrency,
                "files_per_rank": w.files_per_rank,
            }
            return lambda state: dcp_save(state, storage_writer=w), t.upload_memory_bytes * w.files_per_rank, settings
        r = S3StorageReader(url)
        r.transport.clients.get().head_bucket(Bucket=spec["bucket"])
        t = r.transport.transfer
        settings = {"read_chunk_size_MB": t.read_chunk_size_MB, "max_read_concurrency": t.max_read_concurrency}
        return lambda state: dcp_load(state, storage_reader=r), None, settings
    if method == "s3torchconnector-dcp":
        from s3torchconnector import S3ClientConfig
        from s3torchconnector.dcp import S3StorageReader as TcReader
        from s3torchconnector.dcp import S3StorageWriter as TcWriter

        # The endpoint comes from AWS_ENDPOINT_URL; path-style is what a local server needs, not a speed knob.
        cfg = S3ClientConfig(force_path_style=True)
        settings = {"part_size_MB": cfg.part_size // MiB, "force_path_style": True}
        if op == "save":
            tw = TcWriter(spec["region"], url, s3client_config=cfg)
            return lambda state: dcp_save(state, storage_writer=tw), None, {**settings, "thread_count": 1}
        tr = TcReader(spec["region"], url, s3client_config=cfg)
        return lambda state: dcp_load(state, storage_reader=tr), None, {**settings, "reader": "dcp_optimized"}
    if method == "fsspec-dcp":
        # Not re-exported by torch.distributed.checkpoint in every release; the module is where both live.
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

        opts: dict[str, Any] = {
            "key": os.environ["AWS_ACCESS_KEY_ID"],
            "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": spec["endpoint"], "region_name": spec["region"]},
            "config_kwargs": {"s3": {"addressing_style": "path"}},
        }
        if op == "save":
            fw = FsspecWriter(url, **opts)
            settings = {"single_file_per_rank": True, "sync_files": True, "thread_count": 1}
            return lambda state: dcp_save(state, storage_writer=fw), None, settings
        fr = FsspecReader(url, **opts)
        return lambda state: dcp_load(state, storage_reader=fr), None, {}
    raise ValueError(f"unknown sharded method {method!r}")


# -- one rank ----------------------------------------------------------------------------------------------


def measure_rank(spec: Spec, rank: int) -> dict[str, Any]:
    """Join the group, build the state, run the operation between two barriers; this rank's figures."""
    import gc

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = spec["ranks"]
    if world > 1:
        torch.set_num_threads(1)
    timeout = timedelta(seconds=spec["timeout_s"])
    marks = [time.perf_counter()]
    dist.init_process_group("gloo", init_method=f"file://{spec['store']}", rank=rank, world_size=world, timeout=timeout)
    try:
        mesh = init_device_mesh("cpu", (world,))
        marks.append(time.perf_counter())
        operation, buffers, settings = _prepare(spec)
        marks.append(time.perf_counter())
        gc.collect()
        rss_start = _rss()
        state = build_state(spec["size"], rank, mesh, zeros=spec["op"] == "load")
        sharded, replicated = _local_bytes(state)
        gc.collect()
        marks.append(time.perf_counter())
        dist.barrier()
        exact_peak = _reset_peak()
        rss0, cpu0, ru0 = _rss(), _cpu(), resource.getrusage(resource.RUSAGE_SELF)
        srv0 = _server_cpu(spec.get("server_pid")) if rank == 0 else None
        t0 = time.perf_counter()
        operation(state)
        dist.barrier()
        wall = time.perf_counter() - t0
        cpu1, ru1 = _cpu(), resource.getrusage(resource.RUSAGE_SELF)
        srv1 = _server_cpu(spec.get("server_pid")) if rank == 0 else None
        peak = _peak_rss()
        marks.append(time.perf_counter())
        if spec["op"] == "load":
            _check(state, spec["size"], rank)
        marks.append(time.perf_counter())
        local = sharded + replicated
        return {
            "rank": rank,
            "wall_s": wall,
            "cpu_s": cpu1 - cpu0,
            "user_s": ru1.ru_utime - ru0.ru_utime,
            "sys_s": ru1.ru_stime - ru0.ru_stime,
            "minor_faults": ru1.ru_minflt - ru0.ru_minflt,
            "local_bytes": local,
            "sharded_bytes": sharded,
            "replicated_bytes": replicated,
            # Its share counted as its bytes (how this benchmark built it is not the method's), plus what the
            # operation held above the RSS just before it: what the memory formula bounds.
            "peak_rss_bytes": local + max(0, peak - rss0),
            "peak_op_rss_bytes": max(0, peak - rss0),
            "state_rss_bytes": rss0 - rss_start,
            "rss_before_bytes": rss0,
            "bound_bytes": local + buffers if buffers is not None else None,
            "server_cpu_s": (srv1 - srv0) if srv0 is not None and srv1 is not None else None,
            "exact_peak": exact_peak,
            "settings": settings,
            # Untimed seconds around the measurement: group + mesh, writer/reader, state, the timed part, check.
            "phases_s": dict(zip(("group", "client", "state", "op", "check"), _diffs(marks), strict=True)),
        }
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _diffs(marks: list[float]) -> list[float]:
    return [round(b - a, 3) for a, b in itertools.pairwise(marks)]


def _rank_main(spec: Spec, rank: int, leader: int) -> int:
    # A rank must not outlive the leader (killed on a timeout): it would wait in a collective forever.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != leader:
        return 1
    try:
        result = measure_rank(spec, rank)
    except BaseException as exc:  # reported, not raised: the table says why a method has no number
        tail = traceback.format_exc().strip().splitlines()[-8:]
        result = {"rank": rank, "error": f"rank {rank}: {type(exc).__name__}: {exc}"[:800], "traceback": tail}
    with open(f"{spec['out']}.rank{rank}", "w") as f:
        json.dump(result, f)
    return 3 if "error" in result else 0


def _wait(pids: dict[int, int], timeout: float) -> dict[int, int]:
    """Wait for every rank (pid -> rank); once one fails, or at the timeout, kill those left after a grace."""
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    killed = False
    while len(statuses) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            statuses[pids[pid]] = status
            if status != 0:
                deadline = min(deadline, time.monotonic() + GRACE_S)
            continue
        if not killed and time.monotonic() > deadline:
            for p, r in pids.items():
                if r not in statuses:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    return statuses


def merge(spec: Spec, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One measurement's figures from its ranks' (rank 0's wall and server CPU; CPU summed; the worst peak)."""
    errors = [r["error"] for r in results if r.get("error")]
    if errors:
        return {"error": errors[0], "errors": errors, "ranks": results}
    total = sum(r["sharded_bytes"] for r in results) + results[0]["replicated_bytes"]
    if total != spec["expect_bytes"]:
        return {"error": f"the ranks hold {total} tensor bytes, expected {spec['expect_bytes']}", "ranks": results}
    r0 = results[0]
    return {
        "wall_s": r0["wall_s"],
        "cpu_s": sum(r["cpu_s"] for r in results),
        "peak_rss_bytes": max(r["peak_op_rss_bytes"] for r in results),
        "server_cpu_s": r0["server_cpu_s"],
        "bytes": total,
        "settings": r0["settings"],
        "ranks": [{k: v for k, v in r.items() if k != "settings"} for r in results],
    }


def main(argv: list[str]) -> int:
    """Fork the ranks, wait for them, write the merged result (or why there is none) to ``spec['out']``."""
    with open(argv[0]) as f:
        spec = json.load(f)
    os.environ.update(spec.get("env", {}))
    leader = os.getpid()
    pids: dict[int, int] = {}
    for rank in range(spec["ranks"]):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _rank_main(spec, rank, leader)
            finally:
                os._exit(code)
        pids[pid] = rank
    statuses = _wait(pids, spec["timeout_s"])
    results = []
    for rank in range(spec["ranks"]):
        try:
            with open(f"{spec['out']}.rank{rank}") as f:
                results.append(json.load(f))
        except (OSError, ValueError):
            why = f"wait status {statuses.get(rank)}" + (
                " (killed: timeout, or another rank failed)" if statuses.get(rank) == signal.SIGKILL else ""
            )
            results.append({"rank": rank, "error": f"rank {rank} wrote no result: {why}"})
    result = merge(spec, results)
    result["python"] = sys.executable
    with open(spec["out"], "w") as f:
        json.dump(result, f)
    return 3 if "error" in result else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        from benchmarks.forkserver import serve

        sys.exit(serve(main, preimport=PREIMPORT))
    sys.exit(main(sys.argv[1:]))

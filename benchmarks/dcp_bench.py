"""Sharded save and load throughput through ``torch.distributed.checkpoint``: s3ckpt's S3 storage layer
beside PyTorch's own ``FsspecWriter``/``FsspecReader`` over s3fs, on the same embedded server, in one run.

    python -m benchmarks.dcp_bench                          # 4 ranks, 256 MiB, 3 repeats
    python -m benchmarks.dcp_bench --total-mib 1024 --repeats 5 --ranks 4

Each method runs in its own group of gloo rank processes (a FileStore rendezvous, no ports). The state is
``--tensors`` DTensors sharded on dim 0 over a CPU DeviceMesh, ``--total-mib`` in all. A save or load is
timed on rank 0 from a barrier before it to a barrier after it, so the slowest rank sets the time.
Every save goes to a new prefix; each load reads the last one and the first load is checked for equality.

The fsspec peer needs s3fs, which is kept out of the project venv (its aiobotocore pins an older botocore
than s3ckpt's boto3 pin). It runs if s3fs imports here, or under ``--peer-python`` (default: the benchmark
harness's ``benchmarks/.venv-peers`` when it exists); otherwise the JSON records why it was skipped.
Writes ``benchmarks/results/dcp.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
PEERS_PYTHON = ROOT / "benchmarks" / ".venv-peers" / "bin" / "python"
RESULT_TAG = "DCP-BENCH "
MiB = 1024 * 1024
BUCKET = "dcp-bench"
# Same reason as the main harness: the gateway otherwise splits every part into 4 MiB volume writes.
SERVER_FLAGS = ("-filer.maxMB=64",)
METHODS = ("s3ckpt", "fsspec-s3fs")


# -- rank process (only torch at module level: the fsspec ranks may run in a venv without s3ckpt) ------------------


def _writer_reader(cfg: dict[str, Any]) -> tuple[Any, Any]:
    if cfg["method"] == "s3ckpt":
        from s3ckpt.config import ClientConfig, TransferConfig
        from s3ckpt.dcp import S3StorageReader, S3StorageWriter
        from s3ckpt.transport import S3Transport

        t = S3Transport.create(
            client=ClientConfig(endpoint_url=cfg["endpoint"], access_key_id=cfg["ak"], secret_access_key=cfg["sk"]),
            transfer=TransferConfig(**cfg["transfer"]),
        )
        return (lambda url: S3StorageWriter(url, transport=t)), (lambda url: S3StorageReader(url, transport=t))
    # Not re-exported by torch.distributed.checkpoint in every release; the module is where both live.
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    opts = {"key": cfg["ak"], "secret": cfg["sk"], "client_kwargs": {"endpoint_url": cfg["endpoint"]}}
    return (lambda url: FsspecWriter(url, overwrite=True, **opts)), (lambda url: FsspecReader(url, **opts))


def _rank_main(cfg_json: str, rank_arg: str) -> None:
    import resource

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    cfg, rank = json.loads(cfg_json), int(rank_arg)
    ws = cfg["ranks"]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{cfg['store']}", rank=rank, world_size=ws)
    mesh = init_device_mesh("cpu", (ws,))
    cols = 1024
    rows = max(1, cfg["total_bytes"] // ws // cfg["tensors"] // (4 * cols))
    g = torch.Generator().manual_seed(rank)

    def dtensor(local: torch.Tensor) -> DTensor:
        return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=(rows * ws, cols), stride=(cols, 1))

    state = {f"layer{i}.weight": dtensor(torch.rand(rows, cols, generator=g)) for i in range(cfg["tensors"])}
    nbytes = rows * cols * 4 * cfg["tensors"] * ws
    new_writer, new_reader = _writer_reader(cfg)
    saves: list[float] = []
    loads: list[float] = []
    # Untimed: builds the S3 clients, opens their connections and lets the store grow its volumes.
    for i in range(cfg["warmup"]):
        warm = f"s3://{BUCKET}/{cfg['method']}/warm-up-{i}"
        dcp.save(state, storage_writer=new_writer(warm))
        dcp.load(state, storage_reader=new_reader(warm))
    url = ""
    for rep in range(cfg["repeats"]):
        url = f"s3://{BUCKET}/{cfg['method']}/rep-{rep}"
        dist.barrier()
        start = time.perf_counter()
        dcp.save(state, storage_writer=new_writer(url))
        dist.barrier()
        saves.append(time.perf_counter() - start)
    target = {k: dtensor(torch.zeros(rows, cols)) for k in state}
    for rep in range(cfg["repeats"]):
        dist.barrier()
        start = time.perf_counter()
        dcp.load(target, storage_reader=new_reader(url))
        dist.barrier()
        loads.append(time.perf_counter() - start)
        if rep == 0:
            for k, v in state.items():
                if not torch.equal(v.to_local(), target[k].to_local()):
                    raise AssertionError(f"{cfg['method']}: {k} differs after load on rank {rank}")
                target[k].to_local().zero_()
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024])  # KiB -> MiB on Linux
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        out = {"saves": saves, "loads": loads, "bytes": nbytes, "peak_rss_mib": int(rss.item())}
        print(RESULT_TAG + json.dumps(out), flush=True)
    dist.destroy_process_group()


# -- driver ----------------------------------------------------------------------------------------------------------


def _peer_python(arg: str | None) -> tuple[str | None, str]:
    """The interpreter for the fsspec ranks, or None and why there is none."""
    if importlib.util.find_spec("s3fs") is not None:
        return sys.executable, "s3fs importable in this interpreter"
    candidate = Path(arg) if arg else PEERS_PYTHON
    if candidate.exists():
        probe = subprocess.run(
            [str(candidate), "-c", "import s3fs, torch; print(s3fs.__version__, torch.__version__)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if probe.returncode == 0:
            return str(candidate), f"s3fs {probe.stdout.split()[0]} in {candidate}"
        why = probe.stderr.strip().splitlines()[-1:] or ["?"]
        return None, f"s3fs not importable in {candidate}: {why[0]}"
    return None, (
        "s3fs is not importable: it is not installed in this venv (s3fs's aiobotocore pins an older botocore "
        f"than s3ckpt's boto3 pin) and no peer interpreter was found ({candidate} missing; pass --peer-python)"
    )


def _run_method(server: Any, args: argparse.Namespace, method: str, python: str, workdir: Path) -> dict[str, Any]:
    cfg = {
        "method": method,
        "endpoint": server.endpoint_url,
        "ak": server.access_key,
        "sk": server.secret_key,
        "ranks": args.ranks,
        "tensors": args.tensors,
        "total_bytes": args.total_mib * MiB,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "store": str(workdir / f"store-{method}"),
        "transfer": {
            "chunk_size_MB": args.chunk_mb,
            "max_write_concurrency": args.write_concurrency,
            "max_read_concurrency": args.read_concurrency,
            "read_chunk_size_MB": args.read_chunk_mb,
        },
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TORCH_CPP_LOG_LEVEL="ERROR")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    logs = [workdir / f"{method}-rank{r}.log" for r in range(args.ranks)]
    procs = []
    for r, log in enumerate(logs):
        with open(log, "wb") as out:
            cmd = [python, "-m", "benchmarks.dcp_bench", "--worker", json.dumps(cfg), str(r)]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=args.timeout_s) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        tail = "\n".join(f"--- {log.name} ---\n{log.read_text()[-2000:]}" for log in logs)
        raise RuntimeError(f"{method}: rank exit codes {codes}\n{tail}")
    line = next(ln for ln in logs[0].read_text().splitlines() if ln.startswith(RESULT_TAG))
    result: dict[str, Any] = json.loads(line[len(RESULT_TAG) :])
    return result


def _summary(method: str, op: str, seconds: list[float], nbytes: int, rss: int) -> dict[str, Any]:
    med = statistics.median(seconds)
    return {
        "method": method,
        "op": op,
        "seconds": [round(s, 4) for s in seconds],
        "median_s": round(med, 4),
        "min_s": round(min(seconds), 4),
        "mib_per_s": round(nbytes / MiB / med, 1),
        "gb_per_s": round(nbytes / 1e9 / med, 3),
        "peak_rss_mib_per_rank": rss,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.dcp_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--total-mib", type=int, default=256, help="state size over all ranks")
    p.add_argument("--tensors", type=int, default=8, help="sharded tensors in the state")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed save+load rounds first")
    p.add_argument("--chunk-mb", type=int, default=16, help="s3ckpt part size")
    p.add_argument("--write-concurrency", type=int, default=4, help="s3ckpt parts in flight per rank")
    p.add_argument("--read-concurrency", type=int, default=4, help="s3ckpt ranged GETs in flight per rank")
    p.add_argument("--read-chunk-mb", type=int, default=16, help="s3ckpt ranged GET size")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--peer-python", default=None, help=f"interpreter with s3fs (default {PEERS_PYTHON})")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dcp.json"))
    p.add_argument("--timeout-s", type=float, default=900)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _rank_main(*args.worker)
        return 0

    from s3ckpt.server import LocalS3Server

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    interpreters = {"s3ckpt": sys.executable}
    if "fsspec-s3fs" in methods:
        python, why = _peer_python(args.peer_python)
        if python is None:
            skipped.append({"method": "fsspec-s3fs", "reason": why})
        else:
            interpreters["fsspec-s3fs"] = python
    load_before = os.getloadavg()
    with (
        tempfile.TemporaryDirectory(prefix="dcp-bench-") as tmp,
        LocalS3Server(data_dir=Path(tmp) / "weed", extra_flags=SERVER_FLAGS) as server,
    ):
        server.create_bucket(BUCKET)
        for method in methods:
            if method not in interpreters:
                continue
            print(f"running {method} ({args.ranks} ranks, {args.total_mib} MiB, {args.repeats} repeats)...", flush=True)
            r = _run_method(server, args, method, interpreters[method], Path(tmp))
            results.append(_summary(method, "save", r["saves"], r["bytes"], r["peak_rss_mib"]))
            results.append(_summary(method, "load", r["loads"], r["bytes"], r["peak_rss_mib"]))
    doc = {
        "benchmark": "dcp",
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "interpreters": interpreters,
        "results": results,
        "skipped": skipped,
        "env": {
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "platform": platform.platform(),
            "server": "embedded SeaweedFS (weed mini), loopback, same host as the ranks",
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n{'method':<14}{'op':<6}{'MiB':>7}{'ranks':>7}{'median s':>10}{'min s':>8}{'MiB/s':>9}{'RSS MiB':>9}")
    for row in results:
        print(
            f"{row['method']:<14}{row['op']:<6}{args.total_mib:>7}{args.ranks:>7}{row['median_s']:>10.3f}"
            f"{row['min_s']:>8.3f}{row['mib_per_s']:>9.1f}{row['peak_rss_mib_per_rank']:>9}"
        )
    for s in skipped:
        print(f"{s['method']:<14}skipped: {s['reason']}")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

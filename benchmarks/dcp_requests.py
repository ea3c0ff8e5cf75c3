"""Sharded checkpoints at many ranks: the S3 requests of a resume, replicated state written once, and the
save time per prefix strategy.

    python -m benchmarks.dcp_requests                              # all three sections, 2, 8 and 32 ranks
    python -m benchmarks.dcp_requests --sections requests --ranks 2,8 --rounds 3
    python -m benchmarks.dcp_requests --sections prefixes --prefix-ranks 4,8 --prefix-mib 256

**requests**: N gloo ranks save a small sharded model and optimizer state (DTensors, ``--state-mib`` in all) to
``<run>/step=10-last``, then resume from ``<run>`` in three ways, alternating, ``--rounds`` times:

* ``s3ckpt``: ``s3ckpt.distributed.resolve_resume_path(run)`` (rank 0 lists, the path is broadcast), then
  ``s3ckpt.dcp.load`` of the model and of the optimizer (each: ``.metadata`` and its sidecar fetched by rank 0
  and broadcast);
* ``s3ckpt-preloaded``: the same, with one ``s3ckpt.dcp.fetch_shared`` for both loads (``preloaded=``);
* ``plain``: what every rank does without s3ckpt's broadcasts: ``find_resume_checkpoint(run)`` on every rank,
  then ``dcp.load(storage_reader=S3StorageReader(path))`` twice (every rank GETs ``.metadata`` and the sidecar).

Every HTTP request each rank sends is counted on the wire (a botocore ``before-send`` hook) by operation and
key: LIST, HEAD, GET of ``.metadata``, GET of the sidecar ``.metadata.s3ckpt.json``, ranged GETs of shards. The
time to resume is rank 0's, from a barrier before the resume to a barrier after it.

**replicas**: 4 ranks save state that is replicated: ``ddp`` (the same full tensors on every rank, as DDP holds
them) and ``hsdp`` (DTensors with ``[Replicate(), Shard(0)]`` on a 2 x 2 mesh). Bytes per rank file come from
the checkpoint's manifest: uploaded bytes against the model's size, and each rank's share.

**prefixes**: save time with every rank file under the checkpoint prefix (``flat``, the default) against
``NumericPrefixStrategy(n)``, at 4 and 8 ranks, strategies alternating. SeaweedFS does not partition by key
prefix the way AWS S3 does, so this measures what the layout costs a store without partitions, not what it buys
on AWS.

Ranks are forked from one launcher that has imported torch and s3ckpt.dcp only (no Lightning), so 32 ranks fit
in this 24 GiB machine. Prints the tables and writes ``benchmarks/results/dcp_requests.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
BUCKET = "dcp-requests"
# As benchmarks.dcp_bench: the gateway otherwise splits every part into 4 MiB volume writes.
SERVER_FLAGS = ("-filer.maxMB=64",)
SECTIONS = ("requests", "replicas", "prefixes")
MODES = ("s3ckpt", "s3ckpt-preloaded", "plain")
RUN_NAME = "step=10-last"
# The request categories of the table, in its column order.
COLUMNS = ("LIST", "HEAD", "GET .metadata", "GET sidecar", "GET shard range")
_PUTS = ("PutObject", "UploadPart")


# -- rank processes ------------------------------------------------------------------------------------------------


class WireCounter:
    """Counts the HTTP requests a botocore client sends, by category (see :func:`category`)."""

    def __init__(self, client: Any) -> None:
        import threading
        from collections import Counter

        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        client.meta.events.register("before-send.s3", self)

    def __call__(self, event_name: str, request: Any = None, **kwargs: Any) -> None:
        name = category(event_name.rsplit(".", 1)[-1], request)
        with self._lock:  # ranged GETs and part uploads are sent from several threads
            self.counts[name] += 1
        # Returning None lets botocore send the request (a value would be taken as the response).

    def take(self) -> dict[str, int]:
        with self._lock:
            out = dict(self.counts)
            self.counts.clear()
        return out


def category(op: str, request: Any) -> str:
    """``LIST``, ``HEAD``, ``GET .metadata``, ``GET sidecar``, ``GET shard range`` (``GET shard`` without a
    Range header), ``GET <name>`` for other objects, else the operation name."""
    from urllib.parse import urlsplit

    if op == "ListObjectsV2":
        return "LIST"
    if op in ("HeadObject", "HeadBucket"):
        return "HEAD"
    if op != "GetObject":
        return op
    name = urlsplit(getattr(request, "url", "") or "").path.rsplit("/", 1)[-1]
    if name == ".metadata":
        return "GET .metadata"
    if name == ".metadata.s3ckpt.json":
        return "GET sidecar"
    if name.endswith(".distcp"):
        headers = getattr(request, "headers", {}) or {}
        return "GET shard range" if "Range" in headers else "GET shard"
    return f"GET {name}"


def _rank_main(cfg: dict[str, Any], rank: int) -> dict[str, Any]:  # pragma: no cover - runs in the rank processes
    import resource
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from s3ckpt.config import ClientConfig, RetryConfig, TransferConfig
    from s3ckpt.transport import S3Transport

    torch.set_num_threads(1)
    ws = cfg["world_size"]
    dist.init_process_group(
        "gloo", init_method=f"file://{cfg['store']}", rank=rank, world_size=ws, timeout=timedelta(seconds=300)
    )
    t = S3Transport.create(
        client=ClientConfig(endpoint_url=cfg["endpoint"], access_key_id=cfg["ak"], secret_access_key=cfg["sk"]),
        retry=RetryConfig(max_attempts=5, base_delay_s=0.05, max_delay_s=1.0, deadline_s=120),
        transfer=TransferConfig(),  # s3ckpt's defaults: 16 MiB parts x 4 writers, 16 MiB ranges x 8 readers
    )
    wire = WireCounter(t.clients.get())
    section = {"requests": _requests, "replicas": _replicas, "prefixes": _prefixes}[cfg["section"]]
    out = section(cfg, rank, t, wire)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    dist.barrier()
    dist.destroy_process_group()
    return out


def _sharded_state(cfg: dict[str, Any], mesh: Any, empty: bool) -> dict[str, Any]:  # pragma: no cover
    """A model and its Adam state as DTensors sharded on dim 0 over all ranks, ``cfg["state_mib"]`` in all
    (a third weights, two thirds moments), plus a replicated step counter and a non-tensor hyper-parameter."""
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor

    tensors, cols = 4, 1024
    rows = max(cfg["world_size"], cfg["state_mib"] * MiB // 3 // tensors // (4 * cols))
    g = torch.Generator().manual_seed(10)

    def param() -> Any:
        full = torch.randn(rows, cols, generator=g)
        return distribute_tensor(torch.zeros_like(full) if empty else full, mesh, [Shard(0)], src_data_rank=None)

    model = {f"layer{i}.weight": param() for i in range(tensors)}
    optim = {
        "state": {k: {"exp_avg": param(), "exp_avg_sq": param()} for k in model},
        "step": torch.tensor(0.0 if empty else 10.0),
        "lr": -1.0 if empty else 3e-4,
    }
    return {"model": model, "optim": optim}


def _same(a: Any, b: Any, where: str) -> None:  # pragma: no cover - runs in the rank processes
    import torch
    from torch.distributed.tensor import DTensor

    if isinstance(a, dict):
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, DTensor):
        assert torch.equal(a.to_local(), b.to_local()), where
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, (where, a, b)


def _requests(cfg: dict[str, Any], rank: int, t: Any, wire: WireCounter) -> dict[str, Any]:  # pragma: no cover
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    from s3ckpt import dcp as s3dcp
    from s3ckpt.distributed import find_resume_checkpoint, resolve_resume_path

    run = f"s3://{BUCKET}/requests-{cfg['world_size']}"
    url = f"{run}/{RUN_NAME}"
    mesh = init_device_mesh("cpu", (cfg["world_size"],))
    saved = _sharded_state(cfg, mesh, empty=False)
    wire.take()
    dist.barrier()
    start = time.perf_counter()
    s3dcp.save(saved, url, transport=t)
    dist.barrier()
    out: dict[str, Any] = {"save": {"s": round(time.perf_counter() - start, 4), "requests": wire.take()}}

    def resume(mode: str, target: dict[str, Any]) -> str:
        if mode == "plain":
            path = find_resume_checkpoint(run, transport=t)
            assert path is not None
            dcp.load({"model": target["model"]}, storage_reader=s3dcp.S3StorageReader(path, transport=t))
            dcp.load({"optim": target["optim"]}, storage_reader=s3dcp.S3StorageReader(path, transport=t))
        else:
            path = resolve_resume_path(run, transport=t)
            assert path is not None
            shared = s3dcp.fetch_shared(path, t) if mode == "s3ckpt-preloaded" else None
            s3dcp.load({"model": target["model"]}, path, transport=t, preloaded=shared)
            s3dcp.load({"optim": target["optim"]}, path, transport=t, preloaded=shared)
        return path

    rounds = []
    for n in range(cfg["rounds"]):
        # Rotated each round, so no mode always runs first (or right after the save).
        for mode in cfg["modes"][n % len(cfg["modes"]) :] + cfg["modes"][: n % len(cfg["modes"])]:
            target = _sharded_state(cfg, mesh, empty=True)
            wire.take()
            dist.barrier()
            start = time.perf_counter()
            path = resume(mode, target)
            dist.barrier()
            took = time.perf_counter() - start
            _same(saved, target, f"{mode} rank {rank}")
            rounds.append({"mode": mode, "round": n, "s": round(took, 4), "path": path, "requests": wire.take()})
    out["rounds"] = rounds
    return out


def _replicas(cfg: dict[str, Any], rank: int, t: Any, wire: WireCounter) -> dict[str, Any]:  # pragma: no cover
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from s3ckpt import dcp as s3dcp

    ws = cfg["world_size"]
    tensors, rows, cols = 16, 64, 1024  # 16 x 256 KiB = 4 MiB of fp32
    g = torch.Generator().manual_seed(3)
    full = {f"layer{i}.weight": torch.randn(rows, cols, generator=g) for i in range(tensors)}
    mesh = init_device_mesh("cpu", (2, ws // 2), mesh_dim_names=("replicate", "shard"))
    states: dict[str, dict[str, Any]] = {
        "ddp": dict(full),  # every rank holds the same full tensors
        "hsdp": {k: distribute_tensor(v, mesh, [Replicate(), Shard(0)], src_data_rank=None) for k, v in full.items()},
    }
    out: dict[str, Any] = {"model_bytes": sum(v.nbytes for v in full.values()), "saves": {}}
    for style, state in states.items():
        url = f"s3://{BUCKET}/replicas-{ws}/{style}"
        wire.take()
        dist.barrier()
        s3dcp.save(state, url, transport=t)
        dist.barrier()
        out["saves"][style] = {"url": url, "requests": wire.take()}
    return out


def _prefixes(cfg: dict[str, Any], rank: int, t: Any, wire: WireCounter) -> dict[str, Any]:  # pragma: no cover
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from s3ckpt import dcp as s3dcp
    from s3ckpt.transport import ops

    ws = cfg["world_size"]
    mesh = init_device_mesh("cpu", (ws,))
    tensors, cols = 8, 1024
    rows = max(ws, cfg["prefix_mib"] * MiB // tensors // (4 * cols))
    g = torch.Generator().manual_seed(5)
    state = {
        f"w{i}": distribute_tensor(torch.rand(rows, cols, generator=g), mesh, [Shard(0)], src_data_rank=None)
        for i in range(tensors)
    }
    strategies: dict[str, Any] = {"flat": None}
    for n in cfg["prefix_counts"]:
        strategies[f"NumericPrefixStrategy({n})"] = s3dcp.NumericPrefixStrategy(n)
    names = list(strategies)
    saves: list[dict[str, Any]] = []
    for n in range(cfg["rounds"] + 1):  # round 0 is a warm-up (client connections, volume growth), not reported
        for name in names[n % len(names) :] + names[: n % len(names)]:
            url = f"s3://{BUCKET}/prefixes-{ws}/r{n}-{name.replace('(', '-').rstrip(')')}"
            dist.barrier()
            start = time.perf_counter()
            s3dcp.save(state, url, transport=t, prefix_strategy=strategies[name])
            dist.barrier()
            took = time.perf_counter() - start
            if n:
                saves.append({"strategy": name, "round": n, "s": round(took, 4)})
            if rank == 0:  # outside the timed part: keeps the store's disk and index small
                keys = [o.key for o in ops.list_objects(t, BUCKET, url[len(f"s3://{BUCKET}/") :] + "/")]
                ops.delete_objects(t, BUCKET, keys)
            dist.barrier()
    wire.take()
    return {"saves": saves, "bytes": rows * cols * 4 * tensors}


def _launch(cfg: dict[str, Any]) -> int:  # pragma: no cover - runs in the launcher process
    """Fork the ranks from this interpreter once torch and s3ckpt.dcp are imported: one import for all ranks
    (a torch import costs seconds of CPU, and its pages stay shared), nothing else loaded (no Lightning)."""
    import torch
    import torch.distributed.checkpoint
    import torch.distributed.tensor  # noqa: F401

    import s3ckpt.dcp
    import s3ckpt.distributed  # noqa: F401

    outdir = Path(cfg["outdir"])
    children: dict[int, int] = {}
    for rank in range(cfg["world_size"]):
        pid = os.fork()
        if pid == 0:
            log = os.open(outdir / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = 1
            try:
                result = _rank_main(cfg, rank)
                (outdir / f"rank{rank}.json").write_text(json.dumps(result))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = rank
    codes: dict[int, int] = {}
    while children:
        pid, status = os.wait()
        codes[children.pop(pid)] = os.waitstatus_to_exitcode(status)
    failed = {r: c for r, c in sorted(codes.items()) if c}
    if failed:
        print(f"rank exit codes {failed}", flush=True)
    return 1 if failed else 0


# -- driver --------------------------------------------------------------------------------------------------------


def _run(server: Any, section: str, world_size: int, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Run one section on ``world_size`` forked ranks; return each rank's result."""
    outdir = tmp / f"{section}-{world_size}"
    outdir.mkdir()
    cfg = {
        "section": section,
        "world_size": world_size,
        "endpoint": server.endpoint_url,
        "ak": server.access_key,
        "sk": server.secret_key,
        "store": str(outdir / "store"),
        "outdir": str(outdir),
        "rounds": args.rounds,
        "modes": list(MODES),
        "state_mib": args.state_mib,
        "prefix_mib": args.prefix_mib,
        "prefix_counts": sorted({2, world_size}),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TORCH_CPP_LOG_LEVEL="ERROR")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "benchmarks.dcp_requests", "--launch", json.dumps(cfg)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=args.timeout_s, capture_output=True, text=True)
    if proc.returncode:
        tails = "\n".join(
            f"--- {p.name} ---\n{p.read_text()[-2500:]}" for p in sorted(outdir.glob("rank*.log")) if p.stat().st_size
        )
        raise RuntimeError(
            f"{section} at {world_size} ranks failed ({proc.returncode}): {proc.stdout}{proc.stderr}\n{tails}"
        )
    return [json.loads((outdir / f"rank{r}.json").read_text()) for r in range(world_size)]


def _split(per_rank: list[dict[str, int]], name: str) -> dict[str, int]:
    """Requests of category ``name``: in all, by rank 0, by every other rank together."""
    counts = [r.get(name, 0) for r in per_rank]
    return {"total": sum(counts), "rank0": counts[0], "others": sum(counts[1:])}


def _summarize_requests(world_size: int, ranks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    modes = list(dict.fromkeys(r["mode"] for r in ranks[0]["rounds"]))
    for mode in modes:
        rounds = [[x for x in rank["rounds"] if x["mode"] == mode] for rank in ranks]
        first = [rs[0]["requests"] for rs in rounds]
        # The counts are deterministic; a round that differs would be a retry (recorded, not hidden).
        stable = all(x["requests"] == rs[0]["requests"] for rs in rounds for x in rs)
        seconds = [x["s"] for x in rounds[0]]  # rank 0: barrier before to barrier after
        names = sorted({k for r in first for k in r})
        rows.append(
            {
                "ranks": world_size,
                "mode": mode,
                "requests": {name: _split(first, name) for name in names},
                "requests_total": sum(sum(r.values()) for r in first),
                "requests_per_rank": first,
                "same_in_every_round": stable,
                "resume_s": seconds,
                "resume_median_s": round(statistics.median(seconds), 3),
                "resume_min_s": round(min(seconds), 3),
                "paths_agree": len({x["path"] for rs in rounds for x in rs}) == 1,
            }
        )
    return rows


def _summarize_replicas(server: Any, ranks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from s3ckpt.dcp.layout import MANIFEST_NAME

    client = server.client()
    model = ranks[0]["model_bytes"]
    rows = []
    for style, save in ranks[0]["saves"].items():
        key = save["url"][len(f"s3://{BUCKET}/") :] + "/" + MANIFEST_NAME
        manifest = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
        per_rank = [0] * len(ranks)
        for name, record in manifest["files"].items():
            per_rank[int(name.rsplit("/", 1)[-1].split("_")[2])] += record["size"]
        uploaded = sum(per_rank)
        puts = [sum(v for k, v in r["saves"][style]["requests"].items() if k in _PUTS) for r in ranks]
        rows.append(
            {
                "style": style,
                "ranks": len(ranks),
                "replicas": len(ranks) if style == "ddp" else 2,
                "model_bytes": model,
                "uploaded_bytes": uploaded,
                "uploaded_over_model": round(uploaded / model, 4),
                "bytes_per_rank": per_rank,
                "largest_share": round(max(per_rank) / uploaded, 3),
                "put_requests_per_rank": puts,
            }
        )
    return rows


def _summarize_prefixes(world_size: int, ranks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    saves = ranks[0]["saves"]
    rows = []
    # flat first, then by the number of prefixes
    names = sorted(
        {s["strategy"] for s in saves}, key=lambda n: (n != "flat", int("".join(filter(str.isdigit, n)) or 0))
    )
    for name in names:
        seconds = [s["s"] for s in saves if s["strategy"] == name]
        med = statistics.median(seconds)
        rows.append(
            {
                "ranks": world_size,
                "strategy": name,
                "bytes": ranks[0]["bytes"],
                "save_s": seconds,
                "save_median_s": round(med, 3),
                "save_min_s": round(min(seconds), 3),
                "mib_per_s": round(ranks[0]["bytes"] / MiB / med, 1),
            }
        )
    return rows


def _print_requests(rows: list[dict[str, Any]]) -> None:
    print("\nResume: requests summed over all ranks (rank 0 / the other ranks), time from barrier to barrier")
    head = f"{'ranks':>5}  {'mode':<17}" + "".join(f"{c:>17}" for c in COLUMNS) + f"{'all':>7}{'resume s':>16}"
    print(head)
    for r in rows:
        cells = []
        for c in COLUMNS:
            x = r["requests"].get(c, {"total": 0, "rank0": 0, "others": 0})
            cells.append(f"{x['total']:>6} ({x['rank0']}/{x['others']})".rjust(17))
        times = f"{r['resume_median_s']:.2f} ({r['resume_min_s']:.2f})"
        print(f"{r['ranks']:>5}  {r['mode']:<17}" + "".join(cells) + f"{r['requests_total']:>7}{times:>16}")


def _print_replicas(rows: list[dict[str, Any]]) -> None:
    print("\nReplicated state: bytes uploaded per checkpoint (rank files, from the manifest)")
    print(f"{'style':<6}{'ranks':>6}{'replicas':>9}{'model MiB':>11}{'uploaded MiB':>14}{'ratio':>7}  per rank MiB")
    for r in rows:
        per = " / ".join(f"{b / MiB:.2f}" for b in r["bytes_per_rank"])
        print(
            f"{r['style']:<6}{r['ranks']:>6}{r['replicas']:>9}{r['model_bytes'] / MiB:>11.2f}"
            f"{r['uploaded_bytes'] / MiB:>14.2f}{r['uploaded_over_model']:>7.3f}  {per}"
        )


def _print_prefixes(rows: list[dict[str, Any]]) -> None:
    print("\nSave time by prefix strategy (rank 0, barrier to barrier)")
    print(f"{'ranks':>5}  {'strategy':<26}{'MiB':>6}{'median s':>10}{'min s':>8}{'MiB/s':>8}")
    for r in rows:
        print(
            f"{r['ranks']:>5}  {r['strategy']:<26}{r['bytes'] // MiB:>6}{r['save_median_s']:>10.3f}"
            f"{r['save_min_s']:>8.3f}{r['mib_per_s']:>8.1f}"
        )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.dcp_requests", description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {', '.join(SECTIONS)}")
    p.add_argument("--ranks", default="2,8,32", help="rank counts of the requests section")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each mode / strategy")
    p.add_argument("--state-mib", type=int, default=12, help="model + optimizer state of the requests section")
    p.add_argument("--replica-ranks", type=int, default=4, help="ranks of the replicas section (even)")
    p.add_argument("--prefix-ranks", default="4,8", help="rank counts of the prefixes section")
    p.add_argument("--prefix-mib", type=int, default=256, help="state saved in the prefixes section")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dcp_requests.json"))
    p.add_argument("--timeout-s", type=float, default=1200, help="per group of ranks")
    p.add_argument("--launch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.launch:
        return _launch(json.loads(args.launch))

    from s3ckpt.server import LocalS3Server

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or args.replica_ranks < 2 or args.replica_ranks % 2:
        p.error(f"unknown sections {unknown}" if unknown else "--replica-ranks must be even (a 2 x n mesh)")
    doc: dict[str, Any] = {
        "benchmark": "dcp_requests",
        "config": {k: v for k, v in vars(args).items() if k != "launch"},
    }
    load_before = os.getloadavg()
    with (
        tempfile.TemporaryDirectory(prefix="dcp-requests-") as tmp,
        LocalS3Server(data_dir=Path(tmp) / "weed", extra_flags=SERVER_FLAGS) as server,
    ):
        server.create_bucket(BUCKET)
        if "requests" in sections:
            rows: list[dict[str, Any]] = []
            for n in _ints(args.ranks):
                print(f"requests: {n} ranks, {args.rounds} rounds of {', '.join(MODES)}...", flush=True)
                ranks = _run(server, "requests", n, args, Path(tmp))
                rows += _summarize_requests(n, ranks)
                doc.setdefault("save", []).append(
                    {
                        "ranks": n,
                        "save_s": ranks[0]["save"]["s"],
                        "requests": {
                            k: _split([r["save"]["requests"] for r in ranks], k)
                            for k in sorted({k for r in ranks for k in r["save"]["requests"]})
                        },
                        "peak_rss_mib_per_rank_max": max(r["peak_rss_mib"] for r in ranks),
                    }
                )
            doc["requests"] = rows
            _print_requests(rows)
        if "replicas" in sections:
            print(f"\nreplicas: {args.replica_ranks} ranks, ddp and hsdp...", flush=True)
            ranks = _run(server, "replicas", args.replica_ranks, args, Path(tmp))
            doc["replicas"] = _summarize_replicas(server, ranks)
            _print_replicas(doc["replicas"])
        if "prefixes" in sections:
            rows = []
            for n in _ints(args.prefix_ranks):
                print(f"\nprefixes: {n} ranks, {args.prefix_mib} MiB, {args.rounds} rounds...", flush=True)
                rows += _summarize_prefixes(n, _run(server, "prefixes", n, args, Path(tmp)))
            doc["prefixes"] = rows
            _print_prefixes(rows)
    doc["env"] = {
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "server": "embedded SeaweedFS (weed mini), loopback, same host as the ranks",
    }
    doc["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

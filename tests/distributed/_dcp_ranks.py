"""The rank side of test_dcp: real gloo ranks that save and load DTensor-sharded state on the real server.

Ranks are processes forked by one launcher (``python -m tests.distributed._dcp_ranks <cfg>``) and rendezvous
through a FileStore, so no port is picked and none can be taken by a parallel run. State is DTensor-sharded over a
CPU DeviceMesh (uneven shards on purpose), plus a replicated DTensor, a plain tensor and a non-tensor.
Tensors are small: 4 ranks share 2 cores with the server and other test runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from s3ckpt import dcp as s3dcp
from s3ckpt.config import ClientConfig, RetryConfig, TransferConfig
from s3ckpt.dcp import NumericPrefixStrategy, S3StorageReader, S3StorageWriter
from s3ckpt.distributed import resolve_resume_path
from s3ckpt.transport import S3Transport

ROOT = Path(__file__).resolve().parents[2]
RESULT_TAG = "DCP-RESULT "
MiB = 1024 * 1024
RANK_BIG_ROWS = 1408  # 5.5 MiB of layer.big per rank: more than one 5 MiB part, so every rank file is multipart
BIG_ROWS = 4 * RANK_BIG_ROWS


# -- shared by the test process and the rank processes --------------------------------------------------------


def full_state(seed: int, big_rows: int = 0) -> dict[str, torch.Tensor]:
    """The unsharded tensors of checkpoint ``seed``; ``layer.big`` (``big_rows`` x 1024 fp32) forces multipart."""
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.big": torch.randn(max(big_rows, 8), 1024, generator=g),
        "layer.w": torch.randn(37, 64, generator=g),  # 37 rows: uneven shards over 2 and 4 ranks
        "emb": torch.randn(24, 16, generator=g).to(torch.bfloat16),
        "rep": torch.randn(8, 8, generator=g),
        "plain": torch.arange(seed, seed + 10),
    }


def server_cfg(server: Any) -> dict[str, Any]:
    return {"endpoint": server.endpoint_url, "ak": server.access_key, "sk": server.secret_key}


def transport_for(cfg: dict[str, Any]) -> S3Transport:
    return S3Transport.create(
        client=ClientConfig(endpoint_url=cfg["endpoint"], access_key_id=cfg["ak"], secret_access_key=cfg["sk"]),
        retry=RetryConfig(max_attempts=5, base_delay_s=0.05, max_delay_s=0.5, deadline_s=60),
        transfer=TransferConfig(chunk_size_MB=5, max_write_concurrency=2, max_read_concurrency=4, read_chunk_size_MB=2),
    )


# -- rank process ------------------------------------------------------------------------------------------------


def _rank_main(cfg: dict[str, Any], rank: int) -> None:  # pragma: no cover - runs in the rank processes
    torch.set_num_threads(1)
    ws = cfg["world_size"]
    dist.init_process_group(
        "gloo", init_method=f"file://{cfg['store']}", rank=rank, world_size=ws, timeout=timedelta(seconds=60)
    )
    mesh = init_device_mesh("cpu", (ws,))
    t = transport_for(cfg)
    from tests.distributed._sharded_ranks import KeyCounter

    wire = KeyCounter(t)
    placements = {"layer.big": [Shard(0)], "layer.w": [Shard(0)], "emb": [Shard(1)], "rep": [Replicate()]}

    def state_for(seed: int, big_rows: int, empty: bool, bump: Any = ()) -> dict[str, Any]:
        full = full_state(seed, big_rows)
        for k in bump:  # these tensors changed since the checkpoint of this seed (incremental saves)
            full[k] = full[k] + 1
        out: dict[str, Any] = {
            k: distribute_tensor(torch.zeros_like(v) if empty else v, mesh, placements[k], src_data_rank=None)
            for k, v in full.items()
            if k in placements
        }
        out["plain"] = torch.zeros_like(full["plain"]) if empty else full["plain"]
        out["meta"] = {"seed": -1 if empty else seed, "tag": "" if empty else f"ckpt-{seed}"}
        return out

    class KillingPlanner(DefaultSavePlanner):
        """SIGKILLs the victim rank before its last tensor, once the earlier ones went into its upload."""

        def resolve_data(self, write_item: Any) -> Any:
            if rank == cfg["victim"] and write_item.type != WriteItemType.BYTE_IO:
                self.seen = getattr(self, "seen", 0) + 1
                if self.seen == sum(1 for i in self.plan.items if i.type != WriteItemType.BYTE_IO):
                    os.kill(os.getpid(), signal.SIGKILL)
            return super().resolve_data(write_item)

    def replicated_state(style: str) -> dict[str, Any]:
        """16 tensors of 64 KiB, replicated: the same full tensors on every rank (``ddp``), or DTensors
        ``[Replicate(), Shard(0)]`` on a 2 x (ws / 2) mesh (``hsdp``: 2 replicas of each shard)."""
        g = torch.Generator().manual_seed(17)
        full = {f"layer{i}.weight": torch.randn(64, 256, generator=g) for i in range(16)}
        if style == "ddp":
            return full
        mesh2 = init_device_mesh("cpu", (2, ws // 2), mesh_dim_names=("replicate", "shard"))
        return {k: distribute_tensor(v, mesh2, [Replicate(), Shard(0)], src_data_rank=None) for k, v in full.items()}

    for op in cfg["ops"]:
        kind, url, seed, big = op["op"], op["url"], op.get("seed", 0), op.get("big_rows", 0)
        strategy = NumericPrefixStrategy(op["prefixes"]) if op.get("prefixes") else None
        start = time.perf_counter()
        wire.take()
        extra: dict[str, Any] = {}
        if kind == "resolve":  # resume discovery on a directory of sharded checkpoints
            extra["path"] = resolve_resume_path(url, transport=t)
        elif kind == "save_replicated":
            s3dcp.save(replicated_state(op["style"]), url, transport=t)
        elif kind in ("save", "async_save", "kill_save"):
            writer = S3StorageWriter(url, transport=t, prefix_strategy=strategy, base=op.get("base"))
            state = state_for(seed, big, empty=False, bump=op.get("bump", ()))
            if kind == "async_save":
                dcp.async_save(state, storage_writer=writer).result()
            else:
                dcp.save(state, storage_writer=writer, planner=KillingPlanner() if kind == "kill_save" else None)
            extra["copied"] = writer.bytes_copied
        else:
            state = state_for(seed, big, empty=True, bump=op.get("bump", ()))
            if op.get("via") == "wrapper":  # s3ckpt.dcp.load: .metadata fetched by rank 0 and broadcast
                s3dcp.load(state, url, transport=t)
            else:
                dcp.load(state, storage_reader=S3StorageReader(url, transport=t))
            expected = state_for(seed, big, empty=False, bump=op.get("bump", ()))
            for k, v in state.items():
                if isinstance(v, DTensor):
                    assert torch.equal(v.to_local(), expected[k].to_local()), f"{url} {k} rank {rank}"
            assert torch.equal(state["plain"], expected["plain"]), url
            assert state["meta"] == expected["meta"], (url, state["meta"])
        # One line per finished op, so a run whose last op is killed still shows what came before it.
        took = round(time.perf_counter() - start, 3)
        print(
            RESULT_TAG
            + json.dumps(
                {"op": kind, "url": url, "via": op.get("via", "reader"), "s": took, "requests": wire.take(), **extra}
            ),
            flush=True,
        )
    dist.barrier()
    dist.destroy_process_group()


# -- test process --------------------------------------------------------------------------------------------------


def _launch(cfg: dict[str, Any]) -> None:  # pragma: no cover - runs in the launcher process
    """Fork the ranks from this interpreter, which has torch imported already: importing it once instead of
    once per rank saves several CPU-seconds per rank, the larger part of a run on 2 shared cores."""
    ranks: dict[int, int] = {}
    for rank in range(cfg["world_size"]):
        pid = os.fork()
        if pid == 0:
            log = os.open(cfg["logs"][rank], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = 1
            try:
                _rank_main(cfg, rank)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        ranks[pid] = rank
    codes = {}
    while ranks:
        pid, status = os.wait()
        codes[ranks.pop(pid)] = os.waitstatus_to_exitcode(status)
    print(json.dumps([codes[r] for r in sorted(codes)]), flush=True)


def run_ranks(
    server: Any, world_size: int, ops_: list[dict[str, Any]], workdir: Path, *, victim: int = -1, timeout_s: float = 150
) -> list[list[dict[str, Any]]]:
    """Run ``ops_`` on ``world_size`` rank processes; return each rank's finished ops. With ``victim``, that rank
    SIGKILLs itself inside its upload (op ``kill_save``) and the others are expected to fail."""
    workdir.mkdir(parents=True, exist_ok=True)
    logs = [workdir / f"rank{r}.log" for r in range(world_size)]
    cfg = {**server_cfg(server), "world_size": world_size, "ops": ops_, "victim": victim}
    cfg.update(store=str(workdir / f"store-{uuid.uuid4().hex}"), logs=[str(p) for p in logs])
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(OMP_NUM_THREADS="1", TORCH_CPP_LOG_LEVEL="ERROR", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "tests.distributed._dcp_ranks", json.dumps(cfg)]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, start_new_session=True)

    def tails() -> str:
        return "\n".join(
            f"--- rank {r} ---\n" + (p.read_text()[-3000:] if p.exists() else "") for r, p in enumerate(logs)
        )

    try:
        out, _ = launcher.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        raise AssertionError(f"ranks did not finish in {timeout_s} s\n{tails()}") from None
    codes = json.loads(out.decode().strip().splitlines()[-1]) if launcher.returncode == 0 else None
    if codes is None or (victim < 0 and any(codes)) or (victim >= 0 and codes[victim] != -signal.SIGKILL):
        raise AssertionError(f"rank exit codes {codes} (launcher {launcher.returncode})\n{tails()}")
    results = []
    for log in logs:
        lines = [ln[len(RESULT_TAG) :] for ln in log.read_text().splitlines() if ln.startswith(RESULT_TAG)]
        results.append([json.loads(ln) for ln in lines])
    return results


if __name__ == "__main__":  # pragma: no cover
    _launch(json.loads(sys.argv[1]))

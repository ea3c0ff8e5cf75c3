"""Rank process of the sharded Lightning Trainer tests (tests/distributed/test_sharded_trainer.py).

Run as ``python -m tests.distributed._sharded_ranks CFG_JSON RANK``: one launch runs every phase the config
names, each a new Trainer in the same processes (imports cost most of the time on a 2-core machine):

* ``mp``: ``S3ModelParallelStrategy`` (FSDP2 ``fully_shard``, 2 data-parallel ranks): train with top-k and
  ``save_last``, then a new Trainer resumes with ``ckpt_path="last"``;
* ``fsdp``: ``S3FSDPStrategy(state_dict_type="sharded")`` (FSDP1 on CPU), train, resume from a URL;
* ``full``: ``S3ModelParallelStrategy(save_distributed_checkpoint=False)``: one file gathered and saved by
  rank 0, loaded by every rank (FSDP1's full state crashes on CPU, Lightning #21804).

Each phase records weights (full state), optimizer state digests, step and the S3 requests each rank sent
while loading; the test compares them across ranks and phases.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from datetime import timedelta
from typing import Any

import torch

RESULT_TAG = "SHARDED-RESULT "


class KeyCounter:
    """Counts the S3 requests a botocore client sends as ``"<operation> <last part of the key>"`` (so GETs of
    ``.metadata`` and ``meta.pt`` are told apart from ranged GETs of shards, counted as ``GetObject *.distcp``)."""

    def __init__(self, transport: Any) -> None:
        import threading
        from collections import Counter

        self._lock = threading.Lock()
        self.ops: Counter[str] = Counter()
        transport.clients.get().meta.events.register("before-send.s3", self)

    def __call__(self, event_name: str, request: Any = None, **kwargs: Any) -> None:
        from urllib.parse import urlsplit

        op = event_name.rsplit(".", 1)[-1]
        name = urlsplit(getattr(request, "url", "") or "").path.rsplit("/", 1)[-1]
        if name.endswith(".distcp"):
            name = "*.distcp"
        with self._lock:
            self.ops[f"{op} {name}" if op in ("GetObject", "HeadObject") else op] += 1

    def take(self) -> dict[str, int]:
        with self._lock:
            out = dict(self.ops)
            self.ops.clear()
        return out


def _digest(obj: Any) -> str:
    """A digest of every tensor in ``obj`` (full tensors of DTensors / ShardedTensors are gathered first)."""
    h = hashlib.sha256()

    def walk(x: Any, path: str) -> None:
        if isinstance(x, torch.Tensor):
            full = x.full_tensor() if hasattr(x, "full_tensor") else x
            h.update(path.encode())
            h.update(full.detach().contiguous().cpu().numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k], f"{path}.{k}")
        elif isinstance(x, list | tuple):
            for i, v in enumerate(x):
                walk(v, f"{path}.{i}")
        else:
            h.update(f"{path}={x!r}".encode())

    walk(obj, "")
    return h.hexdigest()[:16]


def run_two_ranks(
    module: str,
    s3_server: Any,
    workdir: Any,
    phases: list[dict[str, Any]],
    ports: int,
    returncodes: list[int] | None = None,
    **extra: Any,
) -> list[dict[str, Any]]:
    """Launch ``python -m module`` as 2 gloo ranks (Lightning's environment variables) against ``s3_server``
    with ``phases``; returns what each rank reported (``report``)."""
    import socket
    import time

    from tests.distributed.test_resume_broadcast import run_ranks

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    cfg: dict[str, Any] = {
        "endpoint": s3_server.endpoint_url,
        "ak": s3_server.access_key,
        "sk": s3_server.secret_key,
        "workdir": str(workdir),
        "phases": phases,
        "ports": [free_port() for _ in range(ports)],
        **extra,
    }
    env = {"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2", "NODE_RANK": "0"}
    start = time.monotonic()
    per_rank = run_ranks(
        module,
        cfg,
        2,
        workdir,
        timeout_s=240,
        rank_env=lambda r: {**env, "LOCAL_RANK": str(r), "RANK": str(r)},
        result_tag=RESULT_TAG,
        expected_returncode=returncodes or 0,
    )
    print(f"{module} phases {[p['kind'] for p in phases]}: {time.monotonic() - start:.1f} s")
    return per_rank


def report(out: dict[str, Any], cfg: dict[str, Any]) -> None:  # pragma: no cover - runs in the rank processes
    """Print this rank's results (and whether a local ``s3:`` folder appeared), then leave the process group."""
    import torch.distributed as dist

    out["local_s3_dir"] = os.path.exists("s3:") or os.path.exists(os.path.join(cfg["workdir"], "s3:"))
    print(RESULT_TAG + json.dumps(out), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def _kill_during_save(kill: dict[str, Any]) -> None:  # pragma: no cover - runs in the rank processes
    """SIGKILL this process in the middle of the sharded save of step ``kill["step"]``: ``"shard"`` right after
    this rank's shards are stored (the other rank waits in DCP's collective), ``"commit"`` on the coordinator
    after the shards, ``meta.pt`` and the manifest are stored, just before ``.metadata`` (the commit record)."""
    import signal

    from s3ckpt.dcp import commit, writer

    marker = f"step={kill['step']}"
    if kill["at"] == "shard":
        original = writer.S3StorageWriter.write_data

        def write_data(self: Any, plan: Any, planner: Any) -> Any:
            result = original(self, plan, planner)
            if marker in (self.url or ""):
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        writer.S3StorageWriter.write_data = write_data  # type: ignore[method-assign]
    else:
        put = commit.put_record

        def put_record(t: Any, bucket: str, key: str, data: bytes, **kwargs: Any) -> None:
            if marker in key and key.endswith("/.metadata"):
                os.kill(os.getpid(), signal.SIGKILL)
            put(t, bucket, key, data, **kwargs)

        commit.put_record = put_record  # type: ignore[assignment]


def main(cfg: dict[str, Any], rank: int) -> None:  # pragma: no cover - runs in the rank processes
    import lightning.pytorch as pl
    import torch.distributed as dist
    from lightning.pytorch import Callback, Trainer
    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from torch.utils.data import DataLoader, TensorDataset

    from s3ckpt.config import ClientConfig
    from s3ckpt.lightning import S3FSDPStrategy, S3ModelCheckpoint, S3ModelParallelStrategy

    torch.set_num_threads(1)
    client = ClientConfig(endpoint_url=cfg["endpoint"], access_key_id=cfg["ak"], secret_access_key=cfg["sk"])
    out: dict[str, Any] = {}

    class Model(pl.LightningModule):
        def __init__(self, wrap: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
            self.wrap = wrap

        def configure_model(self) -> None:
            if self.wrap:  # FSDP2 through ModelParallelStrategy
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                for layer in self.net:
                    if isinstance(layer, nn.Linear):
                        fully_shard(layer, mesh=mesh)
                fully_shard(self, mesh=mesh)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("score", float(self.global_step))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

        def train_dataloader(self) -> DataLoader[Any]:
            g = torch.Generator().manual_seed(1)
            data = TensorDataset(torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g))
            return DataLoader(data, batch_size=4)

    class Record(Callback):
        def __init__(self, key: str) -> None:
            self.key = key

        def on_train_start(self, trainer: Trainer, pl_module: pl.LightningModule) -> None:
            out[self.key] = state_of(trainer)

    def state_of(trainer: Trainer) -> dict[str, Any]:
        model = trainer.strategy.model
        full = StateDictOptions(full_state_dict=True)  # on every rank (cpu_offload: rank 0 only)
        opt = trainer.optimizers[0]
        return {
            "step": trainer.global_step,
            "weights": _digest(get_model_state_dict(model, options=full)),
            "optim": _digest(get_optimizer_state_dict(model, opt, options=full)),
        }

    class CPUFSDP(S3FSDPStrategy):
        """FSDP1 on CPU: Lightning passes ``device_id=None`` there, which torch refuses."""

        def _setup_model(self, model: nn.Module) -> nn.Module:
            from torch.distributed.fsdp import FullyShardedDataParallel

            wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
            return super()._setup_model(wrapped)

    def strategy(kind: str, **s3: Any) -> Any:
        common = {"process_group_backend": "gloo", "timeout": timedelta(seconds=60), "client": client, **s3}
        if s3.pop("reader", False):  # the read-only identity: every save is refused with AccessDenied
            common["client"] = ClientConfig(
                endpoint_url=cfg["endpoint"], access_key_id=cfg["reader_ak"], secret_access_key=cfg["reader_sk"]
            )
            common.pop("reader")
        if kind in ("mp", "full"):
            # "full": one file gathered on rank 0 (FSDP1's full state crashes on CPU, Lightning #21804).
            return S3ModelParallelStrategy(
                data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=kind == "mp", **common
            )
        return CPUFSDP(state_dict_type="sharded", **common)

    def trainer(kind: str, steps: int, callbacks: list[Any], **s3: Any) -> Trainer:
        return Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy(kind, **s3),
            callbacks=callbacks,
            max_steps=steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=cfg["workdir"],
        )

    ports = iter(cfg["ports"])

    def next_group() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ["MASTER_PORT"] = str(next(ports))

    for phase in cfg["phases"]:
        kind, dirpath = phase["kind"], phase["dirpath"]
        label = phase.get("label", kind)
        s3 = {"async_checkpointing": phase.get("async", False)}
        s3.update({k: phase[k] for k in ("reader", "on_save_error", "incremental") if k in phase})
        next_group()
        if not phase.get("resume_only"):
            if phase.get("kill", {}).get("rank") == rank:
                _kill_during_save(phase["kill"])
            ckpt = S3ModelCheckpoint(
                dirpath, every_n_train_steps=2, save_top_k=2, monitor="score", mode="max", save_last=phase["last"]
            )
            first = trainer(kind, phase["steps"], [ckpt], **s3)
            first.fit(Model(wrap=kind != "fsdp"))
            io = first.strategy.s3_checkpoint_io
            out[f"{label}:trained"] = state_of(first)
            out[f"{label}:best_k"] = sorted(ckpt.best_k_models)
            out[f"{label}:removed"] = sorted(r.path for r in io.removals if r.done_at is not None)
            out[f"{label}:saved"] = sorted(r.path for r in io.records if not r.failed)
            out[f"{label}:copies"] = sorted(c.dst for c in io.copies if c.done_at is not None)
            out[f"{label}:failed"] = sorted(r.path for r in io.failed_saves)
            out[f"{label}:cancelled"] = sorted(r.path for r in io.removals if r.cancelled)
            out[f"{label}:stall_vs_save"] = [(r.stall_s, r.save_s) for r in io.records if not r.failed]
            out[f"{label}:incremental"] = io.incremental
        if phase.get("train_only"):
            continue

        next_group()
        again = S3ModelCheckpoint(dirpath, every_n_train_steps=100, save_top_k=0, save_last=False)
        second = trainer(kind, phase["steps"] + 1, [again, Record(f"{label}:resumed")], **s3)
        wire = KeyCounter(second.strategy.s3_checkpoint_io.transport)
        second.fit(Model(wrap=kind != "fsdp"), ckpt_path=phase["resume"])
        out[f"{label}:resume_requests"] = wire.take()
        out[f"{label}:resumed_path"] = str(second.ckpt_path)
    report(out, cfg)


if __name__ == "__main__":  # pragma: no cover
    main(json.loads(sys.argv[1]), int(sys.argv[2]))

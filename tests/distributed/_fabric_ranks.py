"""Rank process of the Fabric sharded-checkpoint tests (tests/distributed/test_sharded_fabric.py).

Run as ``python -m tests.distributed._fabric_ranks CFG_JSON RANK``: one launch runs every phase the config
names in the same processes and process group (imports cost most of the time on a 2-core machine). Each phase
trains a few steps with one Fabric, ``fabric.save``s to S3, then a new Fabric with a fresh model and optimizer
``fabric.load``s it:

* ``mp``: ``S3ModelParallelStrategy`` (FSDP2 ``fully_shard``, 2 data-parallel ranks), sharded; plus the error
  and ``strict`` cases, ``load_raw`` of a sharded checkpoint and a local path (Lightning's own code);
* ``fsdp``: ``S3FSDPStrategy(state_dict_type="sharded")`` (FSDP1 on CPU, see ``CPUFSDP``);
* ``full``: ``S3ModelParallelStrategy(save_distributed_checkpoint=False)``: one file gathered and saved by
  rank 0 (FSDP1's full state crashes on CPU, Lightning #21804); plus ``load_raw`` and a filtered save.

A phase with ``"pathlib": true`` passes ``s3:/bucket/key``, as ``pathlib`` mangles a URL. A phase with
``"async": true`` saves with ``async_checkpointing=True`` and tears the strategy down before the
load. Each phase records digests of the full weights and optimizer state (for FSDP1 on CPU: of each rank's
shard, which is what torch's full-state API returns there) before the save, of the fresh objects, and after
the load, and the metadata that came back.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from tests.distributed._sharded_ranks import _digest, report


class Counter:
    """A stateful entry of the Fabric state (saved as its ``state_dict()``, loaded through ``load_state_dict``)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.value = state["value"]


def _error(fn: Any) -> str:
    try:
        fn()
    except Exception as exc:
        return type(exc).__name__
    return "no error"


def main(cfg: dict[str, Any], rank: int) -> None:  # pragma: no cover - runs in the rank processes
    from lightning.fabric import Fabric
    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    from s3ckpt import checkpoint as ck
    from s3ckpt.config import ClientConfig
    from s3ckpt.fabric import S3FSDPStrategy, S3ModelParallelStrategy

    torch.set_num_threads(1)
    os.environ["MASTER_PORT"] = str(cfg["ports"][0])
    client = ClientConfig(endpoint_url=cfg["endpoint"], access_key_id=cfg["ak"], secret_access_key=cfg["sk"])
    out: dict[str, Any] = {}

    def parallelize(module: nn.Module, mesh: Any) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        for layer in module:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh["data_parallel"])
        fully_shard(module, mesh=mesh["data_parallel"])
        return module

    class CPUFSDP(S3FSDPStrategy):
        """FSDP1 on CPU: Lightning passes ``device_id=None`` there, which torch refuses."""

        def setup_module(self, module: nn.Module) -> nn.Module:
            from torch.distributed.fsdp import FullyShardedDataParallel

            return FullyShardedDataParallel(module, device_id=torch.device("cpu"), use_orig_params=True)

    def fabric_for(kind: str, **s3: Any) -> Fabric:
        common = {"process_group_backend": "gloo", "timeout": timedelta(seconds=60), "client": client, **s3}
        strategy: Any
        if kind in ("mp", "full"):
            strategy = S3ModelParallelStrategy(
                parallelize,
                data_parallel_size=2,
                tensor_parallel_size=1,
                save_distributed_checkpoint=kind == "mp",
                **common,
            )
        else:
            strategy = CPUFSDP(state_dict_type="sharded", **common)
        fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
        fabric.launch()  # the ranks were started outside (LOCAL_RANK set): joins the existing process group
        return fabric

    def setup(fabric: Fabric) -> tuple[Any, Any]:
        torch.manual_seed(0)
        model = fabric.setup_module(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)))
        optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))
        return model, optimizer

    def train(fabric: Fabric, model: Any, optimizer: Any, steps: int) -> None:
        g = torch.Generator().manual_seed(1 + rank)
        for _ in range(steps):
            x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
            fabric.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()

    full = StateDictOptions(full_state_dict=True)  # on every rank (cpu_offload: rank 0 only)

    def weights(model: Any) -> str:
        return _digest(get_model_state_dict(model.module, options=full))

    def digests(model: Any, optimizer: Any) -> dict[str, str]:
        optim = get_optimizer_state_dict(model.module, optimizer.optimizer, options=full)
        return {"weights": weights(model), "optim": _digest(optim)}

    def mp_extras(fabric: Fabric, url: str, model: Any, optimizer: Any, state: dict[str, Any]) -> dict[str, Any]:
        """Errors as Lightning raises them, non-strict loading, and a local path (Lightning's own code)."""
        errors = {
            "missing_key": _error(lambda: fabric.load(url, {"model": model, "absent": 1})),
            "missing_optimizer": _error(lambda: fabric.load(url, {"model": model, "other": optimizer})),
            "raw_sharded": _error(lambda: fabric.load_raw(url, model)),
            "filter_sharded": _error(lambda: fabric.save(url + "-f", state, filter={"model": lambda k, v: True})),
            "storage_options": _error(lambda: fabric.strategy.save_checkpoint(url + "-o", state, {"x": 1})),
        }
        lenient = {"model": model, "absent": 1}
        rest = sorted(fabric.load(url, lenient, strict=False))
        local = os.path.join(cfg["workdir"], "local-ckpt")
        fabric.save(local, {"model": model, "optimizer": optimizer, "step": 7})
        back = {"model": model, "optimizer": optimizer, "step": 0}
        fabric.load(local, back)
        return {
            "errors": errors,
            "non_strict": {"rest": rest, "absent": lenient["absent"]},
            "local": {"step": back["step"], "meta": os.path.isfile(os.path.join(local, "meta.pt"))},
        }

    def full_extras(fabric: Fabric, url: str, model: Any) -> dict[str, Any]:
        """A filtered full-state save, and ``load_raw`` of a raw state-dict file into a bare module."""
        filtered, raw = url.removesuffix(".ckpt") + "-filtered.ckpt", url.removesuffix(".ckpt") + "-raw.ckpt"
        fabric.save(filtered, {"model": model, "step": 4}, filter={"model": lambda k, v: k.startswith("0.")})
        res: dict[str, Any] = {}
        io = fabric.strategy.s3_checkpoint_io
        if rank == 0:
            saved = ck.load(filtered, weights_only=False, transport=io.transport)
            res["filtered"] = {"keys": sorted(saved), "model": sorted(saved["model"])}
            ck.save(ck.load(url, weights_only=False, transport=io.transport)["model"], raw, transport=io.transport)
        fabric.barrier()
        model3, _ = setup(fabric)
        fabric.load_raw(raw, model3)
        res["raw"] = weights(model3)
        return res

    def run_phase(kind: str, url: str, is_async: bool) -> dict[str, Any]:
        start = time.monotonic()
        fabric = fabric_for(kind, async_checkpointing=is_async)
        model, optimizer = setup(fabric)
        train(fabric, model, optimizer, 3)
        state = {"model": model, "optimizer": optimizer, "step": 3, "note": "kept", "counter": Counter(3)}
        fabric.save(url, state)
        res: dict[str, Any] = {"trained": digests(model, optimizer)}
        if is_async:
            fabric.strategy.teardown()  # the uploads finish here (the saves returned once staged)
        res["saved"] = [r.path for r in fabric.strategy.s3_checkpoint_io.records if not r.failed]

        again = fabric_for(kind)
        model2, optimizer2 = setup(again)
        res["fresh"] = digests(model2, optimizer2)
        state2 = {"model": model2, "optimizer": optimizer2, "step": 0, "counter": Counter(0)}
        remainder = again.load(url, state2)
        res["loaded"] = digests(model2, optimizer2)
        res["step"], res["counter"], res["remainder"] = state2["step"], state2["counter"].value, remainder
        # The loaded objects train on (the optimizer state is the live one, not a copy).
        train(again, model2, optimizer2, 1)
        if kind == "mp" and not is_async:
            res.update(mp_extras(again, url, model2, optimizer2, state))
        if kind == "full":
            res.update(full_extras(again, url, model2))
        again.strategy.teardown()
        res["seconds"] = round(time.monotonic() - start, 1)
        return res

    for phase in cfg["phases"]:
        is_async = phase.get("async", False)
        # "pathlib": the path as pathlib leaves it (s3:/bucket/key), which must still mean the URL.
        path = str(Path(phase["url"])) if phase.get("pathlib") else phase["url"]
        out[phase["kind"] + ("-async" if is_async else "")] = run_phase(phase["kind"], path, is_async)
    report(out, cfg)


if __name__ == "__main__":  # pragma: no cover
    main(json.loads(sys.argv[1]), int(sys.argv[2]))

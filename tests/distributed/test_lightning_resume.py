"""Lightning DDP (gloo, CPU) resuming from S3 across 2 real rank processes with ``configure_s3_resume``.

Run 1 trains and saves through ``S3CheckpointIO`` + ``S3ModelCheckpoint``. Run 2, a new Trainer in the same
processes (one launch: imports cost most of the time on a 2-core machine), resumes: global rank 0 alone
lists S3 (counted on the wire by a botocore ``before-send.s3`` handler, one call per HTTP request sent), every
rank loads the checkpoint rank 0 chose, and training continues from its step, epoch and weights. Run 2 then
tries a directory with no checkpoint: every rank raises rank 0's error at ``fit``, none hangs.

Ranks are subprocesses with the variables Lightning's ``LightningEnvironment`` reads (``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``), so Lightning launches nothing itself.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
import torch

from s3ckpt.server import LocalS3Server
from tests.distributed.test_resume_broadcast import WireCounter, run_ranks

RESULT_TAG = "LIGHTNING-RESULT "
TRAIN_STEPS = 6  # 4 batches per epoch and rank: the checkpoint is mid-epoch 1

pytestmark = [pytest.mark.distributed, pytest.mark.integration]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(cfg_json: str) -> None:  # pragma: no cover - runs in the rank processes
    import torch.distributed as dist
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.strategies import DDPStrategy

    from s3ckpt.config import ClientConfig
    from s3ckpt.lightning import S3CheckpointIO, S3ModelCheckpoint, configure_s3_resume
    from tests.integration._lightning_resume_script import LinearModel

    def new_model() -> LinearModel:  # the model every phase of this script trains
        return LinearModel(features=4, samples=32)

    cfg = json.loads(cfg_json)  # the rank comes from LOCAL_RANK, as Lightning reads it
    torch.set_num_threads(1)
    out: dict[str, Any] = {}

    class Record(Callback):
        def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            w = pl_module.state_dict()
            out["start"] = {"step": trainer.global_step, "epoch": trainer.current_epoch}
            out["start"]["weights"] = {k: v.tolist() for k, v in w.items()}

    def trainer(max_steps: int, io: S3CheckpointIO) -> Trainer:
        return Trainer(
            accelerator="cpu",
            devices=cfg["world_size"],
            num_nodes=1,
            strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)),
            plugins=[io],
            callbacks=[S3ModelCheckpoint(every_n_train_steps=3, save_last=True), Record()],
            max_steps=max_steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=cfg["workdir"],
        )

    def next_group(port: int) -> None:
        # A new Trainer in the same processes: drop the old group so Lightning creates the next one in fit,
        # as in a fresh job (a new port: the old store's socket may linger).
        dist.destroy_process_group()
        os.environ["MASTER_PORT"] = str(port)

    client = ClientConfig(endpoint_url=cfg["endpoint"], access_key_id=cfg["ak"], secret_access_key=cfg["sk"])
    os.environ["MASTER_PORT"] = str(cfg["ports"][0])
    first = trainer(TRAIN_STEPS, S3CheckpointIO(cfg["dirpath"], client=client))
    model = new_model()
    first.fit(model)
    out["trained"] = {"step": first.global_step, "epoch": first.current_epoch}
    out["trained"]["weights"] = {k: v.tolist() for k, v in model.state_dict().items()}

    next_group(cfg["ports"][1])
    io = S3CheckpointIO(cfg["dirpath"], client=client)
    wire = WireCounter(io.transport)
    loads: list[dict[str, int]] = []
    load = io.load_checkpoint

    def counted_load(*args: Any, **kwargs: Any) -> Any:
        loads.append(wire.take())  # what this rank sent before it started loading
        return load(*args, **kwargs)

    io.load_checkpoint = counted_load  # type: ignore[method-assign]
    tr = trainer(TRAIN_STEPS + 1, io)
    out["configured"] = configure_s3_resume(tr, cfg["dirpath"])
    start = time.perf_counter()
    # "last" as users write it: Lightning's own lookup would list S3 on every rank; the connector uses
    # rank 0's choice instead (the wire counts below would show a listing on rank 1).
    tr.fit(new_model(), ckpt_path="last")
    out.update(before_load=loads, resumed=tr.ckpt_path, fit_s=round(time.perf_counter() - start, 2))
    out["load_s"] = tr._checkpoint_connector.load_seconds  # type: ignore[attr-defined]

    # No checkpoint at all, with the process group not yet there: rank 0's error reaches every rank at fit.
    next_group(cfg["ports"][2])
    tr2 = trainer(1, S3CheckpointIO(cfg["dirpath"] + "-empty", client=client))
    configure_s3_resume(tr2, cfg["dirpath"] + "-empty")
    try:
        tr2.fit(new_model())
        out["empty"] = {"type": "", "message": "no error"}
    except Exception as exc:
        out["empty"] = {"type": type(exc).__name__, "message": str(exc)}
        print(RESULT_TAG + json.dumps(out), flush=True)
        # Left uncaught, as in a user's script: the rank must exit with Python's status for an error (1), not
        # die at exit with SIGABRT from a gloo thread of the still-live process group.
        raise
    print(RESULT_TAG + json.dumps(out), flush=True)


@pytest.mark.timeout(240)
def test_ddp_resume_from_rank0_choice(s3_server: LocalS3Server, tmp_path_factory: pytest.TempPathFactory) -> None:
    world_size = 2
    bucket = f"ltn-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    workdir = tmp_path_factory.mktemp("lightning-resume")
    cfg: dict[str, Any] = {
        "endpoint": s3_server.endpoint_url,
        "ak": s3_server.access_key,
        "sk": s3_server.secret_key,
        "dirpath": f"s3://{bucket}/run",
        "world_size": world_size,
        "workdir": str(workdir),
    }

    start = time.monotonic()
    env = {"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": str(world_size), "NODE_RANK": "0"}
    per_rank = run_ranks(
        "tests.distributed.test_lightning_resume",
        {**cfg, "ports": [_free_port() for _ in range(3)]},
        world_size,
        workdir,
        timeout_s=200,
        rank_env=lambda r: {**env, "LOCAL_RANK": str(r), "RANK": str(r)},
        result_tag=RESULT_TAG,
        expected_returncode=1,  # every rank ends with the resume error, uncaught
    )
    print(f"{world_size} ranks: train, resume and a failed resume in {time.monotonic() - start:.1f} s")
    last = f"{cfg['dirpath']}/last.ckpt"
    assert [r["configured"] for r in per_rank] == [last, None], "rank 0 chose; the others learn it at fit"
    trained = per_rank[0]["trained"]
    assert trained["step"] == TRAIN_STEPS
    for rank, r in enumerate(per_rank):
        assert r["resumed"] == last
        # Saved at step 6, the 2nd batch of epoch 1 (fit's end reports epoch 2: it counts the cut-short epoch).
        assert (r["start"]["step"], r["start"]["epoch"]) == (TRAIN_STEPS, 1), f"rank {rank}: {r['start']}"
        assert r["start"]["weights"] == trained["weights"], f"rank {rank} resumed with other weights"
        assert len(r["before_load"]) == 1 and r["load_s"] is not None
    rank0, others = per_rank[0]["before_load"][0], [r["before_load"][0] for r in per_rank[1:]]
    assert rank0.get("ListObjectsV2", 0) >= 1 and rank0.get("HeadObject", 0) >= 1, rank0
    assert others == [{}] * (world_size - 1), f"non-zero ranks sent {others} before loading"

    empty = [r["empty"] for r in per_rank]
    assert empty[0]["type"] == "CheckpointNotFoundError" and "run-empty" in empty[0]["message"], empty[0]
    assert empty == [empty[0]] * world_size
    print(json.dumps({r: {k: per_rank[r][k] for k in ("before_load", "fit_s", "load_s")} for r in range(world_size)}))


if __name__ == "__main__":  # pragma: no cover
    _rank_main(sys.argv[1])

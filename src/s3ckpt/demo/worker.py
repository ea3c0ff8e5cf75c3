"""The demo's training process: ``python -m s3ckpt.demo.worker {train,resume} CONFIG_JSON``.

It reports what happens as JSON lines on stdout (saves committed, removals, the state it resumed from), so
the parent can kill it at a chosen moment and check the resume. With ``"finetune": true`` in the config it
freezes all but the model's last layer and saves incrementally (``S3CheckpointIO(incremental=True)``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from s3ckpt.lightning import S3CheckpointIO, S3ModelCheckpoint

from .model import DemoRegressor, demo_data


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


class Reporter(Callback):
    """Prints each committed save (from the plugin's records) and the state training starts from."""

    def __init__(self, io: S3CheckpointIO, state_out: str | None) -> None:
        self.io = io
        self.seen = 0
        self.removals_seen: set[int] = set()
        self.copies_seen = 0
        self.state_out = state_out

    def _flush(self) -> None:
        records = list(self.io.records)
        for r in records[self.seen :]:
            emit(
                "saved",
                path=r.path,
                bytes=r.bytes,
                save_s=r.save_s,
                upload_s=r.upload_s,
                stall_s=r.stall_s,
                committed_at=r.committed_at,
                bytes_uploaded=r.bytes_uploaded,
                bytes_copied=r.bytes_copied,
                base=r.base,
                incremental=bool(getattr(self.io, "incremental", False)),
            )
        self.seen = len(records)
        # Only once carried out (or cancelled): async, a removal waits for the newer save to commit, and a
        # crash before that leaves the old checkpoint in place; one whose delete failed is never reported.
        for i, rm in enumerate(list(self.io.removals)):
            if i not in self.removals_seen and (rm.done_at is not None or rm.cancelled):
                emit("removed", path=rm.path, requested_at=rm.requested_at, done_at=rm.done_at, cancelled=rm.cancelled)
                self.removals_seen.add(i)
        copies = list(self.io.copies)
        # In order, and only once finished (done or cancelled): the copy runs after its source commits.
        while self.copies_seen < len(copies):
            c = copies[self.copies_seen]
            if c.done_at is None and not c.cancelled:
                break
            emit("copied", src=c.src, dst=c.dst, bytes=c.bytes, done_at=c.done_at, cancelled=c.cancelled)
            self.copies_seen += 1

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.state_out:
            opt = trainer.optimizers[0].state_dict()
            torch.save(
                {
                    "global_step": trainer.global_step,
                    "epoch": trainer.current_epoch,
                    "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                    "optimizer": opt,
                    "ckpt_path": str(trainer.ckpt_path),
                },
                self.state_out,
            )
            emit(
                "resumed",
                global_step=trainer.global_step,
                epoch=trainer.current_epoch,
                ckpt_path=str(trainer.ckpt_path),
            )

    def on_train_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._flush()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.io.wait()
        self._flush()


def run(mode: str, cfg: dict[str, Any]) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    dirpath = cfg["dirpath"]
    finetune = bool(cfg.get("finetune"))
    io = S3CheckpointIO(
        dirpath=dirpath,
        chunk_size_MB=cfg.get("chunk_size_MB", 8),
        max_read_concurrency=cfg.get("max_read_concurrency", 8),
        max_write_concurrency=cfg.get("max_write_concurrency", 4),
        async_checkpointing=True,  # max_pending_saves=2 (the default): a save never waits for the previous upload
        # Fine-tuning: the frozen weights (and their optimizer state) are the same bytes in every checkpoint, so
        # each save has the store copy them from the previous one and uploads only what changed.
        incremental=finetune,
    )
    ckpt = S3ModelCheckpoint(
        dirpath=dirpath,
        filename="{epoch}-{step}",
        monitor="train_loss",
        save_top_k=cfg.get("save_top_k", 2),
        # last.ckpt as a server-side copy of the newest top-k file: each checkpoint is uploaded once.
        save_last="link",
        every_n_train_steps=cfg["every_n_train_steps"],
    )
    reporter = Reporter(io, cfg.get("state_out") if mode == "resume" else None)
    trainer = Trainer(
        max_steps=cfg["max_steps"],
        plugins=[io],
        callbacks=[ckpt, reporter],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = DemoRegressor(width=cfg.get("width", 768))
    if finetune:
        emit("frozen", params=model.freeze_backbone())
    data = demo_data()
    ckpt_path = None
    if mode == "resume":
        from s3ckpt.lightning.connector import configure_s3_resume

        ckpt_path = configure_s3_resume(trainer, dirpath, resume_if_exists=True, resume_ignore_no_checkpoint=False)
        emit("resume_path", path=ckpt_path)
    emit("start", mode=mode, pid=os.getpid())
    trainer.fit(model, data, ckpt_path=ckpt_path, weights_only=False)
    emit("finished", global_step=trainer.global_step)


if __name__ == "__main__":
    run(sys.argv[1], json.loads(sys.argv[2]))

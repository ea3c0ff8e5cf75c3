"""NeMo's checkpoint names, saved by S3ModelCheckpoint and found again by configure_s3_resume.

NeMo's exp_manager names checkpoints ``<name>--{val_loss:.2f}-{step}`` and the last one
``<name>--{val_loss:.2f}-{step}-last`` (``CHECKPOINT_NAME_LAST = filename + "-last"``), so every last
checkpoint has its own name. This is the recipe the README gives NeMo users (exp_manager with its own
checkpointing off, S3ModelCheckpoint plus configure_s3_resume), in real Trainer runs against the real server.
Resume must take the ``-last`` file (not the top-k one of the same step), and after a resume two ``-last``
files exist (the one resumed from is never deleted), so it must take the newest.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl

from s3ckpt.lightning import S3CheckpointIO, S3ModelCheckpoint, configure_s3_resume
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport, ops

from . import _lightning_resume_script as script

pytestmark = [pytest.mark.integration, pytest.mark.portable]

NAME = "tiny--{val_loss:.2f}-{step}"


class ValModel(script.TinyModel):
    """Logs a ``val_loss`` that falls with the step (1 / (1 + step)): NeMo's default monitor."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", 1.0 / (1 + self.global_step))


class Restored(pl.Callback):
    def __init__(self) -> None:
        self.step: int | None = None
        self.ckpt_path: str | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step, self.ckpt_path = trainer.global_step, str(trainer.ckpt_path)


def _fit(dirpath: str, epochs: int, resume: bool) -> Restored:
    io = S3CheckpointIO(dirpath=dirpath, chunk_size_MB=5, max_read_concurrency=4, max_write_concurrency=4)
    ckpt = S3ModelCheckpoint(dirpath=dirpath, filename=NAME, monitor="val_loss", save_top_k=1, save_last=True)
    ckpt.CHECKPOINT_NAME_LAST = NAME + "-last"  # what NeMo's exp_manager sets
    restored = Restored()
    # 2 steps per epoch, validated (and checkpointed) at the end of each.
    trainer = script.trainer(io, [ckpt, restored], -1, max_epochs=epochs, limit_train_batches=2, limit_val_batches=1)
    if resume:
        configure_s3_resume(trainer, dirpath, resume_if_exists=True)
    trainer.fit(ValModel(), script.loader(), script.loader())
    return restored


def test_nemo_names_saved_and_the_newest_last_resumed(
    s3_server: LocalS3Server, s3_env: dict[str, str], transport: S3Transport, bucket: str
) -> None:
    dirpath = f"s3://{bucket}/nemo_run/checkpoints"
    first = _fit(dirpath, epochs=3, resume=False)
    assert first.step == 0
    ckpts = {
        o.key.rsplit("/", 1)[-1] for o in ops.list_objects(transport, bucket, "nemo_run/") if o.key.endswith(".ckpt")
    }
    assert ckpts == {"tiny--val_loss=0.14-step=6.ckpt", "tiny--val_loss=0.14-step=6-last.ckpt"}

    second = _fit(dirpath, epochs=4, resume=True)
    assert second.step == 6 and second.ckpt_path == f"{dirpath}/tiny--val_loss=0.14-step=6-last.ckpt"
    lasts = {
        o.key.rsplit("/", 1)[-1]
        for o in ops.list_objects(transport, bucket, "nemo_run/")
        if o.key.endswith("-last.ckpt")
    }
    # The checkpoint the run resumed from is kept; the new last one is newer.
    assert lasts == {"tiny--val_loss=0.14-step=6-last.ckpt", "tiny--val_loss=0.11-step=8-last.ckpt"}

    third = _fit(dirpath, epochs=5, resume=True)
    assert third.step == 8 and third.ckpt_path == f"{dirpath}/tiny--val_loss=0.11-step=8-last.ckpt"

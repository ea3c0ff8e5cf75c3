"""Tiny Lightning model and trainer shared by the Lightning tests, and a resume driver run in a new process.

Run as ``python _lightning_resume_script.py JOBS.json``: for each job, resume ``trainer.fit`` from
``ckpt_path`` (``"last"`` or an ``s3://`` URL) into ``dirpath``, record the state right after the restore
(weights, optimizer, epoch, global step, ``trainer.ckpt_path``) into the job's ``out`` file, and train on to
``max_steps``. S3 settings come from the standard AWS environment variables.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from s3ckpt.lightning import S3CheckpointIO, S3ModelCheckpoint

# 5 batches per epoch: the checkpoints at even steps 2..8 are all mid-epoch.
SAMPLES, BATCH = 20, 4


class TinyModel(pl.LightningModule):
    """A 2-layer MLP with Adam (so the optimizer has per-parameter state to restore)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        # Grows with the step, so with mode="max" the oldest checkpoint is always the one top-k drops.
        self.log("score", float(self.global_step))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class LinearModel(pl.LightningModule):
    """One linear layer trained with SGD on a fixed random regression set of ``samples`` rows of
    ``features``, batches of 4: the smallest model whose checkpoints Lightning saves and resumes."""

    def __init__(self, features: int = 8, samples: int = 64) -> None:
        super().__init__()
        self.layer = nn.Linear(features, 2)
        self.samples, self.features = samples, features

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader[Any]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.samples, self.features, generator=g)
        return DataLoader(TensorDataset(x, torch.randn(self.samples, 2, generator=g)), 4)


def loader() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(SAMPLES, 8, generator=g), torch.randn(SAMPLES, 1, generator=g))
    return DataLoader(data, batch_size=BATCH, shuffle=False)


def model_checkpoint(dirpath: str | None, **overrides: Any) -> S3ModelCheckpoint:
    """Top-2 by ``score``, plus ``last.ckpt``, every 2 steps, named ``step=N.ckpt``."""
    kwargs: dict[str, Any] = {
        "filename": "{step}",
        "monitor": "score",
        "mode": "max",
        "save_top_k": 2,
        "save_last": True,
        "every_n_train_steps": 2,
    }
    kwargs.update(overrides)
    return S3ModelCheckpoint(dirpath, **kwargs)


def trainer(io: S3CheckpointIO, callbacks: list[pl.Callback], max_steps: int, **kwargs: Any) -> pl.Trainer:
    """A CPU trainer; ``strategy_form=True`` passes the plugin through the strategy instead of ``plugins``."""
    strategy_form = kwargs.pop("strategy_form", False)
    placement: dict[str, Any] = (
        {"strategy": SingleDeviceStrategy("cpu", checkpoint_io=io)} if strategy_form else {"plugins": [io]}
    )
    kwargs.setdefault("logger", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **placement,
        **kwargs,
    )


class CaptureRestored(pl.Callback):
    """Saves what the trainer restored, before the first step changes it."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0].state_dict()
        torch.save(
            {
                "ckpt_path": str(trainer.ckpt_path),
                "ckpt_path_type": type(trainer.ckpt_path).__name__,
                "global_step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "state_dict": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "optimizer": optimizer,
            },
            self.out,
        )


def main(jobs_file: str) -> None:
    for job in json.loads(Path(jobs_file).read_text()):
        io = S3CheckpointIO(
            dirpath=job["dirpath"],
            chunk_size_MB=5,
            max_read_concurrency=4,
            max_write_concurrency=4,
            async_checkpointing=job["async"],
        )
        callbacks: list[pl.Callback] = [model_checkpoint(job["dirpath"]), CaptureRestored(Path(job["out"]))]
        trainer(io, callbacks, job["max_steps"]).fit(TinyModel(), loader(), ckpt_path=job["ckpt_path"])


if __name__ == "__main__":
    main(sys.argv[1])

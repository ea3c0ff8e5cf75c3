"""``S3CheckpointIO(incremental=True)`` in real Lightning Trainer runs (CPU): a fine-tuning model whose frozen
tables stay on the store between checkpoints, top-k and ``last.ckpt`` alongside, sync and async, and a
resume whose first save composes from the checkpoint it resumed from."""

from __future__ import annotations

import io
import itertools
import zipfile
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

import lightning.pytorch as pl
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import s3ckpt
from s3ckpt.lightning import S3CheckpointIO, S3ModelCheckpoint
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport, ops
from tests.conftest import client_config_for

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
KNOBS: dict[str, Any] = {"chunk_size_MB": 5, "max_read_concurrency": 4, "max_write_concurrency": 4}


class FineTune(pl.LightningModule):
    """Two frozen 12 MiB tables, each followed by a small trainable head (as adapters sit beside their base
    weights in a state dict); Adam holds state for the heads only."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb0 = nn.Embedding(3072, 1024).requires_grad_(False)
        self.head0 = nn.Linear(1024, 1)
        self.emb1 = nn.Embedding(3072, 1024).requires_grad_(False)
        self.head1 = nn.Linear(1024, 1)
        with torch.no_grad():
            self.emb0.weight.copy_(torch.randn(3072, 1024, generator=g))
            self.emb1.weight.copy_(torch.randn(3072, 1024, generator=g))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        idx, y = batch
        pred = self.head0(self.emb0(idx)) + self.head1(self.emb1(idx))
        loss = nn.functional.mse_loss(pred.squeeze(-1), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _data() -> DataLoader[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randint(0, 3072, (64,), generator=g), torch.randn(64, generator=g)), 8)


def _fit(io_plugin: S3CheckpointIO, dirpath: str, steps: int, ckpt_path: str | None = None) -> FineTune:
    model = FineTune()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        plugins=[io_plugin],
        callbacks=[
            S3ModelCheckpoint(
                dirpath=dirpath, every_n_train_steps=1, save_top_k=2, monitor="step", mode="max", save_last=True
            )
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, _data(), ckpt_path=ckpt_path)
    return model


def _check_stored(t: S3Transport, bucket: str, prefix: str, model: FineTune) -> int:
    """Every checkpoint left under ``prefix`` is a valid zip, verifies, and holds the frozen tables."""
    keys = [o.key for o in ops.list_objects(t, bucket, prefix) if o.key.endswith(".ckpt")]
    for key in keys:
        data = ops.get_bytes(t, bucket, key)
        assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None, key
        s3ckpt.verify(f"s3://{bucket}/{key}", transport=t)
        state = torch.load(io.BytesIO(data), weights_only=True)["state_dict"]
        assert torch.equal(state["emb0.weight"], model.emb0.weight) and torch.equal(
            state["emb1.weight"], model.emb1.weight
        )
    return len(keys)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_fine_tuning_checkpoints_copy_the_frozen_tables(s3_server: LocalS3Server, bucket: str, mode: str) -> None:
    t = S3Transport.create(client=client_config_for(s3_server))
    dirpath = f"s3://{bucket}/{mode}"
    plugin = S3CheckpointIO(
        dirpath, **KNOBS, async_checkpointing=mode == "async", incremental=True, client=client_config_for(s3_server)
    )
    model = _fit(plugin, dirpath, steps=4)
    records = [r for r in plugin.records if not r.failed]
    assert len(records) == 8  # 4 steps x (top-k checkpoint + last.ckpt)
    assert records[0].bytes_copied == 0 and records[0].base is None  # nothing to compose from yet
    for before, record in itertools.pairwise(records):
        # Each save composes from the one committed just before it (last.ckpt included); the frozen 24 MiB
        # stay on the store: each of the 2 changed regions costs one uploaded part of 5 MiB.
        assert record.base == before.path, (record, before)
        assert record.bytes_copied >= 12 * MiB, record
        assert record.bytes_uploaded + record.bytes_copied == record.bytes
    # top-k removed older checkpoints (bases of later saves) after those saves: everything left is whole
    assert _check_stored(t, bucket, f"{mode}/", model) == 3  # top 2 + last.ckpt
    assert len(plugin.removals) >= 2

    # Resume in a new plugin: its first save composes from the checkpoint it resumed from.
    resumed = S3CheckpointIO(dirpath, **KNOBS, incremental=True, client=client_config_for(s3_server))
    _fit(resumed, dirpath, steps=5, ckpt_path=f"{dirpath}/last.ckpt")
    first = resumed.records[0]
    assert first.base == f"{dirpath}/last.ckpt" and first.bytes_copied >= 12 * MiB, first
    _check_stored(t, bucket, f"{mode}/", model)


def test_incremental_off_uploads_everything(s3_server: LocalS3Server, bucket: str) -> None:
    dirpath = f"s3://{bucket}/plain"
    plugin = S3CheckpointIO(dirpath, **KNOBS, client=client_config_for(s3_server))
    _fit(plugin, dirpath, steps=2)
    assert plugin.records and all(r.bytes_copied == 0 and r.bytes_uploaded == r.bytes for r in plugin.records)

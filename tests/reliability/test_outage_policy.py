"""An outage longer than the retry budget while a Lightning run saves asynchronously.

The fault proxy answers every request with 503 for longer than ``RetryConfig.deadline_s`` (2 s here), so
the saves asked for during the outage fail for good. ``S3CheckpointIO(on_save_error=...)`` decides:

* ``"warn"``: the run reaches ``max_steps``; the failed saves are in ``records`` (``failed_saves``) and in
  ``S3CheckpointMetrics``; the removal that would have replaced the last good checkpoint is cancelled, so
  it still loads during the outage; the first save after the outage commits and loads; ``best_model_path``
  never names a checkpoint that does not exist;
* ``"raise"`` (default): ``fit`` fails with the S3 error within a bound set by the deadline, never hangs.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from lightning.pytorch import Callback, LightningModule, Trainer

from s3ckpt.config import ClientConfig, RetryConfig
from s3ckpt.errors import S3TransferError
from s3ckpt.lightning import S3CheckpointIO, S3CheckpointMetrics, S3ModelCheckpoint
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import ops
from tests.faults.proxy import FaultProxy
from tests.integration._lightning_resume_script import LinearModel

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

DEADLINE_S = 2.0
RETRY = RetryConfig(max_attempts=100, base_delay_s=0.05, max_delay_s=0.5, deadline_s=DEADLINE_S)
MAX_STEPS = 12
EVERY = 2  # a checkpoint (and last.ckpt) every 2 steps
OUTAGE_FROM, OUTAGE_UNTIL = 3, 7  # the saves of steps 4 and 6 meet the outage


class Outage(Callback):
    """Breaks the store at step ``OUTAGE_FROM``; with ``end=True``, at step ``OUTAGE_UNTIL`` waits until the
    saves caught in it have given up, checks what is still loadable, and ends the outage."""

    def __init__(self, proxy: FaultProxy, io: S3CheckpointIO, dirpath: str, *, end: bool) -> None:
        self.proxy, self.io, self.dirpath, self.end = proxy, io, dirpath, end
        self.started_at: float | None = None
        self.seen: dict[str, int] = {}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == OUTAGE_FROM:
            self.io.wait()  # the saves before the outage are committed
            self.started_at = time.monotonic()
            self.proxy.inject(None, "status_503")
        elif step == OUTAGE_UNTIL and self.end:
            self.io.wait()  # "warn": the failures are logged, not raised
            # During the outage reads fail too; these go straight to the checks after it ends.
            self.proxy.clear()
            for name in ("step=2.ckpt", "last.ckpt"):
                self.seen[name] = self.io.load_checkpoint(f"{self.dirpath}/{name}")["global_step"]
        elif step == 9 and self.end:
            self.io.wait()
            self.seen["step=8.ckpt"] = self.io.load_checkpoint(f"{self.dirpath}/step=8.ckpt")["global_step"]


def _run(
    proxy: FaultProxy, server: LocalS3Server, bucket: str, tmp_path: Any, policy: str, async_mode: bool = True
) -> tuple[Trainer, S3CheckpointIO, S3ModelCheckpoint, S3CheckpointMetrics, Outage, str]:
    dirpath = f"s3://{bucket}/run"
    client = ClientConfig(
        endpoint_url=proxy.url,
        region=server.region,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        read_timeout_s=5,
    )
    io = S3CheckpointIO(dirpath, async_checkpointing=async_mode, client=client, retry=RETRY, on_save_error=policy)  # type: ignore[arg-type]
    ckpt = S3ModelCheckpoint(every_n_train_steps=EVERY, save_top_k=1, save_last=True, filename="{step}")
    metrics = S3CheckpointMetrics()
    outage = Outage(proxy, io, dirpath, end=policy == "warn")
    trainer = Trainer(
        accelerator="cpu",
        max_steps=MAX_STEPS,
        plugins=[io],
        callbacks=[outage, ckpt, metrics],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    return trainer, io, ckpt, metrics, outage, dirpath


@pytest.mark.parametrize("async_mode", [True, False], ids=["async", "sync"])
def test_warn_keeps_training_through_an_outage(
    fault_proxy: FaultProxy, s3_server: LocalS3Server, bucket: str, tmp_path: Any, async_mode: bool
) -> None:
    trainer, io, ckpt, metrics, outage, dirpath = _run(fault_proxy, s3_server, bucket, tmp_path, "warn", async_mode)
    trainer.fit(LinearModel())
    assert trainer.global_step == MAX_STEPS

    failed = sorted(r.path for r in io.failed_saves)
    assert failed == sorted(f"{dirpath}/{n}" for n in ("step=4.ckpt", "step=6.ckpt", "last.ckpt", "last.ckpt"))
    assert all("503" in r.error or "SlowDown" in r.error for r in io.failed_saves)
    assert metrics.failed_saves == len(failed)
    # The removal of step=2 (asked for right after the failed save of step=4) was cancelled: during the
    # outage the last good checkpoint was still there, and last.ckpt still held it.
    assert outage.seen["step=2.ckpt"] == 2 and outage.seen["last.ckpt"] == 2
    assert any(r.cancelled and r.path.endswith("step=2.ckpt") for r in io.removals)
    # The next interval after the outage saved again, and it loads.
    assert outage.seen["step=8.ckpt"] == 8
    # Bookkeeping names only checkpoints that exist; top-k then went on as usual.
    t = io.transport
    assert ckpt.best_model_path.endswith("step=12.ckpt")
    for path in (ckpt.best_model_path, ckpt.last_model_path):
        assert io.load_checkpoint(path)["global_step"] == MAX_STEPS
    keys = {o.key.rsplit("/", 1)[-1] for o in ops.list_objects(t, bucket, "run/") if o.key.endswith(".ckpt")}
    assert keys == {"step=12.ckpt", "last.ckpt"}
    assert ops.list_uploads(t, bucket, "run/") == []


def test_raise_stops_the_run_within_the_deadline(
    fault_proxy: FaultProxy, s3_server: LocalS3Server, bucket: str, tmp_path: Any
) -> None:
    trainer, _, _, _, outage, _ = _run(fault_proxy, s3_server, bucket, tmp_path, "raise")
    with pytest.raises(S3TransferError, match=r"SlowDown|503"):
        trainer.fit(LinearModel())
    assert outage.started_at is not None
    took = time.monotonic() - outage.started_at
    print(f"\nthe run stopped {took:.1f} s after the outage began (deadline {DEADLINE_S:g} s)")
    # The first save in the outage gives up at its deadline; the error surfaces at the next save, which waits
    # for room behind it, or at teardown. Two deadlines bound it with room for a slow machine.
    assert took < 2 * DEADLINE_S + 5
    # Stopped by the first request of the next save (a lookup or the upload): no further step was trained.
    assert trainer.global_step < MAX_STEPS

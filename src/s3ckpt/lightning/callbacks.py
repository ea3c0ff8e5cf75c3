"""``S3CheckpointMetrics``: checkpoint save timings from :class:`~s3ckpt.lightning.S3CheckpointIO` to the loggers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from .checkpoint_io import S3CheckpointIO
from .model_checkpoint import find_s3_checkpoint_io
from .records import SaveRecord

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["S3CheckpointMetrics"]


class S3CheckpointMetrics(Callback):
    """Logs, for every checkpoint the plugin committed, how long it took and how long training stalled.

    Per checkpoint, to every ``trainer.loggers`` entry (global rank 0 only), at the current global step:

    * ``ckpt/save_seconds``: from the save call until the checkpoint was committed on S3;
    * ``ckpt/bytes``: size of the checkpoint object;
    * ``ckpt/gbps``: ``bytes / save_seconds`` in GB/s (10^9 bytes);
    * ``ckpt/stall_seconds``: how long ``save_checkpoint`` blocked training (the whole save when
      synchronous, the host snapshot when async);
    * ``ckpt/failed_saves``: how many saves of this run have failed so far (0 in a healthy run).

    A save that failed (``S3CheckpointIO(on_save_error="warn")`` keeps training past it) logs
    ``ckpt/failed_saves`` and ``ckpt/failed_save_seconds`` (from the save call until it gave up) instead of
    the size and speed metrics.

    Async saves commit in the background, so each is logged at the first ``on_train_batch_end``,
    ``on_train_epoch_end`` or ``on_fit_end`` after it committed; ``on_fit_end`` runs after the plugin's
    teardown has waited for every pending save, so none is missed.

    Args:
        prefix: metric name prefix.
    """

    def __init__(self, prefix: str = "ckpt/") -> None:
        super().__init__()
        self.prefix = prefix
        self._plugin: S3CheckpointIO | None = None
        self._seen = 0
        self.failed_saves = 0
        """Failed saves seen in this run (rank 0 and the others alike)."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._plugin = find_s3_checkpoint_io(trainer)
        if self._plugin is None:
            rank_zero_warn("S3CheckpointMetrics: the trainer has no S3CheckpointIO plugin; nothing will be logged")
            return
        # Saves recorded before this stage (an earlier fit of the same plugin) are not this run's.
        self._seen = len(self._plugin.records)
        self.failed_saves = 0

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._emit(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._emit(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._emit(trainer)

    def metrics_of(self, record: SaveRecord) -> dict[str, float]:
        """The metrics logged for one save (``failed_saves`` as counted up to and including it)."""
        p = self.prefix
        if record.failed:
            return {f"{p}failed_saves": float(self.failed_saves), f"{p}failed_save_seconds": record.save_s}
        return {
            f"{p}failed_saves": float(self.failed_saves),
            f"{p}save_seconds": record.save_s,
            f"{p}bytes": float(record.bytes),
            f"{p}bytes_uploaded": float(record.bytes_uploaded),
            f"{p}bytes_copied": float(record.bytes_copied),
            f"{p}gbps": record.gbps,
            f"{p}stall_seconds": record.stall_s,
        }

    def _emit(self, trainer: pl.Trainer) -> None:
        if self._plugin is None:
            return
        # The worker thread only appends, so a slice taken here is a consistent prefix of the list.
        new = self._plugin.records[self._seen :]
        self._seen += len(new)
        for record in new:
            self.failed_saves += record.failed
            if not trainer.is_global_zero:
                continue
            metrics = self.metrics_of(record)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

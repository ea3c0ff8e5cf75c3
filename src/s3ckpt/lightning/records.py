"""What :class:`~s3ckpt.lightning.checkpoint_io.S3CheckpointIO` records about its work: one record per save
(committed or failed), per top-k removal and per ``save_last="link"`` copy, for logging callbacks, benchmarks
and tests."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CopyRecord", "RemovalRecord", "SaveRecord"]


@dataclass(frozen=True)
class SaveRecord:
    """Timing of one checkpoint save, for logging callbacks and benchmarks; or of a save that failed.

    A failed save (``on_save_error="warn"``, or the one raised with ``"raise"``) has ``failed`` True,
    ``error`` set, ``bytes == 0`` and ``committed_at == 0.0``; nothing was committed at ``path`` (whatever
    was there before, if anything, is still there).
    """

    path: str
    bytes: int
    stall_s: float
    """Seconds ``save_checkpoint`` blocked the caller (the whole save when synchronous)."""
    save_s: float
    """Seconds from the call until the checkpoint was committed on S3 (async: including time queued)."""
    committed_at: float
    upload_s: float = 0.0
    """Seconds spent serializing and uploading (the transfer itself, without queueing)."""
    queued_s: float = 0.0
    """Async: seconds of ``stall_s`` spent waiting for room behind earlier saves (the rest is the snapshot)."""
    error: str = ""
    """Why the save failed (the S3 error's message); empty for a committed checkpoint."""

    @property
    def failed(self) -> bool:
        """True if this save was not committed."""
        return bool(self.error)

    @property
    def gbps(self) -> float:
        """Transfer throughput in GB/s (bytes over ``upload_s``)."""
        seconds = self.upload_s or self.save_s
        return self.bytes / seconds / 1e9 if seconds > 0 else 0.0


@dataclass
class RemovalRecord:
    """One ``remove_checkpoint`` call: when it was asked for, when it was carried out, or why not."""

    path: str
    requested_at: float
    done_at: float | None = None
    """When the objects were deleted (None while pending, or if cancelled)."""
    cancelled: bool = False
    """True if the deletion was cancelled because a save it waited for failed."""


@dataclass
class CopyRecord:
    """One :meth:`S3CheckpointIO.copy_checkpoint` call (``save_last="link"``)."""

    src: str
    dst: str
    requested_at: float
    done_at: float | None = None
    """When the copy and its manifest were written (None while pending, or if cancelled)."""
    bytes: int = 0
    cancelled: bool = False
    """True if the copy was cancelled because the save of ``src`` (or one before it) failed."""

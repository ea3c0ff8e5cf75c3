"""What :class:`~s3ckpt.lightning.checkpoint_io.S3CheckpointIO` records about its work: one record per save
(committed or failed), per top-k removal and per ``save_last="link"`` copy, for logging callbacks, benchmarks
and tests."""

from __future__ import annotations

import logging
from dataclasses import dataclass

__all__ = ["CopyRecord", "RemovalRecord", "SaveRecord", "log_save"]

log = logging.getLogger("s3ckpt.lightning.checkpoint_io")


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
    bytes_copied: int = 0
    """Bytes the store copied from :attr:`base` (incremental saves: the records unchanged since it)."""
    base: str | None = None
    """The checkpoint an incremental save copied unchanged records from, if any."""

    @property
    def bytes_uploaded(self) -> int:
        """Bytes this client sent: ``bytes`` less those the store copied."""
        return self.bytes - self.bytes_copied

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


def log_save(record: SaveRecord, on_save_error: str) -> None:
    """Log one save: an error for a failed one (whatever the policy: with ``"warn"`` this line is all that
    says it happened), else its size, speed, stall and, for an incremental save, the bytes copied."""
    if record.failed:
        log.error(
            "checkpoint %s FAILED after %.2f s and was not saved (on_save_error=%r): %s",
            record.path,
            record.save_s,
            on_save_error,
            record.error,
        )
        return
    copied = f", {record.bytes_copied / 1e6:.1f} MB copied on the store" if record.bytes_copied else ""
    log.info(
        "saved %s: %.1f MB in %.2f s (%.3f GB/s), training stalled %.2f s%s",
        record.path,
        record.bytes / 1e6,
        record.save_s,
        record.gbps,
        record.stall_s,
        copied,
    )

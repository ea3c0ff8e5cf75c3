"""``S3CheckpointIO``: Lightning's ``CheckpointIO`` for ``s3://`` paths, sync or async.

Constructed exactly as NeMo documents it::

    S3CheckpointIO(dirpath="s3://bucket/run", chunk_size_MB=64, max_read_concurrency=15,
                   max_write_concurrency=10, async_checkpointing=False)

and passed as ``Trainer(plugins=[io])`` or ``DDPStrategy(checkpoint_io=io)``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import PurePath
from typing import Any, Literal

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from typing_extensions import override

from .. import checkpoint as ck
from ..async_saver import AsyncSaver
from ..budget import check_request_budget
from ..config import ClientConfig, RetryConfig, TransferConfig, given_knobs
from ..errors import S3CheckpointError
from ..model_parallel import GroupSizes, RankFile, remove_rank_file, save_rank_file
from ..s3_dirpath_utils import is_s3_url, parse_s3_url
from ..serialization import clone_to_host
from ..snapshot import SnapshotPool
from ..transport.context import S3Transport
from ..transport.upload import writers_paused
from .nemo_config import checkpoint_io_args
from .records import CopyRecord, RemovalRecord, SaveRecord, log_save

__all__ = ["CopyRecord", "RemovalRecord", "S3CheckpointIO", "SaveRecord"]

log = logging.getLogger(__name__)


def _moved(stats: ck.SaveStats) -> dict[str, Any]:
    """The :class:`SaveRecord` fields saying how a save's bytes got to the store."""
    return {"bytes_copied": stats.bytes_copied, "base": stats.base}


def to_url(path: str | os.PathLike[str]) -> str:
    """``str`` of a path, repairing ``s3:/bucket`` that ``pathlib`` makes of ``s3://bucket``."""
    text = os.fspath(path)
    if isinstance(path, PurePath) and text.startswith("s3:/") and not text.startswith("s3://"):
        text = "s3://" + text[len("s3:/") :]
    return text


class S3CheckpointIO(CheckpointIO):
    """Saves and loads Lightning checkpoints on S3.

    Args:
        dirpath: ``s3://bucket/prefix`` where checkpoints live (validated here; saves may name any
            ``s3://`` path).
        chunk_size_MB: multipart part size in MiB (5-5120); default 16 (NeMo's 64 works verbatim when
            given). Unset knobs come from ``S3CKPT_*`` variables, else the measured defaults of
            :class:`~s3ckpt.config.TransferConfig`.
        max_read_concurrency: ranged GETs in flight per load; default 8 (NeMo's: 15).
        max_write_concurrency: parts in flight per save; default 4 (NeMo's: 10).
        async_checkpointing: return from ``save_checkpoint`` once the state is snapshotted into host memory
            and upload in the background (see :mod:`s3ckpt.async_saver` for the guarantees).
        max_pending_saves: async only: saves queued or running at once before a new one waits; default 2,
            so a save does not wait for the previous upload when uploads keep up on average. Host memory:
            up to ``max_pending_saves`` snapshots plus ``(max_write_concurrency + 1) x chunk_size_MB`` of
            part buffers.
        tensor_parallel_size, pipeline_parallel_size: how many ranks write under one prefix at once, for
            NeMo's request-budget rule ``concurrency * tp * pp * 1.15`` within 3,500 writes / 5,500 reads per
            second per prefix (see :mod:`s3ckpt.budget`). With ``tp * pp > 1``, NeMo's per-rank paths
            (``<dir>/mp_rank_XX/<name>``) form a group committed with no call once every rank file is stored
            (see :mod:`s3ckpt.model_parallel`).
        strict_request_budget: raise ``ConfigError`` instead of warning when the budget is exceeded.
        client: endpoint, region, credentials; default from the environment.
        retry: retry policy; default from the environment.
        verify: check each checkpoint's CRC32C before unpickling (``"require"`` refuses unverifiable ones).
        on_save_error: what a save that fails on the store (an :class:`~s3ckpt.errors.S3CheckpointError`
            once its retry deadline is spent, e.g. an outage longer than ``RetryConfig.deadline_s``) does to
            the run. ``"raise"`` (default): the error stops training (sync: from that save; async: at the
            next save or at teardown). ``"warn"``: training goes on; the save is logged as failed and kept
            in :attr:`records` with ``failed=True`` (:attr:`failed_saves`), removals that depended on it are
            cancelled (top-k never deletes an older checkpoint for a newer one that does not exist), and the
            next save interval tries again. Other errors (a bug, an unpicklable object) always raise.
        incremental: compose each save from this plugin's newest committed checkpoint (or the one it loaded to
            resume): records unchanged since then are copied on the store instead of uploaded (see
            :func:`s3ckpt.save`'s ``base``); the object is still exactly ``torch.save``'s bytes. Pays when
            most of the state is frozen (fine-tuning); costs nothing measurable otherwise. Not with
            ``tensor_parallel_size * pipeline_parallel_size > 1`` (rank files are saved whole).

    Raises:
        ValueError: ``dirpath`` is not an ``s3://`` URL, or a knob is out of range.
    """

    def __init__(
        self,
        dirpath: str,
        chunk_size_MB: int | None = None,
        max_read_concurrency: int | None = None,
        max_write_concurrency: int | None = None,
        async_checkpointing: bool = False,
        *,
        max_pending_saves: int = 2,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        strict_request_budget: bool = False,
        client: ClientConfig | None = None,
        retry: RetryConfig | None = None,
        verify: bool | str = True,
        on_save_error: Literal["raise", "warn"] = "raise",
        incremental: bool = False,
    ) -> None:
        super().__init__()
        if not is_s3_url(dirpath):
            raise ValueError(
                f"S3CheckpointIO(dirpath={dirpath!r}): dirpath must be an s3:// URL such as 's3://bucket/run1'; "
                "for local paths use Lightning's default TorchCheckpointIO"
            )
        parse_s3_url(dirpath)
        self.dirpath = dirpath
        # A knob given here wins (NeMo's values work verbatim); an unset one comes from its S3CKPT_* variable,
        # else the measured default (see TransferConfig).
        self.transfer = TransferConfig.from_env(
            **given_knobs(
                chunk_size_MB=chunk_size_MB,
                max_read_concurrency=max_read_concurrency,
                max_write_concurrency=max_write_concurrency,
            )
        )
        # Checked before the first save rather than discovered as 503 SlowDown mid-run.
        self.request_budget = check_request_budget(
            self.transfer.max_write_concurrency,
            self.transfer.max_read_concurrency,
            tensor_parallel_size,
            pipeline_parallel_size,
            strict=strict_request_budget,
            part_size_MB=self.transfer.chunk_size_MB,
            read_size_MB=self.transfer.read_chunk_size_MB,
        )
        self.model_parallel = GroupSizes(tensor_parallel_size, pipeline_parallel_size)
        self.async_checkpointing = bool(async_checkpointing)
        self.verify = verify
        if on_save_error not in ("raise", "warn"):
            raise ValueError(f"S3CheckpointIO(on_save_error={on_save_error!r}): must be 'raise' or 'warn'")
        self.on_save_error = on_save_error
        self.incremental = bool(incremental)
        # The newest checkpoint committed (or loaded) by this plugin: the base of the next incremental save.
        # Async uploads run one at a time, in order, so the worker reads the one committed just before.
        self._base: str | None = None
        # Sync, "warn": the last save failed, so a removal asked for now would delete the last good one.
        self._last_save_failed = False
        self.transport = S3Transport.create(client=client, retry=retry, transfer=self.transfer)
        self._saver = AsyncSaver(max_pending_saves) if self.async_checkpointing else None
        # Buffers of finished snapshots, reused by the next one (no page faults in the stall); bounded to
        # max_pending_saves snapshots in use or kept.
        self._snapshots = SnapshotPool(max_pending_saves) if self.async_checkpointing else None
        self._records_lock = threading.Lock()
        self.records: list[SaveRecord] = []
        self.removals: list[RemovalRecord] = []
        self.copies: list[CopyRecord] = []

    @classmethod
    def from_config(cls, cfg: Any, dirpath: str, **kwargs: Any) -> S3CheckpointIO:
        """Build from NeMo's ``s3_checkpointing`` section (a dict or an OmegaConf node).

        Raises:
            ConfigError: an unknown key, naming it and the known ones.
        """
        return cls(dirpath, **checkpoint_io_args(cfg), **kwargs)

    # -- CheckpointIO ----------------------------------------------------------------------------------

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path`` (an ``s3://`` URL).

        Synchronous: returns when the checkpoint is committed. Async: returns once the tensors are copied
        to host memory; a failure of an earlier background save is raised here.

        Raises:
            TypeError: ``storage_options`` given (there are none yet).
        """
        if storage_options is not None:
            raise TypeError(
                f"S3CheckpointIO.save_checkpoint got storage_options={storage_options!r}, but it takes none; "
                "configure transfers on the S3CheckpointIO constructor"
            )
        url = self._url(path)
        rank_file = self.model_parallel.rank_file(url)
        start = time.perf_counter()
        if self._saver is None:
            try:
                stats = self._save(checkpoint, url, rank_file)
            except S3CheckpointError as exc:
                elapsed = time.perf_counter() - start
                self._record(SaveRecord(url, 0, elapsed, elapsed, 0.0, error=str(exc)))
                self._last_save_failed = True
                if self.on_save_error == "raise":
                    raise
                return
            self._last_save_failed = False
            elapsed = time.perf_counter() - start
            self._record(SaveRecord(url, stats.bytes, elapsed, elapsed, time.time(), stats.seconds, **_moved(stats)))
            return
        saver = self._saver
        self._raise_background_failure(saver.raise_if_failed)
        queued = saver.wait_for_room()
        # Snapshot on the caller's thread: training may change the tensors as soon as we return. The previous
        # save's serializer pauses meanwhile, or the GIL handoffs would make the snapshot several times slower.
        pool = self._snapshots
        copy, buffers = pool.copier() if pool is not None else (None, [])
        with writers_paused():
            snapshot = clone_to_host(checkpoint, pin_memory=True, copy=copy)
        stall = time.perf_counter() - start

        def upload() -> None:
            try:
                stats = self._save(snapshot, url, rank_file)
            except S3CheckpointError as exc:
                failed_after = time.perf_counter() - start
                self._record(SaveRecord(url, 0, stall, failed_after, 0.0, queued_s=queued, error=str(exc)))
                raise  # the saver cancels the removals and copies that waited for this save
            finally:
                if pool is not None:  # uploaded (or failed): its buffers may hold the next snapshot
                    pool.release(buffers)
            done = time.perf_counter() - start
            self._record(SaveRecord(url, stats.bytes, stall, done, time.time(), stats.seconds, queued, **_moved(stats)))

        try:
            # "warn": an earlier background save that failed was recorded and logged; this one goes ahead.
            saver.submit_save(url, upload, raise_stored=self.on_save_error == "raise")
        except S3CheckpointError:
            if pool is not None:  # never queued: its buffers are free again
                pool.release(buffers)
            raise

    @override
    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load the checkpoint at ``path``, verifying its checksum before unpickling.

        ``map_location=None`` loads onto the CPU, as Lightning's ``TorchCheckpointIO`` does;
        ``weights_only=None`` lets torch decide (``True`` since torch 2.6).

        Raises:
            FileNotFoundError: (``CheckpointNotFoundError``) nothing at ``path``.
            CheckpointCorruptedError: the bytes do not match the checksum recorded at save time.
        """
        url = self._url(path)
        if self._saver is not None:
            self._saver.wait_for(url)
        result = ck.load(
            url,
            map_location=map_location if map_location is not None else "cpu",
            weights_only=weights_only,
            transport=self.transport,
            verify=self.verify,
        )
        if not isinstance(result, dict):
            raise TypeError(f"{url} holds a {type(result).__name__}, not a Lightning checkpoint dict")
        if self.incremental and self._base is None:
            self._base = url  # resuming: the next save composes from the checkpoint resumed from
        return result

    @override
    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint at ``path``. Async: only after every pending save has committed, and not
        at all if one of them failed (the old checkpoint is then the last good one)."""
        url = self._url(path)
        rank_file = self.model_parallel.rank_file(url)
        record = RemovalRecord(url, time.time())
        with self._records_lock:
            self.removals.append(record)

        def remove() -> None:
            if rank_file is not None:  # the group's marker first, then this rank's file
                remove_rank_file(rank_file, transport=self.transport)
            else:
                ck.delete(url, transport=self.transport)
            record.done_at = time.time()

        if self._saver is None:
            if self._last_save_failed:
                # "warn": Lightning removes the checkpoint the failed save was meant to replace; keep it.
                log.warning("not removing %s: the save before it failed, so it may be the last good one", url)
                record.cancelled = True
                return
            # An old checkpoint left behind costs space, never data: with "warn" a store error here is logged.
            self._raise_background_failure(remove)
            return
        self._saver.submit_removal(url, remove, on_cancel=lambda: setattr(record, "cancelled", True))

    def copy_checkpoint(self, src: Any, dst: Any) -> None:
        """Make ``dst`` a server-side copy of the checkpoint ``src`` (``save_last="link"`` on S3).

        No byte is uploaded: the store copies the object (CopyObject, or UploadPartCopy beyond 5 GiB) and
        ``dst`` gets a manifest of its own with ``src``'s CRC32C, so it loads and verifies as a checkpoint
        of its own. Async: queued behind the pending saves and made only once they have committed (never a
        copy of an uncommitted object); cancelled if one of them failed (``CopyRecord.cancelled``).
        """
        from ..checkpoint_copy import copy

        src_url, dst_url = self._url(src), self._url(dst)
        record = CopyRecord(src_url, dst_url, time.time())
        with self._records_lock:
            self.copies.append(record)

        def run() -> None:
            stats = copy(src_url, dst_url, transport=self.transport)
            record.bytes = stats.bytes
            record.done_at = time.time()
            log.info("copied %s -> %s on the store (%d bytes, %.2f s)", src_url, dst_url, stats.bytes, stats.seconds)

        if self._saver is None:
            if self._last_save_failed:  # "warn": the source was not committed
                log.warning("not writing %s: the save of %s failed", dst_url, src_url)
                record.cancelled = True
                return
            run()
            return
        self._saver.submit_after_commit(dst_url, run, on_cancel=lambda: setattr(record, "cancelled", True))

    @override
    def teardown(self) -> None:
        """Wait for every pending save and removal; raise the first background failure (with
        ``on_save_error="warn"``, a failure on the store is logged instead)."""
        if self._saver is not None:
            try:
                self._raise_background_failure(self._saver.close)
            finally:
                if self._snapshots is not None:
                    self._snapshots.clear()

    # -- helpers ---------------------------------------------------------------------------------------

    def _save(self, checkpoint: dict[str, Any], url: str, rank_file: RankFile | None) -> ck.SaveStats:
        if rank_file is None:
            stats = ck.save(checkpoint, url, transport=self.transport, base=self._base if self.incremental else None)
            self._base = url
            return stats
        # After this rank's upload (sync or async): the rank that stores its file last commits the group.
        return save_rank_file(checkpoint, rank_file, self.model_parallel, transport=self.transport)

    def wait(self) -> None:
        """Block until background work is done (raises a stored failure, as :meth:`teardown`). A no-op when
        synchronous."""
        if self._saver is not None:
            self._raise_background_failure(self._saver.wait)

    @property
    def failed_saves(self) -> list[SaveRecord]:
        """The saves that were not committed (``on_save_error="warn"`` keeps training past them)."""
        with self._records_lock:
            return [r for r in self.records if r.failed]

    def _raise_background_failure(self, step: Callable[[], Any]) -> None:
        """Run ``step`` (a saver call that raises a stored background failure, or a removal); with ``"warn"``
        a failure on the store is logged (a failed save is also in :attr:`records`) and does not stop the run."""
        try:
            step()
        except S3CheckpointError as exc:
            if self.on_save_error == "raise":
                raise
            log.warning("continuing after a failure on the store (on_save_error='warn'): %s", exc)

    @property
    def cancelled_removals(self) -> list[str]:
        """Paths whose removal was cancelled because a save it waited for failed."""
        return list(self._saver.cancelled_removals) if self._saver is not None else []

    def _record(self, record: SaveRecord) -> None:
        with self._records_lock:
            self.records.append(record)
        log_save(record, self.on_save_error)

    def _url(self, path: Any) -> str:
        url = to_url(path)
        if not is_s3_url(url):
            raise ValueError(
                f"S3CheckpointIO got a non-S3 path {url!r}; set the checkpoint dirpath to an s3:// URL "
                f"(this plugin was configured with {self.dirpath!r})"
            )
        parse_s3_url(url, require_key=True)
        return url

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_saver"] = None if self._saver is None else AsyncSaver(self._saver.max_pending)
        state["_records_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._records_lock = threading.Lock()

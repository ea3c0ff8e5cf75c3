"""``S3ModelCheckpoint``: Lightning's ``ModelCheckpoint`` for ``dirpath="s3://..."``, without ``s3fs``.

Drop-in: every ``ModelCheckpoint`` argument (``save_top_k``, ``save_last``, ``monitor``,
``every_n_train_steps``, ...) means the same. What changes on S3:

* Existence checks, listings and ``best_k_models.yaml`` go through :class:`~s3ckpt.lightning.fs.S3FileSystem`
  on the trainer's :class:`~s3ckpt.lightning.S3CheckpointIO` transport (one client configuration).
* Top-k never deletes the checkpoint the run resumed from, nor anything outside ``dirpath`` (Lightning
  applies that rule to local paths only). Deletions go through ``trainer.strategy.remove_checkpoint``, so
  in async mode the plugin defers them until the newer save has committed.
* ``trainer.fit(ckpt_path="last")`` finds ``last*.ckpt`` on S3 and keeps the ``s3://`` URL intact.
* ``save_last="link"`` works: ``last.ckpt`` becomes a server-side copy of the newest top-k file
  (:meth:`S3CheckpointIO.copy_checkpoint`), made after that file has committed, so each checkpoint is
  uploaded once. The copy is a checkpoint of its own (own manifest, verified on load; ``ls``, ``prune`` and
  resume see it like any file), not a pointer that breaks when top-k deletes its source.
* ``dirpath`` may be left out: the plugin's ``dirpath`` is used.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from ..catalog import list_checkpoints
from ..distributed import _capture, is_initialized, run_on_rank0
from ..errors import S3CheckpointError
from ..resume import newest_of_run
from ..s3_dirpath_utils import is_s3_url, parse_s3_url
from ..transport import ops
from .checkpoint_io import S3CheckpointIO, to_url
from .fs import S3FileSystem
from .sharded import UNSET_DIRPATH, s3_plugin_of

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["S3ModelCheckpoint", "find_s3_checkpoint_io"]


log = logging.getLogger(__name__)


def find_s3_checkpoint_io(trainer: pl.Trainer) -> S3CheckpointIO | None:
    """The trainer's :class:`S3CheckpointIO`, looking through wrappers such as Lightning's
    ``AsyncCheckpointIO``, else the one an s3ckpt sharded strategy holds; ``None`` if it uses another plugin."""
    plugin = s3_plugin_of(trainer.strategy.checkpoint_io)
    if plugin is not None:
        return plugin
    # s3ckpt's sharded strategies carry their own when none was given as a plugin.
    own = getattr(trainer.strategy, "s3_checkpoint_io", None)
    return own if isinstance(own, S3CheckpointIO) else None


def _normalize_dirpath(dirpath: Any, owner: str) -> str:
    url = to_url(dirpath)
    if not is_s3_url(url):
        raise ValueError(
            f"{owner}(dirpath={url!r}): dirpath must be an s3:// URL such as 's3://bucket/run1'; "
            "for local paths use Lightning's ModelCheckpoint"
        )
    parse_s3_url(url)
    # One spelling, so the dirpath stored in a checkpoint matches on resume (Lightning compares strings).
    return url.rstrip("/")


def _warn_rank_zero(message: str) -> None:
    # Lightning's "last" lookup runs on every rank: each logs its choice, rank 0 alone warns.
    log.info("%s", message)
    rank_zero_warn(message)


class _ResolvedS3Path(str):
    """An ``s3://`` URL found by :meth:`S3ModelCheckpoint._find_last_checkpoints` on global rank 0, carrying
    what rank 0 learnt of it, so Lightning's checkpoint connector (which asks every rank's filesystem whether
    the path exists and when it was modified) sends no request from any rank."""

    fs: _Known

    @classmethod
    def of(cls, url: str, modified: datetime | None) -> _ResolvedS3Path:
        path = cls(url)
        path.fs = _Known(modified)
        return path


def _parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


class _Known:
    """The filesystem face of one listed checkpoint: it exists, and was modified when the listing said."""

    def __init__(self, modified: datetime | None) -> None:
        self._modified = modified or datetime.fromtimestamp(0, timezone.utc)

    def exists(self, path: Any) -> bool:
        return True

    def modified(self, path: Any) -> datetime:
        return self._modified


_hook_lock = threading.Lock()
_HOOK_MARK = "_s3ckpt_resolved_path_hook"


def _install_connector_hook() -> None:
    """Let Lightning's ``ckpt_path="last"`` resolution read timestamps of the URLs we return.

    The connector calls ``get_filesystem(path).modified(path)`` on every candidate, and for ``s3://`` fsspec
    would import ``s3fs``. The wrapper answers only for :class:`_ResolvedS3Path` (which only our
    ``_find_last_checkpoints`` creates) and passes every other path to Lightning's function unchanged.
    """
    from lightning.pytorch.trainer.connectors import checkpoint_connector as connector

    with _hook_lock:
        original = getattr(connector, "get_filesystem")  # noqa: B009 - private name, not re-exported
        if getattr(original, _HOOK_MARK, False):
            return

        @functools.wraps(original)
        def get_filesystem(path: Any, **kwargs: Any) -> Any:
            if isinstance(path, _ResolvedS3Path):
                return path.fs
            return original(path, **kwargs)

        setattr(get_filesystem, _HOOK_MARK, True)
        setattr(connector, "get_filesystem", get_filesystem)  # noqa: B010 - see above


class S3ModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for ``s3://`` directories.

    Args:
        dirpath: ``s3://bucket/prefix`` for the checkpoints; default: the ``S3CheckpointIO`` plugin's dirpath.
        *args, **kwargs: as :class:`lightning.pytorch.callbacks.ModelCheckpoint`.

    Raises:
        ValueError: ``dirpath`` is not an ``s3://`` URL.

    Example::

        io = S3CheckpointIO("s3://bucket/run1", async_checkpointing=True)
        ckpt = S3ModelCheckpoint(monitor="val_loss", save_top_k=2, save_last="link")
        trainer = Trainer(plugins=[io], callbacks=[ckpt])
        trainer.fit(model, ckpt_path="last")
    """

    def __init__(self, dirpath: str | os.PathLike[str] | None = None, *args: Any, **kwargs: Any) -> None:
        url = _normalize_dirpath(dirpath, type(self).__name__) if dirpath is not None else None
        # No dirpath for Lightning: its own handling asks fsspec for an "s3" filesystem, which needs s3fs.
        super().__init__(None, *args, **kwargs)
        self.dirpath = url
        # (source, link) of the last server-side copy: Lightning re-links after every validation even when
        # no new top-k file was saved; the copy is then already in place.
        self._linked: tuple[str, str] | None = None
        # Bound to the trainer's plugin transport in setup (and when resolving ckpt_path="last").
        self._fs = S3FileSystem()

    # -- setup -------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Not super().setup(): it replaces self._fs with fsspec's "s3" filesystem (s3fs).
        self._fs = self._filesystem(trainer)
        if find_s3_checkpoint_io(trainer) is None:
            rank_zero_warn(
                f"{type(self).__name__} is used without S3CheckpointIO: checkpoints are written by "
                f"{type(trainer.strategy.checkpoint_io).__name__}, which needs s3fs for s3:// paths and does "
                "not verify them on load. Pass Trainer(plugins=[S3CheckpointIO(...)])."
            )
        self.dirpath = trainer.strategy.broadcast(self._resolve_dirpath(trainer))
        if trainer.is_global_zero and stage == "fit":
            self._check_dirpath(self.dirpath)
        # As NeMo's NeMoModelCheckpoint: rank 0 may be the only rank that set the resume path or knows the
        # last checkpoint, and every rank must agree. Assigned only when it differs, because the setter
        # also marks the path as user-managed.
        ckpt_path = trainer.strategy.broadcast(trainer.ckpt_path)
        if ckpt_path != trainer.ckpt_path:
            trainer.ckpt_path = ckpt_path
        self.last_model_path = trainer.strategy.broadcast(self.last_model_path)

    def _filesystem(self, trainer: pl.Trainer) -> S3FileSystem:
        plugin = find_s3_checkpoint_io(trainer)
        return S3FileSystem(plugin.transport if plugin is not None else None)

    def _resolve_dirpath(self, trainer: pl.Trainer) -> str:
        if self.dirpath is not None:
            return _normalize_dirpath(self.dirpath, type(self).__name__)
        plugin = find_s3_checkpoint_io(trainer)
        if plugin is None or plugin.dirpath == UNSET_DIRPATH:
            raise ValueError(
                f"{type(self).__name__} has no dirpath: pass dirpath='s3://bucket/prefix', use "
                "Trainer(plugins=[S3CheckpointIO(dirpath=...)]), or give s3ckpt's strategy dirpath=..."
            )
        return _normalize_dirpath(plugin.dirpath, type(self).__name__)

    def _check_dirpath(self, dirpath: str) -> None:
        bucket, _ = parse_s3_url(dirpath)
        # Fail before training, not at the first save an hour later.
        ops.check_bucket(self._fs.transport, bucket)
        if self.save_top_k != 0 and self._fs.isdir(dirpath) and self._fs.ls(dirpath, detail=False):
            rank_zero_warn(f"Checkpoint directory {dirpath} exists and is not empty.")

    # -- Lightning internals that assume a local filesystem -----------------------------------------------

    @override
    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        """The committed ``last*.ckpt`` checkpoint to resume from, ``s3://`` kept, from one recursive listing.

        Lightning's own lookup lists the directory and runs the names through ``os.path.normpath``, which makes
        ``s3:/bucket/...``. Here, as in :func:`s3ckpt.resume.find_resume_checkpoint`: a sharded ``last.ckpt/``
        (a ``torch.distributed.checkpoint`` directory) counts once committed (its ``.metadata`` written), an
        unfinished one is skipped with a warning; of several, the newest by time is taken (what Lightning's
        connector would pick); and resume never goes back past a committed checkpoint, so a top-k checkpoint
        of the same run with a higher step (a crash between its save and the ``last.ckpt`` copy) is returned
        instead, with a warning (:func:`s3ckpt.resume.newest_of_run`). One URL or none is returned.
        """
        fs = self._filesystem(trainer)
        self._fs = fs
        dirpath = self._resolve_dirpath(trainer)

        def find() -> tuple[str, datetime | None] | None:
            # Model-parallel groups are left out: their logical name has no object, so Lightning cannot load it.
            entries = [e for e in list_checkpoints(fs.transport, dirpath) if e.kind != "model_parallel"]
            lasts = [
                e for e in entries if self._is_last_name(e.name) and e.url.rstrip("/").rsplit("/", 1)[0] == dirpath
            ]
            for entry in lasts:
                if not entry.committed:
                    rank_zero_warn(f"Not resuming from {entry.url}: not committed ({entry.reason}).")
            committed = [e for e in lasts if e.committed]
            if not committed:
                return None
            newest = max(committed, key=lambda e: e.last_modified.timestamp() if e.last_modified else 0.0)
            chosen = newest_of_run(fs.transport, newest, entries, warn=_warn_rank_zero)
            return chosen.url.rstrip("/"), chosen.last_modified

        # Global rank 0 lists; every rank learns its answer (or its error): thousands of ranks, one LIST.
        if is_initialized() or trainer.world_size == 1:
            found = run_on_rank0(find)
        else:
            # Lightning resolves "last" before it creates the process group. Rank 0 alone lists now; the
            # S3CheckpointConnector broadcasts its choice (or its error) to every rank when fit starts loading.
            from .connector import install_s3_connector

            connector = install_s3_connector(trainer)
            if trainer.global_rank != 0:
                return set()
            outcome = _capture(find)
            connector._pending = outcome if outcome.error is not None else None
            found = outcome.value
        if found is None:
            return set()
        _install_connector_hook()
        return {_ResolvedS3Path.of(*found)}

    def _is_last_name(self, name: str) -> bool:
        """Lightning's ``last*.ckpt`` pattern (``last.ckpt``, ``last-v1.ckpt``; a file or a sharded directory)."""
        stem, ext = os.path.splitext(name)
        return ext == self.FILE_EXTENSION and bool(re.match(rf"^{self.CHECKPOINT_NAME_LAST}(-(\d+))?", stem))

    @override
    def _should_remove_checkpoint(self, trainer: pl.Trainer, previous: str, current: str) -> bool:
        """Whether top-k may delete ``previous``: never the resumed-from checkpoint, never outside dirpath."""
        if not is_s3_url(to_url(previous)):
            return super()._should_remove_checkpoint(trainer, previous, current)
        prev, cur = to_url(previous).rstrip("/"), to_url(current).rstrip("/")
        if prev == cur:
            return False
        resumed = trainer.ckpt_path
        if resumed is not None and to_url(resumed).rstrip("/") == prev:
            return False
        dirpath = self._resolve_dirpath(trainer)
        return prev.startswith(dirpath + "/")

    def _link_checkpoint(self, trainer: pl.Trainer, filepath: str, linkpath: str) -> None:  # type: ignore[override]
        """``save_last="link"`` on S3: a server-side copy of ``filepath`` at ``linkpath``, on rank 0, ordered
        behind the save of ``filepath`` (Lightning's static version makes a symlink, which S3 lacks)."""
        src, dst = to_url(filepath).rstrip("/"), to_url(linkpath).rstrip("/")
        if not (is_s3_url(src) and is_s3_url(dst)):
            ModelCheckpoint._link_checkpoint(trainer, filepath, linkpath)
            return
        if trainer.is_global_zero and src != dst and self._linked != (src, dst):
            plugin = find_s3_checkpoint_io(trainer)
            if plugin is None:
                raise ValueError(
                    f"{type(self).__name__}(save_last='link') on S3 needs Trainer(plugins=[S3CheckpointIO(...)]): "
                    "the link is a server-side copy made by the plugin"
                )
            plugin.copy_checkpoint(src, dst)
        self._linked = (src, dst)
        trainer.strategy.barrier()

    # -- saves that failed (S3CheckpointIO(on_save_error="warn")) ----------------------------------------------

    @override
    def file_exists(self, filepath: Any, trainer: pl.Trainer) -> bool:
        """Lightning's check (rank 0 looks, every rank learns), except that with ``on_save_error="warn"`` a
        store that cannot answer counts as "no such file": the save that follows meets the same outage and
        is recorded as failed, instead of the lookup stopping the run."""
        local = False
        if trainer.is_global_zero:
            try:
                local = self._fs.exists(filepath)
            except S3CheckpointError as exc:
                plugin = find_s3_checkpoint_io(trainer)
                if plugin is None or plugin.on_save_error != "warn":
                    raise
                log.warning("could not check whether %s exists (%s); assuming it does not", filepath, exc)
        return bool(trainer.strategy.reduce_boolean_decision(local, all=False))

    @override
    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        self._forget_failed_saves(trainer)
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    @override
    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        self._forget_failed_saves(trainer)
        super()._save_last_checkpoint(trainer, monitor_candidates)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the plugin's teardown: the outcome of every async save is known.
        self._forget_failed_saves(trainer)
        super().on_fit_end(trainer, pl_module)

    def _forget_failed_saves(self, trainer: pl.Trainer) -> None:
        """Take saves that failed out of the top-k and last bookkeeping.

        Lightning records a checkpoint as saved when it asks for it. A failed save left in ``best_k_models``
        would hold a top-k slot (so a good checkpoint could be evicted next to it), and ``best_model_path``
        or ``last_model_path`` would name an object that was never written. Its older checkpoints were kept
        (removals behind a failed save are cancelled), so the bookkeeping falls back to them.
        """
        plugin = find_s3_checkpoint_io(trainer)
        if plugin is None:
            return
        failed = plugin.failed_saves
        new = {r.path for r in failed[getattr(self, "_failed_seen", 0) :]}
        self._failed_seen = len(failed)
        if not new:
            return
        # Removals already carried out: their checkpoints are gone whether or not a later save failed.
        removed = {r.path for r in plugin.removals if r.done_at is not None}
        dropped = [k for k in self.best_k_models if to_url(k).rstrip("/") in new]
        for key in dropped:
            del self.best_k_models[key]
        if dropped and self.best_k_models:
            worst, best = (max, min) if self.mode == "min" else (min, max)
            self.kth_best_model_path = worst(self.best_k_models, key=self.best_k_models.get)  # type: ignore[arg-type]
            self.kth_value = self.best_k_models[self.kth_best_model_path]
            self.best_model_path = best(self.best_k_models, key=self.best_k_models.get)  # type: ignore[arg-type]
            self.best_model_score = self.best_k_models[self.best_model_path]
        elif to_url(self.best_model_path).rstrip("/") in new:
            # No scores to choose by (no monitor): the newest committed save that was not removed.
            good = [
                r.path
                for r in plugin.records
                if not r.failed
                and r.path not in removed
                and not r.path.rsplit("/", 1)[-1].startswith(self.CHECKPOINT_NAME_LAST or "last")
            ]
            self.best_model_path = good[-1] if good else ""
            self.kth_best_model_path = self.best_model_path if self.best_k_models else ""
            if not self.best_k_models:
                self.best_model_score = None
        last = to_url(self.last_model_path).rstrip("/")
        # A failed save replaces nothing: the path still holds its last committed save, if it had one.
        if last in new and (last in removed or not any(r.path == last and not r.failed for r in plugin.records)):
            self.last_model_path = ""
        rank_zero_warn(
            f"{type(self).__name__}: {len(new)} checkpoint save(s) failed and are not tracked: {sorted(new)}; "
            f"best_model_path is now {self.best_model_path or 'unset'!r}"
        )

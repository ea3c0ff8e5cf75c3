"""The S3 side of the sharded strategies (Lightning's Trainer and Fabric): which paths are ours, saves with
the plugin's sync/async and ``on_save_error`` policy, loads that probe once on rank 0, removals.

The strategies stay thin: they translate the trainer's calls (state dicts, optimizers, ``meta.pt``) into
:mod:`s3ckpt.dcp.trainer_state` and let :class:`~s3ckpt.lightning.S3CheckpointIO` own the transport, the
background saver and the records, so retention (``remove_checkpoint``) and ``save_last="link"`` copies are
ordered behind sharded saves exactly as behind single-file ones.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any

import torch
import torch.distributed as dist

from .. import checkpoint as ck
from ..dcp.trainer_state import load_state, probe, read_meta, save_state
from ..distributed import get_rank, is_initialized
from ..errors import S3CheckpointError
from ..removal import delete_sharded
from ..s3_dirpath_utils import is_s3_url, parse_s3_url
from .checkpoint_io import S3CheckpointIO
from .records import SaveRecord

__all__ = [
    "UNSET_DIRPATH",
    "S3ShardedCheckpoints",
    "local_broadcast",
    "s3_plugin_of",
    "s3_url_of",
    "weights_only_kwargs",
]

log = logging.getLogger(__name__)


UNSET_DIRPATH = "s3://s3ckpt-dirpath-unset"
"""The ``dirpath`` of a plugin a strategy built before it saw a checkpoint path (only for validation)."""


def weights_only_kwargs(weights_only: bool | None) -> dict[str, bool]:
    """``weights_only`` for Lightning's ``load_checkpoint`` when set: Lightning 2.4 has no such parameter."""
    return {} if weights_only is None else {"weights_only": weights_only}


@contextmanager
def local_broadcast(strategy: Any) -> Iterator[None]:
    """Within the block, ``strategy.broadcast`` returns each rank's own value. For Lightning's full-state
    load on a verified in-memory download: every rank already agreed on the URL, and each has its own
    in-memory file, whose path rank 0 must not impose on the others."""
    strategy.broadcast = _own_value
    try:
        yield
    finally:
        del strategy.broadcast


def _own_value(obj: Any, src: int = 0) -> Any:
    return obj


def s3_plugin_of(plugin: Any) -> S3CheckpointIO | None:
    """The :class:`S3CheckpointIO` that ``plugin`` is or wraps (Lightning's ``AsyncCheckpointIO`` and other
    wrappers keep theirs in ``.checkpoint_io``), else ``None``."""
    for _ in range(8):
        if isinstance(plugin, S3CheckpointIO):
            return plugin
        plugin = getattr(plugin, "checkpoint_io", None)
        if plugin is None:
            break
    return None


def s3_url_of(path: Any) -> str | None:
    """The ``s3://`` URL ``path`` names, or ``None`` for a local path. ``pathlib`` turns ``s3://b/k`` into
    ``s3:/b/k`` (Lightning calls ``Path()`` on every checkpoint path); that is read as the URL it was."""
    if path is None:
        return None
    text = os.fspath(path) if isinstance(path, str | PurePath) else str(path)
    if text.startswith("s3:/") and not text.startswith("s3://"):
        text = "s3://" + text[len("s3:/") :]
    if not is_s3_url(text):
        return None
    parse_s3_url(text, require_key=True)
    return text.rstrip("/")


class S3ShardedCheckpoints:
    """The S3 operations a sharded strategy needs, on one :class:`S3CheckpointIO`.

    Args:
        checkpoint_io: the plugin to use; ``None`` builds one on first use from ``options`` (the
            :class:`S3CheckpointIO` keyword arguments the strategy was given).
    """

    def __init__(self, checkpoint_io: S3CheckpointIO | None = None, **options: Any) -> None:
        self._io = checkpoint_io
        self._options = {k: v for k, v in options.items() if v is not None}
        self._async_group: Any = None
        # The newest sharded checkpoint committed (or resumed from): the base of the next incremental save.
        self._base: str | None = None

    def io(self, url: str | None = None) -> S3CheckpointIO:
        """The plugin: the one given, else one built from the strategy's options (``dirpath`` defaults to
        the bucket of the first checkpoint URL)."""
        if self._io is None:
            options = dict(self._options)
            dirpath = options.pop("dirpath", None)
            if dirpath is None:
                dirpath = f"s3://{parse_s3_url(url)[0]}" if url else UNSET_DIRPATH
            self._io = S3CheckpointIO(dirpath, **options)
        return self._io

    @property
    def built(self) -> S3CheckpointIO | None:
        """The plugin if given or already built (never builds one)."""
        return self._io

    # -- save -----------------------------------------------------------------------------------------------

    def save_sharded(self, url: str, converted: dict[str, Any], meta: Mapping[str, Any] | None) -> None:
        """Save on every rank; committed once every rank's shards and ``meta.pt`` are stored and verified.

        Sync: returns when committed (or failed, per ``on_save_error``). Async: returns once the shards are
        copied to host memory; the upload runs on the plugin's background saver, over a process group of
        its own (a gloo group, so the training collectives never interleave with the checkpoint's).
        """
        io = self.io(url)
        start = time.perf_counter()
        saver = io._saver
        if saver is None:
            try:
                save_state(url, converted, meta, transport=io.transport, base=self._base_for(io, url))
            except S3CheckpointError as exc:
                self._failed(io, url, start, start, exc)
                if io.on_save_error == "raise":
                    raise
                return
            io._last_save_failed = False
            self._base = url
            elapsed = time.perf_counter() - start
            io._record(SaveRecord(url, _nbytes(converted), elapsed, elapsed, time.time(), elapsed))
            self._replace_file(io, url)
            return
        group = self._checkpoint_group()
        io._raise_background_failure(saver.raise_if_failed)
        queued = saver.wait_for_room()
        staged = _stage(converted)
        meta_copy = dict(meta) if meta is not None else None
        stall_end = time.perf_counter()

        def upload() -> None:
            began = time.perf_counter()
            try:
                base = self._base_for(io, url)
                save_state(url, staged, meta_copy, transport=io.transport, process_group=group, base=base)
            except S3CheckpointError as exc:
                self._failed(io, url, start, stall_end, exc, queued)
                raise  # the saver cancels the removals and copies that waited for this save
            self._base = url  # uploads run one at a time, in order: the next one composes from this one
            done = time.perf_counter()
            io._record(
                SaveRecord(url, _nbytes(staged), stall_end - start, done - start, time.time(), done - began, queued)
            )

        saver.submit_save(url, upload, raise_stored=io.on_save_error == "raise")
        self._replace_file(io, url)

    def _base_for(self, io: S3CheckpointIO, url: str) -> str | None:
        """The checkpoint an incremental save (``S3CheckpointIO(incremental=True)``) copies unchanged items
        from: the newest sharded one committed or resumed from (not ``url`` itself, which is replaced)."""
        if not io.incremental or self._base is None or self._base.rstrip("/") == url.rstrip("/"):
            return None
        return self._base

    def _replace_file(self, io: S3CheckpointIO, url: str) -> None:
        """Rank 0: a single-file checkpoint of the same name as a committed sharded one is replaced by it."""
        if get_rank() == 0:
            self._after_commit(io, url, lambda: ck.delete_file(url, transport=io.transport))

    def _failed(
        self, io: S3CheckpointIO, url: str, start: float, stall_end: float, exc: Exception, queued: float = 0.0
    ) -> None:
        now = time.perf_counter()
        io._record(SaveRecord(url, 0, stall_end - start, now - start, 0.0, queued_s=queued, error=str(exc)))
        io._last_save_failed = True

    def _checkpoint_group(self) -> Any:
        """A gloo group for background saves (created once, collectively, on the first async save)."""
        if self._async_group is None and is_initialized():
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def save_file(self, url: str, checkpoint: dict[str, Any]) -> None:
        """A full-state save through the plugin on rank 0 (the state is gathered there). A sharded
        checkpoint of the same name is removed once the file is committed (Lightning removes it first,
        which leaves no checkpoint at all meanwhile); async: queued behind the save."""
        if get_rank() != 0:
            return
        io = self.io(url)
        io.save_checkpoint(checkpoint, url)
        bucket, key = parse_s3_url(url, require_key=True)
        self._after_commit(io, url, lambda: delete_sharded(io.transport, bucket, key + "/"))

    def _after_commit(self, io: S3CheckpointIO, url: str, fn: Callable[[], Any]) -> None:
        """Run ``fn`` (a cleanup that must not precede the commit of ``url``) once it has committed; never if
        that save failed."""
        if io._saver is not None:
            io._saver.submit_removal(url + "#replaced", fn)
        elif not io._last_save_failed:
            fn()

    # -- load -----------------------------------------------------------------------------------------------

    def load(
        self,
        url: str,
        *,
        module: torch.nn.Module,
        optimizers: Mapping[str, torch.optim.Optimizer],
        module_key: str | None,
        strict: bool,
        weights_only: bool | None,
        load_file: Callable[[Path], dict[str, Any]],
        require_optimizers: bool = False,
    ) -> dict[str, Any]:
        """Load the checkpoint at ``url`` into ``module`` and ``optimizers``; returns the rest of the state.

        Rank 0 decides whether ``url`` is a committed sharded checkpoint or a file and broadcasts the answer
        with ``.metadata`` and ``meta.pt``, so no other rank sends a LIST, HEAD or GET for them. A file is
        downloaded (verified) into memory on every rank and handed to ``load_file`` as a path, so the
        strategy's own full-state logic loads it (memory: the file's size per rank, mapped lazily).

        Args:
            module_key: the module's key in a sharded checkpoint; ``None`` accepts a single file only (a bare
                module given to Fabric's ``load_raw``).
            require_optimizers: raise if the sharded checkpoint has no state for one of ``optimizers`` (Fabric,
                where the caller names them); else such an optimizer is left as it is (the Trainer loading a
                ``save_weights_only`` checkpoint).

        Raises:
            ValueError: ``module_key=None`` and ``url`` is a sharded checkpoint.
            KeyError: ``require_optimizers`` and an optimizer's state is missing.
        """
        io = self.io(url)
        if io._saver is not None:
            io._saver.wait_for(url)  # read-your-writes: a save of this path still uploading
        found = probe(url, io.transport, verify=bool(io.verify))
        if found.sharded is not None:
            if module_key is None:
                raise ValueError(
                    f"{url} is a sharded checkpoint: a module alone loads from a single file with the full state "
                    "dict; load the sharded checkpoint with a state dict instead, e.g. {'model': model}"
                )
            loaded = load_state(
                found.sharded, module, optimizers, module_key=module_key, strict=strict, transport=io.transport
            )
            missing = sorted(set(optimizers) - set(loaded))
            if require_optimizers and missing:
                raise KeyError(
                    f"{url} holds no optimizer state under {missing}; its optimizers were saved under other keys, "
                    "or it was saved without optimizers: load it without them or under the keys it was saved with"
                )
            if self._base is None:
                self._base = url  # resuming: an incremental save composes from the checkpoint resumed from
            return read_meta(found.sharded, weights_only=weights_only)
        buf, _, _ = ck._download_verified(io.transport, url, verify=io.verify, progress=None)
        try:
            return load_file(Path(buf.path))
        finally:
            buf.close()

    def remove(self, url: str) -> None:
        """Remove the checkpoint (file or sharded, commit record first) through the plugin, so async removals
        wait for the saves pending before them. Rank 0 only."""
        if get_rank() == 0:
            self.io(url).remove_checkpoint(url)

    def teardown(self) -> None:
        """Finish background saves (raising a stored failure) and release the checkpoint process group."""
        try:
            if self._io is not None:
                self._io.teardown()
        finally:
            if self._async_group is not None and is_initialized():
                dist.destroy_process_group(self._async_group)
            self._async_group = None


def _stage(state: dict[str, Any]) -> dict[str, Any]:
    """A host-memory copy of a (sharded) state dict, DTensor and ShardedTensor included: what the
    background upload reads while training changes the originals."""
    from torch.distributed.checkpoint.staging import BlockingAsyncStager

    staged: dict[str, Any] = BlockingAsyncStager(cache_staged_state_dict=False).stage(state)
    return staged


def _nbytes(state: Any) -> int:
    """Bytes of the tensors (local shards) in ``state``."""
    if isinstance(state, torch.Tensor):
        local = getattr(state, "_local_tensor", None)
        if local is not None:
            return int(local.nbytes)
        shards = getattr(state, "local_shards", None)
        if callable(shards):
            return sum(int(s.tensor.nbytes) for s in shards())
        return int(state.nbytes)
    if isinstance(state, Mapping):
        return sum(_nbytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_nbytes(v) for v in state)
    return 0

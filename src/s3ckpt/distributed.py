"""Resume at scale: global rank 0 alone finds the checkpoint on S3, and every rank gets the answer by broadcast.

Listing a checkpoint directory costs LIST (and HEAD) requests; done by every rank of a 1,000-GPU job at once
it is 1,000 x the requests and can hit S3's per-prefix rate limit before training even starts.
:func:`resolve_resume_path` lists on global rank 0 only and broadcasts the path, or the error, so that every
rank returns the same path or raises the same exception, and no rank waits in a collective for a rank 0 that
failed.

The collective helpers are no-ops without an initialised ``torch.distributed`` process group (rank 0 of 1).
:func:`s3ckpt.distributed_load.load_shared` downloads a checkpoint once per node.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch.distributed as dist

from . import checkpoint as ck
from .catalog import uninject_model_parallel_rank
from .errors import CheckpointNotFoundError, ConfigError, S3CheckpointError
from .model_parallel import GROUP_MARKER_FORMAT as GROUP_MARKER_FORMAT  # re-exported: its old home
from .model_parallel import model_parallel_rank_url, rank_keys, write_group_marker
from .resume import VerifyPolicy, find_resume_checkpoint, head_many
from .s3_dirpath_utils import build_s3_url, parse_s3_url
from .transport import ops
from .transport.context import S3Transport

__all__ = [
    "VerifyPolicy",
    "barrier",
    "broadcast_object",
    "commit_model_parallel",
    "destroy_process_group_at_exit",
    "find_resume_checkpoint",
    "get_rank",
    "get_world_size",
    "is_initialized",
    "model_parallel_rank_url",
    "resolve_resume_path",
    "run_on_rank0",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
_BROADCAST_NOTE = "raised on the rank that ran the step and broadcast to this one"


def is_initialized() -> bool:
    """True if a ``torch.distributed`` default process group exists in this process."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (default: global); 0 without a process group."""
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group: Any = None) -> int:
    """Processes in ``group`` (default: all); 1 without a process group."""
    return dist.get_world_size(group) if is_initialized() else 1


def barrier(group: Any = None) -> None:
    """Wait for every rank of ``group``; a no-op without a process group."""
    if is_initialized() and dist.get_world_size(group) > 1:
        dist.barrier(group=group)


def broadcast_object(obj: T, src: int = 0, *, group: Any = None, device: Any = None) -> T:
    """``obj`` from global rank ``src`` to every rank of ``group``; returns ``obj`` itself without a group.

    Args:
        obj: any picklable object (ignored on the other ranks).
        src: the global rank that sends.
        group: the process group; default: all ranks.
        device: where the pickled bytes travel, as ``torch.distributed.broadcast_object_list``: ``None``
            lets torch choose (CPU for gloo, the current CUDA device for nccl, so call
            ``torch.cuda.set_device(local_rank)`` first, as every NCCL program must).
    """
    if not is_initialized() or dist.get_world_size(group) == 1:
        return obj
    box: list[Any] = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group, device=device)
    return box[0]  # type: ignore[no-any-return]


_exit_hook_installed = False


def destroy_process_group_at_exit() -> None:
    """Make sure the default process group is destroyed before the interpreter exits (idempotent).

    A rank that leaves with a live gloo group (an error raised out of ``fit`` on every rank, after which
    Lightning tears down without destroying the group) sometimes dies at exit with SIGABRT, "terminate called
    without an active exception": gloo's C++ threads are still joinable when static destructors run, so a job
    scheduler records a crash (return code -6) instead of the error's own exit status. An ``atexit`` hook
    runs before that, while Python is still whole. Called on every path where s3ckpt raises a resume error on
    every rank; a user may call it too. Destroying a group is local (no collective): no rank can wait on it.
    """
    global _exit_hook_installed
    if _exit_hook_installed:
        return
    _exit_hook_installed = True
    atexit.register(_destroy_default_group)


def _destroy_default_group() -> None:
    if is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as exc:  # at exit: report, never turn a clean exit into a traceback
            log.debug("destroy_process_group at exit failed: %s", exc)


# -- outcomes: a value or an exception that can cross a broadcast -----------------------------------------


@dataclass(frozen=True)
class _Outcome(Generic[T]):
    """A step run on one rank: its value, or the exception it raised in a form that survives pickling."""

    value: T | None = None
    error: Exception | None = None
    origin: str = ""
    """The traceback on the rank that failed, shown in a note on the ranks it is broadcast to."""
    local: Exception | None = field(default=None, compare=False, repr=False)
    """The original exception, on the rank that raised it only (never pickled)."""

    def __getstate__(self) -> dict[str, Any]:
        return {"value": self.value, "error": self.error, "origin": self.origin}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in {**state, "local": None}.items():
            object.__setattr__(self, name, value)

    def unwrap(self) -> T:
        """The value; or raise the original exception on the rank that failed, its copy on the others."""
        if self.local is not None:
            raise self.local
        if self.error is None:
            return self.value  # type: ignore[return-value]
        if hasattr(self.error, "add_note"):
            self.error.add_note(f"{_BROADCAST_NOTE}; the traceback there:\n{self.origin}")
        raise self.error


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling (cause and traceback never travel), else an equivalent that does:
    checked before the broadcast, because a pickling error inside it would leave the other ranks waiting."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return S3CheckpointError(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}")
    return exc


def _capture(fn: Callable[[], T]) -> _Outcome[T]:
    try:
        return _Outcome(value=fn())
    except Exception as exc:
        return _Outcome(error=_portable(exc), origin=traceback.format_exc(), local=exc)


def run_on_rank0(fn: Callable[[], T], *, group: Any = None) -> T:
    """Run ``fn`` on global rank 0 only and return its value on every rank of ``group``, or raise its
    exception on every rank (so no rank waits in a later collective for a rank 0 that failed).

    Collective: every rank of ``group`` must call it; without a process group it just calls ``fn``.
    """
    outcome: _Outcome[T] | None = _capture(fn) if get_rank() == 0 else None
    shared = broadcast_object(outcome, src=0, group=group)
    assert shared is not None  # rank 0 always sends an outcome
    if shared.error is not None:
        destroy_process_group_at_exit()  # the error may end the process: leave no gloo thread behind
    return shared.unwrap()


# -- resume rules ------------------------------------------------------------------------------------------


def resolve_resume_path(
    dirpath: str,
    *,
    resume_if_exists: bool = True,
    resume_ignore_no_checkpoint: bool = False,
    resume_past_end: bool = False,
    transport: S3Transport | None = None,
    verify_candidates: VerifyPolicy = "head",
) -> str | None:
    """The checkpoint every rank resumes from: found on global rank 0 only, broadcast to the others.

    Collective: every rank of the default process group must call it (without a group, the process is
    rank 0 of 1). Non-zero ranks send no S3 request and never build a client.

    Rules (NeMo's ``exp_manager``), among committed checkpoints only:

    1. a ``*end.ckpt`` (or a sharded directory ending in ``end``) means the run finished: an error unless
       ``resume_past_end``, in which case it is preferred;
    2. else the newest ``*last.ckpt`` (or ``*last`` directory), by step in its name, then by time;
    3. model-parallel rank files (``mp_rank_XX/``, ``tp_rank_XX_pp_rank_XXX/``) are one checkpoint, returned
       without the rank folder (each rank injects its own), committed once the group marker exists;
    4. an unfinished candidate (a model-parallel group without its marker, a sharded directory without
       ``.metadata``; an unfinished file upload is invisible) or a corrupt one is skipped with a warning
       naming it, and the next older one is tried;
    5. nothing usable: :class:`CheckpointNotFoundError`, or ``None`` (start fresh) with a warning if
       ``resume_ignore_no_checkpoint``. A missing bucket is always an error.

    Args:
        dirpath: ``s3://bucket/prefix`` of the checkpoints (searched recursively).
        resume_if_exists: ``False`` returns ``None`` at once, with no request and no collective.
        resume_ignore_no_checkpoint: start fresh instead of raising when nothing is usable.
        resume_past_end: allow resuming from a ``*end.ckpt``.
        transport: used on rank 0; default: built from the environment.
        verify_candidates: how rank 0 checks a candidate before choosing it. ``"head"`` (default): one
            HEAD (plus the manifest GET where the store keeps no CRC32C; for a model-parallel group the
            marker GET and a HEAD per rank file): catches an object replaced or truncated after it was saved,
            not bytes altered behind a record that still matches (those fail the CRC32C check at load, on
            every rank). ``True``: download and CRC32C-check it on rank 0: catches every corruption, for one
            more read of the whole checkpoint. ``False``: trust the listing.

    Returns:
        The ``s3://`` URL to resume from, the same on every rank, or ``None`` to start fresh.

    Raises:
        ResumeError: a ``*end.ckpt`` exists and ``resume_past_end`` is off.
        CheckpointNotFoundError: nothing usable (see rule 5).
        S3CheckpointError: any failure on rank 0 (missing bucket, access denied), raised on every rank
            with the same type and message.
    """
    if not resume_if_exists:
        return None
    if not is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        log.warning("resolve_resume_path before init_process_group: every process lists %s itself", dirpath)
    return run_on_rank0(
        lambda: find_resume_checkpoint(
            dirpath,
            resume_ignore_no_checkpoint=resume_ignore_no_checkpoint,
            resume_past_end=resume_past_end,
            transport=transport,
            verify_candidates=verify_candidates,
        )
    )


# -- model-parallel commit ---------------------------------------------------------------------------------


def commit_model_parallel(
    url_without_rank: str,
    *,
    tensor_parallel_size: int,
    pipeline_parallel_size: int = 1,
    transport: S3Transport | None = None,
) -> str:
    """Mark a NeMo-style model-parallel checkpoint committed once every rank's file is on S3.

    Call it on one rank (rank 0) after a barrier that follows every rank's save::

        s3ckpt.save(state, model_parallel_rank_url(url, tp_rank, pp_rank, pp), transport=t)
        barrier()
        if get_rank() == 0:
            commit_model_parallel(url, tensor_parallel_size=tp, pipeline_parallel_size=pp, transport=t)

    HEADs each rank file (``tp * pp`` requests, in parallel), then writes ``<url>.s3ckpt-group.json``
    recording each file's size and ETag, so a rank file replaced later is detected on resume. Returns the
    marker's ``s3://`` URL. :class:`~s3ckpt.lightning.S3CheckpointIO` built with the group's sizes does this
    by itself, with no collective (see :mod:`s3ckpt.model_parallel`).

    Raises:
        ConfigError: ``tp * pp`` is 1 (NeMo then saves one plain file, which needs no marker).
        CheckpointNotFoundError: rank files are missing (named); no marker is written.
    """
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if tp < 1 or pp < 1 or tp * pp == 1:
        raise ConfigError(
            f"commit_model_parallel: tensor_parallel_size={tp} x pipeline_parallel_size={pp} must be > 1; "
            "a checkpoint without model parallelism is one file and is committed when it is visible"
        )
    bucket, key = parse_s3_url(url_without_rank, require_key=True)
    if uninject_model_parallel_rank(key) != key:
        raise ConfigError(f"commit_model_parallel: pass the URL without the rank folder, got {url_without_rank!r}")
    t = ck.resolve_transport(transport)
    keys = rank_keys(key, tp, pp)
    infos = head_many(t, bucket, keys)
    missing = [k for k, info in zip(keys, infos, strict=True) if info is None]
    if missing:
        ops.check_bucket(t, bucket)
        raise CheckpointNotFoundError(
            f"cannot commit {url_without_rank}: {len(missing)} of {len(keys)} rank files are missing, e.g. "
            f"{[build_s3_url(bucket, k) for k in missing[:4]]}; a rank's save did not finish"
        )
    return write_group_marker(t, bucket, key, [info for info in infos if info is not None])

"""Background saving that never loses a good checkpoint.

One worker thread runs saves and removals in the order they were asked for. The rules that make it safe
(and that NeMo's and Lightning's async modes lack):

* **Back-pressure.** At most ``max_pending`` saves are queued or running; a new one waits for room
  *before* its snapshot is taken, so host memory holds at most ``max_pending`` snapshots (plus the part
  buffers of the one upload running: ``(max_write_concurrency + 1) x chunk_size``). The default of 2 lets
  the next save snapshot and return while the previous one is still uploading: in the steady state (uploads
  keep up on average) a training step stalls for its snapshot only, never for the previous upload.
* **Copies after commit.** :meth:`submit_after_commit` (``save_last="link"``: ``last.ckpt`` as a
  server-side copy of the newest top-k file) runs only after the saves pending when it was asked for have
  committed, and is cancelled if one of them failed: a copy is never made of an uncommitted object.
* **Removal after commit.** A removal runs only after every save that was pending (or had failed unseen)
  when it was asked for has committed. If any of those saves failed, the removal is cancelled and the old
  checkpoint stays: top-k retention never deletes the last good checkpoint because a newer save failed.
* **Nothing silently dropped.** A failure is stored and raised at the next :meth:`submit_save` or at
  :meth:`wait` (``teardown``).

A thread, not a process: the snapshot already lives in host memory, uploads release the GIL in socket
writes and CRC32C, and a forked process would have to be created before CUDA or any native S3 client
starts (a fork after either can deadlock), which a library cannot guarantee for its caller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .errors import S3CheckpointError

__all__ = ["AsyncSaver"]

log = logging.getLogger(__name__)


class AsyncSaver:
    """Serial background executor for saves and dependent removals.

    Args:
        max_pending: saves allowed queued or running at once (>= 1). A new save blocks until one finishes.
            Host memory: up to ``max_pending`` snapshots.
    """

    def __init__(self, max_pending: int = 2) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending!r}: at least one save must be allowed in flight")
        self.max_pending = max_pending
        self._cond = threading.Condition()
        self._executor: ThreadPoolExecutor | None = None
        self._seq = 0
        self._pending_saves: dict[int, str] = {}
        self._pending_after: dict[int, str] = {}  # copies queued behind saves (labels for wait_for)
        self._failed: dict[int, BaseException] = {}
        self._unseen: list[tuple[int, BaseException]] = []
        self._futures: set[Future[Any]] = set()
        self.cancelled_removals: list[str] = []

    # -- submission (caller thread) ---------------------------------------------------------------------

    def wait_for_room(self) -> float:
        """Block until another save may be queued; returns the seconds waited."""
        start = time.perf_counter()
        with self._cond:
            while len(self._pending_saves) >= self.max_pending:
                self._cond.wait()
        return time.perf_counter() - start

    def submit_save(self, label: str, fn: Callable[[], Any], *, raise_stored: bool = True) -> Future[Any]:
        """Queue ``fn`` (which must own its data: snapshot first). Raises a stored earlier failure first,
        unless ``raise_stored`` is off and it is an :class:`S3CheckpointError` (``on_save_error="warn"``: the
        failed save was recorded and logged when it happened; this one goes ahead)."""
        try:
            self.raise_if_failed()
        except S3CheckpointError:
            if raise_stored:
                raise
        self.wait_for_room()
        with self._cond:
            self._seq += 1
            seq = self._seq
            self._pending_saves[seq] = label
        return self._submit(self._run_save, seq, label, fn)

    def submit_removal(
        self, label: str, fn: Callable[[], Any], on_cancel: Callable[[], Any] | None = None
    ) -> Future[Any]:
        """Queue ``fn`` to run once every save it depends on has committed; if one failed, ``fn`` never runs
        and ``on_cancel`` is called instead."""
        with self._cond:
            self._seq += 1
            deps = set(self._pending_saves) | {seq for seq, _ in self._unseen}
        return self._submit(self._run_removal, deps, label, fn, on_cancel)

    def submit_after_commit(
        self, label: str, fn: Callable[[], Any], on_cancel: Callable[[], Any] | None = None
    ) -> Future[Any]:
        """Queue ``fn`` (a copy of a checkpoint) to run once every save pending now has committed; if one
        failed, ``fn`` never runs and ``on_cancel`` is called instead. :meth:`wait_for` ``(label)`` waits for
        it too; a failure of ``fn`` is raised like a save's."""
        with self._cond:
            self._seq += 1
            seq = self._seq
            deps = set(self._pending_saves) | {s for s, _ in self._unseen}
            self._pending_after[seq] = label
        return self._submit(self._run_after_commit, seq, deps, label, fn, on_cancel)

    def is_pending(self, label: str) -> bool:
        with self._cond:
            return label in self._pending_saves.values()

    def wait_for(self, label: str) -> None:
        """Block until no save of ``label`` is pending (read-your-writes for a load of the same path)."""
        with self._cond:
            while label in self._pending_saves.values() or label in self._pending_after.values():
                self._cond.wait()

    def raise_if_failed(self) -> None:
        """Raise the first failure not raised yet (the others are logged)."""
        with self._cond:
            if not self._unseen:
                return
            unseen, self._unseen = self._unseen, []
        for _, extra in unseen[1:]:
            log.error("another background save also failed: %s", extra)
        raise unseen[0][1]

    def wait(self) -> None:
        """Wait for all queued work, then raise the first failure not raised yet."""
        while True:
            with self._cond:
                futures = list(self._futures)
            if not futures:
                break
            for fut in futures:
                try:
                    fut.result()
                except BaseException:  # recorded by the task itself
                    pass
        self.raise_if_failed()

    def close(self) -> None:
        """Wait for everything, shut the worker down (it is recreated on the next submit), raise failures."""
        try:
            self.wait()
        finally:
            with self._cond:
                executor, self._executor = self._executor, None
            if executor is not None:
                executor.shutdown(wait=True)

    # -- worker thread -----------------------------------------------------------------------------------

    def _submit(self, run: Callable[..., Any], *args: Any) -> Future[Any]:
        with self._cond:
            if self._executor is None:
                # Recreated lazily: Lightning calls teardown() after fit and may fit or validate again.
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="s3ckpt-async")
            fut = self._executor.submit(run, *args)
            self._futures.add(fut)
        fut.add_done_callback(self._forget)
        return fut

    def _forget(self, fut: Future[Any]) -> None:
        with self._cond:
            self._futures.discard(fut)

    def _run_save(self, seq: int, label: str, fn: Callable[[], Any]) -> Any:
        try:
            result = fn()
        except BaseException as exc:
            log.error("background save of %s failed: %s", label, exc)
            with self._cond:
                self._failed[seq] = exc
                self._unseen.append((seq, exc))
            raise
        finally:
            with self._cond:
                self._pending_saves.pop(seq, None)
                self._cond.notify_all()
        return result

    def _run_removal(
        self, deps: set[int], label: str, fn: Callable[[], Any], on_cancel: Callable[[], Any] | None
    ) -> Any:
        def cancelled() -> None:
            with self._cond:
                self.cancelled_removals.append(label)
            if on_cancel is not None:
                on_cancel()

        why = "a save it was waiting for failed, so the older checkpoint is kept"
        return self._run_dependent(deps, f"removing {label}", why, fn, cancelled)

    def _run_after_commit(
        self, seq: int, deps: set[int], label: str, fn: Callable[[], Any], on_cancel: Callable[[], Any] | None
    ) -> Any:
        try:
            why = "the save it copies failed, so it was never committed"
            return self._run_dependent(deps, f"writing {label}", why, fn, on_cancel)
        finally:
            with self._cond:
                self._pending_after.pop(seq, None)
                self._cond.notify_all()

    def _run_dependent(
        self, deps: set[int], what: str, why: str, fn: Callable[[], Any], on_cancel: Callable[[], Any] | None
    ) -> Any:
        """Run ``fn`` (a removal or copy queued behind the saves ``deps``) unless one of those saves failed, in
        which case ``on_cancel`` runs instead; a failure of ``fn`` itself is stored like a save's."""
        with self._cond:
            failed = any(d in self._failed for d in deps)
        if failed:
            log.warning("not %s: %s", what, why)
            if on_cancel is not None:
                on_cancel()
            return None
        try:
            return fn()
        except BaseException as exc:
            log.error("background %s failed: %s", what, exc)
            with self._cond:
                self._unseen.append((-1, exc))
            raise

"""Parallel ranged download into one preallocated buffer.

The object is split into ranges of ``read_chunk_size_MB``; at most ``max_read_concurrency`` ranged GETs run
at once, and each writes its bytes straight into its slice of the caller's buffer (no intermediate copy,
no second buffer). Given a :class:`~.checksums.RangeDigest`, each range's checksum is computed from its
bytes as they arrive, on the thread that fetched them (no second pass over the buffer). Every range is
pinned to the ETag the caller saw with ``If-Match``: if the object is replaced mid-download the store
answers 412 and the download fails, so a result is never stitched together from two versions of an object.
"""

from __future__ import annotations

import http.client
import logging
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from ..errors import ConflictError
from .checksums import RangeDigest
from .context import S3Transport
from .ops import ObjectInfo
from .retry import RetryableError

__all__ = ["ObjectChangedError", "download_into", "download_to_path", "fetch_range", "plan_ranges"]

log = logging.getLogger(__name__)

# Read from the socket in slices this big: large enough to amortise the call, small enough to keep the
# bytes moving into the target while the rest of the range is still arriving.
_READ_SLICE = 1024 * 1024


class ObjectChangedError(ConflictError):
    """The object was replaced while it was being downloaded (its ETag changed)."""


def plan_ranges(size: int, chunk: int) -> list[tuple[int, int]]:
    """Split ``size`` bytes into ``(start, end_exclusive)`` ranges of at most ``chunk`` bytes."""
    return [(start, min(start + chunk, size)) for start in range(0, size, chunk)]


def download_into(
    t: S3Transport,
    info: ObjectInfo,
    target: memoryview,
    *,
    progress: Callable[[int], None] | None = None,
    digest: RangeDigest | None = None,
) -> None:
    """Download the object described by ``info`` (from :func:`ops.head`) into ``target``.

    Args:
        t: transport; ``max_read_concurrency`` and ``read_chunk_size_MB`` apply.
        info: size and ETag of the object; every range is pinned to this ETag.
        target: a writable buffer of exactly ``info.size`` bytes.
        progress: called with the byte count of each completed range.
        digest: fed every range's bytes as they arrive (read ``digest.digests()`` afterwards).

    Raises:
        ObjectChangedError: the object changed during the download.
        S3CheckpointError: any other failure after retries.
    """
    if len(target) != info.size:
        raise ValueError(f"target buffer has {len(target)} bytes, object s3://{info.bucket}/{info.key} has {info.size}")
    if info.size == 0:
        return
    cfg = t.transfer
    ranges = plan_ranges(info.size, cfg.read_chunk_size)
    failed = threading.Event()

    def fetch(start: int, end: int) -> None:
        if failed.is_set():
            return
        try:
            fetch_range(t, info, target[start:end], start, end, cancelled=failed.is_set, digest=digest)
        except BaseException:
            failed.set()  # the other ranges stop retrying: the download has failed already
            raise
        if progress is not None:
            progress(end - start)

    if len(ranges) == 1:
        fetch(*ranges[0])
        return
    workers = min(cfg.max_read_concurrency, len(ranges))
    with ThreadPoolExecutor(workers, thread_name_prefix="s3ckpt-download") as pool:
        futures = [pool.submit(fetch, s, e) for s, e in ranges]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for fut in done:
            if fut.exception() is not None:
                failed.set()
                for other in futures:
                    other.cancel()
                raise fut.exception()  # type: ignore[misc]
        for fut in futures:
            fut.result()


def download_to_path(
    t: S3Transport,
    info: ObjectInfo,
    dest: Path,
    *,
    progress: Callable[[int], None] | None = None,
    check: Callable[[memoryview], None] | None = None,
    digest: Callable[[memoryview], RangeDigest] | None = None,
) -> None:
    """Download the object into the file ``dest`` with :func:`download_into`.

    The bytes land in a temporary sibling (mapped, so ranges are written in place), which is renamed over
    ``dest`` only when complete: ``dest`` is never left half-written.

    Args:
        check: sees the downloaded bytes before the rename; raising from it leaves ``dest`` untouched.
        digest: builds the :class:`RangeDigest` fed while the bytes arrive, given the mapped target (the
            ``check`` can then read its digests instead of hashing the file again).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.s3ckpt-partial-{os.getpid()}")
    try:
        with open(tmp, "wb+") as f:
            f.truncate(info.size)
            if info.size:
                with mmap.mmap(f.fileno(), info.size) as m:
                    view = memoryview(m)
                    try:
                        download_into(
                            t, info, view, progress=progress, digest=digest(view) if digest is not None else None
                        )
                        if check is not None:
                            check(view)
                    finally:
                        view.release()
            elif check is not None:
                check(memoryview(b""))
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fetch_range(
    t: S3Transport,
    info: ObjectInfo,
    out: memoryview,
    start: int,
    end: int,
    *,
    cancelled: Callable[[], bool] | None = None,
    digest: RangeDigest | None = None,
) -> None:
    """GET bytes ``[start, end)`` of the object, pinned to ``info.etag``, into ``out`` (retried as a whole;
    a short body is fetched again). Each attempt feeds ``digest`` afresh; only a whole range counts.

    Raises:
        ObjectChangedError: the object's ETag no longer matches.
    """
    bucket, key = info.bucket, info.key
    expected = end - start

    def get(c: Any) -> None:
        resp = c.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=info.etag)
        body = resp["Body"]
        part = digest.begin(start, end) if digest is not None else None
        try:
            got = _read_body_into(body, out[:expected], part.update if part is not None else None)
        finally:
            body.close()
        if got != expected:
            # A truncated body: the range is simply fetched again (it overwrites the same slice).
            raise RetryableError(f"short read of s3://{bucket}/{key} bytes {start}-{end - 1}: {got}/{expected}")
        if part is not None:
            part.done()

    try:
        t.call("GetObject", bucket, key, get, cancelled=cancelled)
    except ConflictError as exc:
        raise ObjectChangedError(
            f"s3://{bucket}/{key} changed while it was being downloaded (ETag {info.etag} no longer matches); "
            "another writer replaced it. Load again to get the new version."
        ) from exc


def _read_body_into(body: Any, out: memoryview, on_data: Callable[[memoryview], None] | None = None) -> int:
    """Read a response body into ``out``; returns the byte count (short if the body was truncated).
    ``on_data`` sees each slice right after it lands, while it is still in the CPU's cache.

    urllib3's ``readinto`` is ``read()`` plus a copy: a new bytes object per call and every byte copied
    twice. For a plain (not chunked, not encoded) body we read from the underlying ``http.client`` response,
    whose ``readinto`` receives straight into ``out``, and hand the connection back to the pool ourselves
    once every byte has arrived. Anything unusual takes the generic path.
    """
    raw: Any = getattr(body, "_raw_stream", None)
    fp: Any = getattr(raw, "_fp", None)
    direct = (
        isinstance(fp, http.client.HTTPResponse)
        and not fp.chunked
        and getattr(raw, "_decoder", None) is None
        and str(getattr(raw, "headers", {}).get("content-encoding", "identity")).lower() in ("", "identity")
    )
    total = len(out)
    got = 0
    while got < total:
        view = out[got : min(total, got + _READ_SLICE)]
        n = fp.readinto(view) if direct else _generic_readinto(body, view)
        if not n:
            break
        if on_data is not None:
            on_data(out[got : got + n])
        got += n
    if direct and got == total and fp.isclosed():
        # The message is complete, so the socket sits at a clean boundary: reuse it (closing the body
        # would otherwise close the connection).
        raw.release_conn()
    return got


def _generic_readinto(body: Any, view: memoryview) -> int:
    """``body.readinto(view)``; botocore's ``StreamingBody`` has it only since 1.38.20, so older releases
    (still inside the supported range) read and copy."""
    readinto = getattr(body, "readinto", None)
    if readinto is not None:
        return int(readinto(view))
    data = body.read(len(view))
    view[: len(data)] = data
    return len(data)

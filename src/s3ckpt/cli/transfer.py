"""The three copies behind ``s3ckpt cp``: upload, download, and S3-to-S3; each leaves a result that verifies.

* upload: the streaming multipart writer (bounded memory), then a manifest with the CRC32C it computed.
* download: parallel ranged GETs into a file mapped in memory, checked against the recorded checksum before
  it is renamed into place (a corrupted checkpoint is never silently copied out).
* S3 to S3: a server-side copy when the source's CRC32C is known (``transport.copy``: CopyObject, or
  UploadPartCopy beyond 5 GiB; no bytes through this machine); otherwise a stream through it with the CRC32C
  checked before the upload completes.
  Either way a new manifest is written: the source's describes another object (ETag, nonce).
"""

from __future__ import annotations

import logging
import time
import zipfile
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import crc32c as _crc32c

from ..errors import CheckpointCorruptedError
from ..inspection.safe_pickle import safe_load
from ..inspection.zipread import RangeReader
from ..layout import (
    Expected,
    expected_checksum,
    expected_crc32c,
    manifest_key,
    read_manifest,
    summarize_meta,
    write_manifest,
)
from ..transport.checksums import RangeDigest
from ..transport.context import S3Transport
from ..transport.copy import copy_object
from ..transport.download import download_to_path
from ..transport.ops import ObjectInfo, delete_object
from ..transport.upload import MultipartWriter, UploadResult

__all__ = [
    "Progress",
    "copy_s3_to_s3",
    "download_to_file",
    "drop_stale_manifest",
    "local_meta",
    "timed",
    "upload_file",
]

log = logging.getLogger(__name__)

Progress = Callable[[int], None] | None
_READ_CHUNK = 8 * 1024 * 1024
# Ranges read ahead of the writer in a streamed S3-to-S3 copy: enough to keep the upload busy, few enough
# to bound memory (this many x read_chunk_size).
_STREAM_WINDOW = 4


def local_meta(path: Path) -> dict[str, Any]:
    """Step and epoch of a local ``torch.save`` file for its manifest, from its pickle alone; ``{}`` if
    it is not one (the upload itself does not depend on it)."""
    try:
        if not zipfile.is_zipfile(path):
            return {}
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not names:
                return {}
            with archive.open(min(names, key=len)) as member:
                # s3ckpt saves without the zip's per-record CRC-32 (torch then writes 0, which zipfile would
                # reject); the object's CRC32C protects these bytes instead.
                if archive.getinfo(member.name).CRC == 0:
                    member._expected_crc = None  # type: ignore[attr-defined]
                return summarize_meta(safe_load(member.read()).root)
    except Exception as exc:  # best effort: an unreadable pickle still uploads, without step/epoch
        log.debug("no step/epoch from %s: %s", path, exc)
        return {}


def upload_file(
    t: S3Transport, path: Path, bucket: str, key: str, *, manifest: bool, progress: Progress
) -> UploadResult:
    """Stream a local file into ``s3://bucket/key``, then write its manifest (if ``manifest``)."""
    size = path.stat().st_size
    with open(path, "rb") as f, MultipartWriter(t, bucket, key, expected_size=size, progress=progress) as writer:
        while chunk := f.read(_READ_CHUNK):
            writer.write(chunk)
    result = writer.result
    if manifest:
        write_manifest(t, result, local_meta(path))
    return result


def drop_stale_manifest(t: S3Transport, bucket: str, key: str) -> None:
    """Delete the manifest of an object just replaced without one: it describes the old bytes, and
    ``verify`` would report the new object as corrupted."""
    delete_object(t, bucket, manifest_key(key))


def download_to_file(
    t: S3Transport, info: ObjectInfo, dest: Path, *, verify: bool, has_manifest: bool, progress: Progress
) -> str:
    """Download into ``dest`` via a temporary file renamed into place; returns how it was verified.

    The bytes are checked, as they arrive, against whatever the object's checksum is (see
    :func:`s3ckpt.layout.expected_checksum`: the store's CRC32C, the manifest, or another tool's CRC32,
    CRC64NVME, SHA or composite checksum); with ``has_manifest=False`` no manifest is read.

    Raises:
        CheckpointCorruptedError: the bytes do not match the recorded checksum (``dest`` is left untouched).
    """
    expected: Expected | None = None
    if verify:
        expected, why = expected_checksum(t, info, manifest=has_manifest)
    else:
        why = "not verified (--no-verify)"
    digest: RangeDigest | None = None

    def start_digest(view: memoryview) -> RangeDigest:
        nonlocal digest
        assert expected is not None
        digest = RangeDigest(expected.algorithm, expected.segment_sizes(info.size), view)
        return digest

    def check(view: memoryview) -> None:
        if expected is None or digest is None:
            return
        problem = expected.mismatch(digest.digests())
        if problem is not None:
            raise CheckpointCorruptedError(
                f"s3://{info.bucket}/{info.key} is corrupted: {problem} (checksum from the {expected.origin}); "
                f"nothing was written to {dest}"
            )

    try:
        download_to_path(
            t, info, dest, progress=progress, check=check, digest=start_digest if expected is not None else None
        )
    finally:
        digest = None  # it holds a view of the mapped temporary file
    if expected is None:
        if verify:
            log.warning("s3://%s/%s copied unverified: %s", info.bucket, info.key, why)
        return "unverified"
    return f"{expected.algorithm} verified against the {expected.origin}"


def _server_side_copy(t: S3Transport, src: ObjectInfo, bucket: str, key: str, crc: int) -> UploadResult:
    # The source's metadata travels with a fresh nonce, which ties the new manifest to this copy.
    copied = copy_object(t, src.bucket, src.key, bucket, key, source=src, metadata=dict(src.metadata))
    return copied.as_upload(crc)


def _streamed_copy(
    t: S3Transport, src: ObjectInfo, bucket: str, key: str, expected: int | None, progress: Progress
) -> UploadResult:
    reader = RangeReader(t, src)
    chunk = t.transfer.read_chunk_size
    ranges = deque((start, min(start + chunk, src.size)) for start in range(0, src.size, chunk))
    crc = 0
    with (
        ThreadPoolExecutor(_STREAM_WINDOW, thread_name_prefix="s3ckpt-cp") as pool,
        MultipartWriter(t, bucket, key, expected_size=src.size, progress=progress) as writer,
    ):
        pending: deque[Future[bytes]] = deque()
        while ranges or pending:
            while ranges and len(pending) < _STREAM_WINDOW:
                pending.append(pool.submit(reader.read, *ranges.popleft()))
            data = pending.popleft().result()
            crc = _crc32c.crc32c(data, crc)
            writer.write(data)
        if expected is not None and crc != expected:
            # Raised inside the writer's block: the upload is aborted, no corrupted copy appears.
            raise CheckpointCorruptedError(
                f"s3://{src.bucket}/{src.key} is corrupted: CRC32C {crc:08x}, recorded {expected:08x}; not copied"
            )
    return writer.result


def copy_s3_to_s3(
    t: S3Transport,
    src: ObjectInfo,
    bucket: str,
    key: str,
    *,
    manifest: bool,
    has_manifest: bool,
    stream: bool,
    progress: Progress,
) -> tuple[UploadResult, str]:
    """Copy one object between S3 locations; returns the result and the method used.

    Raises:
        CheckpointCorruptedError: the source does not match its recorded CRC32C (nothing is copied when the
            bytes go through this machine; a server-side copy keeps the recorded CRC32C, so ``verify``
            reports the copy as corrupted too).
    """
    # Read once: it may hold the CRC32C, and its step and epoch go into the copy's manifest. A DCP
    # ``.metadata``'s manifest name is taken by the DCP sidecar (another format): ``has_manifest=False``.
    found = read_manifest(t, src.bucket, src.key) if has_manifest else None
    expected, _ = expected_crc32c(t, src, manifest=found)
    if expected is not None and not stream:
        result, method = _server_side_copy(t, src, bucket, key, expected), "server-side"
        if progress is not None:
            progress(src.size)
    else:
        result, method = _streamed_copy(t, src, bucket, key, expected, progress), "stream"
    if manifest:
        write_manifest(t, result, dict(found.meta) if found is not None else {})
    return result, method


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and the seconds it took."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start

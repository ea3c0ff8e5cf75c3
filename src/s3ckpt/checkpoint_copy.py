"""Copy a committed checkpoint on the store: :func:`copy` (``s3ckpt.copy``).

What ``save_last="link"`` does on S3: ``last.ckpt`` becomes a server-side copy of the newest top-k file
instead of a second upload of the same bytes. The copy is a checkpoint of its own (``ls``, ``prune``,
resume and ``load`` see a plain object), and it verifies like one:

* Its manifest ``<dst>.s3ckpt.json`` carries the *source's* CRC32C (the bytes are the same) with the
  *copy's* own size, ETag and nonce, so the manifest path of :func:`s3ckpt.layout.expected_crc32c` matches
  the copy and checks its bytes, whatever checksum the store kept for it (SeaweedFS gives a copy a CRC32,
  not its source's CRC32C; AWS keeps the source's algorithm).
* The source is pinned by ETag during the copy and its CRC32C is taken from the source object or its
  matching manifest first: a source that was altered is refused, not copied.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .checkpoint import resolve_transport
from .errors import CheckpointCorruptedError, CheckpointNotFoundError, S3NotFoundError
from .layout import expected_crc32c, manifest_key, read_manifest, write_manifest
from .s3_dirpath_utils import parse_s3_url
from .transport import ops
from .transport.context import S3Transport
from .transport.copy import copy_object

__all__ = ["CopyStats", "copy"]

log = logging.getLogger(__name__)

COPY_OF_META = "copy_of"
"""Manifest ``meta`` key naming the source key of a copy (shown by ``ls``)."""


@dataclass(frozen=True)
class CopyStats:
    """What one checkpoint copy wrote."""

    src: str
    dst: str
    bytes: int
    seconds: float
    crc32c: int
    etag: str
    parts: int


def copy(src_url: str, dst_url: str, *, transport: S3Transport | None = None, verify: bool = True) -> CopyStats:
    """Copy the checkpoint at ``src_url`` to ``dst_url`` on the store (no download, no upload).

    A committed sharded checkpoint (``src_url/.metadata``) is copied object by object and committed last
    (:func:`s3ckpt.dcp.copy.copy_sharded`); its ``CopyStats.parts`` is then the number of objects.

    Args:
        src_url: ``s3://bucket/key`` of a committed checkpoint object or sharded checkpoint.
        dst_url: ``s3://bucket/key`` of the copy; replaced if it exists.
        transport: client and retry settings; default: built from the environment.
        verify: require a recorded CRC32C for the source (stored with it or in a matching manifest), so
            the copy can be verified on load. ``False`` copies an unverifiable source anyway (no manifest).

    Returns:
        :class:`CopyStats`.

    Raises:
        CheckpointNotFoundError: no object at ``src_url``.
        CheckpointCorruptedError: the source has no recorded checksum (``verify``), or its manifest
            describes other bytes.
        ConflictError: the source was replaced while being copied.
    """
    src_bucket, src_key = parse_s3_url(src_url, require_key=True)
    dst_bucket, dst_key = parse_s3_url(dst_url, require_key=True)
    t = resolve_transport(transport)
    start = time.perf_counter()
    try:
        info = ops.head(t, src_bucket, src_key)
    except S3NotFoundError as exc:
        if ops.exists(t, src_bucket, src_key.rstrip("/") + "/.metadata"):
            # A sharded checkpoint: every object copied on the store, committed last. Imported here: DCP
            # (torch.distributed.checkpoint) is not needed to copy single files.
            from .dcp.copy import copy_sharded

            done = copy_sharded(t, src_url, dst_url)
            return CopyStats(done.src, done.dst, done.bytes, done.seconds, 0, "", done.objects)
        raise CheckpointNotFoundError(f"cannot copy {src_url}: it does not exist") from exc
    # Read once: it may hold the CRC32C, and it holds the step and epoch `ls` shows for the copy.
    found = read_manifest(t, src_bucket, src_key)
    crc, where = expected_crc32c(t, info, manifest=found)
    if crc is None and verify:
        raise CheckpointCorruptedError(f"cannot copy {src_url} verifiably: {where}")
    result = copy_object(t, src_bucket, src_key, dst_bucket, dst_key, source=info)
    if crc is not None:
        meta: dict[str, object] = dict(found.meta) if found is not None else {}
        meta[COPY_OF_META] = src_key
        # The same bytes, so the same zip records: a copy (last.ckpt of save_last="link") is a base for the
        # next incremental save like its source.
        records = found.records if found is not None else ()
        transfer = {"uploaded": 0, "copied": result.size, "base": src_url}
        write_manifest(t, result.as_upload(crc), meta, records=records, transfer=transfer)
    else:
        # No digest to carry: drop a stale manifest of an earlier object at dst, which would now mismatch.
        ops.delete_object(t, dst_bucket, manifest_key(dst_key))
    seconds = time.perf_counter() - start
    log.debug("copied %s -> %s (%d bytes) in %.2f s", src_url, dst_url, result.size, seconds)
    return CopyStats(src_url, dst_url, result.size, seconds, crc or 0, result.etag, result.parts)

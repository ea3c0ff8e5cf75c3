"""Server-side copy of one object: no byte passes through the client.

``CopyObject`` for objects up to 5 GiB (S3's limit for a single copy), ``UploadPartCopy`` of ranges in
parallel beyond, completed like any multipart upload and aborted on any failure. The source is pinned by its
ETag (``CopySourceIfMatch``): if another writer replaces the source between the HEAD and the copy, the store
answers 412 and the copy fails (:class:`~s3ckpt.errors.ConflictError`) instead of copying other bytes than
the ones the caller's checksum describes.

The copy gets fresh user metadata (``MetadataDirective=REPLACE``) with a nonce of its own, so a manifest
written for the copy names the copy, not its source. Which checksum a store keeps for a copy differs:
AWS recomputes the source's algorithm on request; SeaweedFS gives a copy a CRC32 whatever the source had.
The caller records the source's CRC32C in the copy's manifest (the bytes are the same), see
:func:`s3ckpt.checkpoint_copy.copy`.
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..config import MAX_PART_SIZE, MAX_PARTS, MiB
from ..errors import ConflictError, S3CheckpointError
from . import ops
from .context import S3Transport
from .ops import ObjectInfo
from .upload import NONCE_META, UploadResult

__all__ = ["COPY_PART_SIZE", "MAX_COPY_OBJECT_SIZE", "CopyResult", "copy_object"]

log = logging.getLogger(__name__)

# S3: CopyObject copies at most 5 GiB; larger objects must be copied part by part (UploadPartCopy).
MAX_COPY_OBJECT_SIZE = 5 * 1024 * MiB
# Ranges of a multipart copy: large, since no byte crosses the client; each is one request the store runs.
COPY_PART_SIZE = 1024 * MiB


@dataclass(frozen=True)
class CopyResult:
    """What a finished copy wrote."""

    bucket: str
    key: str
    size: int
    etag: str
    """The copy's own ETag (a multipart copy has a multipart ETag, unlike its source)."""
    nonce: str
    """The ``s3ckpt-nonce`` metadata of the copy (fresh, not the source's)."""
    source: ObjectInfo
    """The source as HEADed before the copy; its ETag was pinned with ``CopySourceIfMatch``."""
    parts: int
    """0 for a single CopyObject, else the number of UploadPartCopy parts."""

    def as_upload(self, crc32c: int) -> UploadResult:
        """The copy as an upload of the same bytes, whose CRC32C (the source's) the caller knows: what
        :func:`s3ckpt.layout.write_manifest` records."""
        return UploadResult(self.bucket, self.key, self.size, self.etag, crc32c, self.parts, self.nonce)


def copy_object(
    t: S3Transport,
    src_bucket: str,
    src_key: str,
    dst_bucket: str,
    dst_key: str,
    *,
    source: ObjectInfo | None = None,
    metadata: dict[str, str] | None = None,
    multipart_threshold: int = MAX_COPY_OBJECT_SIZE,
    part_size: int = COPY_PART_SIZE,
) -> CopyResult:
    """Copy ``s3://src_bucket/src_key`` to ``s3://dst_bucket/dst_key`` on the store.

    Args:
        t: transport (retry policy; ``max_write_concurrency`` parts in flight for a multipart copy).
        source: the source's HEAD, if the caller has it; its ETag is the one pinned. Default: HEAD it now.
        metadata: user metadata for the copy (a fresh ``s3ckpt-nonce`` is added).
        multipart_threshold: objects larger than this are copied with UploadPartCopy (at most 5 GiB).
        part_size: range of each UploadPartCopy (raised so that at most 10,000 parts are needed).

    Returns:
        :class:`CopyResult` with the copy's ETag and nonce.

    Raises:
        S3NotFoundError: the source does not exist.
        ConflictError: the source changed (its ETag no longer matches) while being copied.
        S3CheckpointError: any other failure; a multipart copy is aborted first.
    """
    info = source if source is not None else ops.head(t, src_bucket, src_key)
    nonce = uuid.uuid4().hex
    meta = {**(metadata or {}), NONCE_META: nonce}
    copy_source = {"Bucket": src_bucket, "Key": src_key}
    threshold = min(multipart_threshold, MAX_COPY_OBJECT_SIZE)
    where = f"s3://{src_bucket}/{src_key} -> s3://{dst_bucket}/{dst_key}"
    if info.size <= threshold:
        kwargs: dict[str, Any] = {
            "Bucket": dst_bucket,
            "Key": dst_key,
            "CopySource": copy_source,
            "CopySourceIfMatch": info.etag,
            "MetadataDirective": "REPLACE",
            "Metadata": meta,
        }
        if t.clients.config.checksum_algorithm == "CRC32C":
            # Ask for a CRC32C of the copy: stores differ in what a copy keeps by default (moto keeps none
            # unless asked, SeaweedFS and AWS the source's), and a single CopyObject's is full-object.
            kwargs["ChecksumAlgorithm"] = "CRC32C"
        try:
            resp = t.call("CopyObject", dst_bucket, dst_key, lambda c: c.copy_object(**kwargs))
        except ConflictError as exc:
            raise ConflictError(f"copy {where}: the source changed during the copy (ETag {info.etag})") from exc
        etag = _etag_of_copy(t, dst_bucket, dst_key, nonce, where)
        log.debug("copied %s (%d bytes) with CopyObject (%s)", where, info.size, resp.get("CopyObjectResult"))
        return CopyResult(dst_bucket, dst_key, info.size, etag, nonce, info, 0)
    return _multipart_copy(t, info, dst_bucket, dst_key, meta, nonce, part_size, where)


def _multipart_copy(
    t: S3Transport,
    info: ObjectInfo,
    dst_bucket: str,
    dst_key: str,
    meta: dict[str, str],
    nonce: str,
    part_size: int,
    where: str,
) -> CopyResult:
    part = max(5 * MiB, part_size, -(-info.size // MAX_PARTS))
    part = min(part, MAX_PART_SIZE)
    ranges = [(start, min(start + part, info.size) - 1) for start in range(0, info.size, part)]
    resp = t.call(
        "CreateMultipartUpload",
        dst_bucket,
        dst_key,
        lambda c: c.create_multipart_upload(Bucket=dst_bucket, Key=dst_key, Metadata=meta),
    )
    upload_id = str(resp["UploadId"])
    failed: list[BaseException] = []

    def copy_part(number: int, first: int, last: int) -> dict[str, Any]:
        if failed:  # another part failed: do not start more work that will be aborted
            raise S3CheckpointError(f"copy {where}: cancelled after another part failed")
        kwargs = {
            "Bucket": dst_bucket,
            "Key": dst_key,
            "UploadId": upload_id,
            "PartNumber": number,
            "CopySource": {"Bucket": info.bucket, "Key": info.key},
            "CopySourceIfMatch": info.etag,
            "CopySourceRange": f"bytes={first}-{last}",
        }
        try:
            out = t.call("UploadPartCopy", dst_bucket, dst_key, lambda c: c.upload_part_copy(**kwargs))
        except BaseException as exc:
            failed.append(exc)
            raise
        return {"PartNumber": number, "ETag": out["CopyPartResult"]["ETag"]}

    try:
        with ThreadPoolExecutor(max(1, t.transfer.max_write_concurrency), thread_name_prefix="s3ckpt-copy") as pool:
            futures = [pool.submit(copy_part, i + 1, a, b) for i, (a, b) in enumerate(ranges)]
            parts = [f.result() for f in futures]
        done = t.call(
            "CompleteMultipartUpload",
            dst_bucket,
            dst_key,
            lambda c: c.complete_multipart_upload(
                Bucket=dst_bucket, Key=dst_key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            ),
        )
    except BaseException as exc:
        try:
            ops.abort_upload(t, dst_bucket, dst_key, upload_id)
        except S3CheckpointError as abort_exc:
            log.warning("could not abort the multipart copy %s of %s: %s", upload_id, where, abort_exc)
        if isinstance(exc, ConflictError):
            raise ConflictError(f"copy {where}: the source changed during the copy (ETag {info.etag})") from exc
        raise
    del done
    etag = _etag_of_copy(t, dst_bucket, dst_key, nonce, where)
    log.debug("copied %s (%d bytes) in %d UploadPartCopy parts", where, info.size, len(ranges))
    return CopyResult(dst_bucket, dst_key, info.size, etag, nonce, info, len(ranges))


def _etag_of_copy(t: S3Transport, bucket: str, key: str, nonce: str, where: str) -> str:
    """The copy's ETag exactly as HEAD reports it (what a manifest is compared with on load).

    The copy response's ETag is not enough: stores differ in quoting it (SeaweedFS answers CopyObject with an
    unquoted ETag, HEAD with a quoted one). The nonce check catches a concurrent writer of the same key.
    """
    info = ops.head(t, bucket, key)
    if info.metadata.get(NONCE_META) != nonce:
        raise ConflictError(f"copy {where}: another writer replaced the copy right after it was made")
    return info.etag

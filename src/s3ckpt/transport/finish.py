"""The last request of an upload: one PUT for a small object, or CompleteMultipartUpload, each able to tell
"my request succeeded but its response was lost" from "another writer's object is there" by the nonce.

A retried request whose first attempt did land gets an answer meant for a second writer: 412 for a
conditional write, NoSuchUpload (MinIO) for a Complete already done. The object is then HEADed: our nonce in
its metadata and our size mean the write was ours.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import ConflictError, S3NotFoundError
from . import ops
from .context import S3Transport

__all__ = ["NONCE_META", "complete_upload", "confirm_ours", "last_part_body", "put_whole"]

log = logging.getLogger(__name__)

# User metadata stamped on every object we write. After a lost CompleteMultipartUpload response the key
# is HEADed and this nonce tells "my upload completed" from "another writer's object is there".
NONCE_META = "s3ckpt-nonce"


def confirm_ours(t: S3Transport, bucket: str, key: str, nonce: str, size: int) -> str | None:
    """The ETag of ``s3://bucket/key`` if it is the object written with ``nonce`` (and ``size`` bytes)."""
    try:
        info = ops.head(t, bucket, key)
    except S3NotFoundError:
        return None
    if info.metadata.get(NONCE_META) == nonce and info.size == size:
        return info.etag
    return None


def _taken(bucket: str, key: str) -> ConflictError:
    return ConflictError(f"s3://{bucket}/{key} already exists (written by another writer)")


def put_whole(
    t: S3Transport,
    bucket: str,
    key: str,
    data: bytes,
    *,
    metadata: dict[str, str],
    if_none_match: bool,
    crc32c: int,
) -> str:
    """PUT an object smaller than one part (``metadata`` carries its nonce). Returns the ETag."""
    try:
        return ops.put_bytes(t, bucket, key, data, metadata=metadata, if_none_match=if_none_match, crc32c=crc32c)
    except ConflictError as exc:
        # A conditional PUT retried after its response was lost gets 412 from our own object.
        confirmed = confirm_ours(t, bucket, key, metadata[NONCE_META], len(data))
        if confirmed is None:
            raise _taken(bucket, key) from exc
        log.info("PutObject s3://%s/%s: response was lost, object confirmed", bucket, key)
        return confirmed


def complete_upload(
    t: S3Transport,
    bucket: str,
    key: str,
    upload_id: str,
    parts: list[dict[str, Any]],
    *,
    crc32c: int | None,
    if_none_match: bool,
    nonce: str,
    size: int,
) -> str:
    """CompleteMultipartUpload, with the full-object CRC32C when given. Returns the ETag."""
    kwargs: dict[str, Any] = {
        "Bucket": bucket,
        "Key": key,
        "UploadId": upload_id,
        "MultipartUpload": {"Parts": parts},
    }
    if crc32c is not None:
        kwargs["ChecksumCRC32C"] = ops.crc32c_b64(crc32c)
        kwargs["ChecksumType"] = "FULL_OBJECT"
    if if_none_match:
        kwargs["IfNoneMatch"] = "*"
    attempts = 0

    def complete(c: Any) -> dict[str, Any]:
        nonlocal attempts
        attempts += 1
        return dict(c.complete_multipart_upload(**kwargs))

    try:
        resp = t.call("CompleteMultipartUpload", bucket, key, complete)
    except (S3NotFoundError, ConflictError) as exc:
        # A retried Complete whose first response was lost: the store may answer NoSuchUpload (MinIO) or
        # 412 (a conditional retry on SeaweedFS) although our object is in place. Decide by the nonce.
        if attempts > 1:
            etag = confirm_ours(t, bucket, key, nonce, size)
            if etag is not None:
                log.info("CompleteMultipartUpload s3://%s/%s: response was lost, object confirmed", bucket, key)
                return etag
        if isinstance(exc, ConflictError):
            raise _taken(bucket, key) from exc
        raise
    return str(resp.get("ETag", ""))


def last_part_body(buf: bytearray, n: int) -> bytes | bytearray:
    """The last part's body: its buffer cut in place to ``n`` bytes, not a copy of up to a part beside it."""
    try:
        del buf[n:]
        return buf
    except BufferError:  # a view of it is still alive somewhere
        return memoryview(buf)[:n].tobytes()

"""Metadata and small-object operations: head, list, exists, delete (one, many, a prefix), small puts and gets,
and multipart-upload housekeeping. Every call goes through the retry policy."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import crc32c as _crc32c

from ..errors import S3CheckpointError, S3NotFoundError, S3TransferError
from .checksums import ALGORITHMS, b64
from .context import S3Transport
from .records import ListedObject, ObjectInfo, PartInfo, PendingUpload

__all__ = [
    "ListedObject",
    "ObjectInfo",
    "PartInfo",
    "PendingUpload",
    "abort_upload",
    "check_bucket",
    "crc32c_b64",
    "delete_object",
    "delete_objects",
    "delete_prefix",
    "exists",
    "get_bytes",
    "head",
    "list_dir",
    "list_objects",
    "list_prefixes",
    "list_uploads",
    "object_parts",
    "put_bytes",
]

# DeleteObjects takes at most 1,000 keys per request (S3 and SeaweedFS alike).
DELETE_BATCH = 1000


def crc32c_b64(value: int) -> str:
    """S3's wire form of a CRC32C: the 4 big-endian bytes, base64-encoded."""
    return b64(value.to_bytes(4, "big"))


def head(t: S3Transport, bucket: str, key: str) -> ObjectInfo:
    """HEAD one object, asking for its stored checksum.

    Raises:
        S3NotFoundError: if the object (or bucket) does not exist.
    """
    resp = t.call("HeadObject", bucket, key, lambda c: c.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED"))
    checksums = _checksums_in(resp)
    kind = resp.get("ChecksumType")
    if checksums and kind not in ("FULL_OBJECT", "COMPOSITE"):
        kind = "COMPOSITE" if any("-" in v for v in checksums.values()) else "FULL_OBJECT"
    crc = checksums.get("CRC32C")
    # A COMPOSITE checksum ("<b64>-<parts>") is a checksum of part checksums, not of the object.
    if crc and (kind == "COMPOSITE" or "-" in crc):
        crc = None
    return ObjectInfo(
        bucket=bucket,
        key=key,
        size=int(resp["ContentLength"]),
        etag=str(resp["ETag"]),
        last_modified=resp.get("LastModified"),
        metadata=dict(resp.get("Metadata") or {}),
        checksum_crc32c=crc,
        checksums=checksums,
        checksum_type=kind if checksums else None,
    )


# Parts of a composite checksum looked up one HEAD each where GetObjectAttributes is missing: beyond this,
# the object is reported unverifiable rather than paying thousands of requests.
_MAX_PART_HEADS = 1000


def object_parts(t: S3Transport, info: ObjectInfo, parts: int) -> list[PartInfo] | None:
    """The parts of a multipart object (sizes and per-part checksums), in order: from GetObjectAttributes
    (``ObjectParts``), else one ``HEAD ?partNumber=N`` per part. None if the store tells neither.

    Args:
        parts: the part count (from the composite checksum's ``-<parts>`` suffix).
    """
    bucket, key = info.bucket, info.key
    found: list[PartInfo] = []
    marker = 0
    try:
        while True:
            kwargs: dict[str, Any] = {
                "Bucket": bucket,
                "Key": key,
                "ObjectAttributes": ["ObjectParts"],
                "MaxParts": 1000,
                "PartNumberMarker": marker,
            }
            resp = t.call("GetObjectAttributes", bucket, key, partial(_object_attributes, kwargs))
            page = resp.get("ObjectParts") or {}
            for p in page.get("Parts") or []:
                found.append(PartInfo(int(p["PartNumber"]), int(p["Size"]), _checksums_in(p)))
            if not page.get("IsTruncated") or not page.get("NextPartNumberMarker"):
                break
            marker = int(page["NextPartNumberMarker"])
    except S3NotFoundError:
        raise
    except S3CheckpointError:
        found = []  # the store has no GetObjectAttributes: ask for each part below
    if len(found) == parts and sum(p.size for p in found) == info.size:
        return sorted(found, key=lambda p: p.number)
    if parts > _MAX_PART_HEADS:
        return None
    found = []
    for n in range(1, parts + 1):
        resp = t.call("HeadObject", bucket, key, partial(_head_part, bucket, key, n, info.etag))
        found.append(PartInfo(n, int(resp["ContentLength"]), _checksums_in(resp)))
    return found if sum(p.size for p in found) == info.size else None


def _checksums_in(resp: dict[str, Any]) -> dict[str, str]:
    """The ``Checksum<ALGORITHM>`` fields of a response (HEAD, or one part of GetObjectAttributes)."""
    return {alg: str(resp[f"Checksum{alg}"]) for alg in ALGORITHMS if resp.get(f"Checksum{alg}")}


def _object_attributes(kwargs: dict[str, Any], c: Any) -> dict[str, Any]:
    return dict(c.get_object_attributes(**kwargs))


def _head_part(bucket: str, key: str, number: int, etag: str, c: Any) -> dict[str, Any]:
    resp = c.head_object(Bucket=bucket, Key=key, PartNumber=number, IfMatch=etag, ChecksumMode="ENABLED")
    return dict(resp)


def check_bucket(t: S3Transport, bucket: str) -> None:
    """Raise :class:`S3NotFoundError` naming the bucket if it does not exist (HEAD answers a bare 404,
    which alone cannot tell a missing bucket from a missing key)."""
    try:
        t.call("HeadBucket", bucket, None, lambda c: c.head_bucket(Bucket=bucket))
    except S3NotFoundError as exc:
        raise S3NotFoundError(
            f"bucket {bucket!r} does not exist on {t.retrier.endpoint}; create it or fix the URL"
        ) from exc


def exists(t: S3Transport, bucket: str, key: str) -> bool:
    """True if the object exists. A missing bucket raises, so a typo is not read as "no checkpoint"."""
    try:
        head(t, bucket, key)
    except S3NotFoundError:
        check_bucket(t, bucket)
        return False
    return True


def _list_v2(kwargs: dict[str, Any], c: Any) -> dict[str, Any]:
    return dict(c.list_objects_v2(**kwargs))


def _list_uploads(kwargs: dict[str, Any], c: Any) -> dict[str, Any]:
    return dict(c.list_multipart_uploads(**kwargs))


def _pages(
    t: S3Transport, bucket: str, prefix: str, delimiter: str | None, max_keys: int | None
) -> Iterator[dict[str, Any]]:
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if token:
            kwargs["ContinuationToken"] = token
        if max_keys:
            kwargs["MaxKeys"] = max_keys
        page: dict[str, Any] = t.call("ListObjectsV2", bucket, prefix, partial(_list_v2, kwargs))
        yield page
        if not page.get("IsTruncated") or max_keys:
            return
        token = page.get("NextContinuationToken")
        if not token:
            return


def _listed(item: dict[str, Any]) -> ListedObject:
    return ListedObject(
        key=str(item["Key"]),
        size=int(item.get("Size", 0)),
        etag=str(item.get("ETag", "")),
        last_modified=item.get("LastModified"),
    )


def list_objects(
    t: S3Transport,
    bucket: str,
    prefix: str = "",
    *,
    delimiter: str | None = None,
    max_keys: int | None = None,
) -> Iterator[ListedObject]:
    """Every object under ``prefix`` (all pages), in the store's order. With ``delimiter``, only the
    objects directly under the prefix; see :func:`list_dir` for the sub-prefixes too."""
    for page in _pages(t, bucket, prefix, delimiter, max_keys):
        for item in page.get("Contents", []) or []:
            yield _listed(item)


def list_dir(
    t: S3Transport, bucket: str, prefix: str = "", delimiter: str = "/"
) -> tuple[list[ListedObject], list[str]]:
    """The objects and the sub-prefixes ("directories") directly under ``prefix``, from one listing (a
    ListObjectsV2 page carries both)."""
    objects: list[ListedObject] = []
    prefixes: list[str] = []
    for page in _pages(t, bucket, prefix, delimiter, None):
        objects.extend(_listed(item) for item in page.get("Contents", []) or [])
        prefixes.extend(str(p["Prefix"]) for p in page.get("CommonPrefixes", []) or [])
    return objects, prefixes


def list_prefixes(t: S3Transport, bucket: str, prefix: str = "", delimiter: str = "/") -> list[str]:
    """The sub-prefixes ("directories") directly under ``prefix``."""
    return list_dir(t, bucket, prefix, delimiter)[1]


def delete_object(t: S3Transport, bucket: str, key: str) -> None:
    """Delete one object; deleting a missing key is not an error (S3 semantics)."""
    t.call("DeleteObject", bucket, key, lambda c: c.delete_object(Bucket=bucket, Key=key))


def delete_objects(t: S3Transport, bucket: str, keys: Iterable[str]) -> int:
    """Delete many keys, 1,000 per request. Returns how many were deleted.

    Raises:
        S3TransferError: naming the keys the store refused to delete.
    """
    batch: list[str] = []
    count = 0

    def flush() -> None:
        nonlocal count
        objs = [{"Key": k} for k in batch]
        resp = t.call(
            "DeleteObjects",
            bucket,
            batch[0],
            lambda c: c.delete_objects(Bucket=bucket, Delete={"Objects": objs, "Quiet": True}),
        )
        errors = resp.get("Errors") or []
        if errors:
            first = errors[0]
            raise S3TransferError(
                f"DeleteObjects s3://{bucket}: {len(errors)} key(s) not deleted, e.g. {first.get('Key')!r}: "
                f"{first.get('Code')} {first.get('Message', '')}"
            )
        count += len(batch)
        batch.clear()

    for key in keys:
        batch.append(key)
        if len(batch) >= DELETE_BATCH:
            flush()
    if batch:
        flush()
    return count


def delete_prefix(t: S3Transport, bucket: str, prefix: str) -> int:
    """Delete every object under ``prefix``. Refuses an empty prefix (the whole bucket)."""
    if not prefix:
        raise ValueError(f"refusing to delete every object in bucket {bucket!r}: give a non-empty prefix")
    return delete_objects(t, bucket, [o.key for o in list_objects(t, bucket, prefix)])


def put_bytes(
    t: S3Transport,
    bucket: str,
    key: str,
    data: bytes,
    *,
    metadata: dict[str, str] | None = None,
    content_type: str = "application/octet-stream",
    if_none_match: bool = False,
    crc32c: int | None = None,
) -> str:
    """PUT a small object in one request (with its CRC32C unless checksums are off; pass ``crc32c`` if
    already computed). Returns the ETag."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Body": data, "ContentType": content_type}
    if metadata:
        kwargs["Metadata"] = metadata
    if t.clients.config.checksum_algorithm == "CRC32C":
        kwargs["ChecksumCRC32C"] = crc32c_b64(_crc32c.crc32c(data) if crc32c is None else crc32c)
    if if_none_match:
        kwargs["IfNoneMatch"] = "*"
    resp = t.call("PutObject", bucket, key, lambda c: c.put_object(**kwargs))
    return str(resp.get("ETag", ""))


def get_bytes(t: S3Transport, bucket: str, key: str) -> bytes:
    """GET a small object whole (manifests, markers). Large objects use ``download``."""

    def fetch(c: Any) -> bytes:
        body = c.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    return t.call("GetObject", bucket, key, fetch)


def list_uploads(t: S3Transport, bucket: str, prefix: str = "") -> list[PendingUpload]:
    """Incomplete multipart uploads under ``prefix`` (all pages)."""
    out: list[PendingUpload] = []
    key_marker: str | None = None
    id_marker: str | None = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if key_marker:
            kwargs["KeyMarker"] = key_marker
            kwargs["UploadIdMarker"] = id_marker or ""
        page: dict[str, Any] = t.call("ListMultipartUploads", bucket, prefix, partial(_list_uploads, kwargs))
        for u in page.get("Uploads", []) or []:
            out.append(PendingUpload(key=str(u["Key"]), upload_id=str(u["UploadId"]), initiated=u.get("Initiated")))
        if not page.get("IsTruncated"):
            return out
        key_marker, id_marker = page.get("NextKeyMarker"), page.get("NextUploadIdMarker")
        if not key_marker:
            return out


def abort_upload(t: S3Transport, bucket: str, key: str, upload_id: str) -> None:
    """Abort a multipart upload; an upload that is already gone counts as aborted."""
    try:
        t.call(
            "AbortMultipartUpload",
            bucket,
            key,
            lambda c: c.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id),
        )
    except S3NotFoundError:
        pass

"""The capability table in tests/backends.py (and the README's "Compatibility" table) is measured, not
assumed: each capability is probed with plain boto3 on the session's backend, and the result must match what
the table claims for it. A backend that gains or loses a feature fails here, naming it.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import crc32c
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from s3ckpt.server import LocalS3Server
from tests import backends
from tests.conftest import BACKEND

pytestmark = [pytest.mark.integration, pytest.mark.portable]

_PART = 5 * 1024 * 1024
_A, _B = b"a" * _PART, b"b" * 1024


def _b64(crc: int) -> str:
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _multipart(c: Any, bucket: str, key: str, checksum_type: str | None, **complete: Any) -> dict[str, Any]:
    """Upload ``_A + _B`` in two parts, each with its CRC32C (a CRC32C upload when ``checksum_type``)."""
    create: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if checksum_type:
        create |= {"ChecksumAlgorithm": "CRC32C", "ChecksumType": checksum_type}
    uid = c.create_multipart_upload(**create)["UploadId"]
    parts = []
    for n, data in enumerate((_A, _B), 1):
        extra = {"ChecksumCRC32C": _b64(crc32c.crc32c(data))} if checksum_type else {}
        etag = c.upload_part(Bucket=bucket, Key=key, UploadId=uid, PartNumber=n, Body=data, **extra)["ETag"]
        parts.append({"PartNumber": n, "ETag": etag, **extra})
    if checksum_type == "FULL_OBJECT":
        complete |= {"ChecksumCRC32C": _b64(crc32c.crc32c(_A + _B)), "ChecksumType": "FULL_OBJECT"}
    return dict(
        c.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=uid, MultipartUpload={"Parts": parts}, **complete)
    )


def multipart(c: Any, bucket: str) -> bool:
    _multipart(c, bucket, "mp", None)
    uid = c.create_multipart_upload(Bucket=bucket, Key="open")["UploadId"]
    listed = [u["UploadId"] for u in c.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    c.abort_multipart_upload(Bucket=bucket, Key="open", UploadId=uid)
    return c.head_object(Bucket=bucket, Key="mp")["ContentLength"] == len(_A + _B) and uid in listed


def conditional_writes(c: Any, bucket: str) -> bool:
    c.put_object(Bucket=bucket, Key="k", Body=b"1")
    refused = 0
    try:
        c.put_object(Bucket=bucket, Key="k", Body=b"2", IfNoneMatch="*")
    except ClientError as e:
        refused += _code(e) == "PreconditionFailed"
    try:
        _multipart(c, bucket, "k", None, IfNoneMatch="*")
    except ClientError as e:
        refused += _code(e) == "PreconditionFailed"
    return refused == 2 and c.get_object(Bucket=bucket, Key="k")["Body"].read() == b"1"


def if_match_reads(c: Any, bucket: str) -> bool:
    c.put_object(Bucket=bucket, Key="k", Body=b"1")
    try:
        c.get_object(Bucket=bucket, Key="k", IfMatch='"0123456789abcdef0123456789abcdef"', Range="bytes=0-0")
    except ClientError as e:
        return _code(e) == "PreconditionFailed"
    return False


def full_object_crc32c(c: Any, bucket: str) -> bool:
    try:
        _multipart(c, bucket, "full", "FULL_OBJECT")
    except ClientError:
        return False
    head = c.head_object(Bucket=bucket, Key="full", ChecksumMode="ENABLED")
    return bool(head.get("ChecksumCRC32C") == _b64(crc32c.crc32c(_A + _B)))


def composite_checksums(c: Any, bucket: str) -> bool:
    try:
        _multipart(c, bucket, "comp", "COMPOSITE")
        attrs = c.get_object_attributes(Bucket=bucket, Key="comp", ObjectAttributes=["Checksum", "ObjectParts"])
    except ClientError:
        return False
    parts = attrs.get("ObjectParts", {}).get("Parts", [])
    want = [_b64(crc32c.crc32c(d)) for d in (_A, _B)]
    return [p.get("ChecksumCRC32C") for p in parts] == want and str(attrs["Checksum"]["ChecksumCRC32C"]).endswith("-2")


def object_attributes(c: Any, bucket: str) -> bool:
    _multipart(c, bucket, "mp", None)
    try:
        attrs = c.get_object_attributes(Bucket=bucket, Key="mp", ObjectAttributes=["ObjectSize", "ObjectParts"])
    except ClientError:
        return False
    return bool(attrs.get("ObjectSize") == len(_A + _B) and attrs.get("ObjectParts", {}).get("TotalPartsCount") == 2)


def server_side_copy(c: Any, bucket: str) -> bool:
    c.put_object(Bucket=bucket, Key="src", Body=_B, ChecksumCRC32C=_b64(crc32c.crc32c(_B)))
    try:
        c.copy_object(Bucket=bucket, Key="dst", CopySource={"Bucket": bucket, "Key": "src"}, ChecksumAlgorithm="CRC32C")
    except ClientError:
        return False
    head = c.head_object(Bucket=bucket, Key="dst", ChecksumMode="ENABLED")
    return bool(head.get("ChecksumCRC32C") == _b64(crc32c.crc32c(_B)))


def checksum_validation(c: Any, bucket: str) -> bool:
    try:
        c.put_object(Bucket=bucket, Key="bad", Body=_B, ChecksumCRC32C=_b64(crc32c.crc32c(_B) ^ 1))
    except ClientError:
        return True
    return False


def conditional_copy(c: Any, bucket: str) -> bool:
    c.put_object(Bucket=bucket, Key="src", Body=_B)
    stale = {"CopySource": {"Bucket": bucket, "Key": "src"}, "CopySourceIfMatch": '"0123456789abcdef0123456789abcdef"'}
    refused = 0
    try:
        c.copy_object(Bucket=bucket, Key="dst", **stale)
    except ClientError as e:
        refused += _code(e) == "PreconditionFailed"
    uid = c.create_multipart_upload(Bucket=bucket, Key="dst")["UploadId"]
    try:
        c.upload_part_copy(Bucket=bucket, Key="dst", UploadId=uid, PartNumber=1, **stale)
    except ClientError as e:
        refused += _code(e) == "PreconditionFailed"
    c.abort_multipart_upload(Bucket=bucket, Key="dst", UploadId=uid)
    return refused == 2


PROBES: dict[str, Callable[[Any, str], bool]] = {
    "multipart": multipart,
    "conditional_writes": conditional_writes,
    "if_match_reads": if_match_reads,
    "full_object_crc32c": full_object_crc32c,
    "composite_checksums": composite_checksums,
    "object_attributes": object_attributes,
    "server_side_copy": server_side_copy,
    "checksum_validation": checksum_validation,
    "conditional_copy": conditional_copy,
}


def test_every_capability_has_a_probe() -> None:
    assert set(PROBES) == backends.ALL_CAPABILITIES


@pytest.mark.parametrize("capability", sorted(PROBES))
def test_capability_table_matches_the_backend(s3_server: LocalS3Server, bucket: str, capability: str) -> None:
    # Checksums only when asked for: the probes send exactly the headers they mean to. No retries: a refusal
    # (SeaweedFS answers a bad checksum by closing the connection) is the answer.
    c = s3_server.client(config=Config(request_checksum_calculation="when_required", retries={"total_max_attempts": 1}))
    claimed = capability in backends.capabilities(BACKEND)
    measured = PROBES[capability](c, bucket)
    assert measured == claimed, (
        f"{BACKEND} {'has' if measured else 'lacks'} {capability} ({backends.CAPABILITIES[capability]}), "
        f"but tests/backends.py says it {'has' if claimed else 'lacks'} it"
    )

"""The server's own limit: a multipart PUT and a parallel ranged GET with no torch and no serialization.

boto3's low-level client with the cheapest settings botocore has: no SHA-256 of the payload (plain http would
otherwise sign every body), no CRC request checksums, no response validation. The PUT sends the same 16 MiB
random block as every part (no per-part copy or generation); the GET writes every range straight into one
preallocated buffer with ``readinto``, 1 MiB at a time (urllib3's ``readinto`` reads into a temporary
buffer of the requested size first: one call per 16 MiB range would hold 16 MiB per thread extra).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["multipart_put", "ranged_get"]

MiB = 1024 * 1024


def multipart_put(client: Any, spec: dict[str, Any], nbytes: int) -> None:
    """Upload ``nbytes`` to ``spec['bucket']/spec['key']`` in parts of ``part_size_MB`` at ``concurrency``."""
    s = spec["settings"]
    part = s.get("part_size_MB", 16) * MiB
    block = os.urandom(part)
    bucket, key = spec["bucket"], spec["key"]
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    sizes = [min(part, nbytes - start) for start in range(0, nbytes, part)]

    def put(i: int) -> dict[str, Any]:
        body = block if sizes[i] == part else block[: sizes[i]]
        resp = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=i + 1, Body=body)
        return {"PartNumber": i + 1, "ETag": resp["ETag"]}

    try:
        with ThreadPoolExecutor(s.get("concurrency", 8)) as pool:
            parts = list(pool.map(put, range(len(sizes))))
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
    except BaseException:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise


def ranged_get(client: Any, spec: dict[str, Any]) -> bytearray:
    """Download the object with ranged GETs of ``part_size_MB`` at ``concurrency`` into one buffer."""
    s = spec["settings"]
    part = s.get("part_size_MB", 16) * MiB
    bucket, key = spec["bucket"], spec["key"]
    size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
    buf = bytearray(size)
    view = memoryview(buf)

    def get(start: int) -> None:
        end = min(start + part, size)
        body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")["Body"]
        got = 0
        while got < end - start:
            n = body.readinto(view[start + got : min(end, start + got + MiB)])
            if not n:
                raise OSError(f"short read at {start + got}")
            got += n
        body.close()

    with ThreadPoolExecutor(s.get("concurrency", 8)) as pool:
        list(pool.map(get, range(0, size, part)))
    return buf

"""The embedded SeaweedFS server, tuned for the benchmark, and its housekeeping between measurements.

On this kind of machine the store's CPU is the write ceiling (about 10 server CPU-seconds per GB written,
half of it MD5, which no flag turns off), and the client shares the same cores. The flags below are those that
cut the server's work per request; none changed its CPU per byte measurably, so the write ceiling is weed's
own. :data:`INVESTIGATED` records the others looked at and why they are not used. Every run also measures a
raw PUT against a server with s3ckpt's default flags and reports it beside the tuned one.
"""

from __future__ import annotations

import contextlib
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from s3ckpt.server import LocalS3Server, ServerFlags

__all__ = ["INVESTIGATED", "TUNED_FLAGS", "empty_bucket", "start_server", "vacuum", "warm_up"]

MiB = 1024 * 1024

# (flag, why). Applied on top of s3ckpt's own ServerFlags (telemetry off, 1024 MB volumes, no preallocation,
# no WebDAV/Iceberg/Lance listeners, volume.max=1000, preStopSeconds=0), which already suit a benchmark.
TUNED_FLAGS: list[tuple[str, str]] = [
    (
        "-filer.maxMB=64",
        "the S3 gateway splits every upload (and every part) into chunks of filer.maxMB, default 4 MiB: a 16 MiB "
        "part becomes 4 volume writes, each with its own needle, index entry and lookup. 64 keeps a part of up "
        "to 64 MiB in one chunk: 4x fewer chunks and volume requests. Measured (3 A/B pairs, 512 MiB raw PUT, "
        "loaded machine): server CPU 9.76 vs 9.83 s/GB, within noise: the per-byte work (MD5, copies) dominates",
    ),
    (
        "-volume.index=memory",
        "the needle index as an in-memory map (also weed's default; pinned so a changed default cannot slow "
        "the benchmark down with leveldb writes)",
    ),
    (
        "-master.defaultReplication=000",
        "one copy: the single volume server cannot hold replicas anyway; pinned so nothing tries to grow some",
    ),
]

# Looked at and left alone, with what was measured or why it cannot help.
INVESTIGATED: list[dict[str, str]] = [
    {
        "flag": "GOGC=200 / GOGC=400 (environment)",
        "finding": "server CPU per GB written within noise (GOGC=400: 10.4 vs 10.1 s/GB over 3 A/B pairs), "
        "weed RSS +1 GiB (200) to +2.5 GiB (400): not used",
    },
    {"flag": "-s3.cacheCapacityMB=0", "finding": "no measurable effect on PUT or GET (GET chunk cache)"},
    {
        "flag": "-filer.saveToFilerLimit",
        "finding": "only objects below the limit go to the filer store: no effect on 8-64 MiB parts",
    },
    {"flag": "-volume.fileSizeLimitMB", "finding": "a cap (default 256 MiB), above the 64 MiB chunks; no effect"},
    {"flag": "-master.volumeSizeLimitMB", "finding": "already 1024 in s3ckpt's ServerFlags: fewer volume growths"},
    {"flag": "-s3.concurrentUploadLimitMB / -filer.concurrentUploadLimitMB", "finding": "default 0 = unlimited"},
    {
        "flag": "MD5 / ETag computation",
        "finding": "no flag or setting turns it off in weed 4.48 (about half of the server's CPU per byte written: "
        "a CPU profile, weed -cpuprofile, shows crypto/md5 over every byte four times: the S3 gateway's ETag, the "
        "filer's object and chunk MD5s, and the volume server's needle)",
    },
    {
        "flag": "Content-Type of the upload (client side)",
        "finding": "none, octet-stream, zip, x-pytorch: server CPU per GB within noise (10.4-11.8), so weed does "
        "not spend it guessing whether to compress",
    },
    {
        "flag": "a part size just under 16 MiB (client side)",
        "finding": "weed reads each part into a growing buffer, which doubles once more when a part fills it "
        "exactly; 9 alternating 512 MiB saves each: server CPU 5.24 s with 16 MiB - 4 KiB parts, 5.31 s with "
        "16 MiB, within noise",
    },
    {
        "flag": "the client's x-amz-checksum-crc32c on every part (client side)",
        "finding": "6 A/B pairs of 512 MiB saves: server CPU 5.24 s with it, 5.17 s without (1 %); kept",
    },
]


def tuned_flags() -> list[str]:
    """The flags of :data:`TUNED_FLAGS`, as arguments."""
    return [flag for flag, _ in TUNED_FLAGS]


@contextlib.contextmanager
def start_server(data_dir: Path, *, tuned: bool = True) -> Iterator[LocalS3Server]:
    """A running server in ``data_dir``: tuned, or with s3ckpt's default flags only."""
    server = LocalS3Server(data_dir=data_dir, flags=ServerFlags(), extra_flags=tuned_flags() if tuned else ())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def warm_up(server: LocalS3Server, bucket: str) -> None:
    """Create ``bucket`` and write into it once, so the first measurement does not pay for volume growth."""
    server.create_bucket(bucket)
    client = server.client()
    block = os.urandom(8 * MiB)
    upload = client.create_multipart_upload(Bucket=bucket, Key="warm-up")["UploadId"]
    parts = []
    for n in (1, 2):
        etag = client.upload_part(Bucket=bucket, Key="warm-up", UploadId=upload, PartNumber=n, Body=block)["ETag"]
        parts.append({"PartNumber": n, "ETag": etag})
    client.complete_multipart_upload(Bucket=bucket, Key="warm-up", UploadId=upload, MultipartUpload={"Parts": parts})
    client.get_object(Bucket=bucket, Key="warm-up")["Body"].read()
    empty_bucket(server, bucket)


def empty_bucket(server: LocalS3Server, bucket: str) -> int:
    """Delete every object (and abort every pending upload) in ``bucket``; return how many objects."""
    client = server.client()
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", []) or []]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            count += len(keys)
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) or []:
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    return count


def vacuum(server: LocalS3Server, timeout_s: float = 120) -> None:
    """Compact volumes so deleted checkpoints free their disk (weed frees space only on vacuum)."""
    url = f"http://127.0.0.1:{server.ports['master']}/vol/vacuum?garbageThreshold=0.0001"
    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=timeout_s) as resp:
        resp.read()


def server_info(server: LocalS3Server, tuned: bool) -> dict[str, Any]:
    """What the JSON records about the server: its flags and the reasons."""
    return {
        "command_flags": ServerFlags().args() + (tuned_flags() if tuned else []),
        "tuned_flags": [{"flag": f, "why": why} for f, why in TUNED_FLAGS] if tuned else [],
        "investigated": INVESTIGATED,
    }

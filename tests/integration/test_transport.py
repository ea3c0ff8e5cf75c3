"""The transfer layer against the real embedded SeaweedFS server: byte-exact round trips at the part
boundaries, abort on failure, listing and deletion, and the upload's bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from s3ckpt.config import MiB, RetryConfig, TransferConfig
from s3ckpt.errors import S3NotFoundError, S3TransferError
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import MultipartWriter, S3Transport, download_into, ops
from s3ckpt.transport.download import ObjectChangedError
from tests.conftest import client_config_for

# portable: make test also runs these on moto (tests/backends.py).
pytestmark = [pytest.mark.integration, pytest.mark.portable]

PART = 5 * MiB
SIZES = [0, 1, PART - 1, PART, PART + 1, int(3.5 * PART)]


def _transport(server: LocalS3Server, chunk_mb: int, write_c: int, read_c: int, read_mb: int = 5) -> S3Transport:
    return S3Transport.create(
        client=client_config_for(server),
        retry=RetryConfig(max_attempts=3, base_delay_s=0.05, deadline_s=20),
        transfer=TransferConfig(
            chunk_size_MB=chunk_mb,
            max_write_concurrency=write_c,
            max_read_concurrency=read_c,
            read_chunk_size_MB=read_mb,
        ),
    )


def _roundtrip(t: S3Transport, bucket: str, key: str, data: bytes, write_piece: int) -> bytes:
    with MultipartWriter(t, bucket, key) as w:
        for i in range(0, len(data), write_piece):
            w.write(data[i : i + write_piece])
    assert w.result.size == len(data)
    info = ops.head(t, bucket, key)
    assert info.size == len(data)
    out = bytearray(info.size)
    download_into(t, info, memoryview(out))
    return bytes(out)


@pytest.mark.parametrize(
    ("chunk_mb", "write_c", "read_c", "read_mb"),
    [(5, 1, 1, 5), (5, 4, 8, 1), (6, 2, 3, 7)],
)
def test_roundtrip_part_boundaries(
    s3_server: LocalS3Server, bucket: str, chunk_mb: int, write_c: int, read_c: int, read_mb: int
) -> None:
    t = _transport(s3_server, chunk_mb, write_c, read_c, read_mb)
    part = chunk_mb * MiB
    for size in sorted({0, 1, part - 1, part, part + 1, int(3.5 * part)}):
        data = os.urandom(size)
        # Odd write sizes make part boundaries fall inside writes.
        got = _roundtrip(t, bucket, f"obj-{chunk_mb}-{size}", data, write_piece=1_234_567)
        assert got == data, f"mismatch at size {size}"
    assert ops.list_uploads(t, bucket) == []


def test_roundtrip_200mib_single_large_write(transport: S3Transport, bucket: str) -> None:
    data = os.urandom(200 * MiB)
    got = _roundtrip(transport, bucket, "big/object.bin", data, write_piece=len(data))
    assert got == data
    info = ops.head(transport, bucket, "big/object.bin")
    assert info.checksum_crc32c is not None, "the store should keep the full-object CRC32C"


def test_object_invisible_until_complete_and_abort_leaves_nothing(transport: S3Transport, bucket: str) -> None:
    w = MultipartWriter(transport, bucket, "ckpt/partial.bin")
    w.write(os.urandom(3 * PART))  # three parts sent, upload open
    w._drain()  # let the parts land before looking
    assert len(ops.list_uploads(transport, bucket)) == 1
    assert not ops.exists(transport, bucket, "ckpt/partial.bin"), "an unfinished upload must be invisible"
    w.abort()
    assert ops.list_uploads(transport, bucket) == []
    assert not ops.exists(transport, bucket, "ckpt/partial.bin")


def test_exception_inside_writer_aborts(transport: S3Transport, bucket: str) -> None:
    with pytest.raises(RuntimeError, match="serializer blew up"), MultipartWriter(transport, bucket, "x.bin") as w:
        w.write(os.urandom(2 * PART + 10))
        raise RuntimeError("serializer blew up")
    assert ops.list_uploads(transport, bucket) == []
    assert not ops.exists(transport, bucket, "x.bin")


def test_failed_upload_keeps_previous_object(transport: S3Transport, bucket: str) -> None:
    old = os.urandom(PART + 3)
    _roundtrip(transport, bucket, "keep.bin", old, write_piece=len(old))
    with pytest.raises(ValueError), MultipartWriter(transport, bucket, "keep.bin") as w:
        w.write(os.urandom(2 * PART))
        raise ValueError("crash mid-save")
    info = ops.head(transport, bucket, "keep.bin")
    out = bytearray(info.size)
    download_into(transport, info, memoryview(out))
    assert bytes(out) == old


def test_list_delete_and_prefix(transport: S3Transport, bucket: str) -> None:
    keys = [f"run/step-{i:03d}.ckpt" for i in range(7)] + ["run/sub/a", "other/b"]
    for k in keys:
        ops.put_bytes(transport, bucket, k, k.encode())
    listed = sorted(o.key for o in ops.list_objects(transport, bucket, "run/"))
    assert listed == sorted(k for k in keys if k.startswith("run/"))
    direct = sorted(o.key for o in ops.list_objects(transport, bucket, "run/", delimiter="/"))
    assert "run/sub/a" not in direct and len(direct) == 7
    assert ops.list_prefixes(transport, bucket, "run/") == ["run/sub/"]
    assert ops.get_bytes(transport, bucket, "other/b") == b"other/b"
    assert ops.delete_prefix(transport, bucket, "run/") == 8
    assert [o.key for o in ops.list_objects(transport, bucket)] == ["other/b"]
    ops.delete_object(transport, bucket, "other/b")
    ops.delete_object(transport, bucket, "other/b")  # deleting a missing key is fine
    assert not ops.exists(transport, bucket, "other/b")
    with pytest.raises(ValueError, match="refusing"):
        ops.delete_prefix(transport, bucket, "")


def test_list_paginates_past_1000(transport: S3Transport, bucket: str) -> None:
    keys = [f"many/k{i:05d}" for i in range(1205)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: ops.put_bytes(transport, bucket, k, b"x"), keys))
    assert sorted(o.key for o in ops.list_objects(transport, bucket, "many/")) == keys
    assert ops.delete_objects(transport, bucket, keys) == 1205  # two DeleteObjects batches
    assert list(ops.list_objects(transport, bucket, "many/")) == []


def test_missing_bucket_and_key_errors(transport: S3Transport, bucket: str) -> None:
    with pytest.raises(S3NotFoundError) as info:
        ops.head(transport, bucket, "nope")
    assert isinstance(info.value, FileNotFoundError)
    assert f"s3://{bucket}/nope" in str(info.value)
    assert info.value.__cause__ is not None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ops.exists(transport, "no-such-bucket-xyz", "k")
    # (A PUT into a missing bucket is not tested: SeaweedFS creates the bucket on write, AWS refuses.)


def test_object_replaced_mid_download_is_detected(transport: S3Transport, bucket: str) -> None:
    first = os.urandom(3 * PART)
    _roundtrip(transport, bucket, "swap.bin", first, write_piece=len(first))
    info = ops.head(transport, bucket, "swap.bin")
    _roundtrip(transport, bucket, "swap.bin", os.urandom(3 * PART), write_piece=3 * PART)
    with pytest.raises(ObjectChangedError, match="changed while it was being downloaded"):
        download_into(transport, info, memoryview(bytearray(info.size)))


def test_conditional_write_refuses_existing(transport: S3Transport, bucket: str) -> None:
    from s3ckpt.errors import ConflictError

    ops.put_bytes(transport, bucket, "once.bin", b"first")
    for size in (10, 2 * PART):
        with pytest.raises(ConflictError), MultipartWriter(transport, bucket, "once.bin", if_none_match=True) as w:
            w.write(os.urandom(size))
    assert ops.get_bytes(transport, bucket, "once.bin") == b"first"
    assert ops.list_uploads(transport, bucket) == []


def test_retry_budget_exhausted_raises_transfer_error(s3_server: LocalS3Server) -> None:
    """A dead endpoint (nothing listens) fails within the deadline with a message naming the endpoint."""
    from s3ckpt.config import ClientConfig

    t = S3Transport.create(
        client=ClientConfig(endpoint_url="http://127.0.0.1:9", access_key_id="a", secret_access_key="b"),
        retry=RetryConfig(max_attempts=3, base_delay_s=0.01, deadline_s=2),
    )
    with pytest.raises(S3TransferError, match=r"127\.0\.0\.1:9"):
        ops.head(t, "bucket", "key")
    assert t.retrier.stats.attempts == 3


UPLOAD_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys, threading, time
    import psutil
    from s3ckpt.config import ClientConfig, TransferConfig, MiB
    from s3ckpt.transport import S3Transport, MultipartWriter
    from s3ckpt.transport import ops
    cfg = json.loads(sys.argv[1])
    t = S3Transport.create(
        client=ClientConfig(endpoint_url=cfg["endpoint"], access_key_id=cfg["ak"], secret_access_key=cfg["sk"]),
        transfer=TransferConfig(chunk_size_MB=cfg["chunk_mb"], max_write_concurrency=cfg["conc"]),
    )
    t.clients.get()
    ops.put_bytes(t, cfg["bucket"], "warmup", b"x")  # import and connect everything before the baseline
    block = os.urandom(4 * MiB)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = base
    stop = False
    def sample():
        global peak
        while not stop:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.005)
    th = threading.Thread(target=sample, daemon=True); th.start()
    with MultipartWriter(t, cfg["bucket"], "mem/1gib.bin") as w:
        for _ in range(cfg["total_mb"] // 4):
            w.write(block)
    stop = True; th.join()
    print(json.dumps({"base": base, "peak": peak, "size": w.result.size}))
    """
)


@pytest.mark.slow
def test_upload_peak_memory_within_formula(s3_server: LocalS3Server, bucket: str) -> None:
    """Streaming 1 GiB holds at most (concurrency + 1) parts, whatever the object size."""
    chunk_mb, conc = 8, 4
    cfg = {
        "endpoint": s3_server.endpoint_url,
        "ak": s3_server.access_key,
        "sk": s3_server.secret_key,
        "bucket": bucket,
        "chunk_mb": chunk_mb,
        "conc": conc,
        "total_mb": 1024,
    }
    out = subprocess.run(
        [sys.executable, "-c", UPLOAD_MEMORY_SCRIPT, json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["size"] == 1024 * MiB
    growth = result["peak"] - result["base"]
    formula = (conc + 1) * chunk_mb * MiB
    # 32 MiB of slack for thread stacks, sockets and botocore's per-request objects.
    assert growth <= formula + 32 * MiB, f"upload grew RSS by {growth / MiB:.0f} MiB, formula {formula / MiB:.0f} MiB"


def test_write_tap_sees_every_byte_once_in_order(transport: S3Transport, bucket: str) -> None:
    """``write(data, tap=...)`` hands back exactly the bytes copied into the part buffers, across part
    boundaries that fall inside one write; the object stored is the same bytes."""
    data = os.urandom(int(2.5 * PART))
    seen = bytearray()
    with MultipartWriter(transport, bucket, "tap/object.bin") as w:
        w.write(data[:1000])
        w.write(data[1000:], tap=seen.extend)
    assert bytes(seen) == data[1000:]
    out = bytearray(len(data))
    download_into(transport, ops.head(transport, bucket, "tap/object.bin"), memoryview(out))
    assert bytes(out) == data

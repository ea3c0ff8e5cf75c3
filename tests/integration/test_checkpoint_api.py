"""s3ckpt.save / load / verify / delete and S3Utils against the real embedded server."""

from __future__ import annotations

import io
import os
import pickle
import time
import zipfile
from pathlib import Path

import pytest
import torch
from botocore.config import Config

import s3ckpt
from s3ckpt import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    S3Utils,
    UnsafeCheckpointError,
    UnverifiableCheckpointError,
)
from s3ckpt.layout import manifest_key, read_manifest
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport, ops
from tests.faults.damage import FlipOneByte

# portable: make test also runs these on moto (tests/backends.py).
pytestmark = [pytest.mark.integration, pytest.mark.portable]


def _state(seed: int = 0, n: int = 6) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {f"layer{i}.weight": torch.randn(1024, 512 + i, generator=g) for i in range(n)},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(1000, generator=g)}}, "lr": 0.1},
        "epoch": 3,
        "global_step": 400,
        "bf16": torch.randn(33, dtype=torch.bfloat16, generator=g),
    }


def _assert_equal(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_equal(a[k], b[k])
    else:
        assert a == b


def test_save_load_roundtrip_multipart(transport: S3Transport, bucket: str) -> None:
    state = _state()
    url = f"s3://{bucket}/run/epoch=3-step=400.ckpt"
    stats = s3ckpt.save(state, url, transport=transport)
    assert stats.parts >= 2 and stats.bytes > 5 * 1024 * 1024
    loaded = s3ckpt.load(url, transport=transport)
    _assert_equal(state, loaded)
    manifest = read_manifest(transport, bucket, "run/epoch=3-step=400.ckpt")
    assert manifest is not None
    assert manifest.size == stats.bytes and manifest.crc32c == stats.crc32c
    assert manifest.meta == {"epoch": 3, "global_step": 400}
    res = s3ckpt.verify(url, transport=transport)
    assert res.crc32c == stats.crc32c and res.source == "object"


def test_small_checkpoint_single_put(transport: S3Transport, bucket: str) -> None:
    url = f"s3://{bucket}/tiny.pt"
    stats = s3ckpt.save({"x": torch.arange(10)}, url, transport=transport)
    assert stats.parts == 0
    assert torch.equal(s3ckpt.load(url, transport=transport)["x"], torch.arange(10))


def test_load_map_location_and_mmap_off(transport: S3Transport, bucket: str) -> None:
    url = f"s3://{bucket}/m.pt"
    s3ckpt.save({"w": torch.ones(4)}, url, transport=transport)
    out = s3ckpt.load(url, map_location=torch.device("meta"), transport=transport)
    assert out["w"].device.type == "meta"
    out = s3ckpt.load(url, transport=transport, mmap=False, max_read_concurrency=1)
    assert torch.equal(out["w"], torch.ones(4))


def test_env_configured_default_transport(s3_env: dict[str, str], bucket: str) -> None:
    """With only the standard AWS variables set, save/load need no explicit transport."""
    url = f"s3://{bucket}/env.pt"
    s3ckpt.save({"a": torch.zeros(3)}, url, chunk_size_MB=5, max_write_concurrency=2)
    assert torch.equal(s3ckpt.load(url, max_read_concurrency=2)["a"], torch.zeros(3))


def test_not_found(transport: S3Transport, bucket: str) -> None:
    with pytest.raises(CheckpointNotFoundError) as info:
        s3ckpt.load(f"s3://{bucket}/missing.ckpt", transport=transport)
    assert isinstance(info.value, FileNotFoundError)
    assert "missing.ckpt" in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        s3ckpt.load("s3://no-such-bucket-abc/x.ckpt", transport=transport)


def test_bad_url_refused_before_any_request(transport: S3Transport) -> None:
    before = transport.retrier.stats.attempts
    for url in ("s3://bucket/a/../b", "s3:/bucket/x", "s3://Bad_Bucket/x", "s3://bucket/a//b", "s3://bucket/"):
        with pytest.raises(ValueError):
            s3ckpt.save({"x": 1}, url, transport=transport)
        with pytest.raises(ValueError):
            s3ckpt.load(url, transport=transport)
    assert transport.retrier.stats.attempts == before


def _corrupt(transport: S3Transport, bucket: str, key: str, mutate: str) -> None:
    """Rewrite the object through S3 with altered bytes, keeping its metadata (as a bad disk or a careless
    tool would): the stored CRC32C is gone, so the manifest has to catch it."""
    client = transport.clients.get()
    obj = client.get_object(Bucket=bucket, Key=key)
    data = bytearray(obj["Body"].read())
    if mutate == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) - 100]
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data), Metadata=obj["Metadata"])


@pytest.mark.parametrize("mutate", ["flip", "truncate"])
def test_corruption_detected_before_unpickling(transport: S3Transport, bucket: str, mutate: str) -> None:
    url = f"s3://{bucket}/c-{mutate}.ckpt"
    s3ckpt.save(_state(1), url, transport=transport)
    _corrupt(transport, bucket, f"c-{mutate}.ckpt", mutate)
    with pytest.raises(CheckpointCorruptedError) as info:
        s3ckpt.load(url, transport=transport)
    assert url in str(info.value)
    with pytest.raises(CheckpointCorruptedError):
        s3ckpt.verify(url, transport=transport)


def test_bytes_damaged_in_transit_detected(transport: S3Transport, bucket: str) -> None:
    """The object on the server is intact and carries its CRC32C; one byte of one GET response is flipped
    on the way in (injected with a botocore event hook on the real HTTP path). The load must refuse it."""
    url = f"s3://{bucket}/transit.ckpt"
    s3ckpt.save(_state(2), url, transport=transport)
    client = transport.clients.get()
    hits: list[int] = []

    def damage(http_response: object, parsed: dict[str, object], **_: object) -> None:
        if not hits:
            parsed["Body"] = FlipOneByte(parsed["Body"])
            hits.append(1)

    client.meta.events.register("after-call.s3.GetObject", damage)
    try:
        with pytest.raises(CheckpointCorruptedError, match="the object recorded"):
            s3ckpt.load(url, transport=transport)
    finally:
        client.meta.events.unregister("after-call.s3.GetObject", damage)
    assert hits == [1]
    _assert_equal(_state(2), s3ckpt.load(url, transport=transport))


def test_unverifiable_object_policy(
    transport: S3Transport, bucket: str, s3_server: LocalS3Server, caplog: pytest.LogCaptureFixture
) -> None:
    """An object written by another tool with no checksum at all (boto3 with checksums only "when
    required") and no manifest loads with a warning, and is refused as unverifiable (not as corrupted) when
    verification is required."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    plain = s3_server.client(config=Config(request_checksum_calculation="when_required"))
    plain.put_object(Bucket=bucket, Key="foreign.pt", Body=buf.getvalue())
    url = f"s3://{bucket}/foreign.pt"
    with caplog.at_level("WARNING"):
        assert torch.equal(s3ckpt.load(url, transport=transport)["w"], torch.ones(2))
    assert "unverified" in caplog.text
    with pytest.raises(UnverifiableCheckpointError, match="cannot be verified") as info:
        s3ckpt.load(url, transport=transport, verify="require")
    assert not isinstance(info.value, CheckpointCorruptedError)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch /tmp/s3ckpt-pwned",))


def test_malicious_pickle_refused_with_weights_only(transport: S3Transport, bucket: str, tmp_path: Path) -> None:
    marker = Path("/tmp/s3ckpt-pwned")
    marker.unlink(missing_ok=True)
    url = f"s3://{bucket}/evil.ckpt"
    s3ckpt.save({"payload": _Evil()}, url, transport=transport)
    with pytest.raises(UnsafeCheckpointError) as info:
        s3ckpt.load(url, transport=transport)  # weights_only=True is the default
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert "weights_only=False" in str(info.value)
    assert not marker.exists(), "the malicious payload ran"


def test_delete_removes_data_and_manifest(transport: S3Transport, bucket: str) -> None:
    url = f"s3://{bucket}/del.ckpt"
    s3ckpt.save({"a": 1}, url, transport=transport)
    assert ops.exists(transport, bucket, manifest_key("del.ckpt"))
    s3ckpt.delete(url, transport=transport)
    assert list(ops.list_objects(transport, bucket)) == []
    s3ckpt.delete(url, transport=transport)  # idempotent


def test_s3utils_nemo_surface(transport: S3Transport, bucket: str, tmp_path: Path) -> None:
    S3Utils.use_transport(transport)
    try:
        local = tmp_path / "blob.bin"
        payload = os.urandom(12 * 1024 * 1024 + 7)
        local.write_bytes(payload)
        S3Utils.upload_file(str(local), f"s3://{bucket}/dir/blob.bin")
        S3Utils.upload_file_stream_to_s3(io.BytesIO(b"hello"), f"s3://{bucket}/dir/sub/hello-last.ckpt")
        assert S3Utils.s3_path_exists(f"s3://{bucket}/dir/blob.bin")
        assert not S3Utils.s3_path_exists(f"s3://{bucket}/dir/nope.bin")
        assert S3Utils.s3_path_exists(f"s3://{bucket}/dir", match_directory=True)
        assert not S3Utils.s3_path_exists(f"s3://{bucket}/di", match_directory=True)
        assert S3Utils.find_files_with_suffix(f"s3://{bucket}/dir", "last.ckpt") == [
            f"s3://{bucket}/dir/sub/hello-last.ckpt"
        ]
        assert S3Utils.find_files_with_suffix(f"s3://{bucket}/dir", ".bin", return_key_only=True) == ["dir/blob.bin"]
        dest = tmp_path / "out" / "blob.bin"
        S3Utils.download_s3_file_to_path(f"s3://{bucket}/dir/blob.bin", str(dest))
        assert dest.read_bytes() == payload
        assert S3Utils.download_s3_file_to_stream(f"s3://{bucket}/dir/sub/hello-last.ckpt").read() == b"hello"
        S3Utils.remove_object(f"s3://{bucket}/dir/blob.bin")
        assert not S3Utils.s3_path_exists(f"s3://{bucket}/dir/blob.bin")
        assert S3Utils.parse_s3_url("s3://a-bucket/k") == ("a-bucket", "k")
        assert S3Utils.is_s3_url("s3://x") and not S3Utils.is_s3_url("x")
        with pytest.raises(FileNotFoundError):
            S3Utils.s3_path_exists("s3://no-such-bucket-qq/x")
    finally:
        S3Utils.use_transport(None)


def _zip_records(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Every record's CRC-32 and bytes, after ``zipfile`` has checked each CRC-32 against its bytes."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.testzip() is None
    return {info.filename: (info.CRC, archive.read(info)) for info in archive.infolist()}


def test_zip_crc32_option(transport: S3Transport, bucket: str) -> None:
    """A default save is a valid zip archive (``zipfile``'s testzip() finds no bad CRC-32, as model scanners
    need) with the records torch.save writes, CRC-32s included, although s3ckpt computed them: checked on a
    multipart object whose records straddle part boundaries. ``zip_crc32=False`` is the documented opt-out
    that leaves them 0 (testzip() reports it). Both load."""
    state = _state()
    reference = io.BytesIO()
    torch.save(state, reference)
    expected = {k: v for k, v in _zip_records(reference.getvalue()).items() if "serialization_id" not in k}
    for flag in (False, True):
        url = f"s3://{bucket}/zip-{flag}.ckpt"
        stats = s3ckpt.save(state, url, transport=transport, **({} if flag else {"zip_crc32": False}))
        assert stats.parts > 1
        assert torch.equal(
            s3ckpt.load(url, transport=transport)["model"]["layer5.weight"], state["model"]["layer5.weight"]
        )  # type: ignore[index]
        data = transport.clients.get().get_object(Bucket=bucket, Key=f"zip-{flag}.ckpt")["Body"].read()
        if flag:
            records = _zip_records(data)
            assert {k: v for k, v in records.items() if "serialization_id" not in k} == expected
            assert torch.equal(torch.load(io.BytesIO(data), weights_only=True)["bf16"], state["bf16"])  # type: ignore[arg-type]
        else:
            archive = zipfile.ZipFile(io.BytesIO(data))
            assert all(info.CRC == 0 for info in archive.infolist())
            assert archive.testzip() is not None


def test_a_stream_the_crc_filler_cannot_follow_is_saved_again_by_torch(
    transport: S3Transport, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected fault (no real torch writes a layout the filler refuses): the filler raises ZipLayoutError
    in the middle of a multipart save. The upload is aborted, the save is redone with torch computing the
    CRC-32s, the object is a valid zip, later saves skip the filler, and the caller's progress counts the
    object's bytes once, not the aborted attempt's on top."""
    from s3ckpt import serialization
    from s3ckpt.zip_crc import ZipCrcFiller, ZipLayoutError

    progress: list[int] = []
    before_redo: list[int] = []

    class Refusing(ZipCrcFiller):
        def _fill_descriptor(self, desc: bytearray) -> None:
            if self.records >= 9:  # past data/4: 10 MiB of tensors, so a 5 MiB part is on its way
                deadline = time.monotonic() + 30  # let a part of this attempt land first, as in a real save
                while not progress and time.monotonic() < deadline:
                    time.sleep(0.01)
                before_redo.append(sum(progress))
                raise self._fail("injected: a layout this filler does not follow")
            super()._fill_descriptor(desc)

    monkeypatch.setattr(serialization, "ZipCrcFiller", Refusing)
    monkeypatch.setattr(serialization, "_fast_writer_ok", True)
    state = _state()
    url = f"s3://{bucket}/refused.ckpt"
    s3ckpt.save(state, url, transport=transport, progress=progress.append)
    assert serialization._fast_writer_ok is False
    data = transport.clients.get().get_object(Bucket=bucket, Key="refused.ckpt")["Body"].read()
    assert len(_zip_records(data)) > 5
    assert before_redo and before_redo[0] > 0, "the aborted attempt had stored parts (and reported them)"
    assert sum(progress) == len(data) and min(progress) > 0
    assert ops.list_uploads(transport, bucket) == []
    # Later saves go through torch's own CRC-32 (the refusing filler is never asked again).
    s3ckpt.save(state, f"s3://{bucket}/after.ckpt", transport=transport)
    data = transport.clients.get().get_object(Bucket=bucket, Key="after.ckpt")["Body"].read()
    assert len(_zip_records(data)) > 5
    with pytest.raises(ZipLayoutError):
        Refusing(io.BytesIO()).write(b"junk")

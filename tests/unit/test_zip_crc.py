"""The zip CRC-32 filler (s3ckpt.zip_crc) against real torch.save streams and real zipfile archives.

What must hold: the archive it passes on is byte for byte what torch.save writes with its own CRC-32
(``.data/serialization_id``, which combines the CRC-32s, included: see test_serialization_id.py), for any way
the writes are split by the sink; and every stream it does not follow raises ZipLayoutError instead of being
passed on with a wrong CRC-32.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from typing import Any

import pytest
import torch

from s3ckpt import serialization
from s3ckpt.zip_crc import BytesSink, ZipCrcFiller, ZipLayoutError


class _Recorder(io.RawIOBase):
    """A plain binary sink (no ``tap``) that records every write() as torch made it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.writes.append(bytes(data))
        return len(self.writes[-1])


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {
        "weights": {f"layer{i}": torch.randn(37 * (i + 1), generator=g) for i in range(12)},
        "empty": torch.zeros(0),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "half": torch.ones(3, 3, dtype=torch.float16),
        "step": 7,
        "names": ["a", "b"],
    }


def _records(data: bytes) -> dict[str, tuple[int, bytes]]:
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.testzip() is None
    return {info.filename: (info.CRC, archive.read(info)) for info in archive.infolist()}


def _filled(state: Any, sink: Any) -> ZipCrcFiller:
    filler = ZipCrcFiller(sink)
    serialization._torch_save_without_crc(state, filler)
    filler.finish()
    return filler


@pytest.mark.parametrize("tapped", [True, False], ids=["tap-sink", "plain-sink"])
def test_filled_archive_is_what_torch_save_writes(tapped: bool) -> None:
    state = _state()
    reference = io.BytesIO()
    torch.save(state, reference)
    if tapped:
        sink: Any = BytesSink()
        filler = _filled(state, sink)
        out = bytes(sink.data)
    else:
        sink = _Recorder()
        filler = _filled(state, sink)
        out = b"".join(sink.writes)
    ours, theirs = _records(out), _records(reference.getvalue())
    assert filler.records == len(theirs) > 10
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name] == theirs[name], name
    assert out == reference.getvalue()
    loaded = torch.load(io.BytesIO(out), weights_only=True)
    assert torch.equal(loaded["weights"]["layer11"], state["weights"]["layer11"])


def test_without_filler_torch_writes_zero_crcs() -> None:
    """The control: the stream the filler receives really has every CRC-32 at 0 (so the filler did the work)."""
    sink = _Recorder()
    serialization._torch_save_without_crc(_state(), sink)
    archive = zipfile.ZipFile(io.BytesIO(b"".join(sink.writes)))
    assert {info.CRC for info in archive.infolist()} == {0}


def test_a_stream_split_differently_is_refused_not_mangled() -> None:
    """The filler relies on torch writing each record's data in one write(); data split in two must raise."""
    sink = _Recorder()
    serialization._torch_save_without_crc(_state(), sink)
    out = BytesSink()
    filler = ZipCrcFiller(out)
    with pytest.raises(ZipLayoutError):
        for piece in sink.writes:
            if len(piece) > 64 and not piece.startswith(b"PK"):
                filler.write(piece[:10])
                filler.write(piece[10:])
            else:
                filler.write(piece)
        filler.finish()
    assert filler.error is not None


@pytest.mark.parametrize("zip64", [False, True])
def test_zipfile_stream_archives_round_trip(zip64: bool) -> None:
    """Python's zipfile writing to an unseekable stream (data descriptors; 24-byte zip64 ones when forced):
    with its CRC-32s zeroed, the filler restores the original byte for byte. (No empty member: zipfile gives
    one a data descriptor and no data, which torch never writes.)"""
    rec = _Recorder()
    payloads = [bytes(range(1 + n * 40)) * (n + 1) for n in range(6)]
    with zipfile.ZipFile(rec, "w", zipfile.ZIP_STORED) as archive:
        for i, payload in enumerate(payloads):
            with archive.open(f"r{i}", "w", force_zip64=zip64) as f:
                f.write(payload)
    original = b"".join(rec.writes)
    zeroed = bytearray(original)
    for info in zipfile.ZipFile(io.BytesIO(original)).infolist():
        # local header (30 + name + extra), data, then the descriptor: signature then CRC-32
        name_len, extra_len = struct.unpack_from("<HH", original, info.header_offset + 26)
        desc = info.header_offset + 30 + name_len + extra_len + info.compress_size
        assert original[desc : desc + 4] == b"PK\x07\x08"
        zeroed[desc + 4 : desc + 8] = bytes(4)
    pos = original.find(b"PK\x01\x02")
    while pos >= 0:
        zeroed[pos + 16 : pos + 20] = bytes(4)
        pos = original.find(b"PK\x01\x02", pos + 4)
    assert bytes(zeroed) != original
    out = BytesSink()
    filler = ZipCrcFiller(out)
    for piece in _rechunk(rec.writes, zeroed):
        filler.write(piece)
    filler.finish()
    assert bytes(out.data) == original


def _rechunk(writes: list[bytes], data: bytearray) -> list[bytes]:
    """``data`` cut at the same write() boundaries as ``writes``."""
    out, pos = [], 0
    for w in writes:
        out.append(bytes(data[pos : pos + len(w)]))
        pos += len(w)
    return out


def test_compressed_and_foreign_streams_are_refused() -> None:
    rec = _Recorder()
    with zipfile.ZipFile(rec, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a", b"x" * 1000)
    filler = ZipCrcFiller(BytesSink())
    with pytest.raises(ZipLayoutError, match="method 8"):
        for piece in rec.writes:
            filler.write(piece)
    with pytest.raises(ZipLayoutError, match="unexpected bytes"):
        ZipCrcFiller(BytesSink()).write(b"not a zip at all")


def test_a_truncated_stream_fails_finish() -> None:
    sink = _Recorder()
    serialization._torch_save_without_crc(_state(), sink)
    filler = ZipCrcFiller(BytesSink())
    for piece in sink.writes[:-3]:
        filler.write(piece)
    with pytest.raises(ZipLayoutError, match="ended early"):
        filler.finish()


def test_save_to_stream_falls_back_to_torch_when_the_self_check_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected fault (a torch whose private writer API changed: the call raises TypeError): the self-check
    fails once, and saves go through torch.save computing its own CRC-32s, still a valid zip."""

    def changed_api(obj: Any, stream: Any) -> None:
        raise TypeError("PyTorchFileWriter(): incompatible function arguments")

    monkeypatch.setattr(serialization, "_fast_writer_ok", None)
    monkeypatch.setattr(serialization, "_torch_save_without_crc", changed_api)
    out = io.BytesIO()
    serialization.save_to_stream(_state(), out)
    assert serialization._fast_writer_ok is False
    assert len(_records(out.getvalue())) > 10
    unchecked = io.BytesIO()
    serialization.save_to_stream(_state(), unchecked, zip_crc32=False)
    assert {info.CRC for info in zipfile.ZipFile(unchecked).infolist()} == {0}


def test_save_to_stream_fills_and_skips() -> None:
    assert serialization._fast_writer_works()
    filled, skipped = BytesSink(), BytesSink()
    serialization.save_to_stream(_state(), filled)
    serialization.save_to_stream(_state(), skipped, zip_crc32=False)
    assert len(_records(bytes(filled.data))) > 10
    assert {info.CRC for info in zipfile.ZipFile(io.BytesIO(bytes(skipped.data))).infolist()} == {0}


def _zip64_stream(payloads: list[bytes]) -> tuple[list[bytes], bytes]:
    """A stored zip in torch's streaming shape whose central directory puts every size and offset in zip64
    extra fields (as for records past 4 GiB), CRC-32s zeroed: the writes, and the archive with true CRCs."""
    writes, true_parts, central = [], [], []
    offset = 0
    for i, payload in enumerate(payloads):
        name = f"archive/data/{i}".encode()
        header = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0x0808, 0, 0, 0, 0, 0, 0, len(name), 0) + name
        crc = zlib.crc32(payload)
        desc = struct.pack("<4sIQQ", b"PK\x07\x08", 0, len(payload), len(payload))
        writes += [header, payload, desc]
        true_parts += [header, payload, struct.pack("<4sIQQ", b"PK\x07\x08", crc, len(payload), len(payload))]
        extra = struct.pack("<HHQQQ", 1, 24, len(payload), len(payload), offset)
        central.append((name, extra, crc))
        offset += len(header) + len(payload) + len(desc)
    cd_start, cd_size = offset, 0
    for name, extra, crc in central:
        fixed = struct.pack(
            "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, 0x0808, 0, 0, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF,
            len(name), len(extra), 0, 0, 0, 0, 0xFFFFFFFF,
        )  # fmt: skip
        writes.append(fixed + name + extra)
        true_parts.append(fixed[:16] + struct.pack("<I", crc) + fixed[20:] + name + extra)
        cd_size += len(fixed) + len(name) + len(extra)
    n = len(payloads)
    tail = [
        struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, cd_size, cd_start),
        struct.pack("<4sIQI", b"PK\x06\x07", 0, cd_start + cd_size, 1),
        struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0),
    ]
    return writes + tail, b"".join(true_parts + tail)


def test_zip64_central_directory_entries_are_matched_and_filled() -> None:
    """Sizes and offsets in zip64 extra fields (records past 4 GiB; a real 4.06 GiB torch.save was checked by
    hand, too slow for the suite): the filler finds each record by its zip64 offset and fills its CRC-32."""
    writes, expected = _zip64_stream([b"x" * 1000, bytes(range(256)) * 3, b"tail"])
    out = BytesSink()
    filler = ZipCrcFiller(out)
    for piece in writes:
        filler.write(piece)
    filler.finish()
    assert bytes(out.data) == expected
    archive = zipfile.ZipFile(io.BytesIO(expected))
    assert archive.testzip() is None
    assert archive.read("archive/data/1") == bytes(range(256)) * 3

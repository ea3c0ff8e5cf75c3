"""s3ckpt's save is byte for byte what ``torch.save`` writes, ``.data/serialization_id`` included.

torch's writer ends the archive with ``.data/serialization_id``: a hash of the record names, then a hash
combined from the CRC-32 in every data descriptor written before it. Saving without torch's CRC-32s, torch
combines zeros there; the filler (``s3ckpt.zip_crc``) must write the value torch combines from the real ones.
"""

from __future__ import annotations

import io
import logging
import struct
import zipfile
from typing import Any

import pytest
import torch

from s3ckpt import serialization
from s3ckpt.zip_crc import BytesSink, ZipCrcFiller

_ID_RECORD = "archive/.data/serialization_id"


def _dtypes_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(257, generator=g)
    return {
        "f32": base,
        "f64": base.double(),
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "i8": (base * 50).to(torch.int8),
        "i64": torch.arange(-40, 60),
        "u8": torch.arange(200, dtype=torch.uint8),
        "bool": base > 0,
        "c64": torch.complex(base, -base),
        "empty": torch.zeros(0),
        "scalar": torch.tensor(2.5),
        "step": 11,
    }


def _nested_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(4)
    return {
        "model": {f"layers.{i}.{kind}": torch.randn(16, 8 + i, generator=g) for i in range(6) for kind in ("w", "b")},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(5, generator=g), "step": torch.tensor(9.0)}}, "lr": 1e-3},
        "meta": {"epoch": 2, "names": ["a", "b"], "shared": None},
    }


def _large_state() -> dict[str, Any]:
    # 4 MiB of data: the tapping sink below hands it back in many slices, as the multipart writer does
    g = torch.Generator().manual_seed(5)
    return {"big": torch.randn(1 << 20, generator=g), "small": torch.ones(3)}


def _descriptor_like_state() -> dict[str, Any]:
    # torch's writer takes any write() starting with the data descriptor signature for a descriptor and
    # combines its bytes 4-8 into the id: record data that starts so is combined too.
    return {
        "looks_like_descriptor": torch.tensor(list(b"PK\x07\x08\x01\x02\x03\x04rest"), dtype=torch.uint8),
        "plain": torch.arange(7, dtype=torch.int32),
    }


_STATES = {
    "dtypes": _dtypes_state,
    "nested": _nested_state,
    "empty-dict": dict,
    "large": _large_state,
    "descriptor-like-data": _descriptor_like_state,
}


class _SlicingSink(BytesSink):
    """A tapping sink that hands each write back in 64 KiB slices, as the multipart writer taps per slice."""

    def write(self, data: Any, *, tap: Any = None) -> int:
        view = memoryview(data).cast("B")
        for pos in range(0, len(view), 1 << 16):
            super().write(view[pos : pos + (1 << 16)], tap=tap)
        return len(view)


def _torch_save(obj: Any) -> bytes:
    out = io.BytesIO()
    torch.save(obj, out)
    return out.getvalue()


def _check_zip(data: bytes) -> zipfile.ZipFile:
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.testzip() is None
    return archive


def _raw_id(data: bytes) -> bytes:
    """The id record's bytes, read past its CRC-32 (0 in an unfilled archive, which zipfile refuses)."""
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(_ID_RECORD)
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    return data[start : start + info.file_size]


@pytest.mark.parametrize("make_state", _STATES.values(), ids=_STATES.keys())
def test_save_to_stream_is_byte_identical_to_torch_save(make_state: Any) -> None:
    assert serialization._fast_writer_works()  # else save_to_stream is torch.save and proves nothing
    state = make_state()
    expected = _torch_save(state)
    out = io.BytesIO()
    serialization.save_to_stream(state, out)
    assert out.getvalue() == expected
    _check_zip(out.getvalue())


@pytest.mark.parametrize("make_state", _STATES.values(), ids=_STATES.keys())
def test_a_tapping_sink_gets_the_same_bytes(make_state: Any) -> None:
    state = make_state()
    expected = _torch_save(state)
    sink = _SlicingSink()
    filler = ZipCrcFiller(sink)
    serialization._torch_save_without_crc(state, filler)
    filler.finish()
    assert bytes(sink.data) == expected


def test_the_id_differs_without_the_fill() -> None:
    """The control: torch's CRC-less writer really writes another id (so the tests above test the fill)."""
    state = _nested_state()
    unfilled = io.BytesIO()
    serialization._torch_save_without_crc(state, unfilled)
    ours, theirs = _raw_id(unfilled.getvalue()), _raw_id(_torch_save(state))
    assert len(ours) == len(theirs) == 40
    assert ours[:20] == theirs[:20]  # the record-name hash needs no CRC-32
    assert ours[20:] != theirs[20:]


@pytest.mark.parametrize("replacement", [b"x" * 40, b"1" * 40], ids=["not-digits", "unknown-crc-part"])
def test_an_id_in_another_shape_is_left_as_it_is(replacement: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """A torch whose id the filler does not recognise: the record passes unchanged (with its CRC-32 filled),
    said at debug level, and the archive stays valid."""

    class _SwapId(io.RawIOBase):
        def __init__(self, target: ZipCrcFiller) -> None:
            super().__init__()
            self.target = target
            self.after_id_header = False

        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            piece = bytes(data)
            if self.after_id_header and len(piece) == 40:
                piece, self.after_id_header = replacement, False
            self.after_id_header = self.after_id_header or piece.endswith(b"/.data/serialization_id")
            return int(self.target.write(piece))

    sink = BytesSink()
    filler = ZipCrcFiller(sink)
    with caplog.at_level(logging.DEBUG, logger="s3ckpt.zip_crc"):
        serialization._torch_save_without_crc(_nested_state(), _SwapId(filler))
    filler.finish()
    assert _check_zip(bytes(sink.data)).read(_ID_RECORD) == replacement
    assert "serialization id" in caplog.text

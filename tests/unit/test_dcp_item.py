"""The DCP reader's in-place view of an item (``s3ckpt.dcp.item``) and its reused span buffers."""

from __future__ import annotations

import io
import struct

import pytest
import torch

from s3ckpt.dcp.item import MemoryFile, tensor_in_item
from s3ckpt.dcp.spans import SpanBuffers
from s3ckpt.serialization import save_to_stream


def _saved(obj: object, *, filler: bool = True, pad: int = 0) -> memoryview:
    out = io.BytesIO()
    out.write(b"\0" * pad)  # items sit at any offset of a rank file
    if filler:
        save_to_stream(obj, out)
    else:
        torch.save(obj, out)
    return memoryview(bytearray(out.getvalue()))[pad:]


CASES = [
    torch.arange(12.0).reshape(3, 4),
    torch.arange(12.0).reshape(3, 4)[:, 1:3],  # a view: the whole storage is saved, with strides and offset
    torch.randn(5, 7).to(torch.bfloat16),
    torch.arange(9, dtype=torch.int64),
    torch.tensor([True, False, True]),
    torch.randn(4, dtype=torch.complex64),
    torch.tensor(2.5),
    torch.empty(0, 3),
]


@pytest.mark.parametrize("tensor", CASES, ids=lambda t: f"{t.dtype}-{tuple(t.shape)}")
@pytest.mark.parametrize("filler", [True, False], ids=["s3ckpt-crc-filler", "torch.save"])
@pytest.mark.parametrize("pad", [0, 3])
def test_view_equals_torch_load(tensor: torch.Tensor, filler: bool, pad: int) -> None:
    data = _saved(tensor, filler=filler, pad=pad)
    view = tensor_in_item(data)
    assert view is not None, "the plain torch.save layout takes the fast path"
    expected = torch.load(io.BytesIO(bytes(data)), weights_only=True)
    assert view.dtype == expected.dtype and view.shape == expected.shape and view.stride() == expected.stride()
    assert torch.equal(view, expected)


def test_view_shares_the_downloaded_bytes() -> None:
    data = _saved(torch.zeros(1024))
    view = tensor_in_item(data)
    assert view is not None
    start = bytes(data).index(b"\0" * 4096)  # the storage record: 4 KiB of zeros
    data[start : start + 4] = struct.pack("<f", 7.0)
    assert view[0].item() == 7.0, "no copy was made: the reader copies once, into the target"


@pytest.mark.parametrize(
    "obj",
    [{"a": torch.ones(2)}, [torch.ones(2)], 3],
    ids=["dict", "list", "int"],
)
def test_anything_but_one_tensor_falls_back(obj: object) -> None:
    assert tensor_in_item(_saved(obj)) is None


def test_bytes_that_are_not_a_zip_fall_back() -> None:
    assert tensor_in_item(memoryview(bytearray(b"not a zip archive" * 8))) is None
    truncated = _saved(torch.ones(100))[:-10]
    assert tensor_in_item(truncated) is None


def test_a_pickle_naming_other_globals_is_refused() -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    out = io.BytesIO()
    torch.save(Evil(), out, pickle_protocol=2)  # type: ignore[arg-type]
    assert tensor_in_item(memoryview(bytearray(out.getvalue()))) is None


def test_memory_file_reads_without_copying_the_whole() -> None:
    data = memoryview(bytearray(range(256)))
    f = MemoryFile(data)
    assert f.read(4) == bytes([0, 1, 2, 3]) and f.tell() == 4
    f.seek(-2, io.SEEK_END)
    assert f.read() == bytes([254, 255])


def test_span_buffers_are_reused_and_sized() -> None:
    buffers = SpanBuffers()
    first = buffers.take(1000)
    assert len(first) == 1000
    owner = first.obj
    first[:3] = b"abc"
    buffers.give(first)
    again = buffers.take(500)  # fits in the returned one
    assert len(again) == 500 and again.obj is owner
    bigger = buffers.take(5000)
    assert bigger.obj is not owner and len(bigger) == 5000

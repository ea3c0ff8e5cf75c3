"""A rank file's items on their way out: their data resolved, sized, spread over files, and reported.

The pieces :class:`~s3ckpt.dcp.writer.S3StorageWriter` uses whether it uploads every item or composes a file
from the base's (:mod:`s3ckpt.dcp.incremental`).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import crc32c as _crc32c
import torch
from torch.distributed.checkpoint.planner import SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from ..transport.upload import MultipartWriter, UploadResult
from .layout import ItemWrite

__all__ = ["ItemTap", "host_tensor", "item_bytes", "resolved", "results", "split"]

# What torch.save adds around a tensor's bytes (zip headers, the pickle); only used to size parts up front.
_ITEM_OVERHEAD = 4096


class ItemTap:
    """Forwards writes to the upload and keeps the CRC32C of the item being written.

    A tappable sink (``accepts_tap``): the upload hands each piece back once it is copied into a part buffer,
    so this CRC32C, and the zip CRC-32 the filler computes, read bytes still in the CPU cache instead of
    making passes of their own over the tensor. Not an ``io`` class on purpose: torch.save only needs
    ``write`` and ``flush``, and an ``IOBase`` would close the shared upload when it is garbage-collected.
    """

    accepts_tap = True

    def __init__(self, sink: MultipartWriter) -> None:
        self._sink = sink
        self.crc = 0

    def write(self, data: Any, *, tap: Callable[[memoryview], None] | None = None) -> int:
        def hot(piece: memoryview) -> None:
            self.crc = _crc32c.crc32c(piece, self.crc)
            if tap is not None:
                tap(piece)

        return self._sink.write(data, tap=hot)

    def flush(self) -> None:
        pass


def item_bytes(item: WriteItem) -> int:
    if item.tensor_data is None:
        return _ITEM_OVERHEAD
    numel = 1
    for dim in item.tensor_data.size:
        numel *= dim
    return numel * item.tensor_data.properties.dtype.itemsize + _ITEM_OVERHEAD


def split(items: list[WriteItem], bins: int) -> list[list[WriteItem]]:
    """Spread items over ``bins`` files of about equal size (largest tensor into the lightest file)."""
    if bins <= 1:
        return [list(items)]
    out: list[list[WriteItem]] = [[] for _ in range(bins)]
    sizes = [0] * bins
    for item in sorted(items, key=item_bytes, reverse=True):
        i = sizes.index(min(sizes))
        out[i].append(item)
        sizes[i] += item_bytes(item)
    return out


def host_tensor(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    # torch.save writes a view's whole storage; a slice of a large parameter must not drag the rest along.
    if tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.clone()
    return tensor


def resolved(items: list[WriteItem], planner: SavePlanner) -> Iterator[tuple[WriteItem, torch.Tensor | memoryview]]:
    """Each item with its data: a host tensor, or the bytes of a ``BYTE_IO`` item. Byte items first, as torch
    does: they are resolved without touching tensor memory.

    Raises:
        TypeError: the planner resolved an item to something else.
    """
    for item in sorted(items, key=lambda i: i.type != WriteItemType.BYTE_IO):
        data = planner.resolve_data(item)
        if item.type == WriteItemType.BYTE_IO:
            if not isinstance(data, io.BytesIO):
                raise TypeError(f"{item.index.fqn}: BYTE_IO item resolved to {type(data).__name__}")
            yield item, data.getbuffer()
        else:
            if not isinstance(data, torch.Tensor):
                raise TypeError(f"{item.index.fqn}: tensor item resolved to {type(data).__name__}")
            yield item, host_tensor(data)


def results(rel: str, written: list[tuple[WriteItem, int, int, int]], result: UploadResult) -> list[WriteResult]:
    """The write results of one file: each item's offset, length and CRC32C, and the file's upload."""
    return [
        WriteResult(
            index=item.index,
            size_in_bytes=length,
            storage_data=ItemWrite(rel, offset, length, crc, result.size, result.crc32c, result.etag),
        )
        for item, offset, length, crc in written
    ]

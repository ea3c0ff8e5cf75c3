"""``torch.save`` of a DCP tensor item without running ``torch.save`` for every item.

A DCP rank file is a sequence of ``torch.save`` archives, one per tensor item (what PyTorch's own
``FileSystemWriter`` writes, so any DCP reader reads ours). For a plain CPU tensor, that archive depends only on
the tensor's dtype, shape and strides, except in three places: the tensor's bytes (``data/0``), their zip
CRC-32 (in the data descriptor and the central directory), and the second half of
``.data/serialization_id`` (torch combines every record's CRC-32 into it). Running ``torch.save`` and the CRC
filler costs about 0.4 ms of Python per item; a model has hundreds of items per rank.

:class:`ItemTemplates` runs the real ``torch.save`` once per (dtype, shape, strides), on an uninitialized tensor
whose bytes it never reads, records where those three things are, and for every tensor of that kind writes the
recorded bytes around the tensor's own, patching the CRC-32 and the serialization id in. Recording a template
checks that the serialization id it recomputes is the one torch wrote; if not (another torch), that kind is
always saved by ``torch.save``.
The bytes are exactly ``torch.save``'s (tested against it for many dtypes and shapes).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ..serialization import save_to_stream
from ..zip_crc import hash_combine

__all__ = ["ItemTemplates", "Template", "storage_bytes"]

_DESCRIPTOR = b"PK\x07\x08"
_CENTRAL = b"PK\x01\x02"
_ID_SUFFIX = "/.data/serialization_id"
_DIGITS = 20


@dataclass
class Template:
    """``torch.save``'s bytes for one kind of tensor, with holes for the tensor's bytes and their CRC-32."""

    prefix: bytes  # everything before the tensor's bytes
    suffix: bytearray  # everything after them, with the CRC-32 and the id's CRC half to patch
    crc_at: list[int]  # offsets in suffix of the tensor record's CRC-32 (descriptor, central directory)
    id_at: int  # offset in suffix of the serialization id's second 20 digits
    id_crc_at: list[int]  # offsets in suffix of the serialization id record's own CRC-32
    crcs: list[int]  # the CRC-32s torch combines into the id, in order
    data_index: int  # which of them is the tensor's

    def suffix_for(self, crc32: int) -> bytes:
        """The bytes after the tensor's, for a tensor whose bytes have this zip CRC-32."""
        suffix = bytearray(self.suffix)
        for at in self.crc_at:
            struct.pack_into("<I", suffix, at, crc32)
        crcs = list(self.crcs)
        crcs[self.data_index] = crc32
        suffix[self.id_at : self.id_at + _DIGITS] = b"%0*d" % (_DIGITS, _id_value(crcs))
        id_crc = zlib.crc32(suffix[self.id_at - _DIGITS : self.id_at + _DIGITS])
        for at in self.id_crc_at:
            struct.pack_into("<I", suffix, at, id_crc)
        return bytes(suffix)


class _Discard:
    accepts_tap = True

    def write(self, data: Any, *, tap: Any = None) -> int:
        return len(memoryview(data))


# The CRC-32 a template is recorded with (its tensor's bytes are never read): any value other records do not have.
_PLACEHOLDER_CRC = 0x5EED1E55


@dataclass
class _Recorder:
    """A record sink that notes where the pieces of the archive are, leaving the tensor's bytes unread."""

    sink: Any = field(default_factory=_Discard)
    stream: bytearray = field(default_factory=bytearray)  # every byte but the tensor's
    data_at: int = -1  # offset in ``stream`` where the tensor's bytes were left out
    data_size: int = 0
    crcs: list[int] = field(default_factory=list)
    data_index: int = -1
    id_at: int = -1
    tensor_records: int = 0
    _name: str = ""

    accepts_records = True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.stream += view
        return int(self.sink.write(view))

    def begin_record(self, name: str) -> None:
        self._name = name

    def write_data(self, data: memoryview) -> int:
        if "/data/" in self._name and not self._name.endswith(_ID_SUFFIX):
            self.tensor_records += 1
            self.data_at, self.data_size = len(self.stream), len(data)
            return _PLACEHOLDER_CRC
        if self._name.endswith(_ID_SUFFIX):
            self.id_at = len(self.stream) + _DIGITS
        self.stream += data
        self.sink.write(data)
        return zlib.crc32(data)

    def end_record(self, crc32: int, size: int) -> None:
        if size and not self._name.endswith(_ID_SUFFIX):
            # torch combines the CRC-32 of each record written with a data descriptor before the id
            if "/data/" in self._name and not self._name.endswith(_ID_SUFFIX):
                self.data_index = len(self.crcs)
            self.crcs.append(crc32)


def _key(t: torch.Tensor) -> tuple[Any, ...] | None:
    """What the archive of ``t`` depends on besides its bytes; None for tensors that pickle otherwise."""
    if type(t) is not torch.Tensor or t.device.type != "cpu" or t.layout != torch.strided or t.is_quantized:
        return None
    if t.is_conj() or t.is_neg() or t.requires_grad or t.storage_offset() != 0 or t.__dict__:
        return None
    if t.untyped_storage().nbytes() != t.nbytes:
        return None
    return (t.dtype, tuple(t.shape), t.stride())


def storage_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t``'s storage (what torch.save writes as ``data/0``), without a copy; any dtype."""
    u8 = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
    return memoryview(u8.numpy())  # type: ignore[arg-type]


def _id_value(crcs: list[int]) -> int:
    value = 0
    for crc in crcs:
        value = hash_combine(value, crc)
    return value


class ItemTemplates:
    """Writes ``torch.save(tensor)`` into a tappable sink (see :class:`s3ckpt.zip_crc.TappableSink`) from a
    template per kind of tensor. A kind's template is recorded by ``torch.save`` of an uninitialized tensor
    of that kind whose bytes are never read (no memory is touched). Not thread-safe: one per file."""

    def __init__(self) -> None:
        self._templates: dict[tuple[Any, ...], Template | None] = {}
        self.templated = 0  # items written from a template (for tests and logs)

    def template(self, tensor: torch.Tensor) -> Template | None:
        """The template ``tensor``'s archive follows, or None (a kind ``torch.save`` must write itself)."""
        key = _key(tensor)
        if key is None or tensor.nbytes < 8:
            return None
        if key not in self._templates:
            rec = _Recorder()
            dtype, shape, stride = key
            save_to_stream(torch.empty_strided(shape, stride, dtype=dtype), rec)  # type: ignore[arg-type]
            self._templates[key] = _template_of(rec)
        return self._templates[key]

    def save(self, tensor: torch.Tensor, sink: Any) -> None:
        """``torch.save(tensor)``'s exact bytes into ``sink``."""
        template = self.template(tensor)
        data = storage_bytes(tensor) if template is not None else None
        if template is None or data is None or data[:4] == _DESCRIPTOR:
            # (torch's writer folds any write that starts like a data descriptor into the id: not templated)
            save_to_stream(tensor, sink)
            return
        crc = [0]

        def tap(piece: memoryview) -> None:
            crc[0] = zlib.crc32(piece, crc[0])

        sink.write(template.prefix)
        sink.write(data, tap=tap)
        sink.write(template.suffix_for(crc[0]))
        self.templated += 1


def _template_of(rec: _Recorder) -> Template | None:
    """The template recorded by a save, or None where the archive is not the shape this module knows."""
    if rec.tensor_records != 1 or rec.data_index < 0 or rec.id_at < rec.data_at or rec.data_at < 0:
        return None
    if rec.crcs.count(_PLACEHOLDER_CRC) != 1:
        return None
    stream = rec.stream
    digits = bytes(stream[rec.id_at : rec.id_at + _DIGITS])
    if not digits.isdigit() or int(digits) != _id_value(rec.crcs):
        return None  # the id is not combined the way this module recomputes it: save every item with torch
    suffix = bytearray(stream[rec.data_at :])
    id_at = rec.id_at - rec.data_at
    crc, id_crc = rec.crcs[rec.data_index], zlib.crc32(suffix[id_at - _DIGITS : id_at + _DIGITS])
    # Where each CRC-32 to patch is: the descriptor right after the record's data, and its central entry.
    crc_at, id_crc_at = [4], [id_at + _DIGITS + 4]
    for at, value in ((0, crc), (id_at + _DIGITS, id_crc)):
        if suffix[at : at + 4] != _DESCRIPTOR or struct.unpack_from("<I", suffix, at + 4)[0] != value:
            return None
    pos = suffix.find(_CENTRAL)
    while pos >= 0:
        name_len = struct.unpack_from("<H", suffix, pos + 28)[0]
        name = bytes(suffix[pos + 46 : pos + 46 + name_len]).decode("utf-8", "replace")
        stored = struct.unpack_from("<I", suffix, pos + 16)[0]
        if name.endswith(_ID_SUFFIX) and stored == id_crc:
            id_crc_at.append(pos + 16)
        elif "/data/" in name and stored == crc:
            crc_at.append(pos + 16)
        pos = suffix.find(_CENTRAL, pos + 46 + name_len)
    if len(crc_at) != 2 or len(id_crc_at) != 2:
        return None
    return Template(bytes(stream[: rec.data_at]), suffix, crc_at, id_at, id_crc_at, rec.crcs, rec.data_index)

"""The tensor inside one DCP item, read in place: no ``torch.load`` copy.

Each tensor item of a rank file is a ``torch.save`` of that tensor: a small zip archive whose pickle names
one storage record. :func:`tensor_in_item` finds the record through the zip's central directory, reads the
pickle with an unpickler that knows only the five names such a pickle uses, and returns a tensor that views the
downloaded bytes. The reader then copies it once, into the tensor being loaded (``torch.load`` would copy it
into a new storage first, and ``io.BytesIO`` of the bytes once more before that).

Anything else (a compressed or zip64 record, another byte order, a pickle naming anything more) returns
``None``, and the caller falls back to ``torch.load(weights_only=True)``, which also gives the right error for
bytes that are not a tensor at all.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from typing import Any

import torch

__all__ = ["MemoryFile", "tensor_in_item"]

_EOCD = struct.Struct("<4sHHHHIIH")  # 22 bytes, no archive comment (torch writes none)
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes
_U32_MAX = 0xFFFFFFFF
# The legacy storage class names torch.save pickles, by dtype (newer dtypes take the torch.load path).
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}


class MemoryFile(io.RawIOBase):
    """A read-only file over a memoryview that never copies it whole (``io.BytesIO(view)`` does)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        n = max(0, min(len(out), len(self._view) - self._pos))
        out[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def _members(data: memoryview) -> dict[str, memoryview] | None:
    """Name -> bytes of every stored (uncompressed) member, or None if the archive is not the plain layout."""
    if len(data) < _EOCD.size:
        return None
    sig, _, _, _, count, cd_size, cd_offset, comment = _EOCD.unpack_from(data, len(data) - _EOCD.size)
    if sig != b"PK\x05\x06" or comment or _U32_MAX in (cd_size, cd_offset) or count == 0xFFFF:
        return None
    members: dict[str, memoryview] = {}
    pos = cd_offset
    for _ in range(count):
        if pos + _CENTRAL.size > len(data):
            return None
        fields = _CENTRAL.unpack_from(data, pos)
        if fields[0] != b"PK\x01\x02":
            return None
        method, size, name_len, extra_len, comment_len, offset = (
            fields[4],
            fields[9],
            fields[10],
            fields[11],
            fields[12],
            fields[16],
        )
        if method != 0 or _U32_MAX in (size, offset):
            return None
        name = bytes(data[pos + _CENTRAL.size : pos + _CENTRAL.size + name_len]).decode("utf-8", "replace")
        pos += _CENTRAL.size + name_len + extra_len + comment_len
        if offset + _LOCAL.size > len(data):
            return None
        local = _LOCAL.unpack_from(data, offset)
        if local[0] != b"PK\x03\x04":
            return None
        start = offset + _LOCAL.size + local[9] + local[10]
        if start + size > len(data):
            return None
        members[name] = data[start : start + size]
    return members


class _Rebuild:
    """Stands for ``torch._utils._rebuild_tensor_v2`` in the pickle."""


class _Unpickler(pickle.Unpickler):
    """Knows only what the pickle of ``torch.save(tensor)`` names; anything else ends the fast path."""

    def __init__(self, file: Any, records: dict[str, memoryview], prefix: str) -> None:
        super().__init__(file)
        self._records = records
        self._prefix = prefix

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"persistent id {pid!r}")
        _, dtype, key, _, numel = pid
        record = self._records.get(f"{self._prefix}data/{key}")
        if record is None or len(record) != numel * dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {key!r}")
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        flat = torch.frombuffer(record, dtype=torch.uint8)
        if flat.data_ptr() % dtype.itemsize:
            flat = flat.clone()  # misaligned for this dtype: one copy, as torch.load would make
        return flat.view(dtype)


def _rebuild(storage: torch.Tensor, offset: int, size: Any, stride: Any, *args: Any) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset)


def tensor_in_item(data: memoryview) -> torch.Tensor | None:
    """A tensor viewing the bytes of ``data`` (one ``torch.save`` of a tensor), or None to use ``torch.load``.

    The tensor shares memory with ``data``: copy it out before ``data`` is reused.
    """
    try:
        members = _members(data)
        if members is None:
            return None
        pickles = [n for n in members if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            return None
        prefix = pickles[0][: -len("data.pkl")]
        order = members.get(prefix + "byteorder")
        if order is not None and bytes(order) != b"little":
            return None
        # The pickle is a few hundred bytes: a copy in a BytesIO is read by C code, where a Python file's
        # readinto would be called ~130 times for it.
        result = _Unpickler(io.BytesIO(members[pickles[0]]), members, prefix).load()
    except (pickle.UnpicklingError, struct.error, ValueError, TypeError, RuntimeError, EOFError, IndexError):
        return None
    return result if isinstance(result, torch.Tensor) else None

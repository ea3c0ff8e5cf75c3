"""Read a checkpoint's pickle without running it: tensors become descriptions, unknown classes placeholders.

``pickle.load`` calls whatever the stream names, so a pickle from a bucket someone else can write is code
execution. This unpickler resolves only an allow-list of globals (containers, torch's tensor rebuild
functions, storage types, dtypes), each replaced by a harmless stand-in: a tensor becomes a
:class:`TensorRef` (dtype, shape, bytes), never memory. Every other global becomes an :class:`Opaque`
placeholder that records its name and arguments and does nothing else.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Opaque", "PickleSummary", "StorageRef", "TensorRef", "safe_load"]

# torch's legacy storage classes and their dtypes (torch.storage._dtype_to_storage_type_map, frozen: newer
# dtypes are written as UntypedStorage plus a dtype argument, see _rebuild_tensor_v3).
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "BFloat16Storage": "bfloat16",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8",
    "QInt32Storage": "qint32",
    "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
    "UntypedStorage": "uint8",
}
_DTYPES: dict[str, torch.dtype] = {n: v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_SAFE_CODECS = frozenset({"latin1", "latin-1", "utf-8", "utf8", "ascii"})


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else str(dtype)


def _itemsize(dtype_name: str) -> int:
    dtype = _DTYPES.get(dtype_name)
    return dtype.itemsize if dtype is not None else 1


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> str:
        return _STORAGE_DTYPES.get(self.name, "unknown")


@dataclass(frozen=True)
class StorageRef:
    """One storage record (``archive/data/<key>``): its element type and size, never its bytes."""

    key: str
    dtype: str
    numel: int
    location: str

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


@dataclass(frozen=True)
class TensorRef:
    """A tensor as the pickle describes it."""

    dtype: str
    shape: tuple[int, ...]
    storage: StorageRef | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


class Opaque:
    """Stand-in for a class or function the allow-list refuses: records what was asked, runs nothing."""

    qualname = "?"
    args: tuple[Any, ...]
    state: Any
    items: dict[Any, Any]
    elements: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        self = super().__new__(cls)
        self.args = args
        self.state = None
        self.items = {}
        self.elements = []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # dict subclasses: SETITEMS
        self.items[key] = value

    def append(self, value: Any) -> None:  # list subclasses: APPENDS
        self.elements.append(value)

    def extend(self, values: Any) -> None:
        self.elements.extend(values)

    def field(self, name: str) -> Any:
        """An attribute from the pickled state (dataclasses pickle their ``__dict__``)."""
        if isinstance(self.state, dict):
            return self.state.get(name)
        if isinstance(self.state, tuple) and len(self.state) == 2 and isinstance(self.state[1], dict):
            return self.state[1].get(name)  # (dict_state, slots_state)
        return None

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


@dataclass
class PickleSummary:
    """What :func:`safe_load` found."""

    root: Any
    tensors: list[TensorRef] = field(default_factory=list)
    storages: dict[str, StorageRef] = field(default_factory=dict)
    refused: Counter[str] = field(default_factory=Counter)


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.summary = PickleSummary(root=None)
        self._opaque: dict[str, type[Opaque]] = {}
        self._allowed: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
            ("builtins", "complex"): complex,
            ("builtins", "slice"): slice,
            ("_codecs", "encode"): _encode,
            ("torch", "Size"): _size,
            ("torch", "device"): _device,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): _first,
            ("torch._utils", "_rebuild_parameter_with_state"): _first,
            ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
        }

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 names builtins the Python 2 way; the stock unpickler maps them, so must we.
        module = _PY2_MODULES.get(module, module)
        allowed = self._allowed.get((module, name))
        if allowed is not None:
            return allowed
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        qualname = f"{module}.{name}"
        self.summary.refused[qualname] += 1
        cls = self._opaque.get(qualname)
        if cls is None:
            cls = type(name, (Opaque,), {"qualname": qualname})
            self._opaque[qualname] = cls
        return cls

    def persistent_load(self, pid: Any) -> Any:
        # torch.save's persistent ids: ('storage', storage_type, key, location, numel).
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        stype, key, location, numel = pid[1], str(pid[2]), str(pid[3]), int(pid[4])
        dtype = stype.dtype if isinstance(stype, _StorageType) else "unknown"
        ref = self.summary.storages.setdefault(key, StorageRef(key, dtype, numel, location))
        return ref

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, *rest: Any) -> TensorRef:
        ref = storage if isinstance(storage, StorageRef) else None
        return self._add(TensorRef(ref.dtype if ref else "unknown", _shape(size), ref))

    def _rebuild_tensor_v3(
        self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any, *rest: Any
    ) -> TensorRef:
        ref = storage if isinstance(storage, StorageRef) else None
        return self._add(TensorRef(_dtype_name(dtype), _shape(size), ref))

    def _add(self, tensor: TensorRef) -> TensorRef:
        self.summary.tensors.append(tensor)
        return tensor


def _shape(size: Any) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in size)
    except (TypeError, ValueError):
        return ()


def _encode(text: Any, encoding: str = "utf-8") -> Any:
    # Protocol 2 (torch's default) writes bytes as _codecs.encode(str, 'latin1').
    if isinstance(text, str) and encoding.lower() in _SAFE_CODECS:
        return text.encode(encoding)
    return Opaque()


def _size(dims: Any = ()) -> tuple[int, ...]:
    return _shape(dims)


def _device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


def _first(data: Any, *rest: Any) -> Any:
    return data


def _rebuild_from_type(func: Callable[..., Any], new_type: Any, args: Any, state: Any) -> Any:
    # `func` came out of find_class, so it is an allow-listed stand-in or an Opaque: calling it is safe.
    return func(*args) if callable(func) and isinstance(args, tuple) else Opaque()


def safe_load(data: bytes) -> PickleSummary:
    """Unpickle ``data`` with the allow-list, returning the object tree and what was found in it.

    Raises:
        pickle.UnpicklingError (or another error of a malformed stream): not a readable pickle.
    """
    unpickler = _SafeUnpickler(data)
    root = unpickler.load()
    unpickler.summary.root = root
    return unpickler.summary

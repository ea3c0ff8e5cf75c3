"""torch.save into a stream, and torch.load out of an in-memory file. Knows torch, not boto3.

Loading without a second copy: the checkpoint is downloaded into an anonymous in-memory file (``memfd`` on
Linux; a temporary file elsewhere) and ``torch.load(..., mmap=True)`` maps it, so each loaded tensor's
storage *is* a slice of the downloaded bytes. Loading from a byte buffer instead would copy every tensor
out of it and hold both copies (2x the checkpoint) until the buffer is freed.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import io
import logging
import mmap
import os
import pickle
import sys
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any, BinaryIO

import torch
from torch.utils.serialization import config as serialization_config

from .errors import CheckpointCorruptedError, UnsafeCheckpointError
from .zip_crc import BytesSink, ZipCrcFiller, ZipLayoutError

log = logging.getLogger(__name__)

__all__ = [
    "LoadBuffer",
    "ZipLayoutError",
    "clone_to_host",
    "disable_crc_filling",
    "load_from_buffer",
    "save_to_stream",
]

MapLocation = Any  # str | torch.device | dict | Callable, as torch.load accepts


def save_to_stream(obj: Any, stream: BinaryIO | io.RawIOBase, *, zip_crc32: bool = True) -> None:
    """``torch.save`` into a write-only stream (zip format; no seek needed).

    Args:
        zip_crc32: write the zip format's CRC-32 of every record (the default), so the result is what
            ``torch.save`` writes to a file: a valid zip archive that Python's ``zipfile``, model scanners
            (picklescan, modelscan) and ``torch.load`` all accept. s3ckpt fills the CRC-32s in itself as the
            bytes stream by (:mod:`s3ckpt.zip_crc`), at about a third of torch's cost; where that cannot
            work with the installed torch (checked once per process), torch computes them. ``False`` is an
            opt-in for files only torch will read: each record's CRC-32 is then 0, which
            ``zipfile.ZipFile.testzip()`` reports as a bad CRC; s3ckpt's CRC32C of the whole object still
            protects every byte.

    Raises:
        ZipLayoutError: the stream torch wrote was not the layout the CRC-32 filler follows (nothing is
            lost: the caller's upload is aborted; :func:`disable_crc_filling` then makes torch compute them).
    """
    if not _fast_writer_works():
        _torch_save_public(obj, stream, compute_crc32=zip_crc32)
    elif not zip_crc32:
        _torch_save_without_crc(obj, stream)
    else:
        filler = ZipCrcFiller(stream)
        try:
            _torch_save_without_crc(obj, filler)
            filler.finish()
        except Exception:
            if filler.error is not None:
                # torch's C++ writer replaces the filler's error with its own ("unexpected pos"); raise ours.
                raise filler.error from None
            raise


def disable_crc_filling(reason: str) -> None:
    """From now on let torch compute the zip CRC-32s (after the filler met a stream it did not follow)."""
    global _fast_writer_ok
    if _fast_writer_ok is not False:
        log.warning("s3ckpt: torch computes zip CRC-32s from now on (%s)", reason)
    _fast_writer_ok = False


_fast_writer_ok: bool | None = None


def _fast_writer_works() -> bool:
    """Whether torch's writer can be asked for no CRC-32 and the filler gets a valid zip from it (checked
    on a small object once per process: both lean on torch internals that may change between releases)."""
    global _fast_writer_ok
    if _fast_writer_ok is None:
        weights = torch.arange(300, dtype=torch.float32)
        probe = {"w": weights, "empty": torch.zeros(0), "meta": [1, "x"]}
        sink = BytesSink()
        try:
            filler = ZipCrcFiller(sink)
            _torch_save_without_crc(probe, filler)
            filler.finish()
            data = bytes(sink.data)
            if zipfile.ZipFile(io.BytesIO(data)).testzip() is not None:
                raise ZipLayoutError("zipfile reports a bad CRC-32")
            loaded = torch.load(io.BytesIO(data), weights_only=True)
            _fast_writer_ok = bool(torch.equal(loaded["w"], weights)) and loaded["meta"] == probe["meta"]
        except Exception as exc:  # any failure means: use torch's own path
            log.info("s3ckpt: zip CRC-32s computed by torch (the filler's self-check failed: %s)", exc)
            _fast_writer_ok = False
    return _fast_writer_ok


def _torch_save_without_crc(obj: Any, stream: Any) -> None:
    """``torch.save(obj, stream)`` with torch's CRC-32 off for this call only.

    Through torch's writer directly, since the public switch (``torch.serialization.set_crc32_options`` or
    the config) is process-global: flipping it would also drop the CRC-32s of a ``torch.save`` that another
    thread starts meanwhile (a user's own local save while an async checkpoint uploads).
    """
    writer = torch._C.PyTorchFileWriter(stream, False, torch.serialization._get_storage_alignment())
    torch.serialization._save(  # type: ignore[no-untyped-call]
        obj, writer, pickle, torch.serialization.DEFAULT_PROTOCOL, False
    )
    writer.write_end_of_file()


def _torch_save_public(obj: Any, stream: Any, *, compute_crc32: bool) -> None:
    if compute_crc32:
        torch.save(obj, stream)
        return
    # Process-global: a torch.save running concurrently in another thread may skip its CRC-32 too (only a
    # zip reader that checks CRCs would notice; torch.load does not).
    with serialization_config.patch({"save.compute_crc32": False}):  # type: ignore[attr-defined]
        torch.save(obj, stream)


class LoadBuffer:
    """A writable in-memory file of a fixed size that ``torch.load`` can map.

    Usage: ``download_into(..., buf.view)``, then :func:`load_from_buffer`, then :meth:`close`. Tensors
    loaded with ``mmap=True`` keep their own mapping of the pages, so closing the buffer is safe and
    the memory is freed once the tensors are.
    """

    def __init__(self, size: int, name: str = "s3ckpt") -> None:
        self.size = size
        self._tmp_path: str | None = None
        if hasattr(os, "memfd_create") and sys.platform.startswith("linux"):
            # memfd pages are anonymous shared memory: not limited by a small /dev/shm (Docker's is 64 MB)
            # and gone when the last reference closes.
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
            self.path = f"/proc/self/fd/{self.fd}"
        else:
            fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".ckpt")
            self.fd, self.path, self._tmp_path = fd, path, path
        try:
            os.ftruncate(self.fd, size)
            self._map: mmap.mmap | None = mmap.mmap(self.fd, size) if size else None
        except BaseException:
            self.close()
            raise

    @property
    def view(self) -> memoryview:
        """The writable bytes (empty for a 0-byte object)."""
        return memoryview(self._map) if self._map is not None else memoryview(bytearray())

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._tmp_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp_path)
            self._tmp_path = None

    def __enter__(self) -> LoadBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_from_buffer(
    buf: LoadBuffer,
    *,
    url: str,
    map_location: MapLocation = None,
    weights_only: bool | None = True,
    mmap_tensors: bool = True,
) -> Any:
    """``torch.load`` the bytes in ``buf``.

    Args:
        buf: the downloaded checkpoint.
        url: named in errors.
        map_location: as ``torch.load``; ``None`` keeps tensors where they were saved.
        weights_only: ``True`` (the default) refuses pickles that could run code; ``None`` lets torch
            decide (True since torch 2.6); ``False`` only for checkpoints you trust.
        mmap_tensors: map tensor storages onto the buffer instead of copying them.

    Raises:
        UnsafeCheckpointError: ``weights_only`` refused an object in the pickle.
        CheckpointCorruptedError: the bytes are not a torch checkpoint.
    """
    kwargs: dict[str, Any] = {"map_location": map_location, "mmap": mmap_tensors}
    if weights_only is not None:
        kwargs["weights_only"] = weights_only
    try:
        if buf.size == 0:
            raise RuntimeError("the object is empty (0 bytes)")
        return torch.load(buf.path, **kwargs)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Weights only load failed" in str(exc):
            raise UnsafeCheckpointError(
                f"{url}: torch.load(weights_only=True) refused to unpickle an object that is not a plain "
                f"tensor/container ({_first_line(exc)}). If you trust this checkpoint, load it with "
                "weights_only=False, or allow the type with torch.serialization.add_safe_globals([...])."
            ) from exc
        raise CheckpointCorruptedError(f"{url}: not a readable torch checkpoint: {_first_line(exc)}") from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        text = str(exc)
        if "zip archive" in text or "central directory" in text or "PytorchStreamReader" in text or "empty" in text:
            raise CheckpointCorruptedError(f"{url}: not a readable torch checkpoint: {_first_line(exc)}") from exc
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def clone_to_host(
    obj: Any, *, pin_memory: bool = False, copy: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Any:
    """A snapshot of ``obj`` whose tensors are detached CPU copies, so the caller may mutate the originals.

    Containers (dict, list, tuple, namedtuple) are rebuilt; other objects are shared (they are pickled as
    they are when the snapshot is saved). With ``pin_memory`` CUDA tensors are staged in pinned host memory.
    """

    def snap(t: torch.Tensor) -> torch.Tensor:
        if copy is not None:
            return copy(t)
        if t.device.type == "cpu":
            return t.detach().clone()
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin_memory and torch.cuda.is_available())
        out.copy_(t.detach(), non_blocking=pin_memory)
        return out

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return snap(value)
        if isinstance(value, dict):
            if type(value) is dict:
                return {k: walk(v) for k, v in value.items()}
            new = copy_module.copy(value)  # keeps the subclass (OrderedDict, AttributeDict, defaultdict)
            for k, v in value.items():
                new[k] = walk(v)
            return new
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, tuple):
            items = [walk(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return value

    result = walk(obj)
    if pin_memory and torch.cuda.is_available():
        torch.cuda.synchronize()
    return result

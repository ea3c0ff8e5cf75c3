"""Fill in a zip stream's CRC-32s as it is written, instead of letting torch compute them.

``torch.save`` computes each record's CRC-32 with its own table-driven code (about 0.6 CPU-s per GB on the
machines we measured). Into a stream it writes each record as a local header (no CRC, no sizes), the data in
one ``write()``, then a data descriptor holding the CRC-32 and sizes; the central directory at the end repeats
each CRC-32. Asked not to compute them, it writes 0 in both places. :class:`ZipCrcFiller` sits between torch
and a :class:`TappableSink` (the streaming upload): it follows the zip structure as the writes go by, has the
sink hand back each record's data just after copying it into a part buffer, computes the CRC-32 there with
zlib (the bytes are still in the CPU cache: about a third of torch's cost), and writes it into the data
descriptor and the central directory entry as they pass.

One record's content depends on those CRC-32s too: torch's writer ends the archive with
``.data/serialization_id``, 40 decimal digits: 20 for a hash of the record names, then 20 for
``c10::hash_combine`` over the CRC-32 in every data descriptor written before it (zeros when it computed none).
The filler redoes that combination with the CRC-32s it filled in and writes the digits torch would have, so
the result is byte for byte what ``torch.save`` writes, ``.data/serialization_id`` included.

Knows the zip format, not torch and not S3. It checks the stream as it goes (each descriptor's sizes against
the data seen, each central directory entry against the records seen) and raises :class:`ZipLayoutError` on
anything else (compression, encryption, data written in pieces, an unknown record), so a stream it does not
understand fails instead of being stored with a wrong CRC-32.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from typing import Any, Protocol

__all__ = ["BytesSink", "RecordSink", "TappableSink", "ZipCrcFiller", "ZipLayoutError", "hash_combine"]

log = logging.getLogger(__name__)

_LOCAL = b"PK\x03\x04"
_DESCRIPTOR = b"PK\x07\x08"
_CENTRAL = b"PK\x01\x02"
_ZIP64_END = b"PK\x06\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_END = b"PK\x05\x06"
_LOCAL_FIXED = 30
_CENTRAL_FIXED = 46
_HAS_DESCRIPTOR = 0x0008
_ENCRYPTED = 0x0001
_U32_MAX = 0xFFFFFFFF
_ZIP64_EXTRA_ID = 0x0001
_U64_MASK = (1 << 64) - 1
# torch's kSerializationIdRecordName, under the archive's folder; its content is two 20-digit numbers
_SERIALIZATION_ID_SUFFIX = b"/.data/serialization_id"
_ID_PART_DIGITS = 20


class ZipLayoutError(ValueError):
    """The stream is not the zip layout ``torch.save`` writes, which this filler follows."""


class TappableSink(Protocol):
    """A stream whose ``write()`` hands each piece back to ``tap`` once copied (``accepts_tap = True``):
    ``s3ckpt.transport.MultipartWriter``, or :class:`BytesSink`."""

    accepts_tap: bool

    def write(self, data: Any, *, tap: Any = None) -> int: ...


class RecordSink(Protocol):
    """A stream told where each zip record begins and ends (``accepts_records = True``), which takes each
    record's data through :meth:`write_data` and returns its CRC-32 (``s3ckpt.incremental.RecordComposer``,
    which decides per record whether to upload the bytes or copy them on the store)."""

    accepts_records: bool

    def write(self, data: Any) -> int: ...

    def begin_record(self, name: str) -> None:
        """A record's local header comes next (in one or more ``write()`` calls)."""

    def write_data(self, data: memoryview) -> int:
        """The record's whole data, in one call; returns its zip CRC-32."""
        ...

    def end_record(self, crc32: int, size: int) -> None:
        """The record's data descriptor has been written (none for an empty record)."""


class BytesSink(io.RawIOBase):
    """An in-memory :class:`TappableSink`."""

    accepts_tap = True

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any, *, tap: Any = None) -> int:
        view = memoryview(data).cast("B")
        self.data += view
        if tap is not None:
            tap(view)
        return len(view)


class ZipCrcFiller(io.RawIOBase):
    """A write-only stream that passes a zip archive to ``sink`` with every record's CRC-32 filled in.

    ``sink`` is any binary stream; one with ``accepts_tap`` (a :class:`TappableSink`) lets the CRC-32 be
    computed on the copy it just made, otherwise it is computed on the data before it is passed on. Call
    :meth:`finish` after the archive is written: it checks that the stream ended where a zip ends.
    """

    def __init__(self, sink: TappableSink | RecordSink | Any) -> None:
        super().__init__()
        self._sink: Any = sink
        self._tap = bool(getattr(sink, "accepts_tap", False))
        # A RecordSink is told where each record begins and ends, and computes the data's CRC-32 itself.
        self._events = bool(getattr(sink, "accepts_records", False))
        self._offset = 0  # stream offset of the next byte handed to the sink
        self._pending = bytearray()  # a header being collected (torch writes one in several pieces)
        self._need = 4  # bytes self._pending must reach before the next parsing step
        self._expect = "record"  # "record", "data" (one write), "descriptor" (one write) or "tail"
        self._record_at = 0  # stream offset of the current record's local header
        self._data_len = 0
        self._crc = 0
        self._records: dict[int, tuple[int, int]] = {}  # local header offset -> (CRC-32, size)
        self._central_entries = 0
        # torch's combined_uncomp_crc32_ as its CRC-less writer computes it (descriptors holding 0), and as
        # torch.save computes it (the CRC-32s filled in): see _fix_serialization_id.
        self._id_crc_hash_seen = 0
        self._id_crc_hash_filled = 0
        self._in_serialization_id = False
        self.error: ZipLayoutError | None = None  # the first error raised (torch replaces it with its own)

    @property
    def records(self) -> int:
        """Records seen so far."""
        return len(self._records)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self._write(memoryview(data).cast("B"))
        except ZipLayoutError as exc:
            self.error = self.error or exc
            raise

    def finish(self) -> None:
        """Check that the archive ended completely and its central directory listed every record.

        Raises:
            ZipLayoutError: the stream stopped in the middle of the archive.
        """
        if self._expect != "tail" or self._central_entries != len(self._records):
            raise self._fail(
                f"the zip stream ended early (offset {self._offset}, expecting {self._expect}; "
                f"{len(self._records)} records, {self._central_entries} central directory entries)"
            )

    # -- internals -----------------------------------------------------------------------------------------

    def _fail(self, message: str) -> ZipLayoutError:
        self.error = self.error or ZipLayoutError(message)
        return self.error

    def _write(self, view: memoryview) -> int:
        total = len(view)
        if self._expect != "descriptor" and total >= 8 and view[:4] == _DESCRIPTOR:
            # torch's writer takes *any* write() that starts like a data descriptor for one and combines its
            # bytes 4-8 into the serialization id; record data can start so (the descriptors themselves are
            # combined in _fill_descriptor, with their filled-in CRC-32).
            value = int.from_bytes(view[4:8], "little")
            self._id_crc_hash_seen = _hash_combine(self._id_crc_hash_seen, value)
            self._id_crc_hash_filled = _hash_combine(self._id_crc_hash_filled, value)
        if self._expect == "data":
            if self._in_serialization_id:
                view = self._fix_serialization_id(view)
            if self._events:
                self._crc = self._sink.write_data(view)
            elif self._tap:
                self._sink.write(view, tap=self._update_crc)
            else:
                self._update_crc(view)
                self._sink.write(view)
            self._offset += total
            self._data_len = total
            self._expect = "descriptor"
        elif self._expect == "descriptor":
            self._fill_descriptor(bytearray(view))
        elif self._expect == "tail":
            self._pass(view)
        else:
            pos = 0
            while pos < total:
                if self._expect != "record":
                    raise self._fail(f"zip record data at offset {self._offset} shares a write() with its header")
                n = min(self._need - len(self._pending), total - pos)
                self._pending += view[pos : pos + n]
                pos += n
                if len(self._pending) == self._need:
                    self._parse()
        return total

    def _update_crc(self, piece: memoryview) -> None:
        self._crc = zlib.crc32(piece, self._crc)

    def _pass(self, data: Any) -> None:
        self._offset += int(self._sink.write(data))

    def _emit_pending(self) -> None:
        header = bytes(self._pending)
        self._pending.clear()
        self._need = 4
        self._pass(header)

    def _complete(self, head: bytes, fixed: int, total: Any) -> bool:
        """Whether ``head`` holds the whole structure: ``fixed`` bytes, ``total(head)`` in all."""
        if len(head) < fixed:
            self._need = fixed
            return False
        full = int(total(head))
        if len(head) < full:
            self._need = full
            return False
        return True

    def _parse(self) -> None:
        head = bytes(self._pending)
        sig = head[:4]
        if sig == _LOCAL:
            if self._complete(head, _LOCAL_FIXED, lambda h: _LOCAL_FIXED + sum(struct.unpack_from("<HH", h, 26))):
                self._start_record(head)
        elif sig == _CENTRAL:
            if self._complete(head, _CENTRAL_FIXED, lambda h: _CENTRAL_FIXED + sum(struct.unpack_from("<HHH", h, 28))):
                self._fill_central(head)
        elif sig == _ZIP64_END:
            if self._complete(head, 12, lambda h: 12 + struct.unpack_from("<Q", h, 4)[0]):
                self._emit_pending()
        elif sig == _ZIP64_LOCATOR:
            if self._complete(head, 20, lambda h: 20):
                self._emit_pending()
        elif sig == _END:
            if self._complete(head, 22, lambda h: 22 + struct.unpack_from("<H", h, 20)[0]):
                self._emit_pending()
                self._expect = "tail"
        else:
            raise self._fail(f"unexpected bytes {sig!r} at offset {self._offset} of the zip stream")

    def _start_record(self, head: bytes) -> None:
        flags, method = struct.unpack_from("<HH", head, 6)
        crc, csize, usize = struct.unpack_from("<III", head, 14)
        if flags & _ENCRYPTED or method != 0:
            raise self._fail(f"zip record at offset {self._offset}: flags {flags:#x}, method {method}")
        self._record_at = self._offset
        name_len = struct.unpack_from("<H", head, 26)[0]
        name = head[_LOCAL_FIXED : _LOCAL_FIXED + name_len]
        self._in_serialization_id = name.endswith(_SERIALIZATION_ID_SUFFIX)
        if self._events:
            self._sink.begin_record(name.decode("utf-8", "replace"))
        self._emit_pending()
        if flags & _HAS_DESCRIPTOR:
            self._crc = 0
            self._expect = "data"
        elif csize == usize == crc == 0:
            self._records[self._record_at] = (0, 0)  # torch writes an empty record without a descriptor
            if self._events:
                self._sink.end_record(0, 0)
        else:
            raise self._fail(f"zip record at offset {self._record_at} has no data descriptor and is not empty")

    def _fill_descriptor(self, desc: bytearray) -> None:
        if desc[:4] != _DESCRIPTOR or len(desc) not in (16, 24):
            raise self._fail(f"expected a zip data descriptor at offset {self._offset}, got {len(desc)} bytes")
        fmt = "<II" if len(desc) == 16 else "<QQ"
        csize, usize = struct.unpack_from(fmt, desc, 8)
        if csize != self._data_len or usize != self._data_len:
            raise self._fail(
                f"zip data descriptor at offset {self._offset} gives {csize} bytes; {self._data_len} were written"
            )
        crc = self._crc & _U32_MAX
        self._id_crc_hash_seen = _hash_combine(self._id_crc_hash_seen, struct.unpack_from("<I", desc, 4)[0])
        self._id_crc_hash_filled = _hash_combine(self._id_crc_hash_filled, crc)
        struct.pack_into("<I", desc, 4, crc)
        self._records[self._record_at] = (crc, self._data_len)
        self._pass(desc)
        self._expect = "record"
        if self._events:
            self._sink.end_record(crc, self._data_len)

    def _fix_serialization_id(self, view: memoryview) -> memoryview:
        """``.data/serialization_id`` with its CRC part computed from the filled-in CRC-32s.

        torch (``PyTorchStreamWriter::writeSerializationId``) writes ``%020u%020u`` of the combined hash of
        the record names (no CRC-32 in it, kept as it is) and the combined CRC-32s. The second number is
        replaced only where it is exactly what torch combined from the descriptors as they reached the filler:
        a record in any other shape (another torch version) is passed on unchanged.
        """
        text = bytes(view[: 2 * _ID_PART_DIGITS + 1])
        seen = b"%0*d" % (_ID_PART_DIGITS, self._id_crc_hash_seen)
        if len(text) != 2 * _ID_PART_DIGITS or not text.isdigit() or text[_ID_PART_DIGITS:] != seen:
            log.debug(
                "s3ckpt: the %d-byte serialization id at offset %d (%r) is not the 40 digits expected "
                "(CRC part %s); left as it is",
                len(view),
                self._offset,
                text,
                seen.decode(),
            )
            return view
        filled = b"%0*d" % (_ID_PART_DIGITS, self._id_crc_hash_filled)
        return memoryview(text[:_ID_PART_DIGITS] + filled)

    def _fill_central(self, head: bytes) -> None:
        csize, usize, name_len, extra_len = struct.unpack_from("<IIHH", head, 20)
        local_at = struct.unpack_from("<I", head, 42)[0]
        if _U32_MAX in (csize, usize, local_at):
            # zip64: uncompressed size, compressed size, local header offset, each only if it overflowed
            values = _zip64_values(head[_CENTRAL_FIXED + name_len : _CENTRAL_FIXED + name_len + extra_len])
            if usize == _U32_MAX:
                usize = values.pop(0)
            if csize == _U32_MAX:
                csize = values.pop(0)
            if local_at == _U32_MAX:
                local_at = values.pop(0)
        record = self._records.get(local_at)
        if record is None or record[1] != csize or csize != usize:
            raise self._fail(f"central directory entry at offset {self._offset} does not match the record written")
        self._pending[16:20] = struct.pack("<I", record[0])
        self._central_entries += 1
        self._emit_pending()


def _hash_combine(seed: int, value: int) -> int:
    """``c10::hash_combine`` (Boost's) on 64-bit ``size_t``, wrapping as C++ does."""
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & _U64_MASK)) & _U64_MASK


hash_combine = _hash_combine


def _zip64_values(extra: bytes) -> list[int]:
    """The 8-byte values of the zip64 extended-information field in a central directory ``extra`` field."""
    pos = 0
    while pos + 4 <= len(extra):
        field_id, size = struct.unpack_from("<HH", extra, pos)
        if field_id == _ZIP64_EXTRA_ID:
            return [int(v) for v in struct.unpack_from(f"<{size // 8}Q", extra, pos + 4)]
        pos += 4 + size
    raise ZipLayoutError("a zip64 size or offset is missing its extended-information field")

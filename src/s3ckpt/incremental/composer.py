"""Between the zip CRC-32 filler and the upload: list the archive's records, and upload only what changed.

:class:`RecordComposer` is the stream ``torch.save`` (through :class:`~s3ckpt.zip_crc.ZipCrcFiller`) writes
into. The filler tells it where each record begins and ends and hands it each record's data in one call
(``torch.save`` writes a record's data in one ``write()``), so every decision is taken while the bytes are
still there, before any of them goes out:

* with no base, every byte is uploaded, and each record's offsets and checksums are listed (the manifest
  keeps them, so this save can be the base of a later one);
* with a base, a record whose name, size, CRC32C and zip CRC-32 equal the base's is not copied into a part
  buffer: its bytes are checksummed where they lie and the store copies the same range of the base
  (``UploadPartCopy``). Its local header and data descriptor are copied too when they are the same bytes
  (same length and CRC32C), so consecutive unchanged records form one copied run.

:class:`PartPlanner` turns that stream of "upload these bytes" / "these bytes are at base offset X" into
parts S3 accepts: every part but the last at least 5 MiB. A copied run shorter than that is uploaded instead
(its bytes are kept, at most 5 MiB, while the run is that short), and an uploaded part shorter than that
takes the first bytes of the run after it. Long runs are copied in parts of ``copy_part_size`` bytes (the store
copies parts in parallel), at most 5 GiB each.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import crc32c as _crc32c

from ..config import MAX_PART_SIZE, MIN_PART_SIZE, MiB
from ..transport.checksums import crc_combine
from ..transport.upload import MultipartWriter
from .records import PREFIX, BaseLayout, ZipRecord

__all__ = ["COPY_PART_SIZE", "DataSums", "PartPlanner", "PartSink", "RecordComposer"]

# Copied parts are cut at record boundaries once this long: the store copies the parts of one upload in
# parallel (max_write_concurrency at once), and a failed part is retried alone.
COPY_PART_SIZE = 128 * MiB


class PartSink(Protocol):
    """What the planner sends parts through: :class:`~s3ckpt.transport.compose.ComposingWriter`."""

    @property
    def pending_bytes(self) -> int: ...

    def write(self, data: Any, *, tap: Any = None) -> int: ...

    def flush_part(self) -> None: ...

    def copy_part(self, first: int, length: int, crc32c: int) -> None: ...


class DataSums:
    """The zip CRC-32 and CRC32C of one record's data, taken on the pieces the upload hands back as it copies
    them into part buffers (:meth:`tap`), while they are still in the CPU cache. ``crc32c`` given: already
    known (computed where the bytes lay), so only the CRC-32 is taken."""

    def __init__(self, crc32c: int | None = None) -> None:
        self._known = crc32c is not None
        self.crc32 = 0
        self.crc32c = crc32c or 0

    def tap(self, piece: memoryview) -> None:
        self.crc32 = zlib.crc32(piece, self.crc32)
        if not self._known:
            self.crc32c = _crc32c.crc32c(piece, self.crc32c)


@dataclass
class _Record:
    name: str
    start: int
    head: bytearray = field(default_factory=bytearray)
    data: int = -1
    size: int = 0
    crc32c: int = 0
    prefix_crc32c: int = 0
    base: ZipRecord | None = None  # the base's record, when this one's data is the same bytes
    desc: bytearray = field(default_factory=bytearray)


class PartPlanner:
    """Sends uploaded bytes and copied ranges through a :class:`PartSink` as valid parts."""

    def __init__(self, writer: PartSink, copy_part_size: int) -> None:
        self._w = writer
        # A run may end up to one short run (< 5 MiB) longer than this: still within S3's 5 GiB.
        self._copy_max = max(MIN_PART_SIZE, min(copy_part_size, MAX_PART_SIZE - MIN_PART_SIZE))
        self._run_at = 0  # base offset of the run's first byte
        self._run_len = 0
        self._run_crc = 0
        self._held = bytearray()  # the run's bytes while it is shorter than a part may be

    def upload(self, view: memoryview, tap: Any = None) -> None:
        self._close_run()
        self._w.write(view, tap=tap)

    def copy(self, view: memoryview, base_at: int, crc: int | None) -> None:
        """``view`` equals the base's bytes at ``base_at``; ``crc`` is its CRC32C if already computed."""
        n = len(view)
        if n == 0:
            return
        if not (self._run_len and base_at == self._run_at + self._run_len):
            self._close_run()
            pending = self._w.pending_bytes
            if 0 < pending < MIN_PART_SIZE:
                # The part being filled is too short to end here: it takes the run's first bytes.
                k = min(MIN_PART_SIZE - pending, n)
                self._w.write(view[:k])
                if k == n:
                    return
                view, base_at, n, crc = view[k:], base_at + k, n - k, None
            self._run_at, self._run_len, self._run_crc = base_at, 0, 0
        elif self._run_len >= MIN_PART_SIZE and self._run_len + n > self._copy_max:
            self._close_run()  # a long run is copied in several parts, cut at a record boundary
            self._run_at = base_at
        if n > self._copy_max:
            for off in range(0, n, self._copy_max):
                piece = view[off : off + self._copy_max]
                self.copy(piece, base_at + off, None)
            return
        if crc is None:
            crc = _crc32c.crc32c(view)
        self._run_crc = crc if self._run_len == 0 else crc_combine("CRC32C", self._run_crc, crc, n)
        if self._run_len + n < MIN_PART_SIZE:
            self._held += view
        else:
            self._held = bytearray()  # long enough to be copied: its bytes are not needed
        self._run_len += n

    def finish(self) -> None:
        self._close_run()

    def _close_run(self) -> None:
        if not self._run_len:
            return
        if self._run_len >= MIN_PART_SIZE:
            self._w.flush_part()
            self._w.copy_part(self._run_at, self._run_len, self._run_crc)
        else:
            self._w.write(self._held)
        self._run_len, self._run_crc, self._held = 0, 0, bytearray()


class RecordComposer(io.RawIOBase):
    """The stream a save writes into (a :class:`~s3ckpt.zip_crc.RecordSink`): uploads through ``writer``,
    copies unchanged records from ``base`` when ``writer`` can (a :class:`PartSink`, e.g.
    :class:`~s3ckpt.transport.compose.ComposingWriter`), and lists the archive's records in :attr:`records`.

    Args:
        writer: the upload.
        base: the base checkpoint's records; None uploads everything.
        copy_part_size: bytes per copied part (see :data:`COPY_PART_SIZE`).
    """

    accepts_records = True

    def __init__(
        self,
        writer: MultipartWriter | PartSink,
        base: BaseLayout | None = None,
        *,
        copy_part_size: int = COPY_PART_SIZE,
    ) -> None:
        super().__init__()
        self._w = writer
        can_copy = callable(getattr(writer, "copy_part", None))
        self._base = base if can_copy else None
        self._plan = PartPlanner(writer, copy_part_size) if can_copy and base is not None else None  # type: ignore[arg-type]
        self._offset = 0
        self._cur: _Record | None = None
        self.records: list[ZipRecord] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        cur = self._cur
        if cur is None:
            self._upload(view)
        elif cur.data < 0:
            cur.head += view  # the local header: held until the record's data says whether it is copied
        else:
            cur.desc += view  # the data descriptor: held until end_record
        self._offset += len(view)
        return len(view)

    def begin_record(self, name: str) -> None:
        self._cur = _Record(name, self._offset)

    def write_data(self, data: memoryview) -> int:
        cur = self._cur
        assert cur is not None, "record data outside a record"
        view = memoryview(data).cast("B")
        cur.data, cur.size = self._offset, len(view)
        self._offset += cur.size
        candidate = self._base.match(cur.name, cur.size) if self._base is not None else None
        crc32c: int | None = None
        cur.prefix_crc32c = _crc32c.crc32c(view[:PREFIX])
        if candidate is not None and candidate.prefix_crc32c != cur.prefix_crc32c:
            candidate = None  # changed (a training step changes a tensor's first bytes too): no full pass
        if candidate is not None and self._plan is not None:
            # Checksummed where the bytes lie (no copy into a part buffer): CRC32C first, the cheaper one.
            crc32c = _crc32c.crc32c(view)
            if crc32c == candidate.crc32c:
                crc32 = zlib.crc32(view)
                if crc32 == candidate.crc32:
                    head_crc = _crc32c.crc32c(cur.head)
                    if len(cur.head) == candidate.data - candidate.start and head_crc == candidate.head_crc32c:
                        self._plan.copy(memoryview(cur.head), candidate.start, head_crc)
                    else:
                        self._plan.upload(memoryview(cur.head))
                    self._plan.copy(view, candidate.data, crc32c)
                    cur.base, cur.crc32c = candidate, crc32c
                    return crc32
        self._upload(memoryview(cur.head))
        sums = DataSums(crc32c)
        self._upload(view, sums.tap)
        cur.crc32c = sums.crc32c
        return sums.crc32

    def end_record(self, crc32: int, size: int) -> None:
        cur = self._cur
        assert cur is not None, "end of a record that did not begin"
        self._cur = None
        if cur.data < 0:  # an empty record: no data, no descriptor
            cur.data = self._offset
            cur.prefix_crc32c = 0
            self._upload(memoryview(cur.head))
        base = cur.base
        desc = memoryview(cur.desc)
        if base is not None and self._plan is not None and len(desc) == base.end - base.data_end:
            self._plan.copy(desc, base.data_end, None)
        else:
            self._upload(desc)
        self.records.append(
            ZipRecord(
                cur.name,
                cur.start,
                cur.data,
                size,
                self._offset,
                crc32,
                cur.crc32c,
                _crc32c.crc32c(cur.head),
                cur.prefix_crc32c,
            )
        )

    def finish(self) -> None:
        """Send what the planner still holds (call before the writer completes)."""
        if self._plan is not None:
            self._plan.finish()

    def _upload(self, view: memoryview, tap: Any = None) -> None:
        if not len(view):
            return
        if self._plan is not None:
            self._plan.upload(view, tap)
        elif tap is not None:
            self._w.write(view, tap=tap)
        else:
            self._w.write(view)

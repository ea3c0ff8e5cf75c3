"""Read one member of a zip archive on S3 with a few ranged GETs, never the whole object.

A ``torch.save`` file is a zip archive whose pickle (``<name>/data.pkl``) is small and whose tensor data
(``<name>/data/<key>``) is everything else. Zip keeps its table of contents at the end: the end-of-central-
directory record (EOCD) in the last 22 bytes (plus a comment, at most 64 KiB), pointing at the central
directory, which gives each member's offset. So: GET the last 64 KiB (usually the whole central directory
too), then GET the pickle's byte range. ``bytes_fetched`` says what it cost.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointCorruptedError
from ..transport.context import S3Transport
from ..transport.ops import ObjectInfo

__all__ = ["NotAZipError", "RangeReader", "RemoteZip", "ZipMember"]

TAIL_BYTES = 64 * 1024
_EOCD = struct.Struct("<4sHHHHIIH")  # 22 bytes
_Z64_LOCATOR = struct.Struct("<4sIQI")  # 20 bytes
_Z64_EOCD = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes
# torch pads each member's local header so that the data is 64-byte aligned: a little slack covers it.
_LOCAL_EXTRA_GUESS = 128
_U32_MAX = 0xFFFFFFFF


class NotAZipError(ValueError):
    """The object is not a zip archive (a legacy ``torch.save``, or not a checkpoint at all)."""


@dataclass(frozen=True)
class ZipMember:
    """One central-directory entry."""

    name: str
    method: int
    crc32: int
    compressed_size: int
    size: int
    header_offset: int


class RangeReader:
    """Ranged GETs of one object version (pinned by ETag), counting the bytes and requests they cost."""

    def __init__(self, t: S3Transport, info: ObjectInfo) -> None:
        self.t = t
        self.info = info
        self.bytes_fetched = 0
        self.requests = 0

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``, clamped to the object."""
        end = min(end, self.info.size)
        if end <= start:
            return b""
        bucket, key, etag = self.info.bucket, self.info.key, self.info.etag

        def get(c: Any) -> bytes:
            body = c.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=etag)["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        data = self.t.call("GetObject", bucket, key, get)
        self.requests += 1
        self.bytes_fetched += len(data)
        return data


class RemoteZip:
    """The central directory of a zip object, and its members read on demand."""

    def __init__(self, reader: RangeReader) -> None:
        self.reader = reader
        size = reader.info.size
        self._cache_start = max(0, size - TAIL_BYTES)
        self._cache = reader.read(self._cache_start, size)
        cd_offset, cd_size = self._find_central_directory()
        self.members = self._parse_central_directory(self._bytes(cd_offset, cd_offset + cd_size))

    def _bytes(self, start: int, end: int) -> bytes:
        """From the tail already fetched when it covers the range, else one more GET."""
        if start >= self._cache_start and end <= self._cache_start + len(self._cache):
            return self._cache[start - self._cache_start : end - self._cache_start]
        return self.reader.read(start, end)

    def _find_central_directory(self) -> tuple[int, int]:
        tail = self._cache
        pos = tail.rfind(b"PK\x05\x06")
        # A comment can contain the signature: the real record is the one whose comment ends the file.
        while pos >= 0 and not (
            pos + _EOCD.size <= len(tail) and pos + _EOCD.size + _EOCD.unpack_from(tail, pos)[7] == len(tail)
        ):
            pos = tail.rfind(b"PK\x05\x06", 0, pos)
        if pos < 0:
            raise NotAZipError("no zip end-of-central-directory record in the last 64 KiB")
        _, _, _, _, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, pos)
        if cd_offset == _U32_MAX or cd_size == _U32_MAX or entries == 0xFFFF:
            loc = pos - _Z64_LOCATOR.size
            if loc < 0 or tail[loc : loc + 4] != b"PK\x06\x07":
                raise NotAZipError("zip64 archive without a zip64 end-of-central-directory locator")
            z64_offset = _Z64_LOCATOR.unpack_from(tail, loc)[2]
            record = self._bytes(z64_offset, z64_offset + _Z64_EOCD.size)
            if len(record) < _Z64_EOCD.size or record[:4] != b"PK\x06\x06":
                raise NotAZipError("zip64 end-of-central-directory record not found where its locator points")
            cd_size, cd_offset = _Z64_EOCD.unpack(record)[8:10]
        if cd_offset + cd_size > self.reader.info.size:
            raise NotAZipError("the zip central directory lies outside the object (truncated?)")
        return cd_offset, cd_size

    @staticmethod
    def _parse_central_directory(data: bytes) -> list[ZipMember]:
        members: list[ZipMember] = []
        pos = 0
        while pos + _CENTRAL.size <= len(data) and data[pos : pos + 4] == b"PK\x01\x02":
            fields = _CENTRAL.unpack_from(data, pos)
            method, crc, csize, usize = fields[4], fields[7], fields[8], fields[9]
            name_len, extra_len, comment_len, offset = fields[10], fields[11], fields[12], fields[16]
            name_start = pos + _CENTRAL.size
            name = data[name_start : name_start + name_len].decode("utf-8", "replace")
            extra = data[name_start + name_len : name_start + name_len + extra_len]
            usize, csize, offset = _apply_zip64_extra(extra, usize, csize, offset)
            members.append(ZipMember(name, method, crc, csize, usize, offset))
            pos = name_start + name_len + extra_len + comment_len
        if not members:
            raise NotAZipError("the zip central directory is empty or unreadable")
        return members

    def find(self, suffix: str) -> ZipMember | None:
        """The first member whose name ends with ``suffix``, preferring the shallowest path."""
        matches = [m for m in self.members if m.name == suffix.lstrip("/") or m.name.endswith(suffix)]
        return min(matches, key=lambda m: m.name.count("/")) if matches else None

    def read(self, member: ZipMember) -> bytes:
        """The member's uncompressed bytes, checked against the CRC-32 the archive recorded.

        Raises:
            CheckpointCorruptedError: a bad local header, an unknown compression, or a CRC mismatch.
        """
        where = f"s3://{self.reader.info.bucket}/{self.reader.info.key}:{member.name}"
        guess_end = member.header_offset + _LOCAL.size + len(member.name.encode()) + _LOCAL_EXTRA_GUESS
        chunk = self._bytes(member.header_offset, guess_end + member.compressed_size)
        if len(chunk) < _LOCAL.size or chunk[:4] != b"PK\x03\x04":
            raise CheckpointCorruptedError(f"{where}: no zip local header at offset {member.header_offset}")
        name_len, extra_len = _LOCAL.unpack_from(chunk, 0)[9:11]
        start = _LOCAL.size + name_len + extra_len
        end = start + member.compressed_size
        if end > len(chunk):  # more header padding than guessed: fetch the remainder
            chunk += self._bytes(member.header_offset + len(chunk), member.header_offset + end)
        raw = chunk[start:end]
        if member.method == 0:
            data = raw
        elif member.method == 8:
            data = zlib.decompress(raw, -15)
        else:
            raise CheckpointCorruptedError(f"{where}: unsupported zip compression method {member.method}")
        # torch writes 0 when its CRC-32 is switched off (s3ckpt's opt-in zip_crc32=False: the object's
        # CRC32C covers it instead).
        crc_ok = member.crc32 == 0 or zlib.crc32(data) == member.crc32
        if len(data) != member.size or not crc_ok:
            raise CheckpointCorruptedError(f"{where}: CRC-32 or size does not match the zip directory")
        return data


def _apply_zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """Sizes and offset from the zip64 extra field (id 1), which holds only the fields set to 0xFFFFFFFF."""
    pos = 0
    while pos + 4 <= len(extra):
        header_id, length = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + length]
        if header_id == 1:
            values = [struct.unpack_from("<Q", body, i)[0] for i in range(0, len(body) - 7, 8)]
            if usize == _U32_MAX and values:
                usize = values.pop(0)
            if csize == _U32_MAX and values:
                csize = values.pop(0)
            if offset == _U32_MAX and values:
                offset = values.pop(0)
            break
        pos += 4 + length
    return usize, csize, offset

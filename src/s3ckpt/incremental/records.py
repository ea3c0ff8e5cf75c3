"""The zip records of a saved checkpoint, as its manifest lists them, and the base a new save composes from.

Every s3ckpt save lists its ``torch.save`` archive's records in the manifest: name, where the record starts
(local header), where its data starts, the data's size, where the record ends (after its data descriptor),
the zip CRC-32 and the CRC32C of the data, and the CRC32C of the local header. A later save that finds a
record with the same name, size and both checksums knows those bytes are already stored at a known range of
the base object, and has the store copy them instead of uploading them again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointCorruptedError, S3CheckpointError, S3NotFoundError
from ..s3_dirpath_utils import parse_s3_url
from ..transport import ops
from ..transport.compose import CopySource
from ..transport.context import S3Transport

__all__ = ["PREFIX", "BaseLayout", "ZipRecord", "load_base"]

log = logging.getLogger(__name__)

PREFIX = 64 * 1024
"""Bytes at the start of each record's data whose CRC32C is listed on their own (``prefix_crc32c``)."""


@dataclass(frozen=True)
class ZipRecord:
    """One record of a zip archive as written to the object (offsets in bytes from the object's start).

    Attributes:
        name: the record's name (``archive/data/0``).
        start: offset of its local header.
        data: offset of its data (``start`` + the header's length).
        size: bytes of data.
        end: offset just past its data descriptor (or its data, for an empty record).
        crc32: the zip CRC-32 of the data.
        crc32c: the CRC32C of the data.
        head_crc32c: the CRC32C of the local header ``[start, data)``.
        prefix_crc32c: the CRC32C of the data's first :data:`PREFIX` bytes: a changed tensor is told from an
            unchanged one by its first bytes, without a pass over all of them.
    """

    name: str
    start: int
    data: int
    size: int
    end: int
    crc32: int
    crc32c: int
    head_crc32c: int
    prefix_crc32c: int

    @property
    def data_end(self) -> int:
        return self.data + self.size

    def to_json(self) -> list[Any]:
        """A compact list (a manifest holds one per tensor)."""
        return [
            self.name,
            self.start,
            self.data,
            self.size,
            self.end,
            self.crc32,
            self.crc32c,
            self.head_crc32c,
            self.prefix_crc32c,
        ]

    @classmethod
    def from_json(cls, raw: Any) -> ZipRecord:
        name, *numbers = raw
        record = cls(str(name), *(int(n) for n in numbers))
        if not record.start <= record.data <= record.data_end <= record.end:
            raise ValueError(f"record {record.name!r} has offsets out of order")
        return record


@dataclass(frozen=True)
class BaseLayout:
    """A committed checkpoint a new save may copy unchanged records from.

    Attributes:
        url: the base checkpoint.
        source: its bucket, key, size and the ETag every copy is pinned to.
        records: its records by name.
    """

    url: str
    source: CopySource
    records: dict[str, ZipRecord]

    def match(self, name: str, size: int) -> ZipRecord | None:
        """The base's record of that name and size (its checksums still to be compared), if any."""
        found = self.records.get(name)
        return found if found is not None and found.size == size else None


def load_base(t: S3Transport, url: str) -> tuple[BaseLayout | None, str]:
    """The base layout of the checkpoint at ``url``, or ``(None, why not)``: missing, no manifest, a manifest
    that describes other bytes, or one without records (saved by another tool or an older s3ckpt)."""
    from ..layout import read_manifest

    bucket, key = parse_s3_url(url, require_key=True)
    try:
        info = ops.head(t, bucket, key)
        manifest = read_manifest(t, bucket, key)
    except S3NotFoundError:
        return None, f"the base {url} does not exist (deleted?)"
    except CheckpointCorruptedError as exc:
        return None, f"the base's manifest is unreadable: {exc}"
    except S3CheckpointError as exc:
        return None, f"the base {url} could not be read: {exc}"
    if manifest is None:
        return None, f"the base {url} has no s3ckpt manifest"
    if not manifest.matches(info):
        return None, f"the base {url} does not match its manifest (replaced since it was saved)"
    if not manifest.records:
        return None, f"the base {url}'s manifest lists no zip records (saved without them)"
    records = {r.name: r for r in manifest.records}
    return BaseLayout(url, CopySource(bucket, key, info.etag, info.size), records), ""

"""Incremental sharded saves: each rank copies its unchanged items from the previous checkpoint on the store.

A DCP rank file is a sequence of items, each a ``torch.save`` archive of one tensor (or some bytes), and the
base checkpoint's sidecar manifest records every item's offset, length and CRC32C. With
``S3StorageWriter(base=...)`` the coordinator reads the base's ``.metadata`` and manifest once, in
``prepare_global_plan`` (no rank sends a request for it), and hands each rank, inside its plan, the base
records of the items it is about to write. A rank then checksums each such item where its bytes lie (the
item's bytes are known without serializing it: :mod:`s3ckpt.dcp.item_template`), and an item whose length
and CRC32C equal the base's is copied by the store (``UploadPartCopy`` pinned to the base file's ETag) instead
of uploaded. The rank file is byte for byte what a plain save writes. Everything else, a base that cannot be
used included, is uploaded as usual (see :mod:`s3ckpt.incremental` for the part rules and the safety checks,
which are the same).
"""

from __future__ import annotations

import collections
import logging
import zlib
from dataclasses import dataclass, field
from typing import Any

import crc32c as _crc32c
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan

from ..errors import S3CheckpointError
from ..incremental.composer import COPY_PART_SIZE, DataSums, PartPlanner
from ..serialization import save_to_stream
from ..transport.checksums import crc_combine
from ..transport.compose import ComposingWriter, CopySource
from ..transport.context import S3Transport
from .item_template import ItemTemplates, storage_bytes
from .layout import FileRecord, loads_metadata, split_url
from .shared import fetch_committed

__all__ = ["BaseItem", "BaseItems", "ItemComposer", "base_items_for", "combine_crcs"]

_DESCRIPTOR = b"PK\x07\x08"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseItem:
    """Where one item of the base checkpoint is: file (relative to the base's prefix), offset, length, CRC32C."""

    relative_path: str
    offset: int
    length: int
    crc32c: int


@dataclass(frozen=True)
class BaseItems:
    """What one rank may copy: the base's records of the items it writes, and the base's files."""

    url: str
    bucket: str
    prefix: str
    items: dict[MetadataIndex, BaseItem] = field(default_factory=dict)
    files: dict[str, FileRecord] = field(default_factory=dict)

    def source_for(self, indexes: list[MetadataIndex]) -> CopySource | None:
        """The base file most of these items come from (one upload copies from one object), if any."""
        counts = collections.Counter(self.items[i].relative_path for i in indexes if i in self.items)
        if not counts:
            return None
        rel = counts.most_common(1)[0][0]
        record = self.files[rel]
        return CopySource(self.bucket, self.prefix + rel, f'"{record.etag}"', record.size)


def base_items_for(t: S3Transport, base: str, plans: list[SavePlan], *, where: str) -> list[BaseItems | None]:
    """Each rank's :class:`BaseItems` (coordinator, once per save), or Nones (logged) when the base is unusable."""
    try:
        pre = fetch_committed(t, base, verify=True)
        metadata = loads_metadata(pre.metadata, where=pre.url + ".metadata")
    except S3CheckpointError as exc:
        log.warning("incremental save of %s: the base %s cannot be used (%s); uploading everything", where, base, exc)
        return [None] * len(plans)
    manifest = pre.manifest
    assert manifest is not None  # verify=True
    bucket, prefix = split_url(pre.url)
    stored: dict[MetadataIndex, Any] = dict(metadata.storage_data or {})
    out: list[BaseItems | None] = []
    for plan in plans:
        items: dict[MetadataIndex, BaseItem] = {}
        for item in plan.items:
            info = stored.get(item.index)
            if info is None:
                continue
            entry = manifest.items.get(info.relative_path, {}).get(info.offset)
            if entry is None or entry[0] != info.length or info.relative_path not in manifest.files:
                continue
            items[item.index] = BaseItem(info.relative_path, info.offset, info.length, entry[1])
        files = {rel: manifest.files[rel] for rel in {i.relative_path for i in items.values()}}
        out.append(BaseItems(pre.url, bucket, prefix, items, files) if items else None)
    return out


def combine_crcs(*pieces: tuple[int, int]) -> int:
    """The CRC32C of consecutive pieces from each piece's ``(crc32c, length)``."""
    crc, started = 0, False
    for piece_crc, length in pieces:
        if not started:
            crc, started = piece_crc, True
        elif length:
            crc = crc_combine("CRC32C", crc, piece_crc, length)
    return crc


class _PlannedSink:
    """A tappable sink for ``torch.save`` of an item no template covers: uploads through the planner and keeps
    the item's length and CRC32C."""

    accepts_tap = True

    def __init__(self, plan: PartPlanner) -> None:
        self._plan = plan
        self.crc = 0
        self.length = 0

    def write(self, data: Any, *, tap: Any = None) -> int:
        view = memoryview(data).cast("B")
        self.crc = _crc32c.crc32c(view, self.crc)
        self.length += len(view)
        self._plan.upload(view, tap)
        return len(view)

    def flush(self) -> None:
        pass


class ItemComposer:
    """Writes one rank file's items through a :class:`ComposingWriter` whose source is a file of the base:
    an item whose bytes equal the base's record of it (same length and CRC32C) is copied, the rest uploaded.

    Attributes:
        offset: bytes of the file so far (copied ones included): where the next item starts.
    """

    def __init__(self, upload: ComposingWriter, base: BaseItems, templates: ItemTemplates) -> None:
        self._plan = PartPlanner(upload, COPY_PART_SIZE)
        self._base = base
        self._source_rel = upload.source.key[len(base.prefix) :]
        self._templates = templates
        self.offset = 0

    def write_bytes(self, data: memoryview) -> tuple[int, int]:
        """A ``BYTE_IO`` item; returns its length and CRC32C."""
        crc = int(_crc32c.crc32c(data))
        self._plan.upload(data)
        self.offset += len(data)
        return len(data), crc

    def write_tensor(self, index: MetadataIndex, tensor: torch.Tensor) -> tuple[int, int]:
        """A tensor item (``torch.save``'s bytes, copied from the base if unchanged); its length and CRC32C."""
        template = self._templates.template(tensor)
        data = storage_bytes(tensor) if template is not None else None
        if template is None or data is None or data[:4] == _DESCRIPTOR:
            sink = _PlannedSink(self._plan)
            save_to_stream(tensor, sink)  # type: ignore[arg-type]
            self.offset += sink.length
            return sink.length, sink.crc
        prefix = memoryview(template.prefix)
        length = len(prefix) + len(data) + len(template.suffix)
        head = int(_crc32c.crc32c(prefix))
        base = self._base.items.get(index)
        if base is not None and base.length == length and base.relative_path == self._source_rel:
            # Checksummed where the bytes lie; copied into no part buffer if unchanged.
            body, zip_crc = int(_crc32c.crc32c(data)), zlib.crc32(data)
            suffix = memoryview(template.suffix_for(zip_crc))
            tail = int(_crc32c.crc32c(suffix))
            crc = combine_crcs((head, len(prefix)), (body, len(data)), (tail, len(suffix)))
            if crc == base.crc32c:
                self._plan.copy(prefix, base.offset, head)
                self._plan.copy(data, base.offset + len(prefix), body)
                self._plan.copy(suffix, base.offset + len(prefix) + len(data), tail)
            else:
                for piece in (prefix, data, suffix):
                    self._plan.upload(piece)
            self.offset += length
            return length, crc
        sums = DataSums()
        self._plan.upload(prefix)
        self._plan.upload(data, sums.tap)
        suffix = memoryview(template.suffix_for(sums.crc32))
        self._plan.upload(suffix)
        self.offset += length
        return length, combine_crcs(
            (head, len(prefix)), (sums.crc32c, len(data)), (int(_crc32c.crc32c(suffix)), len(suffix))
        )

    def finish(self) -> None:
        """Send what the planner still holds (before the upload completes)."""
        self._plan.finish()

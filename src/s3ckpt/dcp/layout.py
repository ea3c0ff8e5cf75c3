"""What a sharded checkpoint is on S3, shared by the writer and the reader.

A checkpoint at ``s3://bucket/run/step-100`` is the prefix ``run/step-100/`` holding:

* ``__{rank}_{n}.distcp``: rank ``rank``'s data file(s), or ``__shard{k}/__{rank}_{n}.distcp`` with a
  :class:`NumericPrefixStrategy`. Each is a concatenation of items, exactly as torch's ``FileSystemWriter``
  lays them out: a ``torch.save`` of each tensor, the raw bytes of each non-tensor item.
* ``.metadata.s3ckpt.json`` (the *manifest*): size and CRC32C of ``.metadata``; size, CRC32C and ETag of
  every data file; offset, length and CRC32C of every item.
* extra files the coordinator uploads beside the shards (Lightning's ``meta.pt``: the trainer state), each
  recorded in the manifest's ``extras`` with its size, CRC32C and ETag, so they are covered by the commit.
* ``.metadata``: the pickled DCP ``Metadata`` whose ``storage_data`` maps each item to torch's own
  ``_StorageInfo(relative_path, offset, length)``, so a copy of the prefix on local disk also loads with
  torch's ``FileSystemReader``. It is written last, and its presence is the commit: a prefix without it is
  an unfinished save and is never loaded.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch.distributed.checkpoint.metadata import Metadata

from ..errors import CheckpointCorruptedError, UnsafeCheckpointError
from ..s3_dirpath_utils import build_s3_url, parse_s3_url

__all__ = [
    "DATA_SUFFIX",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "METADATA_NAME",
    "SHARD_DIR_PREFIX",
    "FileRecord",
    "FlatPrefixStrategy",
    "ItemWrite",
    "Manifest",
    "NumericPrefixStrategy",
    "PrefixStrategy",
    "RankFiles",
    "check_extra_name",
    "is_data_file",
    "loads_metadata",
    "split_url",
]

METADATA_NAME = ".metadata"
MANIFEST_NAME = ".metadata.s3ckpt.json"
MANIFEST_FORMAT = "s3ckpt-dcp/1"
DATA_SUFFIX = ".distcp"
SHARD_DIR_PREFIX = "__shard"
# Only keys of this shape are ours to delete when a save replaces a previous or unfinished one; anything else
# under the prefix (a user's notes, a nested checkpoint) is left alone.
_DATA_FILE_RE = re.compile(r"^(?:__shard\d+/)?__\d+_\d+\.distcp$")


def is_data_file(relative_key: str) -> bool:
    """True if ``relative_key`` (relative to the checkpoint prefix) names a rank data file we write."""
    return bool(_DATA_FILE_RE.match(relative_key))


def check_extra_name(name: str) -> str:
    """``name`` if it may be an extra file of a sharded checkpoint (``meta.pt``): one plain file name that
    cannot be taken for a shard, ``.metadata`` or the manifest.

    Raises:
        ValueError: anything else, naming it.
    """
    if not name or "/" in name or name.startswith(".") or is_data_file(name):
        raise ValueError(
            f"extra file name {name!r}: must be a plain file name (no '/', not starting with '.', not a "
            "__<rank>_<n>.distcp shard name), e.g. 'meta.pt'"
        )
    return name


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/run/ckpt`` -> ``("bucket", "run/ckpt/")``: the checkpoint is a prefix, never the bucket."""
    bucket, key = parse_s3_url(url, require_key=True)
    prefix = key if key.endswith("/") else key + "/"
    build_s3_url(bucket, prefix + MANIFEST_NAME)  # validates the longest key we will write
    return bucket, prefix


@runtime_checkable
class PrefixStrategy(Protocol):
    """Where each rank's data files go, relative to the checkpoint prefix."""

    def rank_dir(self, rank: int) -> str:
        """The sub-folder of ``rank``'s files (no slashes at either end), or ``""`` for the prefix itself."""
        ...


@dataclass(frozen=True)
class FlatPrefixStrategy:
    """Every rank's files directly under the checkpoint prefix (torch's own layout; the default)."""

    def rank_dir(self, rank: int) -> str:
        """Always ``""``."""
        return ""


@dataclass(frozen=True)
class NumericPrefixStrategy:
    """Spread rank files over ``n`` sub-prefixes ``__shard0`` ... ``__shard{n-1}`` (rank ``r`` -> ``r % n``).

    S3 scales request rates per key prefix (about 3,500 writes and 5,500 reads per second each, more after
    it repartitions a hot prefix); hundreds of ranks uploading parts under one prefix can be throttled with
    503 SlowDown. Distinct sub-prefixes let the store split the load from the first save.

    Args:
        n: number of sub-prefixes, 1 to 10,000.
    """

    n: int

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= 10_000:
            raise ValueError(f"NumericPrefixStrategy(n={self.n!r}): n must be a whole number from 1 to 10000")

    def rank_dir(self, rank: int) -> str:
        """``__shard{rank % n}``."""
        return f"{SHARD_DIR_PREFIX}{rank % self.n}"


@dataclass(frozen=True)
class RankFiles:
    """The coordinator's decision for one rank (``SavePlan.storage_data``): how its files are named."""

    rank: int
    directory: str
    base: Any = None
    """:class:`s3ckpt.dcp.incremental.BaseItems`: the base's records of this rank's items (incremental saves)."""

    def relative_path(self, n: int) -> str:
        name = f"__{self.rank}_{n}{DATA_SUFFIX}"
        return f"{self.directory}/{name}" if self.directory else name


@dataclass(frozen=True)
class ItemWrite:
    """``WriteResult.storage_data`` as a rank reports it to the coordinator: where the item is, its CRC32C,
    and what the rank's upload of the whole file produced (checked with HEAD before the commit)."""

    relative_path: str
    offset: int
    length: int
    crc32c: int
    file_size: int
    file_crc32c: int
    file_etag: str


@dataclass(frozen=True)
class FileRecord:
    """One data file as committed."""

    size: int
    crc32c: int
    etag: str


def strip_etag(etag: str) -> str:
    """ETags come quoted from some calls and not others; compare them bare."""
    return etag.strip().strip('"')


@dataclass
class Manifest:
    """The JSON sidecar ``.metadata.s3ckpt.json``: digests of everything the commit covers.

    ``items[relative_path][offset] = (length, crc32c)``: an item is identified by its file and offset, which
    is exactly what ``.metadata``'s ``_StorageInfo`` records, so the two never need a shared index.
    """

    metadata_size: int
    metadata_crc32c: int
    files: dict[str, FileRecord] = field(default_factory=dict)
    items: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)
    save_id: str = ""
    world_size: int = 0
    extras: dict[str, FileRecord] = field(default_factory=dict)
    """Files beside the shards that the commit covers (``meta.pt``), by name relative to the prefix."""

    def to_json(self) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "save_id": self.save_id,
            "world_size": self.world_size,
            "metadata": {"size": self.metadata_size, "crc32c": self.metadata_crc32c},
            "files": {k: dataclasses.asdict(v) for k, v in sorted(self.files.items())},
            "items": {
                path: [[off, length, crc] for off, (length, crc) in sorted(entries.items())]
                for path, entries in sorted(self.items.items())
            },
        }
        if self.extras:
            doc["extras"] = {k: dataclasses.asdict(v) for k, v in sorted(self.extras.items())}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> Manifest:
        """Parse a manifest; anything malformed raises :class:`CheckpointCorruptedError` naming ``where``."""
        try:
            doc = json.loads(data)
            if doc.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            return cls(
                metadata_size=int(doc["metadata"]["size"]),
                metadata_crc32c=int(doc["metadata"]["crc32c"]),
                files={
                    str(k): FileRecord(int(v["size"]), int(v["crc32c"]), str(v["etag"]))
                    for k, v in doc["files"].items()
                },
                items={
                    str(path): {int(off): (int(length), int(crc)) for off, length, crc in entries}
                    for path, entries in doc["items"].items()
                },
                save_id=str(doc.get("save_id", "")),
                world_size=int(doc.get("world_size", 0)),
                extras={
                    str(k): FileRecord(int(v["size"]), int(v["crc32c"]), str(v["etag"]))
                    for k, v in doc.get("extras", {}).items()
                },
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointCorruptedError(f"{where} is not a valid s3ckpt DCP manifest: {exc}") from exc


# Everything a DCP Metadata pickle legitimately references. `.metadata` is a pickle (DCP's format), and a
# plain pickle.load runs whatever callable the file names: a writable bucket would be code execution on
# every rank that loads. A CRC32C is no defence (anyone can compute one), so globals are allow-listed.
_SAFE_GLOBALS = {
    ("torch.serialization", "_get_layout"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}
_DCP_PACKAGE = "torch.distributed.checkpoint."


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if "." not in name:
            if (module, name) in _SAFE_GLOBALS:
                return super().find_class(module, name)
            if module == "torch":
                obj = getattr(torch, name, None)
                if obj is torch.Size or isinstance(obj, torch.dtype | torch.layout | torch.memory_format):
                    return obj
            if module.startswith(_DCP_PACKAGE):
                obj = getattr(importlib.import_module(module), name, None)
                # DCP's metadata is made of dataclasses and enums; no function of the package is allowed.
                if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                    return obj
        raise UnsafeCheckpointError(
            f"refusing to unpickle {module}.{name}: a DCP .metadata never references it. If you trust this "
            "checkpoint's writer (a custom planner), load it with S3StorageReader(..., trusted_metadata=True)"
        )


def loads_metadata(data: bytes, *, trusted: bool = False, where: str = ".metadata") -> Metadata:
    """Unpickle a DCP ``Metadata``, allowing only the globals DCP itself writes unless ``trusted``.

    Raises:
        UnsafeCheckpointError: the pickle references anything else.
        CheckpointCorruptedError: it is not a pickle of a ``Metadata``.
    """
    try:
        obj = pickle.loads(data) if trusted else _MetadataUnpickler(io.BytesIO(data)).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:
        raise CheckpointCorruptedError(f"{where} is not a readable DCP Metadata pickle: {exc}") from exc
    if not isinstance(obj, Metadata):
        raise CheckpointCorruptedError(f"{where} holds a {type(obj).__name__}, not a DCP Metadata")
    return obj


class S3CheckpointId:
    """The ``checkpoint_id`` face DCP's storage reader and writer share: an ``s3://`` URL in ``self.url``."""

    url: str | None

    @property
    def checkpoint_id(self) -> str | None:
        """The checkpoint URL (``s3://bucket/prefix/``)."""
        return self.url

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """True for ``s3://`` URLs."""
        return isinstance(checkpoint_id, str) and checkpoint_id.startswith("s3://")

"""Which checkpoints exist under a prefix, and which of them are committed.

One recursive listing (no per-object requests) is grouped into logical checkpoints:

* ``file``: one ``torch.save`` object (``*.ckpt``, ``*.pt``, ``*.pth``, ``*.bin``). Visible means whole: S3
  shows a multipart object only once it is complete, so every listed file is committed.
* ``model_parallel``: NeMo's per-rank files of one checkpoint, ``<dir>/mp_rank_XX/<name>`` or
  ``<dir>/tp_rank_XX_pp_rank_XXX/<name>``, named by the path without the rank folder (NeMo's
  ``uninject_model_parallel_rank``). Committed once its group marker ``<name>.s3ckpt-group.json`` exists,
  written by rank 0 after every rank's file is in place.
* ``sharded``: a ``torch.distributed.checkpoint`` directory; committed once its ``.metadata`` exists (the
  DCP writer writes it last, after checking every shard).

Step and epoch are read from the Lightning-style name (``epoch=3-step=400``) so that ordering needs no
extra request; manifests can be fetched for details with ``with_manifests=True``.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal

from .errors import CheckpointCorruptedError
from .layout import Manifest, is_manifest_key, read_manifest
from .s3_dirpath_utils import build_s3_url, parse_s3_url
from .transport import ops
from .transport.context import S3Transport
from .transport.ops import ListedObject

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "GROUP_MARKER_SUFFIX",
    "CheckpointEntry",
    "list_checkpoints",
    "parse_step_epoch",
    "uninject_model_parallel_rank",
]

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
GROUP_MARKER_SUFFIX = ".s3ckpt-group.json"
DCP_METADATA = ".metadata"
# s3ckpt.dcp.NumericPrefixStrategy spreads rank files over <checkpoint>/__shard<k>/: they belong to <checkpoint>/.
_DCP_SHARD_DIR_RE = re.compile(r"(^|/)__shard\d+/$")
log = logging.getLogger(__name__)
_MP_DIR_RE = re.compile(r"(^|/)(mp_rank_\d+|tp_rank_\d+_pp_rank_\d+)/")
_STEP_RE = re.compile(r"(?:^|[-_/])step=?(\d+)")
_EPOCH_RE = re.compile(r"(?:^|[-_/])epoch=?(\d+)")

Kind = Literal["file", "model_parallel", "sharded"]


def uninject_model_parallel_rank(key: str) -> str:
    """``run/mp_rank_01/x.ckpt`` -> ``run/x.ckpt`` (and the same for ``tp_rank_XX_pp_rank_XXX``)."""
    return _MP_DIR_RE.sub(r"\1", key, count=1)


def parse_step_epoch(name: str) -> tuple[int | None, int | None]:
    """Step and epoch from a Lightning-style file name, or None where absent."""
    step = _STEP_RE.search(name)
    epoch = _EPOCH_RE.search(name)
    return (int(step.group(1)) if step else None, int(epoch.group(1)) if epoch else None)


@dataclass(frozen=True)
class CheckpointEntry:
    """One logical checkpoint under a prefix."""

    url: str
    """``s3://`` URL of the checkpoint: the file, the rank-less name, or the sharded directory (ending in /)."""
    kind: Kind
    keys: tuple[str, ...]
    """The data objects it is made of."""
    size: int
    last_modified: datetime | None
    committed: bool
    reason: str = ""
    """Why it is not committed (empty when it is)."""
    step: int | None = None
    epoch: int | None = None
    manifest: Manifest | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def copy_of(self) -> str | None:
        """For a server-side copy (``save_last="link"``'s ``last.ckpt``): the key it was copied from, as its
        manifest records it (listed ``with_manifests``); None otherwise. The copy is a checkpoint of its own:
        deleting its source leaves it whole."""
        source = self.manifest.meta.get("copy_of") if self.manifest is not None else None
        return str(source) if source else None


def _is_checkpoint_key(key: str) -> bool:
    return key.endswith(CHECKPOINT_SUFFIXES)


def list_checkpoints(
    t: S3Transport,
    url: str,
    *,
    with_manifests: bool = False,
    include_uncommitted: bool = True,
) -> list[CheckpointEntry]:
    """Every checkpoint under the ``s3://`` prefix ``url``, newest step first (then newest time).

    Args:
        t: transport.
        url: ``s3://bucket/prefix``; a trailing ``/`` is implied.
        with_manifests: also GET each file checkpoint's manifest (one request per checkpoint).
        include_uncommitted: keep entries that are not committed (``committed=False`` with a reason).

    Raises:
        S3NotFoundError: the bucket does not exist.
    """
    bucket, prefix = parse_s3_url(url)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    objects: dict[str, ListedObject] = {o.key: o for o in ops.list_objects(t, bucket, prefix)}
    if not objects:
        ops.check_bucket(t, bucket)
    entries: list[CheckpointEntry] = []
    sharded_dirs: dict[str, list[ListedObject]] = defaultdict(list)
    mp_groups: dict[str, list[ListedObject]] = defaultdict(list)

    for key, obj in objects.items():
        base = key.rsplit("/", 1)[-1]
        if base.endswith(".distcp") or base == DCP_METADATA or base == DCP_METADATA + ".tmp":
            directory = key[: len(key) - len(base)]
            if base.endswith(".distcp"):
                directory = _DCP_SHARD_DIR_RE.sub(r"\1", directory)
            sharded_dirs[directory].append(obj)
    in_shards = {o.key for members in sharded_dirs.values() for o in members}
    for key, obj in objects.items():
        if is_manifest_key(key) or key.endswith(GROUP_MARKER_SUFFIX):
            continue
        home = _sharded_dir_of(key, sharded_dirs)
        if home is not None:
            # Everything else inside a sharded checkpoint (Lightning's meta.pt, the DCP manifest) is a piece
            # of it, never a checkpoint of its own.
            if key not in in_shards:
                sharded_dirs[home].append(obj)
            continue
        if not _is_checkpoint_key(key):
            continue
        logical = uninject_model_parallel_rank(key)
        if logical != key:
            mp_groups[logical].append(obj)
            continue
        step, epoch = parse_step_epoch(key.rsplit("/", 1)[-1])
        entries.append(
            CheckpointEntry(
                url=build_s3_url(bucket, key),
                kind="file",
                keys=(key,),
                size=obj.size,
                last_modified=obj.last_modified,
                committed=True,
                step=step,
                epoch=epoch,
            )
        )

    for logical, members in mp_groups.items():
        entries.append(
            _group_entry(
                bucket,
                logical,
                "model_parallel",
                members,
                committed=logical + GROUP_MARKER_SUFFIX in objects,
                reason="no group commit marker (a rank's save did not finish)",
            )
        )
    for directory, members in sharded_dirs.items():
        entries.append(
            _group_entry(
                bucket,
                directory,
                "sharded",
                members,
                committed=directory + DCP_METADATA in objects,
                reason="no .metadata (the sharded save did not finish)",
            )
        )

    if with_manifests:
        entries = [
            replace(e, manifest=_manifest_or_none(t, bucket, e.keys[0])) if e.kind == "file" else e for e in entries
        ]
        entries = [_fill_from_manifest(e) for e in entries]
    if not include_uncommitted:
        entries = [e for e in entries if e.committed]
    entries.sort(key=_order_key, reverse=True)
    return entries


def _sharded_dir_of(key: str, sharded_dirs: dict[str, list[ListedObject]]) -> str | None:
    """The sharded checkpoint directory ``key`` lies in (at any depth), if any."""
    parts = key.split("/")
    for i in range(len(parts) - 1, 0, -1):
        directory = "/".join(parts[:i]) + "/"
        if directory in sharded_dirs:
            return directory
    return None


def _group_entry(
    bucket: str, logical: str, kind: Kind, members: list[ListedObject], *, committed: bool, reason: str
) -> CheckpointEntry:
    """The entry of a checkpoint made of several objects (rank files, shards)."""
    step, epoch = parse_step_epoch(logical.rstrip("/").rsplit("/", 1)[-1])
    return CheckpointEntry(
        url=build_s3_url(bucket, logical),
        kind=kind,
        keys=tuple(sorted(m.key for m in members)),
        size=sum(m.size for m in members),
        last_modified=max((m.last_modified for m in members if m.last_modified), default=None),
        committed=committed,
        reason="" if committed else reason,
        step=step,
        epoch=epoch,
    )


def _manifest_or_none(t: S3Transport, bucket: str, key: str) -> Manifest | None:
    # One unreadable manifest must not hide every other checkpoint from a listing; the load of that
    # checkpoint reports it.
    try:
        return read_manifest(t, bucket, key)
    except CheckpointCorruptedError as exc:
        log.warning("ignoring the manifest of s3://%s/%s: %s", bucket, key, exc)
        return None


def _fill_from_manifest(entry: CheckpointEntry) -> CheckpointEntry:
    m = entry.manifest
    if m is None:
        return entry
    step = m.meta.get("global_step", m.meta.get("step"))
    epoch = m.meta.get("epoch")
    return replace(
        entry,
        step=int(step) if isinstance(step, int) else entry.step,
        epoch=int(epoch) if isinstance(epoch, int) else entry.epoch,
    )


def _order_key(entry: CheckpointEntry) -> tuple[int, float, str]:
    step = entry.step if entry.step is not None else -1
    ts = entry.last_modified.timestamp() if entry.last_modified else 0.0
    return (step, ts, entry.url)

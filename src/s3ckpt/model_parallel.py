"""NeMo's model-parallel checkpoints: one file per tensor x pipeline rank, committed as one group.

NeMo's legacy strategy (``NLPDDPStrategy``) saves a checkpoint ``<dir>/<name>`` as one file per model-parallel
rank, ``<dir>/mp_rank_XX/<name>`` (pipeline size 1) or ``<dir>/tp_rank_XX_pp_rank_XXX/<name>``, each written
by the rank of that coordinate whose data-parallel rank is 0. The group is one checkpoint: it is committed by
the marker ``<dir>/<name>.s3ckpt-group.json``, which records each rank file's size and ETag, is written last
(once every rank file is in place) and is deleted first.

Two ways to write the marker, one code path (:func:`write_group_marker`):

* :func:`s3ckpt.distributed.commit_model_parallel`: one rank, after a barrier that follows every save.
* automatically, with no collective (only the data-parallel-rank-0 ranks save, so a collective over the
  world would deadlock): :class:`~s3ckpt.lightning.S3CheckpointIO` built with the group's sizes saves a rank
  file with :func:`save_rank_file`, which, once this rank's file and manifest are stored, HEADs the group's
  ``tp * pp`` files and writes the marker if every one is there, from the same save. S3's read-after-write
  consistency makes the rank that stores its file last see all the others, so some rank always commits;
  ranks that finish together write the same marker (a conditional PUT, then a comparison), and all succeed.

"The same save" is told by each rank file's manifest: it must describe the object now stored (a rank whose
upload has landed but whose manifest has not is not finished) and record the same step and epoch as this
rank's. That matters when a name is saved again (``last.ckpt``): the file another rank has not replaced yet
belongs to the previous save and must not be committed with this one.

Removal (:func:`remove_rank_file`, each rank its own file) deletes the marker first. One window is left open
without a collective: a rank whose commit check ran just before another rank removed its file of the same
checkpoint (possible only when a checkpoint is removed while a save of it is still pending on another rank)
writes a marker that names a file no longer there. Resume's check of a group's marker against its files
skips such a group, and the committing rank's own removal of that checkpoint deletes the marker again.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import checkpoint as ck
from .catalog import GROUP_MARKER_SUFFIX, uninject_model_parallel_rank
from .errors import CheckpointCorruptedError, ConfigError, ConflictError, S3NotFoundError
from .layout import Manifest, read_manifest
from .resume import head_many
from .s3_dirpath_utils import build_s3_url, parse_s3_url
from .transport import ops
from .transport.context import S3Transport

__all__ = [
    "GROUP_MARKER_FORMAT",
    "GroupSizes",
    "RankFile",
    "commit_if_complete",
    "group_record",
    "model_parallel_rank_url",
    "parse_rank_url",
    "rank_keys",
    "remove_rank_file",
    "save_rank_file",
    "write_group_marker",
]

log = logging.getLogger(__name__)

GROUP_MARKER_FORMAT = "s3ckpt-group/1"
# The folder NeMo's inject_model_parallel_rank puts right above the file name.
_RANK_DIR_RE = re.compile(r"^(?:mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+))$")
# A conditional PUT racing another one on the same key may get 409 ConditionalRequestConflict with neither
# object stored yet; it is tried again this many times.
_MARKER_ATTEMPTS = 3
_warned_unsized = False  # a rank file saved without the group's sizes: said once per process


def model_parallel_rank_url(url: str, tp_rank: int, pp_rank: int = 0, pipeline_parallel_size: int = 1) -> str:
    """NeMo's ``inject_model_parallel_rank``: ``<dir>/<name>`` -> ``<dir>/mp_rank_XX/<name>`` (or
    ``tp_rank_XX_pp_rank_XXX`` with pipeline parallelism)."""
    head, slash, name = url.rpartition("/")  # no slash: a bare key at the top of a bucket
    folder = f"mp_rank_{tp_rank:02d}" if pipeline_parallel_size == 1 else f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}"
    return f"{head}{slash}{folder}/{name}"


@dataclass(frozen=True)
class RankFile:
    """A per-rank path of a model-parallel checkpoint."""

    url: str
    """The rank file, ``<dir>/mp_rank_XX/<name>`` or ``<dir>/tp_rank_XX_pp_rank_XXX/<name>``."""
    group_url: str
    """The checkpoint without the rank folder, ``<dir>/<name>`` (what resume returns)."""
    tp_rank: int
    pp_rank: int
    pipeline_folder: bool
    """The folder names a pipeline rank (``tp_rank_XX_pp_rank_XXX``), as NeMo writes when pp > 1."""

    @property
    def marker_url(self) -> str:
        """The group's commit marker."""
        return self.group_url + GROUP_MARKER_SUFFIX


def parse_rank_url(url: str) -> RankFile | None:
    """The rank coordinates of a NeMo per-rank path, or ``None`` if ``url`` has no rank folder above its name."""
    head, _, name = url.rpartition("/")
    parent, _, folder = head.rpartition("/")
    match = _RANK_DIR_RE.match(folder)
    if match is None or not parent or not name:
        return None
    group_url = f"{parent}/{name}"
    _, key = parse_s3_url(url, require_key=True)
    if uninject_model_parallel_rank(key) != parse_s3_url(group_url)[1]:
        return None  # another rank folder higher up: the catalog would group it elsewhere
    mp, tp, pp = match.groups()
    return RankFile(url, group_url, int(mp if mp is not None else tp), int(pp or 0), mp is None)


def rank_keys(group_key: str, tensor_parallel_size: int, pipeline_parallel_size: int = 1) -> list[str]:
    """Every rank file key of the group ``group_key`` (the key without a rank folder), pipeline-major."""
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    return [model_parallel_rank_url(group_key, r, p, pp) for p in range(pp) for r in range(tp)]


def group_record(infos: Sequence[ops.ObjectInfo]) -> dict[str, Any]:
    """The marker's content: each rank file's size and ETag, so a file replaced later is caught on resume."""
    return {
        "format": GROUP_MARKER_FORMAT,
        "created": time.time(),
        "files": {info.key: {"size": info.size, "etag": info.etag} for info in infos},
    }


def write_group_marker(t: S3Transport, bucket: str, group_key: str, infos: Sequence[ops.ObjectInfo]) -> str:
    """Write the marker of the group ``group_key`` recording ``infos``; returns its ``s3://`` URL.

    Idempotent, for ranks that finish at the same moment: the PUT is conditional (``If-None-Match: *``); if
    a marker is already there and records the same files, that rank's commit is this one too. A marker that
    records other files was left by an earlier save of the same name and is replaced.

    Raises:
        S3CheckpointError: the store refused or failed the write.
    """
    record = group_record(infos)
    body = json.dumps(record, sort_keys=True).encode()
    key = group_key + GROUP_MARKER_SUFFIX
    url = build_s3_url(bucket, key)
    existing: dict[str, Any] | None = None
    for attempt in range(1, _MARKER_ATTEMPTS + 1):
        try:
            ops.put_bytes(t, bucket, key, body, content_type="application/json", if_none_match=True)
            return url
        except ConflictError:
            existing = _recorded_files(t, bucket, key)
        if existing == record["files"]:
            log.debug("%s: already committed by another rank", url)
            return url
        if existing is not None:
            log.info("%s: replacing a marker that records other files (an earlier save of this name)", url)
            break
        if attempt < _MARKER_ATTEMPTS:
            time.sleep(0.05 * attempt)  # 409: another conditional PUT was in flight and may have landed now
    ops.put_bytes(t, bucket, key, body, content_type="application/json")
    return url


def _recorded_files(t: S3Transport, bucket: str, key: str) -> dict[str, Any] | None:
    """The ``files`` of the marker at ``key``; ``None`` if there is none, ``{}`` if it is unreadable."""
    try:
        raw = json.loads(ops.get_bytes(t, bucket, key))
    except S3NotFoundError:
        return None
    except ValueError:
        return {}
    files = raw.get("files") if isinstance(raw, dict) else None
    return files if isinstance(files, dict) else {}


@dataclass(frozen=True)
class GroupSizes:
    """A model-parallel group's shape: ``tp * pp`` rank files per checkpoint."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    def rank_file(self, url: str) -> RankFile | None:
        """``url`` as a rank file of this group shape, or ``None`` for a plain checkpoint (no rank folder, or a
        group of one, which is committed without a marker).

        Raises:
            ConfigError: the rank folder does not fit the sizes (a rank beyond them, or NeMo's pipeline
                folder where the pipeline size is 1 and the other way round).
        """
        rank_file = parse_rank_url(url)
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        if rank_file is None:
            return None
        if tp * pp == 1:
            global _warned_unsized
            if _warned_unsized:
                return None
            _warned_unsized = True
            log.warning(
                "%s is a model-parallel rank file, but tensor_parallel_size and pipeline_parallel_size are 1: its "
                "group is not committed automatically (resume skips it until it is); pass the sizes, or call "
                "s3ckpt.distributed.commit_model_parallel",
                url,
            )
            return None
        if rank_file.tp_rank >= tp or rank_file.pp_rank >= pp or rank_file.pipeline_folder != (pp > 1):
            raise ConfigError(
                f"{url}: the rank folder does not fit tensor_parallel_size={tp} x pipeline_parallel_size={pp} "
                "(NeMo names mp_rank_XX when pp is 1, tp_rank_XX_pp_rank_XXX otherwise); pass the job's sizes"
            )
        return rank_file


def commit_if_complete(t: S3Transport, rank_file: RankFile, sizes: GroupSizes) -> str | None:
    """Commit ``rank_file``'s group if every rank's file of this save is stored; call after this rank's own
    save. Returns the marker's URL, or ``None`` while ranks are still saving (a later rank commits).

    Requests: ``tp * pp`` HEADs, and ``tp * pp`` manifest GETs once every file is there, then the marker PUT.
    """
    bucket, group_key = parse_s3_url(rank_file.group_url, require_key=True)
    keys = rank_keys(group_key, sizes.tensor_parallel_size, sizes.pipeline_parallel_size)
    infos = head_many(t, bucket, keys)
    present = [info for info in infos if info is not None]
    if len(present) < len(keys):
        log.debug("%s: %d of %d rank files stored; a later rank commits", rank_file.group_url, len(present), len(keys))
        return None
    manifests = _read_manifests(t, bucket, keys)
    own = manifests[keys.index(parse_s3_url(rank_file.url)[1])]
    for key, info, manifest in zip(keys, present, manifests, strict=True):
        if own is None or manifest is None or not manifest.matches(info) or manifest.meta != own.meta:
            log.debug("%s: %s is not (yet) from this save; a later rank commits", rank_file.group_url, key)
            return None
    url = write_group_marker(t, bucket, group_key, present)
    log.info("committed the model-parallel checkpoint %s (%d rank files)", rank_file.group_url, len(keys))
    return url


def _read_manifests(t: S3Transport, bucket: str, keys: list[str]) -> list[Manifest | None]:
    def read(key: str) -> Manifest | None:
        try:
            return read_manifest(t, bucket, key)
        except CheckpointCorruptedError as exc:
            log.warning("%s; its model-parallel group is not committed", exc)
            return None

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(keys)))) as pool:
        return list(pool.map(read, keys))


def save_rank_file(obj: Any, rank_file: RankFile, sizes: GroupSizes, *, transport: S3Transport) -> ck.SaveStats:
    """Save this rank's file of a model-parallel checkpoint and commit the group if it is now complete.

    The group's marker is deleted first: from then on the checkpoint of that name is uncommitted (a save of
    the same name replaces it) until every rank has saved again.

    Raises:
        S3CheckpointError: the save or the commit failed on the store.
    """
    bucket, marker = parse_s3_url(rank_file.marker_url, require_key=True)
    ops.delete_object(transport, bucket, marker)
    stats = ck.save(obj, rank_file.url, transport=transport)
    commit_if_complete(transport, rank_file, sizes)
    return stats


def remove_rank_file(rank_file: RankFile, *, transport: S3Transport) -> None:
    """Delete this rank's file of a model-parallel checkpoint, after the group's marker (so the group is
    uncommitted before any of its files goes). Each rank removes its own file; missing objects are fine."""
    bucket, marker = parse_s3_url(rank_file.marker_url, require_key=True)
    ops.delete_object(transport, bucket, marker)
    ck.delete(rank_file.url, transport=transport)

"""Copy a committed sharded checkpoint on the store: every shard and extra file server-side, then its own
manifest and ``.metadata`` last.

What ``save_last="link"`` does for a sharded checkpoint: ``last.ckpt/`` becomes a copy of the newest top-k
checkpoint without one byte uploaded again. The copy is committed like a save (``.metadata`` last, after
every copied object), pinned to the ETags the source's commit recorded, so a source replaced meanwhile makes
the copy fail rather than mix two checkpoints. Each item keeps its recorded CRC32C (the bytes are the same),
so a load of the copy verifies every item as it would the source.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from ..transport.context import S3Transport
from ..transport.copy import copy_object
from ..transport.ops import ObjectInfo
from .commit import clear_previous, put_record
from .layout import MANIFEST_NAME, METADATA_NAME, FileRecord, split_url, strip_etag
from .shared import fetch_committed

__all__ = ["ShardedCopy", "copy_sharded"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShardedCopy:
    """What one sharded copy wrote."""

    src: str
    dst: str
    objects: int
    bytes: int
    seconds: float


def copy_sharded(t: S3Transport, src_url: str, dst_url: str) -> ShardedCopy:
    """Make ``dst_url`` a committed copy of the committed sharded checkpoint ``src_url`` (replacing any
    checkpoint there: its ``.metadata`` is deleted first).

    Raises:
        CheckpointNotFoundError: nothing committed at ``src_url``.
        CheckpointCorruptedError: the source has no manifest, or it does not match.
        ConflictError: a source object changed while it was being copied.
    """
    start = time.perf_counter()
    src = fetch_committed(t, src_url, verify=True)
    assert src.manifest is not None  # verify=True
    manifest = src.manifest
    src_bucket, src_prefix = split_url(src_url)
    dst_bucket, dst_prefix = split_url(dst_url)
    clear_previous(t, dst_bucket, dst_prefix, overwrite=True, extra_names=list(manifest.extras))
    records = {**manifest.files, **manifest.extras}

    def one(item: tuple[str, FileRecord]) -> tuple[str, FileRecord]:
        rel, rec = item
        source = ObjectInfo(src_bucket, src_prefix + rel, rec.size, f'"{rec.etag}"')
        result = copy_object(t, src_bucket, src_prefix + rel, dst_bucket, dst_prefix + rel, source=source)
        return rel, dataclasses.replace(rec, etag=strip_etag(result.etag))

    workers = max(1, min(t.transfer.max_write_concurrency * 2, len(records), t.clients.max_pool_connections))
    with ThreadPoolExecutor(workers, thread_name_prefix="s3ckpt-dcp-copy") as pool:
        copied = dict(pool.map(one, sorted(records.items())))
    new = dataclasses.replace(
        manifest,
        files={k: copied[k] for k in manifest.files},
        extras={k: copied[k] for k in manifest.extras},
    )
    dst = f"s3://{dst_bucket}/{dst_prefix}"
    put_record(t, dst_bucket, dst_prefix + MANIFEST_NAME, new.to_json(), exclusive=False, url=dst)
    put_record(t, dst_bucket, dst_prefix + METADATA_NAME, src.metadata, exclusive=False, url=dst)
    size = sum(r.size for r in records.values())
    seconds = time.perf_counter() - start
    log.info("copied %s -> %s on the store (%d objects, %d bytes, %.2f s)", src.url, dst, len(records), size, seconds)
    return ShardedCopy(src.url, dst, len(records), size, seconds)

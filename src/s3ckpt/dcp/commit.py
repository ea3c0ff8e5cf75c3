"""The coordinator's side of a sharded save: clear the prefix before, check and commit after.

Protocol (the coordinator runs all of it; ranks only upload their own files):

1. Before any rank writes (``prepare_global_plan``): if ``.metadata`` exists and ``overwrite`` is off, refuse.
   With ``overwrite``, delete ``.metadata`` *first*, so from that instant the prefix is an unfinished save,
   never a mix of old and new files that looks committed. Then delete the manifest, the data files an
   earlier save left, and abort its incomplete multipart uploads.
2. Each rank streams its files and reports size, CRC32C and ETag of each in its ``WriteResult``s.
3. ``finish``: HEAD every file and compare size, ETag and (where the store keeps one) the full-object
   CRC32C with what its rank reported. Any difference aborts the commit. Then the coordinator uploads the
   extra files (Lightning's ``meta.pt``), which the manifest records like the shards.
4. PUT the manifest, then PUT ``.metadata`` (conditional on absence unless overwriting, so two jobs racing
   for one prefix cannot both commit). ``.metadata`` present means every file it names was confirmed.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import crc32c as _crc32c
from torch.distributed.checkpoint import filesystem as _fs
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.storage import WriteResult

from ..errors import CheckpointCorruptedError, ConflictError, S3NotFoundError
from ..transport import ops
from ..transport.context import S3Transport
from .layout import MANIFEST_NAME, METADATA_NAME, FileRecord, ItemWrite, Manifest, is_data_file, strip_etag

__all__ = ["clear_previous", "commit", "put_record"]

log = logging.getLogger(__name__)

# Enough parallel HEADs that committing 1,000 rank files takes seconds, few enough to stay far below a
# prefix's request budget.
_HEAD_CONCURRENCY = 16


def clear_previous(
    t: S3Transport, bucket: str, prefix: str, *, overwrite: bool, extra_names: Sequence[str] = ()
) -> None:
    """Make ``prefix`` ready for a new save (step 1 of the protocol).

    Raises:
        ConflictError: a committed checkpoint is there and ``overwrite`` is off.
        S3NotFoundError: the bucket does not exist.
    """
    url = f"s3://{bucket}/{prefix}"
    committed = ops.exists(t, bucket, prefix + METADATA_NAME)
    if committed:
        if not overwrite:
            raise ConflictError(
                f"{url} already holds a committed checkpoint (.metadata exists); save to a new prefix, or pass "
                "overwrite=True to replace it"
            )
        # The commit marker goes first: a crash after this line leaves an unfinished save, never a committed
        # checkpoint whose files are half old and half new.
        ops.delete_object(t, bucket, prefix + METADATA_NAME)
        log.info("overwriting %s: old .metadata deleted", url)
    extras = set(extra_names)
    stale = [
        o.key
        for o in ops.list_objects(t, bucket, prefix)
        if o.key == prefix + MANIFEST_NAME or is_data_file(o.key[len(prefix) :]) or o.key[len(prefix) :] in extras
    ]
    if stale:
        ops.delete_objects(t, bucket, stale)
    # A rank killed mid-upload leaves its multipart upload open (invisible, but billed until aborted).
    for upload in ops.list_uploads(t, bucket, prefix):
        if is_data_file(upload.key[len(prefix) :]):
            ops.abort_upload(t, bucket, upload.key, upload.upload_id)


def _collect(
    results: Sequence[Sequence[WriteResult]], url: str
) -> tuple[dict[str, FileRecord], dict[str, dict[int, tuple[int, int]]], dict[MetadataIndex, _fs._StorageInfo]]:
    files: dict[str, FileRecord] = {}
    items: dict[str, dict[int, tuple[int, int]]] = {}
    storage: dict[MetadataIndex, _fs._StorageInfo] = {}
    for rank_results in results:
        for wr in rank_results:
            info = wr.storage_data
            if not isinstance(info, ItemWrite):
                raise TypeError(f"{url}: WriteResult for {wr.index} carries {type(info).__name__}, not ItemWrite")
            record = FileRecord(info.file_size, info.file_crc32c, strip_etag(info.file_etag))
            if files.setdefault(info.relative_path, record) != record:
                raise CheckpointCorruptedError(
                    f"{url}: two different uploads reported for {info.relative_path}; not committed"
                )
            items.setdefault(info.relative_path, {})[info.offset] = (info.length, info.crc32c)
            # torch's own record type, so the committed .metadata is exactly what FileSystemReader reads.
            storage[wr.index] = _fs._StorageInfo(info.relative_path, info.offset, info.length)
    return files, items, storage


def _check_file(t: S3Transport, bucket: str, prefix: str, rel: str, rec: FileRecord) -> str | None:
    try:
        info = ops.head(t, bucket, prefix + rel)
    except S3NotFoundError:
        return f"{rel} is missing"
    if info.size != rec.size:
        return f"{rel} has {info.size} bytes, its rank wrote {rec.size}"
    if strip_etag(info.etag) != rec.etag:
        return f"{rel} has ETag {info.etag}, its rank's upload produced {rec.etag} (replaced by another writer?)"
    if info.checksum_crc32c is not None and info.checksum_crc32c != ops.crc32c_b64(rec.crc32c):
        return f"{rel}: the store's CRC32C {info.checksum_crc32c} differs from its rank's {rec.crc32c:08x}"
    return None


def put_record(t: S3Transport, bucket: str, key: str, data: bytes, *, exclusive: bool, url: str) -> None:
    try:
        ops.put_bytes(t, bucket, key, data, if_none_match=exclusive)
    except ConflictError as exc:
        # A retried conditional PUT whose first response was lost answers 412 although the object is ours.
        try:
            if ops.get_bytes(t, bucket, key) == data:
                return
        except S3NotFoundError:
            pass
        raise ConflictError(f"{url} was committed by another writer during this save; this save is discarded") from exc


def commit(
    t: S3Transport,
    bucket: str,
    prefix: str,
    metadata: Metadata,
    results: Sequence[Sequence[WriteResult]],
    *,
    overwrite: bool,
    extras: Mapping[str, bytes] | None = None,
) -> Manifest:
    """Steps 3 and 4: confirm every reported file, upload ``extras`` (name -> bytes, e.g. Lightning's
    ``meta.pt``), then write the manifest (which records the extras too) and ``.metadata``.

    Raises:
        CheckpointCorruptedError: a file is missing or differs from its rank's report (nothing committed).
        ConflictError: another writer committed this prefix meanwhile (``overwrite`` off).
    """
    url = f"s3://{bucket}/{prefix}"
    files, items, storage = _collect(results, url)
    workers = max(1, min(_HEAD_CONCURRENCY, t.clients.max_pool_connections, len(files)))
    with ThreadPoolExecutor(workers, thread_name_prefix="s3ckpt-dcp-head") as pool:
        problems = [p for p in pool.map(lambda kv: _check_file(t, bucket, prefix, *kv), files.items()) if p]
    if problems:
        raise CheckpointCorruptedError(
            f"{url} not committed: {len(problems)} of {len(files)} data file(s) do not match what their ranks "
            f"wrote: {'; '.join(problems[:5])}"
        )
    extra_records = {
        name: FileRecord(len(data), _crc32c.crc32c(data), strip_etag(ops.put_bytes(t, bucket, prefix + name, data)))
        for name, data in (extras or {}).items()
    }
    metadata.storage_data = storage
    metadata.version = getattr(_fs, "CURRENT_DCP_VERSION", "1.0.0")
    blob = pickle.dumps(metadata)
    save_id = metadata.storage_meta.save_id if metadata.storage_meta is not None else None
    manifest = Manifest(
        metadata_size=len(blob),
        metadata_crc32c=_crc32c.crc32c(blob),
        files=files,
        items=items,
        save_id=save_id or "",
        world_size=len(results),
        extras=extra_records,
    )
    # Manifest before .metadata: whoever sees .metadata can rely on the manifest being there. Both are
    # conditional unless overwriting, so of two jobs racing for one prefix at most one commits.
    put_record(t, bucket, prefix + MANIFEST_NAME, manifest.to_json(), exclusive=not overwrite, url=url)
    put_record(t, bucket, prefix + METADATA_NAME, blob, exclusive=not overwrite, url=url)
    log.info("committed %s: %d file(s), %d bytes", url, len(files), sum(f.size for f in files.values()))
    return manifest

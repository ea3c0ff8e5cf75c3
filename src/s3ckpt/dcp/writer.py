"""``S3StorageWriter``: torch.distributed.checkpoint's storage layer for S3, streaming and crash-safe."""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ..budget import ShardBudget, check_shard_budget
from ..checkpoint import resolve_transport
from ..errors import ConfigError
from ..incremental.fallback import compose_store_checksum
from ..serialization import ZipLayoutError, disable_crc_filling
from ..transport.client import ClientFactory
from ..transport.compose import ComposingWriter, CopyPartError, CopySource
from ..transport.context import S3Transport
from ..transport.upload import MultipartWriter
from .commit import clear_previous, commit
from .incremental import BaseItems, ItemComposer, base_items_for
from .item_template import ItemTemplates
from .layout import (
    FlatPrefixStrategy,
    PrefixStrategy,
    RankFiles,
    S3CheckpointId,
    check_extra_name,
    split_url,
)
from .write_items import ItemTap, item_bytes, resolved, results, split

__all__ = ["S3StorageWriter"]

log = logging.getLogger(__name__)


class S3StorageWriter(S3CheckpointId, StorageWriter):
    """Save a ``torch.distributed.checkpoint`` straight to ``s3://bucket/prefix``.

    Each rank streams its items into one multipart upload per file (``__{rank}_{n}.distcp``), so memory per
    rank is bounded by ``(max_write_concurrency + 1) * chunk_size_MB`` MiB whatever the state size, and
    records each item's offset, length and CRC32C. The coordinator commits by writing ``.metadata`` last,
    after HEAD confirms every rank's files (see :mod:`s3ckpt.dcp.commit`): a save that fails or is killed
    leaves no ``.metadata`` and is never loaded.

    Usable with ``dcp.save`` and ``dcp.async_save``; needs ``use_collectives=True`` (the default). DCP
    does not pick it from an ``s3://`` ``checkpoint_id`` by itself: pass ``storage_writer=``, or use
    :func:`s3ckpt.dcp.save`.

    Args:
        url: the checkpoint, ``s3://bucket/prefix`` (a prefix of its own). May be left out if
            ``checkpoint_id`` is given to ``dcp.save``.
        transport: client, retry and transfer settings; default: built from the environment.
        chunk_size_MB: multipart part size for this writer (overrides the transport's).
        max_write_concurrency: parts in flight per file (overrides the transport's).
        prefix_strategy: where rank files go; :class:`NumericPrefixStrategy` spreads them over sub-prefixes.
            Default: all under the checkpoint prefix.
        files_per_rank: files each rank writes in parallel, each its own upload, so memory and parts in
            flight are multiplied by it.
        extra_files: small files (name -> bytes) the coordinator uploads beside the shards inside the same
            commit, e.g. Lightning's ``{"meta.pt": ...}`` (the trainer state): recorded in the manifest and
            written before ``.metadata``, so a committed checkpoint always has them. Only the coordinator's
            value is used.
        overwrite: replace a committed checkpoint at ``url``. Off by default: saving onto a committed
            checkpoint raises :class:`ConflictError` before any byte is written. When on, the old
            ``.metadata`` is deleted before any rank writes, so an interrupted overwrite leaves an
            unfinished save, never a committed mix of two checkpoints.
        strict_request_budget: raise ``ConfigError`` instead of warning when the save would send more write
            requests per second to one prefix than S3 serves (:func:`s3ckpt.budget.check_shard_budget`, run by
            the coordinator before any rank writes; the message names the ``NumericPrefixStrategy(n)`` needed).
        base: an earlier committed checkpoint saved by s3ckpt (``s3://...``) to compose from: each rank's items
            whose bytes are unchanged since ``base`` are copied by the store instead of uploaded, the files
            stay byte for byte what a plain save writes (see :mod:`s3ckpt.dcp.incremental`). An unusable base
            (missing, not committed, the same prefix) or a store that cannot copy parts: everything uploaded.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        transport: S3Transport | None = None,
        chunk_size_MB: int | None = None,
        max_write_concurrency: int | None = None,
        prefix_strategy: PrefixStrategy | None = None,
        files_per_rank: int = 1,
        extra_files: Mapping[str, bytes] | None = None,
        overwrite: bool = False,
        strict_request_budget: bool = False,
        base: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.extra_files = {check_extra_name(k): bytes(v) for k, v in (extra_files or {}).items()}
        if isinstance(files_per_rank, bool) or not isinstance(files_per_rank, int) or not 1 <= files_per_rank <= 64:
            raise ConfigError(f"S3StorageWriter.files_per_rank={files_per_rank!r}: must be a whole number, 1 to 64")
        self.transport = resolve_transport(
            transport, chunk_size_MB=chunk_size_MB, max_write_concurrency=max_write_concurrency
        )
        need = files_per_rank * self.transport.transfer.max_write_concurrency + 4
        if need > self.transport.clients.max_pool_connections:
            # Parallel files multiply the parts in flight; a pool smaller than that would open and drop a
            # connection for every part past its size.
            t = self.transport
            self.transport = S3Transport(
                ClientFactory(t.clients.config, max_pool_connections=need), t.retrier, t.transfer
            )
        self.prefix_strategy: PrefixStrategy = prefix_strategy if prefix_strategy is not None else FlatPrefixStrategy()
        self.files_per_rank = files_per_rank
        self.overwrite = overwrite
        self.strict_request_budget = strict_request_budget
        self.base = str(base) if base is not None else None
        self.bytes_copied = 0  # this rank's bytes copied from the base by the last save
        self.request_budget: ShardBudget | None = None  # set on the coordinator by prepare_global_plan
        self.url: str | None = None
        self.bucket = ""
        self.prefix = ""
        self.save_id = uuid.uuid4().hex
        self.rank = 0
        self.is_coordinator = False
        if url is not None:
            self._set_url(url)

    def _set_url(self, url: str | os.PathLike[str]) -> None:
        self.bucket, self.prefix = split_url(str(url))
        self.url = f"s3://{self.bucket}/{self.prefix}"

    def _require_url(self) -> str:
        if self.url is None:
            raise ConfigError("S3StorageWriter has no URL: pass url=... or checkpoint_id=... to dcp.save")
        return self.url

    # -- StorageWriter --------------------------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new save, at ``checkpoint_id`` if given."""
        if checkpoint_id:
            self._set_url(checkpoint_id)
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Record this rank's role.

        Raises:
            ConfigError: ``use_collectives=False`` (each rank would commit alone; there is no safe commit).
        """
        self._require_url()
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)
        if not kwargs.get("use_collectives", True):
            raise ConfigError(
                "S3StorageWriter needs use_collectives=True: .metadata is written once, by the coordinator, "
                "after every rank's files are confirmed"
            )

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """No per-rank planning: the coordinator names every rank's files."""
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Clear the prefix (refusing a committed checkpoint unless ``overwrite``) and name each rank's files.

        Runs on the coordinator before any rank writes, which is what makes deleting the old ``.metadata``
        here safe.
        """
        # First, before anything is deleted: only the coordinator knows how many ranks write, and under which prefix.
        t = self.transport.transfer
        self.request_budget = check_shard_budget(
            [self.prefix + self.prefix_strategy.rank_dir(rank) for rank, plan in enumerate(plans) if plan.items],
            t.max_write_concurrency,
            files_per_rank=self.files_per_rank,
            part_size_MB=t.chunk_size_MB,
            strict=self.strict_request_budget,
            where=self.url or "",
        )
        bases: list[BaseItems | None] = [None] * len(plans)
        if self.base is not None and split_url(self.base) != (self.bucket, self.prefix):
            # Read once, here: each rank gets the base's records of its own items inside its plan.
            bases = base_items_for(self.transport, self.base, plans, where=self.url or "")
        clear_previous(
            self.transport, self.bucket, self.prefix, overwrite=self.overwrite, extra_names=list(self.extra_files)
        )
        return [
            dataclasses.replace(plan, storage_data=RankFiles(rank, self.prefix_strategy.rank_dir(rank), bases[rank]))
            for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Stream this rank's items into its file(s); the results carry each file's size, CRC32C and ETag."""
        files = plan.storage_data
        if not isinstance(files, RankFiles):
            raise TypeError(f"SavePlan.storage_data is {type(files).__name__}, not set by S3StorageWriter")
        bins = [b for b in split(plan.items, self.files_per_rank) if b]
        jobs = [(files.relative_path(n), b) for n, b in enumerate(bins)]
        self.bytes_copied = 0
        per_file = self._write_files(jobs, planner, files.base)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result([wr for results in per_file for wr in results])
        return fut

    def _write_files(
        self, jobs: list[tuple[str, list[WriteItem]]], planner: SavePlanner, base: BaseItems | None
    ) -> list[list[WriteResult]]:
        try:
            try:
                return self._write_files_once(jobs, planner, base)
            except CopyPartError as exc:
                # Aborted, nothing committed: this rank's files are written again, every byte uploaded.
                log.warning("rank %d: incremental save of %s: %s; uploading everything", self.rank, self.url, exc)
                self.bytes_copied = 0
                return self._write_files_once(jobs, planner, None)
        except ZipLayoutError as exc:
            # The CRC filler met a layout it does not follow (a torch it was not built for): the uploads were
            # aborted; torch computes the CRC-32s from now on and this rank's files are written again.
            disable_crc_filling(str(exc))
            return self._write_files_once(jobs, planner, None)

    def _write_files_once(
        self, jobs: list[tuple[str, list[WriteItem]]], planner: SavePlanner, base: BaseItems | None
    ) -> list[list[WriteResult]]:
        if len(jobs) <= 1:
            return [self._write_file(rel, items, planner, base) for rel, items in jobs]
        with ThreadPoolExecutor(len(jobs), thread_name_prefix="s3ckpt-dcp-write") as pool:
            return list(pool.map(lambda job: self._write_file(job[0], job[1], planner, base), jobs))

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit (coordinator only): HEAD-check every file, then write the manifest and ``.metadata``."""
        metadata.storage_meta = self.storage_meta()
        commit(
            self.transport,
            self.bucket,
            self.prefix,
            metadata,
            results,
            overwrite=self.overwrite,
            extras=self.extra_files,
        )

    def _compose_file(
        self, rel: str, items: list[WriteItem], planner: SavePlanner, base: BaseItems, source: CopySource
    ) -> list[WriteResult]:
        """:meth:`_write_file` for an incremental save: unchanged items copied from ``source`` (a base file)."""
        written: list[tuple[WriteItem, int, int, int]] = []
        upload = ComposingWriter(
            self.transport,
            self.bucket,
            self.prefix + rel,
            expected_size=sum(item_bytes(i) for i in items),
            source=source,
            store_checksum=compose_store_checksum(),
        )
        with upload:
            composer = ItemComposer(upload, base, ItemTemplates())
            for item, data in resolved(items, planner):
                start = composer.offset
                if isinstance(data, torch.Tensor):
                    length, crc = composer.write_tensor(item.index, data)
                else:
                    length, crc = composer.write_bytes(data)
                written.append((item, start, length, crc))
            composer.finish()
        self.bytes_copied += upload.bytes_copied
        log.debug(
            "rank %d composed %s: %d of %d bytes copied from %s",
            self.rank,
            rel,
            upload.bytes_copied,
            upload.bytes_written,
            source.url,
        )
        return results(rel, written, upload.result)

    def storage_meta(self) -> StorageMeta | None:
        """The checkpoint URL and this save's id, recorded in ``.metadata``."""
        return StorageMeta(checkpoint_id=self.url, save_id=self.save_id)

    # -- internals ------------------------------------------------------------------------------------------

    def _write_file(
        self, rel: str, items: list[WriteItem], planner: SavePlanner, base: BaseItems | None
    ) -> list[WriteResult]:
        key = self.prefix + rel
        expected = sum(item_bytes(i) for i in items)
        source = base.source_for([i.index for i in items]) if base is not None else None
        if base is not None and source is not None:
            return self._compose_file(rel, items, planner, base, source)
        written: list[tuple[WriteItem, int, int, int]] = []
        # torch.save runs once per kind of tensor (dtype, shape, strides); the rest are written from its bytes.
        templates = ItemTemplates()
        with MultipartWriter(self.transport, self.bucket, key, expected_size=expected) as upload:
            tap = ItemTap(upload)
            for item, data in resolved(items, planner):
                start = upload.bytes_written
                tap.crc = 0
                if isinstance(data, torch.Tensor):
                    # torch.save's bytes, with the zip CRC-32s filled in by s3ckpt as they stream (a third of
                    # torch's cost; see s3ckpt.zip_crc), written from the template of its kind.
                    templates.save(data, tap)
                else:
                    tap.write(data)
                written.append((item, start, upload.bytes_written - start, tap.crc))
        result = upload.result
        log.debug(
            "rank %d wrote s3://%s/%s: %d items (%d from templates), %d bytes",
            self.rank,
            self.bucket,
            key,
            len(items),
            templates.templated,
            result.size,
        )
        return results(rel, written, result)

"""``S3StorageReader``: load a sharded checkpoint, fetching only the byte ranges this rank needs."""

from __future__ import annotations

import io
import logging
import os
import threading
import uuid
from collections import deque
from concurrent.futures import Future as CFuture
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, cast

import crc32c as _crc32c
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..checkpoint import resolve_transport
from ..config import MiB
from ..errors import (
    CheckpointCorruptedError,
    ConfigError,
    S3CheckpointError,
    S3NotFoundError,
)
from ..transport import ops
from ..transport.context import S3Transport
from ..transport.download import ObjectChangedError, fetch_range, plan_ranges
from ..transport.ops import ObjectInfo
from .item import MemoryFile, tensor_in_item
from .layout import METADATA_NAME, FileRecord, Manifest, S3CheckpointId, loads_metadata, split_url
from .shared import PreloadedCheckpoint, fetch_committed
from .spans import Span, SpanBuffers, plan_spans

__all__ = ["S3StorageReader"]

log = logging.getLogger(__name__)


def _narrow(tensor: torch.Tensor, offsets: torch.Size, lengths: torch.Size) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offsets, lengths, strict=True)):
        if start != 0 or length != tensor.size(dim):
            tensor = tensor.narrow(dim, start, length)
    return tensor


class S3StorageReader(S3CheckpointId, StorageReader):
    """Load a ``torch.distributed.checkpoint`` from ``s3://bucket/prefix``, with any world size.

    Only a committed checkpoint is loaded (``.metadata`` present). Each rank fetches only the items its
    load plan needs, with nearby items coalesced into one ranged GET; every GET is pinned with ``If-Match``
    to the ETag the commit recorded (or, for a copy whose ETags differ, to the current one once its size and
    stored CRC32C match the manifest), and every item is checked against the CRC32C recorded when it was
    written, before it is deserialized.

    Memory: the spans in flight, at most ``max_read_concurrency * read_chunk_size`` bytes (or one span if
    larger), plus the tensors being loaded into.

    Args:
        url: the checkpoint, ``s3://bucket/prefix``. May be left out if ``checkpoint_id`` is given to
            ``dcp.load``.
        transport: client, retry and transfer settings; default: built from the environment.
        max_read_concurrency: ranged GETs in flight (overrides the transport's).
        coalesce_gap_MB: merge item ranges of one file at most this far apart into one GET.
        max_span_MB: the largest merged range (one item may exceed it).
        verify: check ``.metadata`` and every item against the manifest. ``False`` also loads checkpoints
            written by other DCP writers (``FsspecWriter``), which have no manifest, without checks.
        trusted_metadata: unpickle ``.metadata`` without the allow-list (only for custom planners whose
            metadata holds other types; a pickle can run code).
        preloaded: ``.metadata`` and its manifest already fetched and verified for this URL
            (:func:`s3ckpt.dcp.fetch_shared`: once, by rank 0, broadcast), so this reader sends no request
            for them, however many ``dcp.load`` calls and ranks use it.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        transport: S3Transport | None = None,
        max_read_concurrency: int | None = None,
        coalesce_gap_MB: float = 1.0,
        max_span_MB: int = 64,
        verify: bool = True,
        trusted_metadata: bool = False,
        preloaded: PreloadedCheckpoint | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= coalesce_gap_MB <= 1024:
            raise ConfigError(f"S3StorageReader.coalesce_gap_MB={coalesce_gap_MB!r}: must be from 0 to 1024")
        if not 1 <= max_span_MB <= 5120:
            raise ConfigError(f"S3StorageReader.max_span_MB={max_span_MB!r}: must be from 1 to 5120")
        self.transport = resolve_transport(transport, max_read_concurrency=max_read_concurrency)
        self.gap = int(coalesce_gap_MB * MiB)
        self.max_span = max_span_MB * MiB
        self.verify = verify
        self.trusted_metadata = trusted_metadata
        self.preloaded = preloaded
        self.url: str | None = None
        self.bucket = ""
        self.prefix = ""
        self.load_id = uuid.uuid4().hex
        self.manifest: Manifest | None = None
        self.storage_data: dict[MetadataIndex, _StorageInfo] = {}
        self.metadata_error: S3CheckpointError | None = None
        """What the last :meth:`read_metadata` raised, if anything."""
        self._objects: dict[str, ObjectInfo] = {}
        self._lock = threading.Lock()
        if url is not None:
            self._set_url(url)

    def _set_url(self, url: str | os.PathLike[str]) -> None:
        self.bucket, self.prefix = split_url(str(url))
        self.url = f"s3://{self.bucket}/{self.prefix}"

    # -- StorageReader --------------------------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Start a new load, from ``checkpoint_id`` if given."""
        if checkpoint_id:
            self._set_url(checkpoint_id)
        self.manifest = None
        self.storage_data = {}
        self._objects = {}
        self.load_id = uuid.uuid4().hex

    # Named `**options`, not `**kwargs`: DCP retries read_metadata(rank=...) for per-rank metadata when the
    # signature has a parameter called "kwargs". A sharded checkpoint is committed by its global .metadata
    # only, so there must be no fallback that could find something else.
    def read_metadata(self, *args: Any, **options: Any) -> Metadata:
        """Fetch and check ``.metadata`` (and its manifest).

        Raises:
            CheckpointNotFoundError: no ``.metadata``: nothing there, or a save that never committed.
            CheckpointCorruptedError: the manifest is missing (with ``verify``) or does not match.
            UnsafeCheckpointError: ``.metadata`` references globals DCP never writes.
        """
        self.metadata_error = None
        try:
            return self._read_metadata()
        except S3CheckpointError as exc:
            # DCP turns a read_metadata failure into an AssertionError that keeps only the message;
            # s3ckpt.dcp.load re-raises this instead.
            self.metadata_error = exc
            raise

    def _read_metadata(self) -> Metadata:
        if self.url is None:
            raise ConfigError("S3StorageReader has no URL: pass url=... or checkpoint_id=... to dcp.load")
        pre = self.preloaded
        if pre is None or pre.url != self.url or (self.verify and pre.manifest is None):
            pre = fetch_committed(self.transport, self.url, verify=self.verify)
        self._objects = {}
        self.manifest = pre.manifest if self.verify else None
        metadata = loads_metadata(pre.metadata, trusted=self.trusted_metadata, where=self.url + METADATA_NAME)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Keep the item locations of ``metadata``."""
        if not isinstance(metadata.storage_data, dict):
            raise CheckpointCorruptedError(f"{self.url}{METADATA_NAME} has no storage_data")
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Unchanged: ranges are planned in :meth:`read_data`, where the items are known."""
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Unchanged."""
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Fetch the spans ``plan`` needs (pipelined: later spans download while earlier ones are loaded)."""
        requests: dict[tuple[str, int], list[ReadItem]] = {}
        infos: list[_StorageInfo] = []
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            if info.transform_descriptors:
                raise CheckpointCorruptedError(
                    f"{self.url}{info.relative_path}: stream transforms {info.transform_descriptors} are not supported"
                )
            reqs = requests.setdefault((info.relative_path, info.offset), [])
            if not reqs:
                infos.append(info)
            reqs.append(req)
        spans = plan_spans(infos, gap=self.gap, max_span=self.max_span)
        cfg = self.transport.transfer
        budget = cfg.max_read_concurrency * cfg.read_chunk_size
        pending: deque[tuple[Span, memoryview, list[CFuture[None]]]] = deque()
        buffers = SpanBuffers()
        in_flight = 0
        queue = iter(spans)
        nxt = next(queue, None)
        with ThreadPoolExecutor(cfg.max_read_concurrency, thread_name_prefix="s3ckpt-dcp-read") as pool:
            try:
                while nxt is not None or pending:
                    while nxt is not None and (not pending or in_flight + nxt.size <= budget):
                        buf = buffers.take(nxt.size)
                        pending.append((nxt, buf, self._submit(pool, nxt, buf)))
                        in_flight += nxt.size
                        nxt = next(queue, None)
                    span, buf, futures = pending.popleft()
                    for fut in futures:
                        fut.result()
                    self._load_span(span, buf, requests, planner)
                    buffers.give(buf)  # loaded (copied into the targets): its pages hold the next span
                    in_flight -= span.size
            except BaseException:
                for _, _, futures in pending:
                    for fut in futures:
                        fut.cancel()
                raise
        log.debug("%s: read %d items in %d spans", self.url, len(infos), len(spans))
        done: Future[None] = Future()
        done.set_result(None)
        return done

    # -- internals ------------------------------------------------------------------------------------------

    def _object(self, path: str) -> ObjectInfo:
        with self._lock:
            info = self._objects.get(path)
        if info is not None:
            return info
        key = self.prefix + path
        if self.manifest is not None:
            record = self.manifest.files.get(path)
            if record is None:
                raise CheckpointCorruptedError(f"{self.url}{path} is referenced by .metadata but not by the manifest")
            info = ObjectInfo(self.bucket, key, record.size, f'"{record.etag}"')
        else:
            # Unverified load: pin every range to what HEAD says now, so one load never mixes two versions.
            try:
                info = ops.head(self.transport, self.bucket, key)
            except S3NotFoundError as exc:
                raise CheckpointCorruptedError(f"{self.url}{path} is missing: the checkpoint is incomplete") from exc
        with self._lock:
            return self._objects.setdefault(path, info)

    def _submit(self, pool: ThreadPoolExecutor, span: Span, view: memoryview) -> list[CFuture[None]]:
        chunk = self.transport.transfer.read_chunk_size
        return [
            pool.submit(self._fetch, span.path, view[a - span.start : b - span.start], a, b)
            for a, b in ((span.start + s, span.start + e) for s, e in plan_ranges(span.size, chunk))
        ]

    def _fetch(self, path: str, out: memoryview, start: int, end: int) -> None:
        info = self._object(path)
        try:
            try:
                fetch_range(self.transport, info, out, start, end)
            except ObjectChangedError:
                if self.manifest is None:
                    raise
                fetch_range(self.transport, self._repin(path, info, self.manifest.files[path]), out, start, end)
        except ObjectChangedError as exc:
            raise ObjectChangedError(f"{self.url}{path} changed while it was being loaded; load again") from exc
        except S3NotFoundError as exc:
            raise CheckpointCorruptedError(f"{self.url}{path} is missing: the checkpoint is incomplete") from exc

    def _repin(self, path: str, stale: ObjectInfo, record: FileRecord) -> ObjectInfo:
        """The file's ETag is not the one the commit recorded. A copy of the checkpoint (``s3ckpt cp``, another
        bucket) has new ETags for the same bytes, so this alone is no proof of damage: accept the object if
        its size, and its full-object CRC32C where the store keeps one, match the manifest. Every item is
        still checked against its own CRC32C before use."""
        with self._lock:
            current = self._objects.get(path)
            if current is not None and current.etag != stale.etag:
                return current  # another range of this file already re-pinned it
        where = f"{self.url}{path}"
        try:
            info = ops.head(self.transport, self.bucket, self.prefix + path)
        except S3NotFoundError as exc:
            raise CheckpointCorruptedError(f"{where} is missing: the checkpoint is incomplete") from exc
        if info.size != record.size:
            raise CheckpointCorruptedError(
                f"{where} has {info.size} bytes, the checkpoint committed {record.size}: it was modified or replaced "
                "after the save"
            )
        if info.checksum_crc32c is not None and info.checksum_crc32c != ops.crc32c_b64(record.crc32c):
            raise CheckpointCorruptedError(
                f"{where} is corrupted: its CRC32C is {info.checksum_crc32c}, {ops.crc32c_b64(record.crc32c)} was "
                "recorded when it was written (modified or replaced after the save)"
            )
        log.info(
            "%s: ETag %s differs from the committed %s (a copy?); its items are verified by CRC32C",
            where,
            info.etag,
            record.etag,
        )
        with self._lock:
            self._objects[path] = info
        return info

    def _load_span(
        self, span: Span, view: memoryview, requests: dict[tuple[str, int], list[ReadItem]], planner: LoadPlanner
    ) -> None:
        for info in span.items:
            data = view[info.offset - span.start : info.offset - span.start + info.length]
            self._check_item(span.path, info, data)
            reqs = requests[(span.path, info.offset)]
            if reqs[0].type == LoadItemType.BYTE_IO:
                for req in reqs:
                    planner.load_bytes(req, io.BytesIO(data))
                continue
            # A view of the downloaded bytes where the item is a plain torch.save of a tensor (one copy, into
            # the target, below); torch.load otherwise.
            tensor = tensor_in_item(data)
            if tensor is None:
                tensor = torch.load(cast(IO[bytes], MemoryFile(data)), map_location="cpu", weights_only=True)
            for req in reqs:
                source = _narrow(tensor, req.storage_offsets, req.lengths)
                target = planner.resolve_tensor(req).detach()
                if target.size() != source.size():
                    raise CheckpointCorruptedError(
                        f"{self.url}{span.path}: item {req.storage_index.fqn} has shape {tuple(source.size())}, "
                        f"the load plan expects {tuple(target.size())}"
                    )
                target.copy_(source)
                planner.commit_tensor(req, target)

    def _check_item(self, path: str, info: _StorageInfo, data: memoryview) -> None:
        if not self.verify or self.manifest is None:
            return
        expected = self.manifest.items.get(path, {}).get(info.offset)
        if expected is None or expected[0] != info.length:
            raise CheckpointCorruptedError(
                f"{self.url}{path}: no manifest entry for the item at offset {info.offset} ({info.length} bytes)"
            )
        actual = _crc32c.crc32c(data)
        if actual != expected[1]:
            raise CheckpointCorruptedError(
                f"{self.url}{path} is corrupted: bytes {info.offset}-{info.offset + info.length - 1} have CRC32C "
                f"{actual:08x}, {expected[1]:08x} was recorded when they were written. Do not use this checkpoint."
            )

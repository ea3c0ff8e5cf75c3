"""Streaming multipart upload with a file-like ``write()`` face.

A serializer (``torch.save``) writes straight into :class:`MultipartWriter`; full parts are sent by a
thread pool while the serializer keeps writing. Memory is bounded whatever the object size: at most
(max_write_concurrency + 1) part buffers, the parts in flight plus the one being filled. Buffers are reused,
never reallocated per part. The object becomes visible only when CompleteMultipartUpload succeeds (S3 never
shows a partial object); on any failure, or if the writer is closed by an exception, the upload is aborted so
no billed, invisible parts are left behind.
"""

from __future__ import annotations

import io
import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import crc32c as _crc32c

from ..config import MAX_PARTS, MiB, adjust_part_size
from ..errors import S3CheckpointError, S3TransferError
from . import ops
from .checksums import crc_combine
from .context import S3Transport
from .finish import NONCE_META, complete_upload, last_part_body, put_whole
from .pause import wait_while_paused, writers_paused

__all__ = ["NONCE_META", "MultipartWriter", "Tap", "UploadResult", "writers_paused"]

log = logging.getLogger(__name__)

# Parts past this many double in size, so a stream of unknown length never runs into S3's 10,000-part
# cap: with 5 MiB parts that still allows 2,000 x (5+10+20+40+80) MiB = 302 GiB.
_PARTS_PER_SIZE_STEP = MAX_PARTS // 5

# write() copies into the part buffer in slices of this size and checksums each slice (CRC32C, and the tap's)
# while it is still in the L2 cache: measured on a 512 MiB save, 256 KiB slices cost 0.63 client CPU-s
# against 0.71 for whole 8 MiB parts, whose bytes a second pass reads back from memory.
_SLICE = 256 * 1024

Tap = Callable[[memoryview], None]
"""Called by :meth:`MultipartWriter.write` with each piece of the data just copied into a part buffer."""


@dataclass(frozen=True)
class UploadResult:
    """What a finished upload wrote."""

    bucket: str
    key: str
    size: int
    etag: str
    crc32c: int
    """CRC32C of the whole object, computed from the bytes written."""
    parts: int
    nonce: str


class MultipartWriter(io.RawIOBase):
    """A write-only binary stream that uploads to ``s3://bucket/key`` as it is written.

    Use as a context manager: a clean exit completes the upload, an exception aborts it.
    ``write()`` takes a ``tap`` (``accepts_tap``): see :meth:`write`.

    Args:
        transport: client, retry policy and transfer knobs (``chunk_size_MB``, ``max_write_concurrency``).
        bucket, key: the destination.
        metadata: user metadata (``x-amz-meta-*``); never put credentials here.
        expected_size: if known, used to pick a part size that fits 10,000 parts up front.
        if_none_match: fail with :class:`ConflictError` if the key already exists when the upload
            completes (S3 conditional write), instead of replacing it.
        progress: called with the number of bytes each time a part (or the single PUT) is stored.
    """

    def __init__(
        self,
        transport: S3Transport,
        bucket: str,
        key: str,
        *,
        metadata: dict[str, str] | None = None,
        expected_size: int | None = None,
        if_none_match: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        cfg = transport.transfer
        self._t = transport
        self.bucket = bucket
        self.key = key
        self.nonce = uuid.uuid4().hex
        self._metadata = {**(metadata or {}), NONCE_META: self.nonce}
        self._if_none_match = if_none_match
        self._progress = progress
        self._checksums = transport.clients.config.checksum_algorithm == "CRC32C"
        self._base_part = adjust_part_size(cfg.part_size, expected_size)
        self._concurrency = cfg.max_write_concurrency
        self._slots = threading.BoundedSemaphore(self._concurrency)
        self._free: list[bytearray] = []
        self._free_lock = threading.Lock()
        self._buf: bytearray | None = None
        self._fill = 0
        self._fill_crc = 0  # CRC32C of self._buf[: self._fill]
        self._part_number = 0
        self._size = 0
        self._crc = 0
        # CRC32C and length of each part, computed as its bytes are copied in and combined in order at the
        # end: no second pass over the bytes.
        self._part_crcs: dict[int, tuple[int, int]] = {}
        self._upload_id: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future[None]] = []
        self._parts: dict[int, dict[str, Any]] = {}
        self._error: BaseException | None = None
        self._result: UploadResult | None = None
        self._aborted = False
        # The S3 error write() raised, kept because torch.save (which calls write() from C++) replaces it
        # with a RuntimeError of its own; __exit__ raises this one instead.
        self._write_error: S3CheckpointError | None = None

    # -- io.RawIOBase -------------------------------------------------------------------------------------

    accepts_tap = True

    def writable(self) -> bool:
        return True

    def write(self, data: Any, *, tap: Tap | None = None) -> int:
        """Buffer ``data`` and send every part that fills up. Blocks while all upload slots are busy.

        Args:
            data: any bytes-like object.
            tap: called with each piece of ``data`` right after it is copied into a part buffer, while it
                is still in the CPU cache: a checksum there costs a fraction of a second pass over ``data``.
        """
        if self.closed:
            raise ValueError(f"write to closed MultipartWriter for s3://{self.bucket}/{self.key}")
        wait_while_paused()
        try:
            self._raise_pending()
            view = memoryview(data).cast("B")
            total = len(view)
            pos = 0
            while pos < total:
                if self._buf is None:
                    self._buf = self._take_buffer(self._current_part_size())
                    self._fill = 0
                room = len(self._buf) - self._fill
                n = min(room, total - pos, _SLICE)
                self._buf[self._fill : self._fill + n] = view[pos : pos + n]
                piece = memoryview(self._buf)[self._fill : self._fill + n]
                try:
                    self._fill_crc = _crc32c.crc32c(piece, self._fill_crc)
                    if tap is not None:
                        tap(piece)
                finally:
                    piece.release()
                self._fill += n
                pos += n
                if self._fill == len(self._buf):
                    self._send_full_buffer()
        except S3CheckpointError as exc:
            self._write_error = self._write_error or exc
            raise
        self._size += total
        return total

    def close(self) -> None:
        """Finish the upload (Complete, or one PUT for a small object). Idempotent."""
        if self.closed:
            return
        try:
            if not self._aborted:
                self._finish()
        except BaseException:
            self.abort()
            raise
        finally:
            super().close()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
            super().close()
            failure = self._write_error
            if failure is not None and isinstance(exc, Exception) and not isinstance(exc, S3CheckpointError):
                # The caller (torch.save's C++ writer) turned our S3 error into its own, e.g.
                # "RuntimeError: unexpected pos": surface the real one (its __cause__ is the botocore error;
                # the caller's exception stays attached as __context__).
                raise failure
        else:
            self.close()

    # -- public --------------------------------------------------------------------------------------------

    @property
    def result(self) -> UploadResult:
        """The finished upload; available after a successful :meth:`close`."""
        if self._result is None:
            raise RuntimeError("upload not finished: close() the writer first")
        return self._result

    @property
    def bytes_written(self) -> int:
        return self._size

    def abort(self) -> None:
        """Abandon the upload: stop sending parts and abort the multipart upload on the store."""
        if self._aborted:
            return
        self._aborted = True
        self._error = self._error or S3TransferError(f"upload to s3://{self.bucket}/{self.key} was aborted")
        self._drain(cancel=True)
        if self._upload_id is not None:
            try:
                ops.abort_upload(self._t, self.bucket, self.key, self._upload_id)
                # Parts still arriving when the abort lands can resurrect an upload on some stores; AWS
                # advises checking, so look once more.
                for pending in ops.list_uploads(self._t, self.bucket, self.key):
                    if pending.upload_id == self._upload_id and pending.key == self.key:
                        ops.abort_upload(self._t, self.bucket, self.key, self._upload_id)
            except S3CheckpointError as exc:
                log.warning(
                    "could not abort multipart upload %s of s3://%s/%s: %s (a lifecycle rule or "
                    "`s3ckpt gc` will clean it up)",
                    self._upload_id,
                    self.bucket,
                    self.key,
                    exc,
                )

    # -- internals -----------------------------------------------------------------------------------------

    def _current_part_size(self) -> int:
        step = (self._part_number) // _PARTS_PER_SIZE_STEP
        return int(min(self._base_part * (2**step), 5 * 1024 * MiB))

    def _take_buffer(self, size: int) -> bytearray:
        with self._free_lock:
            while self._free:
                buf = self._free.pop()
                if len(buf) == size:
                    return buf
        return bytearray(size)

    def _return_buffer(self, buf: bytearray) -> None:
        with self._free_lock:
            if len(self._free) <= self._concurrency:
                self._free.append(buf)

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def _ensure_upload(self) -> str:
        if self._upload_id is None:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key, "Metadata": self._metadata}
            if self._checksums:
                kwargs["ChecksumAlgorithm"] = "CRC32C"
                kwargs["ChecksumType"] = "FULL_OBJECT"
            resp = self._t.call(
                "CreateMultipartUpload", self.bucket, self.key, lambda c: c.create_multipart_upload(**kwargs)
            )
            self._upload_id = str(resp["UploadId"])
            self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="s3ckpt-upload")
        return self._upload_id

    def _send_full_buffer(self) -> None:
        assert self._buf is not None
        buf, n, crc = self._buf, self._fill, self._fill_crc
        self._buf, self._fill, self._fill_crc = None, 0, 0
        self._submit(buf, n, crc)

    def _submit(self, buf: bytearray, n: int, crc: int) -> None:
        self._submit_part(n, crc, lambda upload_id, number: self._upload_part(upload_id, number, buf, n))

    def _submit_part(self, n: int, crc: int, send: Callable[[str, int], None]) -> None:
        """Number the next part (``n`` bytes with CRC32C ``crc``) and run ``send(upload_id, number)`` on the pool."""
        upload_id = self._ensure_upload()
        self._part_number += 1
        number = self._part_number
        if number > MAX_PARTS:
            raise S3TransferError(f"s3://{self.bucket}/{self.key}: more than {MAX_PARTS} parts; raise chunk_size_MB")
        # The slot is taken on the writer thread, so a fast serializer waits here instead of queuing
        # unbounded buffers: this is what bounds memory to (concurrency + 1) parts.
        self._slots.acquire()
        self._raise_pending_release()
        assert self._pool is not None
        self._part_crcs[number] = (crc, n)
        self._futures.append(self._pool.submit(send, upload_id, number))

    def _raise_pending_release(self) -> None:
        if self._error is not None:
            self._slots.release()
            raise self._error

    def _upload_part(self, upload_id: str, number: int, buf: bytearray, n: int) -> None:
        try:
            if self._error is not None:
                return
            body = buf if n == len(buf) else last_part_body(buf, n)
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Key": self.key,
                "UploadId": upload_id,
                "PartNumber": number,
                "Body": body,
            }
            entry: dict[str, Any] = {"PartNumber": number}
            if self._checksums:
                crc = ops.crc32c_b64(self._part_crcs[number][0])
                kwargs["ChecksumCRC32C"] = crc
                entry["ChecksumCRC32C"] = crc
            resp = self._t.call(
                "UploadPart",
                self.bucket,
                self.key,
                lambda c: c.upload_part(**kwargs),
                cancelled=lambda: self._error is not None,
            )
            entry["ETag"] = resp["ETag"]
            self._parts[number] = entry
            if self._progress is not None:
                self._progress(n)
        except BaseException as exc:
            if self._error is None:
                self._error = exc
        finally:
            self._return_buffer(buf)
            self._slots.release()

    def _drain(self, cancel: bool = False) -> None:
        for fut in self._futures:
            if cancel:
                fut.cancel()
        for fut in self._futures:
            if not fut.cancelled():
                fut.result()
        self._futures.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None

    def _finish(self) -> None:
        if self._upload_id is None:
            # Below one part: a single PUT, no multipart overhead.
            data = bytes(memoryview(self._buf)[: self._fill]) if self._buf is not None else b""
            self._buf = None
            self._crc = self._fill_crc
            etag = put_whole(
                self._t,
                self.bucket,
                self.key,
                data,
                metadata=self._metadata,
                if_none_match=self._if_none_match,
                crc32c=self._crc,
            )
            if self._progress is not None:
                self._progress(len(data))
            self._result = UploadResult(self.bucket, self.key, self._size, etag, self._crc, 0, self.nonce)
            return
        if self._fill or self._part_number == 0:
            self._send_full_buffer()
        self._drain()
        self._raise_pending()
        self._before_complete()
        self._crc = self._object_crc()
        etag = complete_upload(
            self._t,
            self.bucket,
            self.key,
            self._upload_id,
            [self._parts[i] for i in sorted(self._parts)],
            crc32c=self._crc if self._checksums else None,
            if_none_match=self._if_none_match,
            nonce=self.nonce,
            size=self._size,
        )
        self._upload_id = None  # completed: nothing left to abort
        self._result = UploadResult(self.bucket, self.key, self._size, etag, self._crc, self._part_number, self.nonce)
        log.debug("uploaded s3://%s/%s: %d bytes in %d parts", self.bucket, self.key, self._size, self._part_number)

    def _before_complete(self) -> None:
        """Every part is stored: a subclass's last check before the object becomes visible."""

    def _object_crc(self) -> int:
        """The whole object's CRC32C from the parts' CRCs, in part order."""
        crc, size = 0, 0
        for number in sorted(self._part_crcs):
            part_crc, n = self._part_crcs[number]
            crc = part_crc if size == 0 else crc_combine("CRC32C", crc, part_crc, n)
            size += n
        if size != self._size:
            raise S3TransferError(f"s3://{self.bucket}/{self.key}: parts hold {size} bytes, {self._size} were written")
        return crc

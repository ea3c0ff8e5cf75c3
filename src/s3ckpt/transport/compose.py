"""A streaming multipart upload whose parts may also be server-side copies of byte ranges of another object.

:class:`ComposingWriter` is a :class:`~s3ckpt.transport.upload.MultipartWriter` with two more calls:
:meth:`~ComposingWriter.flush_part` ends the part being filled early, and :meth:`~ComposingWriter.copy_part`
adds a part that the store copies from a range of a *source* object (``UploadPartCopy`` with
``CopySourceRange``), so those bytes never cross the client. The caller plans the parts (every part but the
last at least 5 MiB, S3's rule for copied and uploaded parts alike); this module only checks the plan and
sends it.

Safety:

* every copy is pinned to the source's ETag (``CopySourceIfMatch``): a source replaced since the caller read
  its manifest fails the copy (412) instead of copying other bytes;
* where the store returns the copied part's CRC32C (AWS, SeaweedFS), it must equal the one the caller
  computed for those bytes; where it returns none (moto, MinIO community), the source is HEADed once after
  the copies, before Complete, and must still carry the pinned ETag (a store that ignores
  ``CopySourceIfMatch`` cannot slip other bytes in unnoticed);
* the whole object's CRC32C is combined from the uploaded and copied parts' CRC32Cs and sent with Complete
  (``FULL_OBJECT``), which AWS and SeaweedFS check against what they assembled.

Any failure aborts the upload, so nothing partial is ever visible; :class:`CopyPartError` tells the caller it
was a copy that failed (the store may lack ``UploadPartCopy``, or the source went away), so it can upload the
bytes instead.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import MAX_PART_SIZE, MIN_PART_SIZE
from ..errors import S3CheckpointError, S3TransferError
from . import ops
from .context import S3Transport
from .upload import MultipartWriter

__all__ = ["ComposingWriter", "CopyPartError", "CopySource"]

log = logging.getLogger(__name__)


class CopyPartError(S3TransferError):
    """A server-side copy of a part failed (no ``UploadPartCopy``, source deleted or replaced, checksum of the
    copied bytes not the expected one). The upload was aborted; uploading the bytes instead will work."""


class CopySource:
    """The object copied from: bucket, key and the ETag every copy is pinned to."""

    def __init__(self, bucket: str, key: str, etag: str, size: int) -> None:
        self.bucket = bucket
        self.key = key
        self.etag = etag
        self.size = size

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class ComposingWriter(MultipartWriter):
    """A :class:`MultipartWriter` that also takes parts copied on the store from ``source``.

    ``bytes_copied`` says how many of the object's bytes the store copied. Args as
    :class:`MultipartWriter`, plus ``source``, and ``store_checksum``: ``False`` creates the upload without
    a checksum algorithm even where the transport asks for CRC32C (the store then keeps none; the caller's
    manifest carries the CRC32C), for stores where copying into a checksummed upload costs as much as
    uploading.
    """

    def __init__(self, *args: Any, source: CopySource, store_checksum: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._checksums and not store_checksum:
            # No checksum algorithm on the upload, and none on its parts: with botocore's default
            # (when_supported) every uploaded part would otherwise carry a CRC32 botocore computes.
            t = self._t
            self._t = S3Transport(t.clients.without_request_checksums(), t.retrier, t.transfer)
            self._checksums = False
        self.source = source
        self.bytes_copied = 0
        # Set (from any upload thread) when the store returned no CRC32C for a copied part: the source is then
        # checked once before Complete.
        self._unconfirmed_copies = False

    @property
    def pending_bytes(self) -> int:
        """Bytes written into the part being filled and not sent yet."""
        return self._fill if self._buf is not None else 0

    def flush_part(self) -> None:
        """Send the part being filled now, whatever its size (the caller keeps it at 5 MiB or more unless it
        is the object's last). A no-op if it is empty."""
        self._raise_pending()
        if self._buf is not None and self._fill:
            if self._fill < MIN_PART_SIZE:
                raise ValueError(f"part of {self._fill} bytes ended early: parts but the last need 5 MiB")
            self._send_full_buffer()

    def copy_part(self, first: int, length: int, crc32c: int) -> None:
        """Append bytes ``[first, first + length)`` of the source as the next part (after :meth:`flush_part`).

        Args:
            first: the range's first byte in the source.
            length: its size, 5 MiB to 5 GiB (S3's limits; a smaller one only as the object's last part).
            crc32c: the CRC32C of those bytes, as the caller computed it from the data it did not send.

        Raises:
            ValueError: a range outside the source or the part size limits, or a part still being filled.
        """
        self._raise_pending()
        if self.pending_bytes:
            raise ValueError("copy_part() while a part is being filled: flush_part() first")
        if first < 0 or length <= 0 or first + length > self.source.size:
            # moto clamps a range past the end, SeaweedFS rejects it: check here, never rely on either.
            raise ValueError(f"copy range {first}+{length} is outside {self.source.url} ({self.source.size} bytes)")
        if length > MAX_PART_SIZE:
            raise ValueError(f"copy part of {length} bytes is over S3's 5 GiB part limit")
        self._submit_part(length, crc32c, lambda uid, number: self._copy(uid, number, first, length, crc32c))
        self._size += length
        self.bytes_copied += length

    def _copy(self, upload_id: str, number: int, first: int, length: int, crc32c: int) -> None:
        try:
            if self._error is not None:
                return
            src = self.source
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Key": self.key,
                "UploadId": upload_id,
                "PartNumber": number,
                "CopySource": {"Bucket": src.bucket, "Key": src.key},
                "CopySourceIfMatch": src.etag,
                "CopySourceRange": f"bytes={first}-{first + length - 1}",
            }
            try:
                resp = self._t.call(
                    "UploadPartCopy",
                    self.bucket,
                    self.key,
                    lambda c: c.upload_part_copy(**kwargs),
                    cancelled=lambda: self._error is not None,
                )
            except S3CheckpointError as exc:
                raise CopyPartError(
                    f"copying bytes {first}-{first + length - 1} of {src.url} (ETag {src.etag}) into part "
                    f"{number} of s3://{self.bucket}/{self.key} failed: {exc}"
                ) from exc
            result = resp.get("CopyPartResult") or {}
            entry: dict[str, Any] = {"PartNumber": number, "ETag": result.get("ETag", "")}
            ours = ops.crc32c_b64(crc32c)
            theirs = result.get("ChecksumCRC32C")
            if theirs is not None and theirs != ours:
                raise CopyPartError(
                    f"the store copied bytes {first}-{first + length - 1} of {src.url} with CRC32C {theirs}, "
                    f"expected {ours}: the source is not the object its manifest describes"
                )
            if theirs is None:
                self._unconfirmed_copies = True
            if self._checksums:
                entry["ChecksumCRC32C"] = ours
            self._parts[number] = entry
            if self._progress is not None:
                self._progress(length)
        except BaseException as exc:
            if self._error is None:
                self._error = exc
        finally:
            self._slots.release()

    def _before_complete(self) -> None:
        """The store returned no checksum for some copies: make sure the source still is the pinned object."""
        if not self._unconfirmed_copies:
            return
        src = self.source
        try:
            info = ops.head(self._t, src.bucket, src.key)
        except S3CheckpointError as exc:
            raise CopyPartError(f"{src.url}, copied from, is gone before the upload completed: {exc}") from exc
        if info.etag != src.etag or info.size != src.size:
            raise CopyPartError(
                f"{src.url} was replaced while parts were copied from it (ETag {src.etag} -> {info.etag}); "
                "the copies may hold the new object's bytes"
            )

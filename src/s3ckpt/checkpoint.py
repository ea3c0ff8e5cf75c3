"""The plain-PyTorch API: :func:`save`, :func:`load`, :func:`verify` and :func:`delete` one checkpoint object.

``save`` streams ``torch.save`` into a multipart upload (never a whole serialized copy in memory), then
writes the manifest. ``load`` downloads with parallel ranged GETs into an in-memory file, checks its CRC32C
*before* unpickling anything, and maps the tensors onto it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointCorruptedError, CheckpointNotFoundError, S3NotFoundError
from .layout import expected_crc32c, manifest_key, summarize_meta, write_manifest
from .s3_dirpath_utils import parse_s3_url
from .serialization import LoadBuffer, load_from_buffer, save_to_stream
from .transport import ops
from .transport.context import S3Transport
from .transport.download import download_into
from .transport.upload import MultipartWriter

__all__ = ["SaveStats", "VerifyResult", "delete", "load", "resolve_transport", "save", "verify"]

log = logging.getLogger(__name__)

_default_transport: S3Transport | None = None


def resolve_transport(
    transport: S3Transport | None = None,
    *,
    chunk_size_MB: int | None = None,
    max_read_concurrency: int | None = None,
    max_write_concurrency: int | None = None,
) -> S3Transport:
    """The given transport (or a shared default built from the environment), with any knob overridden."""
    global _default_transport
    if transport is None:
        if _default_transport is None:
            _default_transport = S3Transport.create()
        transport = _default_transport
    knobs = {
        k: v
        for k, v in (
            ("chunk_size_MB", chunk_size_MB),
            ("max_read_concurrency", max_read_concurrency),
            ("max_write_concurrency", max_write_concurrency),
        )
        if v is not None
    }
    if knobs:
        # replace() re-runs TransferConfig's validation on the overridden knobs.
        transport = transport.with_transfer(dataclasses.replace(transport.transfer, **knobs))
    return transport


@dataclass(frozen=True)
class SaveStats:
    """What one save wrote and how long it took."""

    url: str
    bytes: int
    seconds: float
    crc32c: int
    etag: str
    parts: int

    @property
    def gbps(self) -> float:
        """Throughput in GB/s (10^9 bytes)."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def save(
    obj: Any,
    url: str,
    *,
    transport: S3Transport | None = None,
    chunk_size_MB: int | None = None,
    max_write_concurrency: int | None = None,
    if_none_match: bool = False,
    progress: Callable[[int], None] | None = None,
    zip_crc32: bool = False,
) -> SaveStats:
    """``torch.save(obj)`` straight into ``url``, streaming, with a CRC32C recorded for :func:`load`.

    Memory: about ``(max_write_concurrency + 1) * chunk_size_MB`` MiB of part buffers, whatever the size
    of ``obj``. The object appears at ``url`` only once it is complete; until then any previous object of
    that name stays as it was. If the save fails, nothing is left behind (the upload is aborted).

    Args:
        obj: anything ``torch.save`` accepts.
        url: ``s3://bucket/key``.
        transport: client, retry and transfer settings; default: built from the environment.
        chunk_size_MB, max_write_concurrency: override the transport's knobs for this call.
        if_none_match: refuse to replace an existing object (raises :class:`ConflictError`).
        progress: called with byte counts as parts are stored.
        zip_crc32: also compute the zip format's per-record CRC-32 (see
            :func:`s3ckpt.serialization.save_to_stream`; off by default, the CRC32C covers every byte).

    Returns:
        :class:`SaveStats` (bytes, seconds, CRC32C, ETag).

    Raises:
        ValueError: a malformed URL (before any request).
        S3CheckpointError: the upload failed; its cause is kept as ``__cause__``.
    """
    bucket, key = parse_s3_url(url, require_key=True)
    t = resolve_transport(transport, chunk_size_MB=chunk_size_MB, max_write_concurrency=max_write_concurrency)
    start = time.perf_counter()
    with MultipartWriter(t, bucket, key, if_none_match=if_none_match, progress=progress) as writer:
        save_to_stream(obj, writer, zip_crc32=zip_crc32)
    result = writer.result
    write_manifest(t, result, summarize_meta(obj))
    seconds = time.perf_counter() - start
    log.debug("saved %s: %d bytes in %.2f s", url, result.size, seconds)
    return SaveStats(url, result.size, seconds, result.crc32c, result.etag, result.parts)


def _download_verified(
    t: S3Transport,
    url: str,
    *,
    verify: bool | str,
    progress: Callable[[int], None] | None,
    recorded: tuple[int, str] | None = None,
) -> tuple[LoadBuffer, str, int | None]:
    """Download ``url`` into a :class:`LoadBuffer` and check its CRC32C against the recorded one.

    Returns the buffer, where the expected CRC32C came from, and the CRC32C computed (None if unchecked).
    ``recorded`` is a ``(crc32c, source)`` kept elsewhere (a DCP sidecar), used when the store keeps none.
    """
    bucket, key = parse_s3_url(url, require_key=True)
    try:
        info = ops.head(t, bucket, key)
    except S3NotFoundError as exc:
        try:
            ops.check_bucket(t, bucket)
        except S3NotFoundError as bucket_exc:
            raise CheckpointNotFoundError(str(bucket_exc)) from exc
        raise CheckpointNotFoundError(f"checkpoint not found: {url}") from exc
    if not verify:
        expected, source = None, "verification off"
    elif recorded is not None and info.checksum_crc32c is None:
        expected, source = recorded
    else:
        expected, source = expected_crc32c(t, info)
    buf = LoadBuffer(info.size)
    try:
        download_into(t, info, buf.view, progress=progress)
        actual = buf.crc32c() if expected is not None else None
        if expected is not None:
            if actual != expected:
                raise CheckpointCorruptedError(
                    f"{url} is corrupted: CRC32C of its {info.size} bytes is {actual:08x}, the {source} "
                    f"recorded {expected:08x} at save time. Do not use it; load an older checkpoint."
                )
        elif verify == "require":
            raise CheckpointCorruptedError(f"{url} cannot be verified: {source}")
        elif verify:
            log.warning("loading %s unverified: %s", url, source)
        return buf, source, actual
    except BaseException:
        buf.close()
        raise


def load(
    url: str,
    map_location: Any = None,
    weights_only: bool | None = True,
    *,
    transport: S3Transport | None = None,
    chunk_size_MB: int | None = None,
    max_read_concurrency: int | None = None,
    verify: bool | str = True,
    mmap: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Any:
    """Download and ``torch.load`` the checkpoint at ``url``, verifying its CRC32C first.

    Memory: one copy of the checkpoint (tensors are mapped onto the downloaded bytes, not copied out).

    Args:
        url: ``s3://bucket/key``.
        map_location: as ``torch.load``.
        weights_only: ``True`` (default) refuses pickles that could run code; ``None`` lets torch decide;
            ``False`` only for checkpoints you trust (Lightning checkpoints with custom hyperparameters).
        transport, chunk_size_MB, max_read_concurrency: transfer settings.
        verify: ``True`` checks the recorded CRC32C and warns if none was recorded; ``"require"`` also
            refuses an unverifiable object; ``False`` skips the check.
        mmap: map tensor storages onto the downloaded bytes (no second copy).
        progress: called with byte counts as ranges arrive.

    Raises:
        CheckpointNotFoundError: no object at ``url`` (or no bucket).
        CheckpointCorruptedError: the bytes do not match the recorded checksum, or are not a checkpoint.
        UnsafeCheckpointError: ``weights_only=True`` refused an object.
    """
    t = resolve_transport(transport, chunk_size_MB=chunk_size_MB, max_read_concurrency=max_read_concurrency)
    buf, _, _ = _download_verified(t, url, verify=verify, progress=progress)
    with buf:
        return load_from_buffer(buf, url=url, map_location=map_location, weights_only=weights_only, mmap_tensors=mmap)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`."""

    url: str
    size: int
    crc32c: int
    source: str


def verify(
    url: str,
    *,
    transport: S3Transport | None = None,
    progress: Callable[[int], None] | None = None,
    recorded: tuple[int, str] | None = None,
) -> VerifyResult:
    """Download ``url`` and check its CRC32C without unpickling anything.

    Args:
        recorded: ``(crc32c, source)`` recorded outside the object (a DCP sidecar manifest); used when the
            store keeps no checksum with the object.

    Raises:
        CheckpointCorruptedError: a mismatch, or no checksum recorded for the object.
    """
    t = resolve_transport(transport)
    buf, source, actual = _download_verified(t, url, verify="require", progress=progress, recorded=recorded)
    with buf:
        assert actual is not None  # verify="require" checked it
        return VerifyResult(url, buf.size, actual, source)


def delete(url: str, *, transport: S3Transport | None = None) -> None:
    """Delete a checkpoint object and its manifest. Deleting a missing checkpoint is not an error."""
    bucket, key = parse_s3_url(url, require_key=True)
    t = resolve_transport(transport)
    # Data first: a crash in between leaves an orphan manifest (harmless, `s3ckpt gc` removes it), never a
    # data object whose digest is gone.
    ops.delete_object(t, bucket, key)
    ops.delete_object(t, bucket, manifest_key(key))

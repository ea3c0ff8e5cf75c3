"""The plain-PyTorch API: :func:`save`, :func:`load`, :func:`verify` and :func:`delete` one checkpoint object.

``save`` streams ``torch.save`` into a multipart upload (never a whole serialized copy in memory), then
writes the manifest. ``load`` downloads with parallel ranged GETs into an in-memory file, computing the
checksum the store or the manifest recorded (CRC32C for s3ckpt's own saves; CRC32, CRC64NVME, SHA or a
composite checksum for other tools' uploads) while the bytes arrive, checks it *before* unpickling
anything, and maps the tensors onto it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import given_knobs
from .errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    S3NotFoundError,
    UnverifiableCheckpointError,
)
from .incremental import BaseLayout, RecordComposer
from .incremental.fallback import choose_base, compose_store_checksum, copy_failed
from .layout import Expected, expected_checksum, manifest_key, summarize_meta, write_manifest
from .removal import delete_sharded
from .s3_dirpath_utils import parse_s3_url
from .serialization import LoadBuffer, ZipLayoutError, disable_crc_filling, load_from_buffer, save_to_stream
from .transport import ops
from .transport.checksums import RangeDigest
from .transport.compose import ComposingWriter, CopyPartError
from .transport.context import S3Transport
from .transport.download import download_into
from .transport.upload import MultipartWriter

__all__ = ["SaveStats", "VerifyResult", "delete", "delete_file", "load", "resolve_transport", "save", "verify"]

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
    knobs = given_knobs(
        chunk_size_MB=chunk_size_MB,
        max_read_concurrency=max_read_concurrency,
        max_write_concurrency=max_write_concurrency,
    )
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
    bytes_copied: int = 0
    """Bytes the store copied from ``base`` (unchanged records of an incremental save)."""
    base: str | None = None
    """The checkpoint records were copied from, if any."""

    @property
    def bytes_uploaded(self) -> int:
        """Bytes sent by this client: ``bytes`` less those the store copied."""
        return self.bytes - self.bytes_copied

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
    zip_crc32: bool = True,
    base: str | None = None,
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
        zip_crc32: write the zip format's per-record CRC-32, so the object is a valid zip that
            ``zipfile``, model scanners and ``torch.load`` all accept (the default; s3ckpt computes them as
            the bytes stream by, at about 0.2 CPU-s per GB). ``False`` leaves them 0, a file only torch
            reads (see :func:`s3ckpt.serialization.save_to_stream`).
        base: an earlier checkpoint saved by s3ckpt (``s3://...``, same store) to compose from: records
            whose bytes are unchanged since ``base`` (same name, size, CRC32C and zip CRC-32) are copied by
            the store (``UploadPartCopy``) instead of uploaded; the object is still exactly what
            ``torch.save`` writes. If ``base`` is missing, not s3ckpt's, replaced, deleted while the save
            copies from it, or the store cannot copy parts, the save uploads everything instead (logged).
            ``base`` may be deleted once this save returns (copies are copies, not references).

    Returns:
        :class:`SaveStats` (bytes, seconds, CRC32C, ETag; bytes uploaded and copied).

    Raises:
        ValueError: a malformed URL (before any request).
        S3CheckpointError: the upload failed; its cause is kept as ``__cause__``.
    """
    bucket, key = parse_s3_url(url, require_key=True)
    t = resolve_transport(transport, chunk_size_MB=chunk_size_MB, max_write_concurrency=max_write_concurrency)
    start = time.perf_counter()

    reported = 0  # bytes the caller's progress has been told of, so a redo does not count them twice
    layout = choose_base(t, base, url) if base is not None else None

    def upload(layout: BaseLayout | None) -> tuple[MultipartWriter, RecordComposer]:
        stored = 0

        def counted(n: int) -> None:
            nonlocal reported, stored
            stored += n
            if progress is not None and stored > reported:
                progress(stored - reported)
                reported = stored

        kwargs: dict[str, Any] = {"if_none_match": if_none_match, "progress": counted}
        writer = (
            ComposingWriter(t, bucket, key, source=layout.source, store_checksum=compose_store_checksum(), **kwargs)
            if layout is not None
            else MultipartWriter(t, bucket, key, **kwargs)
        )
        with writer:
            composer = RecordComposer(writer, layout)
            save_to_stream(obj, composer, zip_crc32=zip_crc32)
            composer.finish()
        return writer, composer

    try:
        try:
            writer, composer = upload(layout)
        except CopyPartError as exc:
            # Aborted, nothing stored: the streamed bytes are gone, so serialize again and upload them all.
            copy_failed(t, url, exc)
            layout = None
            writer, composer = upload(None)
    except ZipLayoutError as exc:
        # The upload was aborted, so nothing was stored: save again with torch computing the CRC-32s.
        disable_crc_filling(f"{url}: {exc}")
        layout = None
        writer, composer = upload(None)
    result = writer.result
    copied = writer.bytes_copied if isinstance(writer, ComposingWriter) else 0
    transfer: dict[str, Any] = {"uploaded": result.size - copied, "copied": copied}
    if layout is not None:
        transfer["base"] = layout.url
    write_manifest(t, result, summarize_meta(obj), records=tuple(composer.records), transfer=transfer)
    seconds = time.perf_counter() - start
    log.debug("saved %s: %d bytes (%d copied) in %.2f s", url, result.size, copied, seconds)
    return SaveStats(
        url,
        result.size,
        seconds,
        result.crc32c,
        result.etag,
        result.parts,
        bytes_copied=copied,
        base=layout.url if layout is not None else None,
    )


def _download_verified(
    t: S3Transport,
    url: str,
    *,
    verify: bool | str,
    progress: Callable[[int], None] | None,
    recorded: tuple[int, str] | None = None,
) -> tuple[LoadBuffer, str, Expected | None]:
    """Download ``url`` into a :class:`LoadBuffer`, checking it against the recorded checksum as it arrives.

    Returns the buffer, where the expected checksum came from (or why there is none), and the checksum the
    bytes were verified against (None if unchecked). ``recorded`` is a ``(crc32c, source)`` kept elsewhere
    (a DCP sidecar), used when the store keeps no CRC32C.

    Raises:
        CheckpointCorruptedError: the bytes do not match.
        UnverifiableCheckpointError: ``verify="require"`` and nothing to check against.
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
    expected: Expected | None = None
    if not verify:
        source = "verification off"
    else:
        expected, why = expected_checksum(t, info, recorded=recorded)
        source = expected.source if expected is not None else why
        if expected is None and verify == "require":
            raise UnverifiableCheckpointError(
                f"{url} cannot be verified: {why}. Load it with verify=True (warns) or verify=False if you "
                "trust where it came from."
            )
    buf = LoadBuffer(info.size)
    try:
        view = buf.view
        digest = RangeDigest(expected.algorithm, expected.segment_sizes(info.size), view) if expected else None
        download_into(t, info, view, progress=progress, digest=digest)
        if digest is not None and expected is not None:
            problem = expected.mismatch(digest.digests())
            if problem is not None:
                raise CheckpointCorruptedError(
                    f"{url} is corrupted: {problem} (its {info.size} bytes, checksum from the "
                    f"{expected.origin}). Do not use it; load an older checkpoint."
                )
        elif verify:
            log.warning("loading %s unverified: %s", url, source)
        del digest, view  # the digest holds a view of the buffer's map; close() needs it released
        return buf, source, expected
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
    """Download and ``torch.load`` the checkpoint at ``url``, verifying its checksum first.

    Memory: one copy of the checkpoint (tensors are mapped onto the downloaded bytes, not copied out).

    Args:
        url: ``s3://bucket/key``.
        map_location: as ``torch.load``.
        weights_only: ``True`` (default) refuses pickles that could run code; ``None`` lets torch decide;
            ``False`` only for checkpoints you trust (Lightning checkpoints with custom hyperparameters).
        transport, chunk_size_MB, max_read_concurrency: transfer settings.
        verify: ``True`` checks the recorded checksum and warns if none was recorded; ``"require"`` also
            refuses an unverifiable object (:class:`UnverifiableCheckpointError`); ``False`` skips the check.
        mmap: map tensor storages onto the downloaded bytes (no second copy).
        progress: called with byte counts as ranges arrive.

    Raises:
        CheckpointNotFoundError: no object at ``url`` (or no bucket).
        CheckpointCorruptedError: the bytes do not match the recorded checksum, or are not a checkpoint.
        UnverifiableCheckpointError: ``verify="require"`` and no checksum is recorded anywhere.
        UnsafeCheckpointError: ``weights_only=True`` refused an object.
    """
    t = resolve_transport(transport, chunk_size_MB=chunk_size_MB, max_read_concurrency=max_read_concurrency)
    buf, _, _ = _download_verified(t, url, verify=verify, progress=progress)
    with buf:
        return load_from_buffer(buf, url=url, map_location=map_location, weights_only=weights_only, mmap_tensors=mmap)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`: the object's bytes match this checksum.

    Attributes:
        url: the object.
        size: its bytes.
        crc32c: the object's CRC32C when that is what was checked (s3ckpt's own saves), else None.
        source: where the checksum came from: ``"object"`` (the store), ``"manifest"`` (s3ckpt's manifest)
            or the ``recorded`` source given (``"DCP manifest"``); see :attr:`origin` for it in words.
        algorithm: ``"CRC32C"``, ``"CRC64NVME"``, ``"CRC32"``, ``"SHA1"`` or ``"SHA256"``.
        checksum_type: ``"FULL_OBJECT"`` or ``"COMPOSITE"`` (a checksum of the parts' checksums).
        checksum: the checksum as S3 shows it (base64, ``-<parts>`` for a composite).
        origin: ``"store full-object"``, ``"store composite"``, ``"s3ckpt manifest"`` or ``"DCP sidecar"``.
    """

    url: str
    size: int
    crc32c: int | None
    source: str
    algorithm: str = "CRC32C"
    checksum_type: str = "FULL_OBJECT"
    checksum: str = ""
    origin: str = ""


def verify(
    url: str,
    *,
    transport: S3Transport | None = None,
    progress: Callable[[int], None] | None = None,
    recorded: tuple[int, str] | None = None,
) -> VerifyResult:
    """Download ``url`` and check it against its recorded checksum without unpickling anything.

    The checksum is the store's (any algorithm S3 defines, full-object or composite) or s3ckpt's manifest's;
    see :func:`s3ckpt.layout.expected_checksum` for which wins.

    Args:
        recorded: ``(crc32c, source)`` recorded outside the object (a DCP sidecar manifest); used when the
            store keeps no CRC32C with the object.

    Raises:
        CheckpointCorruptedError: the bytes do not match (or the manifest describes other bytes).
        UnverifiableCheckpointError: nothing records what the bytes should be.
    """
    t = resolve_transport(transport)
    buf, source, expected = _download_verified(t, url, verify="require", progress=progress, recorded=recorded)
    with buf:
        assert expected is not None  # verify="require" raised otherwise
        return VerifyResult(
            url,
            buf.size,
            expected.crc32c,
            source,
            algorithm=expected.algorithm,
            checksum_type=expected.checksum_type,
            checksum=expected.value,
            origin=expected.origin,
        )


def delete(url: str, *, transport: S3Transport | None = None) -> None:
    """Delete the checkpoint at ``url``: the object and its manifest, and a sharded checkpoint of that name
    (``url/.metadata`` first, then every object under ``url/``; see :mod:`s3ckpt.removal`). Deleting a
    missing checkpoint is not an error."""
    bucket, key = parse_s3_url(url, require_key=True)
    t = resolve_transport(transport)
    delete_file(url, transport=t)
    delete_sharded(t, bucket, key.rstrip("/") + "/")


def delete_file(url: str, *, transport: S3Transport | None = None) -> None:
    """Delete the checkpoint object at ``url`` and its manifest only (not a sharded checkpoint of that name)."""
    bucket, key = parse_s3_url(url, require_key=True)
    t = resolve_transport(transport)
    key = key.rstrip("/")
    # Data first: a crash in between leaves an orphan manifest (harmless, `s3ckpt gc` removes it), never a
    # data object whose digest is gone.
    ops.delete_object(t, bucket, key)
    ops.delete_object(t, bucket, manifest_key(key))

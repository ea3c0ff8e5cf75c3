"""A sharded checkpoint's small objects, fetched once and shared: ``.metadata``, its manifest and the extra
files the commit covers (Lightning's ``meta.pt``).

DCP calls ``read_metadata`` on every rank for every ``dcp.load``, and a trainer loads the model and each
optimizer separately: at 1,000 ranks that is thousands of GETs of one object per resume. :func:`fetch_shared`
makes global rank 0 fetch and verify them once and broadcasts the bytes (or the error); each rank's
:class:`~s3ckpt.dcp.S3StorageReader` built with ``preloaded=`` then sends no request for them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import crc32c as _crc32c

from ..errors import CheckpointCorruptedError, CheckpointNotFoundError, S3NotFoundError
from ..transport import ops
from ..transport.context import S3Transport
from .layout import MANIFEST_NAME, METADATA_NAME, Manifest, split_url

__all__ = ["PreloadedCheckpoint", "fetch_committed", "fetch_shared"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreloadedCheckpoint:
    """The verified small objects of one committed sharded checkpoint (picklable: it crosses a broadcast)."""

    url: str
    """``s3://bucket/prefix/`` of the checkpoint."""
    metadata: bytes
    """``.metadata``, checked against the manifest (when there is one)."""
    manifest: Manifest | None
    """``None`` only for an unverified load of a checkpoint another DCP writer made."""
    extras: dict[str, bytes] = field(default_factory=dict)
    """The extra files asked for that exist, each checked against the manifest."""


def _get(t: S3Transport, bucket: str, key: str) -> bytes | None:
    try:
        return ops.get_bytes(t, bucket, key)
    except S3NotFoundError:
        return None


def _check(where: str, data: bytes, size: int, crc: int) -> None:
    actual = _crc32c.crc32c(data)
    if (len(data), actual) != (size, crc):
        raise CheckpointCorruptedError(
            f"{where} does not match its manifest: {len(data)} bytes with CRC32C {actual:08x}, the manifest "
            f"recorded {size} bytes with {crc:08x} (corrupted, or overwritten while being read: load again)"
        )


def fetch_committed(
    t: S3Transport, url: str, *, verify: bool = True, extras: Sequence[str] = ()
) -> PreloadedCheckpoint:
    """GET and verify ``.metadata``, the manifest and the named ``extras`` of the checkpoint at ``url``.

    Raises:
        CheckpointNotFoundError: no ``.metadata``: nothing there, or a save that never committed.
        CheckpointCorruptedError: the manifest is missing (with ``verify``), or something does not match it.
        S3NotFoundError: the bucket does not exist.
    """
    bucket, prefix = split_url(url)
    url = f"s3://{bucket}/{prefix}"
    blob = _get(t, bucket, prefix + METADATA_NAME)
    if blob is None:
        ops.check_bucket(t, bucket)
        raise CheckpointNotFoundError(
            f"no committed checkpoint at {url}: {METADATA_NAME} does not exist (nothing was saved there, or the "
            "save did not finish; an unfinished save is never loaded)"
        )
    manifest: Manifest | None = None
    if verify:
        data = _get(t, bucket, prefix + MANIFEST_NAME)
        if data is None:
            raise CheckpointCorruptedError(
                f"{url}{MANIFEST_NAME} is missing, so {url} cannot be verified (not written by s3ckpt, damaged, or "
                "being overwritten right now); pass verify=False to load a checkpoint written by another DCP writer"
            )
        manifest = Manifest.from_json(data, where=url + MANIFEST_NAME)
        _check(url + METADATA_NAME, blob, manifest.metadata_size, manifest.metadata_crc32c)
    found: dict[str, bytes] = {}
    for name in extras:
        record = manifest.extras.get(name) if manifest is not None else None
        if manifest is not None and record is None:
            continue  # not part of this commit (a plain DCP checkpoint has no meta.pt)
        data = _get(t, bucket, prefix + name)
        if data is None:
            if record is not None:
                raise CheckpointCorruptedError(f"{url}{name} is committed in the manifest but missing")
            continue
        if record is not None:
            _check(url + name, data, record.size, record.crc32c)
        found[name] = data
    return PreloadedCheckpoint(url, blob, manifest, found)


def fetch_shared(
    url: str, transport: S3Transport, *, verify: bool = True, extras: Sequence[str] = ()
) -> PreloadedCheckpoint:
    """:func:`fetch_committed` on global rank 0 only, broadcast to every rank (the same result or error).

    Collective: every rank of the default process group calls it (a plain call without one).
    """
    from ..distributed import run_on_rank0

    return run_on_rank0(lambda: fetch_committed(transport, url, verify=verify, extras=extras))

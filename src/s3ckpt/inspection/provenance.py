"""How a checkpoint file was saved, from its s3ckpt manifest: the bytes its client uploaded, the bytes the store
copied (the records an incremental save found unchanged in its base, or every byte of a server-side copy), the
checkpoint they came from, and the zip records the manifest lists (what a later incremental save copies from).
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointCorruptedError, S3NotFoundError
from ..layout import Manifest, manifest_key
from ..s3_dirpath_utils import build_s3_url
from ..transport import ops
from ..transport.context import S3Transport
from ..transport.ops import ObjectInfo
from .zipread import RangeReader

__all__ = ["from_manifest"]


def from_manifest(t: S3Transport, info: ObjectInfo, reader: RangeReader) -> dict[str, Any]:
    """The transfer fields of :class:`~s3ckpt.inspection.CheckpointSummary` for the object ``info``, from its
    manifest: one GET, counted in ``reader``'s bytes and requests.

    Returns:
        ``bytes_uploaded``, ``bytes_copied``, ``base``, ``copy_of`` and ``zip_records``; nothing if the object
        has no manifest (another tool wrote it); only ``manifest_error`` if the manifest is unreadable or
        describes other bytes (the object was replaced behind s3ckpt's back: its numbers would lie).
        A manifest from before incremental saves has no ``transfer``: everything was uploaded. A server-side
        copy (``save_last="link"``, ``s3ckpt cp``) has none either but names its source: the store copied
        every byte.
    """
    where = build_s3_url(info.bucket, manifest_key(info.key))
    reader.requests += 1
    try:
        data = ops.get_bytes(t, info.bucket, manifest_key(info.key))
    except S3NotFoundError:
        return {}
    reader.bytes_fetched += len(data)
    try:
        m = Manifest.from_json(data, where=where)
    except CheckpointCorruptedError as exc:
        return {"manifest_error": str(exc)}
    if not m.matches(info):
        return {"manifest_error": f"{where} describes other bytes (the object was replaced or altered)"}
    source = m.meta.get("copy_of")
    copy_of = str(source) if source else None
    uploaded, copied = m.bytes_uploaded, m.bytes_copied
    if copy_of is not None and not m.transfer:
        uploaded, copied = 0, m.size
    base = m.transfer.get("base")
    return {
        "bytes_uploaded": uploaded,
        "bytes_copied": copied,
        "base": str(base) if base else None,
        "copy_of": copy_of,
        "zip_records": len(m.records),
    }

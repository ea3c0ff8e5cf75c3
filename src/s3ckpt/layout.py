"""What a checkpoint is on S3: the data object, its manifest, and how its integrity is established.

A single-file checkpoint at ``s3://bucket/run/epoch=3-step=400.ckpt`` is:

* the data object at that key: the plain ``torch.save`` bytes, loadable by any tool. It becomes visible
  only when its multipart upload completes, so a save that is still running, or whose writer died, is
  never visible and never replaces the previous object of that name. With ``checksum_algorithm="CRC32C"``
  the store keeps the object's full-object CRC32C with it, atomically.
* a manifest ``<key>.s3ckpt.json`` written right after: size, CRC32C, ETag, the writer's nonce, step and
  epoch. It carries the digest when the store keeps no checksum, and lets ``ls`` show a checkpoint's step
  without downloading it. It never holds credentials or the environment.

Integrity on load: the expected CRC32C comes from the object itself, else from a manifest that matches the
object (same nonce, size and ETag). An object whose manifest describes different bytes is reported as
corrupted; an object with neither (not written by s3ckpt) loads with a warning unless verification is
required.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import CheckpointCorruptedError, S3NotFoundError
from .transport import ops
from .transport.context import S3Transport
from .transport.ops import ObjectInfo
from .transport.upload import NONCE_META, UploadResult

__all__ = [
    "FORMAT",
    "MANIFEST_SUFFIX",
    "Manifest",
    "expected_crc32c",
    "is_manifest_key",
    "manifest_key",
    "read_manifest",
    "write_manifest",
]

FORMAT = "s3ckpt/1"
MANIFEST_SUFFIX = ".s3ckpt.json"
# Only these keys of a Lightning checkpoint are copied into the manifest: small, and never secrets.
_META_KEYS = ("epoch", "global_step", "step", "pytorch-lightning_version")


def manifest_key(key: str) -> str:
    """The manifest key of a checkpoint key."""
    return key + MANIFEST_SUFFIX


def is_manifest_key(key: str) -> bool:
    return key.endswith(MANIFEST_SUFFIX)


@dataclass(frozen=True)
class Manifest:
    """The record written after a checkpoint's data object is complete."""

    key: str
    size: int
    crc32c: int
    etag: str
    nonce: str
    created: float
    meta: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> Manifest:
        try:
            raw = json.loads(data.decode("utf-8"))
            if raw.get("format") != FORMAT:
                raise ValueError(f"unknown format {raw.get('format')!r}")
            return cls(
                key=str(raw["key"]),
                size=int(raw["size"]),
                crc32c=int(raw["crc32c"]),
                etag=str(raw["etag"]),
                nonce=str(raw["nonce"]),
                created=float(raw["created"]),
                meta=dict(raw.get("meta") or {}),
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointCorruptedError(f"{where}: manifest is unreadable: {exc}") from exc

    def matches(self, info: ObjectInfo) -> bool:
        """True if this manifest describes the object ``info`` (same writer, size and ETag)."""
        return (
            self.size == info.size
            and self.etag == info.etag
            and info.metadata.get(NONCE_META, self.nonce) == self.nonce
        )


def summarize_meta(obj: Any) -> dict[str, Any]:
    """The few scalar fields of a checkpoint dict worth showing in ``ls`` (step, epoch)."""
    if not isinstance(obj, dict):
        return {}
    out: dict[str, Any] = {}
    for k in _META_KEYS:
        v = obj.get(k)
        if isinstance(v, int | float | str) and not isinstance(v, bool):
            out[k] = v
    return out


def write_manifest(t: S3Transport, result: UploadResult, meta: dict[str, Any] | None = None) -> Manifest:
    """Write the manifest of a completed upload."""
    manifest = Manifest(
        key=result.key,
        size=result.size,
        crc32c=result.crc32c,
        etag=result.etag,
        nonce=result.nonce,
        created=time.time(),
        meta=dict(meta or {}),
    )
    ops.put_bytes(t, result.bucket, manifest_key(result.key), manifest.to_json(), content_type="application/json")
    return manifest


def read_manifest(t: S3Transport, bucket: str, key: str) -> Manifest | None:
    """The manifest of checkpoint ``key``, or None if there is none."""
    try:
        data = ops.get_bytes(t, bucket, manifest_key(key))
    except S3NotFoundError:
        return None
    return Manifest.from_json(data, where=f"s3://{bucket}/{manifest_key(key)}")


def expected_crc32c(t: S3Transport, info: ObjectInfo) -> tuple[int | None, str]:
    """The CRC32C the object's bytes must have, and where it came from (``"object"``, ``"manifest"``).

    Returns ``(None, reason)`` if no checksum was recorded for this object.

    Raises:
        CheckpointCorruptedError: a manifest exists but describes different bytes (the object was altered or
            replaced outside s3ckpt after it was saved).
    """
    if info.checksum_crc32c:
        return int.from_bytes(base64.b64decode(info.checksum_crc32c), "big"), "object"
    manifest = read_manifest(t, info.bucket, info.key)
    if manifest is None:
        return None, "no checksum stored with the object and no manifest (not written by s3ckpt?)"
    if not manifest.matches(info):
        raise CheckpointCorruptedError(
            f"s3://{info.bucket}/{info.key} does not match its manifest: saved {manifest.size} bytes "
            f"(ETag {manifest.etag}), found {info.size} bytes (ETag {info.etag}). The object was altered or "
            "replaced after it was saved; load an older checkpoint."
        )
    return manifest.crc32c, "manifest"

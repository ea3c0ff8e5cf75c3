"""What a checkpoint is on S3: the data object, its manifest, and how its integrity is established.

A single-file checkpoint at ``s3://bucket/run/epoch=3-step=400.ckpt`` is:

* the data object at that key: the plain ``torch.save`` bytes, loadable by any tool. It becomes visible
  only when its multipart upload completes, so a save that is still running, or whose writer died, is
  never visible and never replaces the previous object of that name. With ``checksum_algorithm="CRC32C"``
  the store keeps the object's full-object CRC32C with it, atomically.
* a manifest ``<key>.s3ckpt.json`` written right after: size, CRC32C, ETag, the writer's nonce, step and
  epoch. It carries the digest when the store keeps no checksum, and lets ``ls`` show a checkpoint's step
  without downloading it. It never holds credentials or the environment.

Integrity on load (:func:`expected_checksum`), first that applies:

1. the object's own full-object CRC32C (what s3ckpt's saves leave): no other request;
2. a CRC32C recorded by the caller (a DCP sidecar manifest);
3. the manifest, if one exists: it must describe this object (same nonce, size and ETag), else the object
   is reported as corrupted (altered or replaced behind s3ckpt's back), whatever checksum the store keeps;
4. any other checksum the store keeps: full-object CRC64NVME, CRC32, SHA-1 or SHA-256 (objects written by
   other tools, copies the store re-checksummed), else a COMPOSITE one, checked part by part against the
   part boundaries the store reports (``GetObjectAttributes``).

An object with none of these cannot be verified, which is not the same as corrupted: it loads with a
warning, and ``verify="require"`` raises :class:`~s3ckpt.errors.UnverifiableCheckpointError`.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import CheckpointCorruptedError, S3NotFoundError
from .incremental.records import ZipRecord
from .transport import ops
from .transport.checksums import COMPOSITE, FULL_OBJECT, b64, composite_of
from .transport.context import S3Transport
from .transport.ops import ObjectInfo
from .transport.upload import NONCE_META, UploadResult

__all__ = [
    "FORMAT",
    "MANIFEST_SUFFIX",
    "SOURCE_DCP",
    "SOURCE_MANIFEST",
    "SOURCE_STORE",
    "Expected",
    "Manifest",
    "expected_checksum",
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
    records: tuple[ZipRecord, ...] = ()
    """The archive's zip records (what a later incremental save copies from); empty if not recorded."""
    transfer: dict[str, Any] = field(default_factory=dict)
    """How the bytes got there: ``uploaded`` and ``copied`` bytes, and the ``base`` copied from, if any."""

    def to_json(self) -> bytes:
        raw = asdict(self)
        raw["records"] = [r.to_json() for r in self.records]
        return json.dumps(raw, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @property
    def bytes_uploaded(self) -> int:
        return int(self.transfer.get("uploaded", self.size))

    @property
    def bytes_copied(self) -> int:
        return int(self.transfer.get("copied", 0))

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
                records=tuple(ZipRecord.from_json(r) for r in raw.get("records") or ()),
                transfer=dict(raw.get("transfer") or {}),
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


def write_manifest(
    t: S3Transport,
    result: UploadResult,
    meta: dict[str, Any] | None = None,
    *,
    records: tuple[ZipRecord, ...] = (),
    transfer: dict[str, Any] | None = None,
) -> Manifest:
    """Write the manifest of a completed upload (with its zip ``records`` and how it was ``transfer``-red)."""
    manifest = Manifest(
        key=result.key,
        size=result.size,
        crc32c=result.crc32c,
        etag=result.etag,
        nonce=result.nonce,
        created=time.time(),
        meta=dict(meta or {}),
        records=records,
        transfer=dict(transfer or {}),
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


SOURCE_STORE = "object"
"""The checksum is the one the store keeps with the object."""
SOURCE_MANIFEST = "manifest"
"""The checksum is the CRC32C in the object's s3ckpt manifest."""
SOURCE_DCP = "DCP manifest"
"""The checksum is the CRC32C in a DCP checkpoint's sidecar manifest (``.metadata.s3ckpt.json``)."""


# expected_crc32c(manifest=...) default: the caller has not read the manifest; read it if it is needed.
_UNREAD: Any = object()


def expected_crc32c(t: S3Transport, info: ObjectInfo, *, manifest: Manifest | None = _UNREAD) -> tuple[int | None, str]:
    """The CRC32C the object's bytes must have, and where it came from (``"object"``, ``"manifest"``);
    only s3ckpt's own records (:func:`expected_checksum` also reads other tools' checksums).

    Args:
        manifest: the object's manifest if the caller already read it (``None``: it has none, or it must not
            be read), so it is not fetched twice; by default it is read when the store keeps no CRC32C.

    Returns ``(None, reason)`` if no checksum was recorded for this object.

    Raises:
        CheckpointCorruptedError: a manifest exists but describes different bytes (the object was altered or
            replaced outside s3ckpt after it was saved).
    """
    if info.checksum_crc32c:
        return _store_crc32c(info), SOURCE_STORE
    if manifest is _UNREAD:
        manifest = read_manifest(t, info.bucket, info.key)
    if manifest is None:
        return None, "no checksum stored with the object and no manifest (not written by s3ckpt?)"
    _check_manifest(manifest, info)
    return manifest.crc32c, SOURCE_MANIFEST


@dataclass(frozen=True)
class Expected:
    """What an object's bytes must hash to, and where that came from.

    Attributes:
        algorithm: ``"CRC32C"``, ``"CRC64NVME"``, ``"CRC32"``, ``"SHA1"`` or ``"SHA256"``.
        checksum_type: ``"FULL_OBJECT"`` (``digest`` is of the bytes) or ``"COMPOSITE"`` (``digest`` is of
            the parts' digests concatenated).
        digest: the expected digest (4 or 8 big-endian bytes for a CRC, 20 or 32 for a SHA).
        source: :data:`SOURCE_STORE`, :data:`SOURCE_MANIFEST` or :data:`SOURCE_DCP`.
        part_sizes: a composite checksum's part sizes, in order (they sum to the object size).
        part_digests: each part's digest where the store reports it, else None for that part.
    """

    algorithm: str
    checksum_type: str
    digest: bytes
    source: str
    part_sizes: tuple[int, ...] = ()
    part_digests: tuple[bytes | None, ...] = ()

    @property
    def origin(self) -> str:
        """Where the checksum came from, in words: ``store full-object``, ``store composite``, ``s3ckpt
        manifest`` or ``DCP sidecar``."""
        if self.source == SOURCE_STORE:
            return "store composite" if self.checksum_type == COMPOSITE else "store full-object"
        return "s3ckpt manifest" if self.source == SOURCE_MANIFEST else "DCP sidecar"

    @property
    def value(self) -> str:
        """The expected checksum as S3 shows it: base64, with ``-<parts>`` for a composite."""
        text = b64(self.digest)
        return f"{text}-{len(self.part_sizes)}" if self.checksum_type == COMPOSITE else text

    @property
    def crc32c(self) -> int | None:
        """The expected CRC32C of the whole object, if that is what this is."""
        if self.algorithm == "CRC32C" and self.checksum_type == FULL_OBJECT:
            return int.from_bytes(self.digest, "big")
        return None

    def segment_sizes(self, size: int) -> list[int]:
        """The byte spans hashed separately: the parts of a composite, else the whole object."""
        return list(self.part_sizes) if self.checksum_type == COMPOSITE else [size]

    def mismatch(self, digests: list[bytes]) -> str | None:
        """None if ``digests`` (one per :meth:`segment_sizes` span) match, else what differs, in words."""
        if self.checksum_type == FULL_OBJECT:
            (got,) = digests
            if got == self.digest:
                return None
            return f"{self.algorithm} of its bytes is {got.hex()}, the {self._who} recorded {self.digest.hex()}"
        start = 0
        for i, (got, want, n) in enumerate(zip(digests, self.part_digests, self.part_sizes, strict=True)):
            if want is not None and got != want:
                return (
                    f"part {i + 1} (bytes {start}-{start + n - 1}) has {self.algorithm} {got.hex()}, the "
                    f"{self._who} recorded {want.hex()}"
                )
            start += n
        combined = composite_of(self.algorithm, digests)
        if combined == self.digest:
            return None
        return (
            f"the {self.algorithm} of its {len(digests)} parts' {self.algorithm}s is {combined.hex()}, the "
            f"{self._who} recorded {self.digest.hex()}"
        )

    @property
    def _who(self) -> str:
        # "the object recorded" keeps the wording of the CRC32C messages users and scripts already know.
        return {SOURCE_STORE: "object", SOURCE_MANIFEST: "manifest"}.get(self.source, self.source)


def _store_crc32c(info: ObjectInfo) -> int:
    """The full-object CRC32C the store keeps with ``info`` (``info.checksum_crc32c`` must be set)."""
    return int.from_bytes(base64.b64decode(info.checksum_crc32c or ""), "big")


def _crc32c_expected(value: int, source: str) -> Expected:
    return Expected("CRC32C", FULL_OBJECT, value.to_bytes(4, "big"), source)


def expected_checksum(
    t: S3Transport, info: ObjectInfo, *, recorded: tuple[int, str] | None = None, manifest: bool = True
) -> tuple[Expected | None, str]:
    """What ``info``'s bytes must hash to (see the module docstring for the order), or ``(None, why)``.

    Args:
        recorded: ``(crc32c, source)`` kept outside the object (a DCP sidecar), used when the store keeps no
            full-object CRC32C; the object then has no s3ckpt manifest to read.
        manifest: read the object's s3ckpt manifest; ``False`` for an object whose manifest name belongs to
            something else (a DCP ``.metadata``, whose sidecar is another format).

    Raises:
        CheckpointCorruptedError: a manifest exists but describes different bytes.
    """
    if info.checksum_crc32c:
        return _crc32c_expected(_store_crc32c(info), SOURCE_STORE), ""
    if recorded is not None:
        return _crc32c_expected(recorded[0], recorded[1]), ""
    found = read_manifest(t, info.bucket, info.key) if manifest else None
    if found is not None:
        _check_manifest(found, info)
        return _crc32c_expected(found.crc32c, SOURCE_MANIFEST), ""
    stored = info.stored_checksums
    for c in stored:
        if c.checksum_type == FULL_OBJECT:
            return Expected(c.algorithm, FULL_OBJECT, c.digest, SOURCE_STORE), ""
    why = "no checksum stored with the object and no s3ckpt manifest (not written by s3ckpt?)"
    for c in stored:
        # The part count: the checksum's "-<parts>" suffix, else the multipart ETag's ("<md5>-<parts>").
        count = c.parts or _etag_parts(info.etag)
        if count is None:
            why = f"the store's composite {c.algorithm} does not say how many parts it covers"
            continue
        parts = ops.object_parts(t, info, count)
        if parts is None:
            why = f"the store keeps a composite {c.algorithm} but does not report the part boundaries it covers"
            continue
        part_digests = tuple(
            base64.b64decode(p.checksums[c.algorithm]) if p.checksums.get(c.algorithm) else None for p in parts
        )
        return Expected(c.algorithm, COMPOSITE, c.digest, SOURCE_STORE, tuple(p.size for p in parts), part_digests), ""
    return None, why


def _etag_parts(etag: str) -> int | None:
    suffix = etag.strip('"').rpartition("-")[2]
    return int(suffix) if "-" in etag and suffix.isdigit() else None


def _check_manifest(manifest: Manifest, info: ObjectInfo) -> None:
    if not manifest.matches(info):
        raise CheckpointCorruptedError(
            f"s3://{info.bucket}/{info.key} does not match its manifest: saved {manifest.size} bytes "
            f"(ETag {manifest.etag}), found {info.size} bytes (ETag {info.etag}). The object was altered or "
            "replaced after it was saved; load an older checkpoint."
        )

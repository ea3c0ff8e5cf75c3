"""What the store says about things, as frozen records: an object (HEAD), its parts, a listing entry, and an
incomplete multipart upload. :mod:`s3ckpt.transport.ops` makes the requests and returns these."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from .checksums import ALGORITHMS, FULL_OBJECT, StoredChecksum

__all__ = ["ListedObject", "ObjectInfo", "PartInfo", "PendingUpload"]


@dataclass(frozen=True)
class ObjectInfo:
    """What HEAD says about one object (asked with ``ChecksumMode=ENABLED``, so with its stored checksums)."""

    bucket: str
    key: str
    size: int
    etag: str
    last_modified: datetime | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    checksum_crc32c: str | None = None
    """Full-object CRC32C (base64) if the store keeps one, else None (also None for a composite CRC32C)."""
    checksums: dict[str, str] = field(default_factory=dict)
    """Every checksum the store returned: algorithm (``"CRC32"``, ``"CRC32C"``, ``"CRC64NVME"``, ``"SHA1"``,
    ``"SHA256"``) -> the value exactly as sent: base64 of the digest, with a ``-<parts>`` suffix for a
    COMPOSITE one. Empty if the store keeps none. A server-side copy may carry another algorithm than its
    source (SeaweedFS gives a copy a CRC32): :attr:`stored_checksums` reads any of them."""
    checksum_type: str | None = None
    """``"FULL_OBJECT"`` or ``"COMPOSITE"`` (the ``x-amz-checksum-type`` header, or inferred from a
    ``-<parts>`` suffix where the store omits it); None if the store returned no checksum."""

    @property
    def stored_checksums(self) -> list[StoredChecksum]:
        """The store's checksums, parsed, in s3ckpt's order of preference (cheapest to verify first, and
        full-object ones before composite ones)."""
        found = [
            StoredChecksum.parse(alg, self.checksums[alg], self.checksum_type)
            for alg in ALGORITHMS
            if self.checksums.get(alg)
        ]
        return sorted(found, key=lambda c: c.checksum_type != FULL_OBJECT)


@dataclass(frozen=True)
class PartInfo:
    """One part of a multipart object: its size, and its checksums where the store reports them
    (algorithm -> base64 digest)."""

    number: int
    size: int
    checksums: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ListedObject:
    """One entry of a listing."""

    key: str
    size: int
    etag: str
    last_modified: datetime | None


@dataclass(frozen=True)
class PendingUpload:
    """An incomplete multipart upload."""

    key: str
    upload_id: str
    initiated: datetime | None

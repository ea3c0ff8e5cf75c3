"""The checksums S3 keeps with an object, computed while a download's ranges arrive.

S3 (and S3-compatible stores) keep one of CRC32, CRC32C, CRC64NVME, SHA-1 or SHA-256 with an object, either
over the whole object (``FULL_OBJECT``) or, for most multipart uploads, as a checksum of the parts'
checksums (``COMPOSITE``: ``H(H(part1) || H(part2) || ...)``, shown as ``<base64>-<parts>``). A download
fetches ranges in parallel, out of order, so each algorithm is computed in the way it allows:

* CRC family: each range's CRC is computed slice by slice as its bytes arrive (still in cache), on the
  thread that fetched them; the ranges' CRCs are combined at the end with :func:`crc_combine` (``crc(A||B)``
  from ``crc(A)``, ``crc(B)`` and ``len(B)``, the zlib algorithm), so no second pass over the buffer.
* SHA family: a hash must see the bytes in order, so whichever fetching thread completes the range at the
  front of the buffer hashes every contiguous completed range from there (one hasher at a time; the others
  keep fetching).

Implementations, fastest available first (see the README's "Checksums s3ckpt verifies" for throughput):
CRC32C from the ``crc32c`` package (SSE4.2/ARMv8 hardware); CRC64NVME from ``awscrt`` if it is installed
(``pip install s3ckpt[crt]``; SIMD carry-less multiply), else in pure Python (slow: about 5 MB/s, fine for
manifests, not for checkpoints: a warning says so); CRC32 from ``zlib`` (faster than awscrt's here); SHA
from ``hashlib``. No torch, no boto3.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import logging
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import crc32c as _crc32c

__all__ = [
    "ALGORITHMS",
    "COMPOSITE",
    "FULL_OBJECT",
    "IMPLEMENTATIONS",
    "Hasher",
    "RangeDigest",
    "StoredChecksum",
    "b64",
    "checksum_of",
    "composite_of",
    "crc_combine",
    "new_hasher",
]

log = logging.getLogger(__name__)

FULL_OBJECT = "FULL_OBJECT"
COMPOSITE = "COMPOSITE"
ALGORITHMS = ("CRC32C", "CRC64NVME", "CRC32", "SHA1", "SHA256")
"""Every algorithm S3 defines, in the order s3ckpt prefers them when a store keeps several (fastest first)."""

_CRC_WIDTH = {"CRC32": 32, "CRC32C": 32, "CRC64NVME": 64}
# Reflected polynomials (all three CRCs start from ~0 and end with ~0, so the zlib combine applies as is).
_CRC_POLY = {"CRC32": 0xEDB88320, "CRC32C": 0x82F63B78, "CRC64NVME": 0x9A6C9329AC4BC9B5}

try:  # optional: the AWS common runtime's SIMD CRCs (botocore uses it for the same reason when installed)
    from awscrt import checksums as _crt  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # pragma: no cover - depends on the environment
    _crt = None


def _crc64nvme_table() -> list[int]:
    poly = _CRC_POLY["CRC64NVME"]
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC64_TABLE = _crc64nvme_table()


def _crc64nvme_py(data: Any, crc: int = 0) -> int:
    """Table-driven CRC64NVME (bytewise): correct everywhere, about 10 MB/s. Install awscrt for speed."""
    table = _CRC64_TABLE
    c = crc ^ 0xFFFFFFFFFFFFFFFF
    for byte in bytes(data):
        c = table[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFFFFFFFFFF


_CrcFn = Callable[[Any, int], int]
_SLOW_WARN_BYTES = 64 * 1024 * 1024
# Measured here (GB/s, 1 MiB slices in cache / streaming a 256 MiB buffer): CRC32C crc32c package 32 / 5.6,
# awscrt 85 / 4.5 (a wash once memory-bound, so the package s3ckpt's uploads use, always); CRC32 zlib 5.2 /
# 1.4, awscrt 3.3 (so zlib always); CRC64NVME awscrt 86 / 3.8, pure Python 0.005; SHA-1 1.5 / 0.6, SHA-256
# 1.4 / 0.6 (hashlib).
_CRC_FN: dict[str, _CrcFn] = {
    "CRC32C": _crc32c.crc32c,
    "CRC32": zlib.crc32,
    "CRC64NVME": _crt.crc64nvme if _crt is not None else _crc64nvme_py,
}
IMPLEMENTATIONS: dict[str, str] = {
    "CRC32C": "crc32c package" + (" (hardware)" if getattr(_crc32c, "hardware_based", False) else " (software)"),
    "CRC32": "zlib",
    "CRC64NVME": "awscrt" if _crt is not None else "pure Python (slow; install s3ckpt[crt])",
    "SHA1": "hashlib",
    "SHA256": "hashlib",
}
"""Which implementation computes each algorithm in this process."""


def b64(digest: bytes) -> str:
    """S3's wire form of a checksum: the digest bytes (big-endian for CRCs), base64-encoded."""
    return base64.b64encode(digest).decode("ascii")


def _crc_bytes(algorithm: str, value: int) -> bytes:
    return value.to_bytes(_CRC_WIDTH[algorithm] // 8, "big")


def _multmodp(a: int, b: int, poly: int, top: int) -> int:
    """``a * b mod p`` in GF(2), reflected bit order (zlib's ``multmodp``)."""
    m, p = top, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ poly if b & 1 else b >> 1


def _x2n_table(width: int, poly: int) -> list[int]:
    top = 1 << (width - 1)
    p = top >> 1  # x^1
    table = [p]
    for _ in range(1, width):
        p = _multmodp(p, p, poly, top)
        table.append(p)
    return table


_X2N = {name: _x2n_table(_CRC_WIDTH[name], poly) for name, poly in _CRC_POLY.items()}


def crc_combine(algorithm: str, crc1: int, crc2: int, len2: int) -> int:
    """The CRC of ``A || B`` from ``crc(A)``, ``crc(B)`` and ``len(B)`` (bytes): zlib's ``crc32_combine``,
    which Python's zlib does not expose, for CRC32, CRC32C and CRC64NVME. O(log len2) GF(2) products."""
    width, poly = _CRC_WIDTH[algorithm], _CRC_POLY[algorithm]
    top = 1 << (width - 1)
    table = _X2N[algorithm]
    # x^(8*len2) mod p: multiply the powers x^(2^k) for the bits of 8*len2 (k starts at 3).
    p, n, k = top, len2, 3
    while n:
        if n & 1:
            p = _multmodp(table[k % width], p, poly, top)
        n >>= 1
        k += 1
    return _multmodp(p, crc1, poly, top) ^ crc2


class Hasher(Protocol):
    """The ``hashlib``-style interface of every algorithm here."""

    def update(self, data: Any, /) -> None: ...

    def digest(self) -> bytes: ...


class _CrcHasher:
    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._fn = _CRC_FN[algorithm]
        self.value = 0

    def update(self, data: Any, /) -> None:
        self.value = self._fn(data, self.value)

    def digest(self) -> bytes:
        return _crc_bytes(self.algorithm, self.value)


def new_hasher(algorithm: str) -> Hasher:
    """A fresh hasher for ``algorithm`` (one of :data:`ALGORITHMS`)."""
    if algorithm in _CRC_FN:
        return _CrcHasher(algorithm)
    if algorithm == "SHA1":
        return hashlib.sha1(usedforsecurity=False)
    if algorithm == "SHA256":
        return hashlib.sha256()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")


def checksum_of(algorithm: str, data: Any) -> bytes:
    """The digest of ``data`` in one call (tests, small objects)."""
    h = new_hasher(algorithm)
    h.update(data)
    return h.digest()


def composite_of(algorithm: str, part_digests: Sequence[bytes]) -> bytes:
    """S3's COMPOSITE checksum: the checksum of the parts' digests concatenated."""
    return checksum_of(algorithm, b"".join(part_digests))


@dataclass(frozen=True)
class StoredChecksum:
    """One checksum a store returned for an object (HEAD with ``ChecksumMode=ENABLED``).

    Attributes:
        algorithm: one of :data:`ALGORITHMS`.
        value: base64 digest as S3 sends it, without the ``-<parts>`` suffix of a composite.
        checksum_type: :data:`FULL_OBJECT` (a checksum of the bytes) or :data:`COMPOSITE` (of the parts'
            checksums; needs the part boundaries to check).
        parts: the part count of a composite checksum, else None.
    """

    algorithm: str
    value: str
    checksum_type: str
    parts: int | None = None

    @property
    def digest(self) -> bytes:
        return base64.b64decode(self.value)

    @classmethod
    def parse(cls, algorithm: str, wire: str, checksum_type: str | None = None) -> StoredChecksum:
        """From the header value (``"<b64>"`` or ``"<b64>-<parts>"``) and ``x-amz-checksum-type``."""
        value, sep, parts = wire.partition("-")
        composite = checksum_type == COMPOSITE or bool(sep)
        return cls(
            algorithm=algorithm,
            value=value,
            checksum_type=COMPOSITE if composite else FULL_OBJECT,
            parts=int(parts) if composite and parts.isdigit() else None,
        )


class _CrcRange:
    """One range of a download, CRC family: a running CRC per segment the range touches."""

    def __init__(self, owner: RangeDigest, start: int, end: int) -> None:
        self.owner, self.start, self.end = owner, start, end
        self.pos = start
        self.pieces: list[tuple[int, int, int, int]] = []  # (segment, start, length, crc)
        self._seg = owner.segment_at(start)
        self._seg_end = owner.bounds[self._seg + 1]
        self._piece_start = start
        self._crc = 0
        self._fn = _CRC_FN[owner.algorithm]

    def update(self, data: memoryview) -> None:
        while len(data):
            take = min(len(data), self._seg_end - self.pos)
            self._crc = self._fn(data[:take], self._crc)
            self.pos += take
            data = data[take:]
            if self.pos == self._seg_end and self.pos < self.end:
                self._close_piece()
                self._seg += 1
                self._seg_end = self.owner.bounds[self._seg + 1]

    def _close_piece(self) -> None:
        self.pieces.append((self._seg, self._piece_start, self.pos - self._piece_start, self._crc))
        self._piece_start, self._crc = self.pos, 0

    def done(self) -> None:
        if self.pos != self.end:
            raise ValueError(f"range {self.start}-{self.end} hashed {self.pos - self.start} bytes")
        if self.pos > self._piece_start:
            self._close_piece()
        self.owner._add_pieces(self.pieces)


class _ShaRange:
    """One range of a download, SHA family: nothing per slice; on completion the in-order front advances."""

    def __init__(self, owner: RangeDigest, start: int, end: int) -> None:
        self.owner, self.start, self.end = owner, start, end

    def update(self, data: memoryview) -> None:
        pass

    def done(self) -> None:
        self.owner._range_done(self.start, self.end)


class RangeDigest:
    """The digest(s) of an object downloaded as ranges that complete in any order, on any thread.

    For each range (each attempt of it: a retried range starts over), call :meth:`begin`, feed the bytes as
    they arrive to ``update`` and call ``done()`` once the range is whole. Then :meth:`digests` gives one
    digest per segment: the whole object, or each part of a composite checksum.

    Args:
        algorithm: one of :data:`ALGORITHMS`.
        segment_sizes: the byte length of each segment, summing to the object size (``[size]`` for a
            full-object checksum, the part sizes for a composite one).
        target: the buffer the ranges land in; read by the SHA family (hashed in order from there).
    """

    def __init__(self, algorithm: str, segment_sizes: Sequence[int], target: memoryview | None = None) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
        self.algorithm = algorithm
        self.bounds = [0]
        for n in segment_sizes:
            self.bounds.append(self.bounds[-1] + int(n))
        self.size = self.bounds[-1]
        if algorithm == "CRC64NVME" and _crt is None and self.size > _SLOW_WARN_BYTES:
            log.warning(
                "verifying %d bytes against a CRC64NVME in pure Python (about 5 MB/s); "
                "`pip install 's3ckpt[crt]'` (awscrt) computes it at GB/s",
                self.size,
            )
        self._crc = algorithm in _CRC_FN
        if not self._crc and target is None:
            raise ValueError(f"{algorithm} is hashed in order from the target buffer: pass target")
        self._target = target
        self._lock = threading.Lock()
        self._pieces: list[tuple[int, int, int, int]] = []
        # SHA: ranges done but not yet hashed (start -> end), the hashed front, and who is hashing.
        self._pending: dict[int, int] = {}
        self._front = 0
        self._hashing = False
        self._hashers: list[Hasher] = [] if self._crc else [new_hasher(algorithm) for _ in segment_sizes]

    def segment_at(self, offset: int) -> int:
        """The segment holding byte ``offset``: the last one starting at or before it."""
        return max(0, min(bisect.bisect_right(self.bounds, offset) - 1, len(self.bounds) - 2))

    def begin(self, start: int, end: int) -> _CrcRange | _ShaRange:
        """State for one attempt at bytes ``[start, end)``."""
        return _CrcRange(self, start, end) if self._crc else _ShaRange(self, start, end)

    def _add_pieces(self, pieces: list[tuple[int, int, int, int]]) -> None:
        with self._lock:
            self._pieces.extend(pieces)

    def _range_done(self, start: int, end: int) -> None:
        with self._lock:
            self._pending[start] = end
            if self._hashing:
                return  # the thread hashing now will take this range too when it reaches it
            self._hashing = True
        try:
            while True:
                with self._lock:
                    end = self._pending.pop(self._front, -1)
                    if end < 0:
                        self._hashing = False
                        return
                    start = self._front
                self._hash_span(start, end)  # outside the lock: hashlib releases the GIL on large buffers
                with self._lock:
                    self._front = end
        except BaseException:
            with self._lock:
                self._hashing = False
            raise

    def _hash_span(self, start: int, end: int) -> None:
        assert self._target is not None
        while start < end:
            seg = self.segment_at(start)
            stop = min(end, self.bounds[seg + 1])
            self._hashers[seg].update(self._target[start:stop])
            start = stop

    def digests(self) -> list[bytes]:
        """One digest per segment, once every range is done.

        Raises:
            ValueError: some bytes were never fed (a bug in the caller, not a corrupted object).
        """
        if not self._crc:
            if self._front != self.size:
                raise ValueError(f"{self.algorithm}: hashed {self._front} of {self.size} bytes in order")
            return [h.digest() for h in self._hashers]
        segs: list[list[tuple[int, int, int]]] = [[] for _ in range(len(self.bounds) - 1)]
        for seg, start, length, crc in self._pieces:
            segs[seg].append((start, length, crc))
        out = []
        for i, pieces in enumerate(segs):
            pieces.sort()
            pos, value = self.bounds[i], 0
            for start, length, crc in pieces:
                if start != pos:
                    raise ValueError(f"{self.algorithm}: bytes {pos}-{start} of segment {i} were never hashed")
                value = crc_combine(self.algorithm, value, crc, length) if start > self.bounds[i] else crc
                pos += length
            if pos != self.bounds[i + 1]:
                raise ValueError(f"{self.algorithm}: segment {i} hashed up to {pos} of {self.bounds[i + 1]}")
            out.append(_crc_bytes(self.algorithm, value))
        return out

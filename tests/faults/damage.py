"""Damage in transit, where the proxy cannot reach: a GetObject body wrapper installed by a botocore
``after-call.s3.GetObject`` hook on the real HTTP path, which flips one byte of what the client reads."""

from __future__ import annotations

from typing import Any

__all__ = ["FlipOneByte"]


class FlipOneByte:
    """Wraps a GetObject body and flips byte ``at`` (counted from the start of this body) as it is read.

    It offers ``readinto`` and ``read`` like botocore's ``StreamingBody``; the inner body is read with
    ``readinto`` where it has one (botocore 1.38.20+) and ``read`` otherwise.
    """

    def __init__(self, body: Any, at: int = 0) -> None:
        self._body, self._at, self._seen = body, at, 0

    def _flip(self, buf: memoryview | bytearray, n: int) -> None:
        if self._seen <= self._at < self._seen + n:
            buf[self._at - self._seen] ^= 0x01
        self._seen += n

    def readinto(self, b: memoryview) -> int:
        inner = getattr(self._body, "readinto", None)
        if inner is not None:
            n = int(inner(b))
        else:
            data = self._body.read(len(b))
            n = len(data)
            b[:n] = data
        self._flip(b, n)
        return n

    def read(self, amt: int | None = None) -> bytes:
        data = bytearray(self._body.read(amt))
        self._flip(data, len(data))
        return bytes(data)

    def close(self) -> None:
        self._body.close()

"""Which byte ranges a rank fetches: the items it needs, merged into spans when they lie close together."""

from __future__ import annotations

import mmap
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch.distributed.checkpoint.filesystem import _StorageInfo

__all__ = ["Span", "SpanBuffers", "plan_spans"]


@dataclass
class Span:
    """One contiguous byte range of a file, fetched as a unit, covering one or more items."""

    path: str
    start: int
    end: int
    items: list[_StorageInfo] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.end - self.start


def plan_spans(infos: Iterable[_StorageInfo], *, gap: int, max_span: int) -> list[Span]:
    """Group item ranges into spans: per file, by offset, merging neighbours at most ``gap`` bytes apart.

    Fetching a small gap costs less than a request (S3 charges and throttles per request, and each GET
    has a first-byte latency of tens of milliseconds), so nearby items share one ranged GET. A span grows
    to at most ``max_span`` bytes unless one item alone is larger; it is fetched in parallel ranges anyway.
    """
    by_file: dict[str, dict[int, _StorageInfo]] = {}
    for info in infos:
        by_file.setdefault(info.relative_path, {})[info.offset] = info
    spans: list[Span] = []
    for path in sorted(by_file):
        current: Span | None = None
        for info in sorted(by_file[path].values(), key=lambda i: i.offset):
            end = info.offset + info.length
            if current is not None and info.offset - current.end <= gap and end - current.start <= max_span:
                current.end = max(current.end, end)
                current.items.append(info)
                continue
            current = Span(path, info.offset, end, [info])
            spans.append(current)
    return spans


class SpanBuffers:
    """Download buffers for spans, reused from one span to the next.

    A fresh buffer costs a page fault per 4 KiB on first touch (and ``bytearray`` also zero-fills it): for a
    load of several GB, more CPU than the copy of the bytes into the tensors. Anonymous maps are not
    zero-filled by the client, and a buffer given back serves a later span of its size or less.
    """

    def __init__(self, keep: int = 8) -> None:
        self._free: list[mmap.mmap] = []
        self._keep = keep

    def take(self, size: int) -> memoryview:
        """A writable buffer of exactly ``size`` bytes."""
        fits = [m for m in self._free if len(m) >= size]
        if fits:
            chosen = min(fits, key=len)
            self._free.remove(chosen)
        else:
            chosen = mmap.mmap(-1, max(size, 1))
        return memoryview(chosen)[:size]

    def give(self, view: memoryview) -> None:
        """Return a buffer from :meth:`take` once nothing reads it any more."""
        owner = view.obj
        view.release()
        if isinstance(owner, mmap.mmap) and len(self._free) < self._keep:
            self._free.append(owner)

"""Host buffers for async snapshots, reused from one save to the next.

An async save copies every tensor to host memory before ``save_checkpoint`` returns: that copy is the stall a
training step sees. Into freshly allocated memory it costs a page fault per 4 KiB on top of the copy (about
half of it for a large state); into the buffers of a snapshot whose upload has finished, only the copy.
:class:`SnapshotPool` keeps those buffers, keyed by dtype and element count, with a hard bound: the
snapshots in use plus the buffers kept never exceed ``capacity`` snapshots' worth of bytes (``capacity`` is
``max_pending_saves``), so the memory formula of async saves is unchanged: up to ``max_pending_saves``
snapshots.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["SnapshotPool"]

_Key = tuple[torch.dtype, int, bool]  # dtype, elements, pinned


class SnapshotPool:
    """Reusable host buffers for :func:`s3ckpt.serialization.clone_to_host` (its ``copy`` hook).

    Args:
        capacity: snapshots' worth of bytes that may exist at once, in use or kept (>= 1).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"SnapshotPool(capacity={capacity!r}): at least 1")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._free: dict[_Key, list[torch.Tensor]] = defaultdict(list)
        self._free_bytes = 0
        self._in_use_bytes = 0
        self._snapshot_bytes = 0  # the largest snapshot seen: the unit of the bound
        self.reused_bytes = 0
        """Bytes copied into kept buffers instead of fresh ones (for tests and logs)."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Buffers never travel: a copy of the plugin in another process starts with an empty pool.
        return (SnapshotPool, (self.capacity,))

    def copier(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]:
        """A ``copy`` function for ``clone_to_host`` and the list it fills with the buffers it used; hand the
        list to :meth:`release` once the snapshot is no longer needed (its upload finished)."""
        used: list[torch.Tensor] = []

        def copy(t: torch.Tensor) -> torch.Tensor:
            src = t.detach()
            if type(src) is not torch.Tensor or src.layout != torch.strided or src.is_quantized or src.is_nested:
                # Subclasses (DTensor), sparse, quantized and nested tensors keep their own clone.
                return src.clone() if src.device.type == "cpu" else src.to("cpu")
            # Device tensors are staged in pinned memory (fast device-to-host copies), as clone_to_host does.
            buf = self._take(src.dtype, src.numel(), src.device.type == "cuda" and torch.cuda.is_available())
            used.append(buf)
            out = buf.view(src.shape)
            out.copy_(src)
            return out

        return copy, used

    def release(self, buffers: list[torch.Tensor]) -> None:
        """Give back the buffers of a finished snapshot; keep what fits the bound, free the rest."""
        with self._lock:
            size = sum(b.numel() * b.element_size() for b in buffers)
            self._snapshot_bytes = max(self._snapshot_bytes, size)
            self._in_use_bytes = max(0, self._in_use_bytes - size)
            limit = self.capacity * self._snapshot_bytes
            for b in buffers:
                n = b.numel() * b.element_size()
                if self._in_use_bytes + self._free_bytes + n > limit:
                    continue  # dropped: freed when the caller lets go of the snapshot
                self._free[(b.dtype, b.numel(), b.is_pinned())].append(b)
                self._free_bytes += n
        buffers.clear()

    def clear(self) -> None:
        """Free every kept buffer (teardown)."""
        with self._lock:
            self._free.clear()
            self._free_bytes = 0

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            return self._free_bytes

    def _take(self, dtype: torch.dtype, numel: int, pin: bool) -> torch.Tensor:
        n = numel * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            free = self._free.get((dtype, numel, pin))
            if free:
                buf = free.pop()
                self._free_bytes -= n
                self._in_use_bytes += n
                self.reused_bytes += n
                return buf
            # A miss allocates: drop kept buffers of other shapes first if the bound would be crossed.
            limit = self.capacity * self._snapshot_bytes
            if self._snapshot_bytes and self._in_use_bytes + self._free_bytes + n > limit:
                for key in list(self._free):
                    while self._free[key] and self._in_use_bytes + self._free_bytes + n > limit:
                        dropped = self._free[key].pop()
                        self._free_bytes -= dropped.numel() * dropped.element_size()
            self._in_use_bytes += n
        return torch.empty(numel, dtype=dtype, pin_memory=pin)

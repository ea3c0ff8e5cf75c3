"""The incremental part planner on random layouts, without a store: the parts it plans always satisfy S3's
rules (every part but the last at least 5 MiB, copies inside the base, at most 5 GiB) and, assembled from
the base's bytes and the uploaded ones, are exactly what ``torch.save`` writes. The store's side (that it
assembles the same way) is tested against SeaweedFS and moto in tests/integration/test_incremental.py."""

from __future__ import annotations

import io
import random
from typing import Any

import crc32c
import pytest
import torch

from s3ckpt.incremental import BaseLayout, RecordComposer
from s3ckpt.serialization import save_to_stream
from s3ckpt.transport.compose import CopySource

MiB = 1024 * 1024
PART = 8 * MiB


class PlannedParts:
    """A part sink that records the parts (uploads cut every ``PART`` bytes, as the real writer does)."""

    accepts_tap = True

    def __init__(self) -> None:
        self.parts: list[tuple[str, Any]] = []
        self._buf = bytearray()

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def write(self, data: Any, *, tap: Any = None) -> int:
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            n = min(PART - len(self._buf), len(view) - pos)
            self._buf += view[pos : pos + n]
            if tap is not None:
                tap(view[pos : pos + n])
            pos += n
            if len(self._buf) == PART:
                self.flush_part()
        return len(view)

    def flush_part(self) -> None:
        if self._buf:
            self.parts.append(("upload", bytes(self._buf)))
            self._buf = bytearray()

    def copy_part(self, first: int, length: int, crc: int) -> None:
        assert not self._buf, "a copy while an upload part is being filled"
        self.parts.append(("copy", (first, length, crc)))

    def close(self) -> None:
        self.flush_part()


def _save(obj: Any, sink: Any, base: BaseLayout | None = None) -> RecordComposer:
    composer = RecordComposer(sink, base, copy_part_size=24 * MiB)
    save_to_stream(obj, composer)
    composer.finish()
    return composer


def _state(rng: random.Random, sizes: list[int], seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randint(0, 255, (n,), dtype=torch.uint8, generator=g) for i, n in enumerate(sizes)}


@pytest.mark.parametrize("seed", range(6))
def test_planned_parts_are_valid_and_assemble_to_torch_save(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [rng.choice([64, 5000, 300_000, 2 * MiB, 5 * MiB - 7, 6 * MiB, 11 * MiB, 30 * MiB]) for _ in range(12)]
    base_state = _state(rng, sizes, seed)
    first = PlannedParts()
    base_records = _save(base_state, first).records
    first.close()
    base_bytes = b"".join(p for kind, p in first.parts)
    assert base_bytes == _torch_save(base_state)

    new_state = dict(base_state)
    for i in rng.sample(range(len(sizes)), k=rng.randint(0, len(sizes))):
        new_state[f"t{i}"] = base_state[f"t{i}"] + 1
    if rng.random() < 0.5:
        new_state["note"] = "x" * rng.randint(1, 500)  # a bigger data.pkl: later records move
    layout = BaseLayout(
        "s3://b/base", CopySource("b", "base", '"e"', len(base_bytes)), {r.name: r for r in base_records}
    )
    sink = PlannedParts()
    _save(new_state, sink, layout)
    sink.close()

    assembled = bytearray()
    for i, (kind, part) in enumerate(sink.parts):
        size = len(part) if kind == "upload" else part[1]
        if i < len(sink.parts) - 1:
            assert size >= 5 * MiB, (i, kind, size)
        assert size <= 5 * 1024 * MiB
        if kind == "upload":
            assembled += part
        else:
            first_byte, length, crc = part
            assert first_byte + length <= len(base_bytes)
            piece = base_bytes[first_byte : first_byte + length]
            assert crc32c.crc32c(piece) == crc
            assembled += piece
    assert bytes(assembled) == _torch_save(new_state)
    copied = sum(p[1] for k, p in sink.parts if k == "copy")
    unchanged = sum(n for i, n in enumerate(sizes) if torch.equal(new_state[f"t{i}"], base_state[f"t{i}"]))
    assert copied <= unchanged + 64 * len(sizes)  # only unchanged records (with their headers) are copied


def test_an_unchanged_state_is_copied_but_for_its_head_and_tail() -> None:
    state = _state(random.Random(0), [20 * MiB, 9 * MiB, 40 * MiB], 0)
    first = PlannedParts()
    records = _save(state, first).records
    first.close()
    size = sum(len(p) for _, p in first.parts)
    layout = BaseLayout("s3://b/base", CopySource("b", "base", '"e"', size), {r.name: r for r in records})
    sink = PlannedParts()
    _save(state, sink, layout)
    sink.close()
    uploaded = sum(len(p) for k, p in sink.parts if k == "upload")
    assert uploaded <= 5 * MiB + 4096  # the head part (data.pkl + first bytes) and the tail
    assert [k for k, _ in sink.parts].count("copy") >= 3  # 69 MiB in copy parts of at most 24 MiB + a run


def _torch_save(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()

"""Incremental saves (``s3ckpt.save(base=...)``) against the real servers: byte-identical to ``torch.save``,
only the changed records uploaded, and every way a base can be unusable ending in a plain upload."""

from __future__ import annotations

import io
import logging
import zipfile
from typing import Any

import pytest
import torch

import s3ckpt
from s3ckpt.layout import read_manifest
from s3ckpt.transport import S3Transport, ops

# portable: make test also runs these on moto (tests/backends.py).
pytestmark = [pytest.mark.integration, pytest.mark.portable]

MiB = 1024 * 1024


def fine_tuning_state(step: int, *, frozen: int = 3, seed: int = 0) -> dict[str, Any]:
    """``frozen`` 12 MiB tensors with small trainable ones between them (as LoRA adapters sit beside their
    base weights), Adam state for the trainable ones only; ``step`` changes only the trainable part.

    12 MiB, not less: S3 wants every part but the last to be 5 MiB or more, so each changed region costs an
    uploaded part of 5 MiB, taken from the unchanged bytes after it; the rest of a run is copied only if it is
    5 MiB or more itself.
    """
    g = torch.Generator().manual_seed(seed)
    model: dict[str, torch.Tensor] = {}
    n_frozen = frozen
    for i in range(n_frozen):
        model[f"layers.{i}.weight"] = torch.randn(3 * 1024, 1024, generator=g)  # 12 MiB, never changes
        model[f"layers.{i}.lora_A"] = torch.full((8, 1024), float(step + i))
        model[f"layers.{i}.lora_B"] = torch.full((1024, 8), float(step - i))
    adam = {
        i: {"step": torch.tensor(float(step)), "exp_avg": torch.full((8, 1024), step * 0.5 + i)}
        for i in range(n_frozen)
    }
    return {
        "state_dict": model,
        "optimizer_states": [{"state": adam, "param_groups": [{"lr": 1e-4, "params": list(range(n_frozen))}]}],
        "global_step": step,
        "epoch": 0,
    }


def torch_save_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def stored_bytes(transport: S3Transport, url: str) -> bytes:
    bucket, key = url[len("s3://") :].split("/", 1)
    return ops.get_bytes(transport, bucket, key)


def test_incremental_save_is_torch_save_and_copies_the_unchanged(transport: S3Transport, bucket: str) -> None:
    base_url, url = f"s3://{bucket}/run/step=1.ckpt", f"s3://{bucket}/run/step=2.ckpt"
    first = s3ckpt.save(fine_tuning_state(1), base_url, transport=transport)
    assert first.bytes_copied == 0 and first.bytes_uploaded == first.bytes and first.base is None
    state = fine_tuning_state(2)
    stats = s3ckpt.save(state, url, transport=transport, base=base_url)

    data = stored_bytes(transport, url)
    assert data == torch_save_bytes(state)  # byte for byte what torch.save writes, serialization id included
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None
    assert stats.base == base_url and stats.bytes == len(data)
    assert stats.bytes_copied + stats.bytes_uploaded == stats.bytes
    # 36 MiB frozen of ~36.5 MiB: each of the 3 changed regions costs one 5 MiB part, the rest is copied
    assert stats.bytes_copied >= 20 * MiB, stats
    assert stats.bytes_uploaded <= 16 * MiB, stats
    manifest = read_manifest(transport, bucket, "run/step=2.ckpt")
    assert manifest is not None
    assert manifest.transfer == {"uploaded": stats.bytes_uploaded, "copied": stats.bytes_copied, "base": base_url}
    assert len(manifest.records) == len(zipfile.ZipFile(io.BytesIO(data)).namelist())

    # A copy is a copy: the base may go, the new checkpoint stays whole and verified.
    s3ckpt.delete(base_url, transport=transport)
    assert s3ckpt.verify(url, transport=transport).crc32c == stats.crc32c
    loaded = s3ckpt.load(url, transport=transport)
    assert torch.equal(loaded["state_dict"]["layers.2.weight"], state["state_dict"]["layers.2.weight"])
    adam = loaded["optimizer_states"][0]["state"][2]["exp_avg"]
    assert torch.equal(adam, state["optimizer_states"][0]["state"][2]["exp_avg"])


def test_a_chain_of_incremental_saves_stays_exact(transport: S3Transport, bucket: str) -> None:
    """Each save composes from the previous one (itself composed): every one is exactly torch.save's bytes."""
    prev: str | None = None
    for step in range(1, 4):
        url = f"s3://{bucket}/chain/step={step}.ckpt"
        state = fine_tuning_state(step, frozen=2)
        stats = s3ckpt.save(state, url, transport=transport, base=prev)
        assert stored_bytes(transport, url) == torch_save_bytes(state)
        if prev is not None:
            assert stats.bytes_copied >= 10 * MiB
        prev = url


def test_everything_changed_uploads_everything(transport: S3Transport, bucket: str) -> None:
    base_url, url = f"s3://{bucket}/full/a.ckpt", f"s3://{bucket}/full/b.ckpt"
    s3ckpt.save(fine_tuning_state(1, seed=1), base_url, transport=transport)
    state = fine_tuning_state(2, seed=2)  # every frozen tensor differs too
    stats = s3ckpt.save(state, url, transport=transport, base=base_url)
    assert stats.bytes_copied == 0 and stats.bytes_uploaded == stats.bytes
    assert stored_bytes(transport, url) == torch_save_bytes(state)


def test_small_changed_records_between_unchanged_ones_keep_parts_valid(transport: S3Transport, bucket: str) -> None:
    """Unchanged runs shorter than 5 MiB, changed records of a few bytes, a changed data.pkl: every part
    but the last must be 5 MiB or more, or Complete fails with EntityTooSmall."""
    g = torch.Generator().manual_seed(5)
    sizes = [300_000, 2 * MiB, 7 * MiB, 1000, 6 * MiB + 3, 100, 3 * MiB, 12 * MiB]
    base = {f"t{i}": torch.randint(0, 255, (n,), dtype=torch.uint8, generator=g) for i, n in enumerate(sizes)}
    changed = dict(base)
    for i in (1, 3, 5):
        changed[f"t{i}"] = base[f"t{i}"] + 1
    changed["extra_note"] = "x" * 333  # moves every later record by a multiple of 64 bytes
    s3ckpt.save(base, f"s3://{bucket}/p/a.ckpt", transport=transport)
    stats = s3ckpt.save(changed, f"s3://{bucket}/p/b.ckpt", transport=transport, base=f"s3://{bucket}/p/a.ckpt")
    assert stored_bytes(transport, f"s3://{bucket}/p/b.ckpt") == torch_save_bytes(changed)
    assert stats.bytes_copied >= 12 * MiB and stats.parts >= 4, stats


def test_unusable_bases_fall_back_to_a_plain_upload(
    transport: S3Transport, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    state = fine_tuning_state(2, frozen=1)
    # missing base
    with caplog.at_level(logging.WARNING, logger="s3ckpt"):
        stats = s3ckpt.save(state, f"s3://{bucket}/m/b.ckpt", transport=transport, base=f"s3://{bucket}/m/nope.ckpt")
    assert stats.bytes_copied == 0 and stats.base is None
    assert "does not exist" in caplog.text
    # a base that is not s3ckpt's (no manifest): a plain torch.save upload
    caplog.clear()
    bkt, key = bucket, "m/foreign.ckpt"
    ops.put_bytes(transport, bkt, key, torch_save_bytes(fine_tuning_state(1, frozen=1)))
    with caplog.at_level(logging.WARNING, logger="s3ckpt"):
        stats = s3ckpt.save(state, f"s3://{bucket}/m/c.ckpt", transport=transport, base=f"s3://{bucket}/{key}")
    assert stats.bytes_copied == 0 and "no s3ckpt manifest" in caplog.text
    # a base replaced behind s3ckpt's back (its manifest describes other bytes)
    caplog.clear()
    s3ckpt.save(fine_tuning_state(1, frozen=1), f"s3://{bucket}/m/r.ckpt", transport=transport)
    ops.put_bytes(transport, bkt, "m/r.ckpt", b"other bytes")
    with caplog.at_level(logging.WARNING, logger="s3ckpt"):
        stats = s3ckpt.save(state, f"s3://{bucket}/m/d.ckpt", transport=transport, base=f"s3://{bucket}/m/r.ckpt")
    assert stats.bytes_copied == 0 and "does not match its manifest" in caplog.text
    for name in ("b", "c", "d"):
        assert stored_bytes(transport, f"s3://{bucket}/m/{name}.ckpt") == torch_save_bytes(state)


def test_saving_over_the_base_itself_composes_from_its_old_bytes(transport: S3Transport, bucket: str) -> None:
    """``last.ckpt`` saved again with itself as the base: every copy is made before Complete replaces it."""
    url = f"s3://{bucket}/last/last.ckpt"
    s3ckpt.save(fine_tuning_state(1, frozen=2), url, transport=transport)
    state = fine_tuning_state(2, frozen=2)
    stats = s3ckpt.save(state, url, transport=transport, base=url)
    assert stats.bytes_copied >= 10 * MiB and stats.base == url
    assert stored_bytes(transport, url) == torch_save_bytes(state)
    assert s3ckpt.verify(url, transport=transport).crc32c == stats.crc32c


def test_a_server_side_copy_is_a_base_like_its_source(transport: S3Transport, bucket: str) -> None:
    """``last.ckpt`` of ``save_last="link"`` is a copy: its manifest carries the source's records."""
    src, link, url = (f"s3://{bucket}/link/{n}.ckpt" for n in ("step=1", "last", "step=2"))
    s3ckpt.save(fine_tuning_state(1, frozen=2), src, transport=transport)
    s3ckpt.copy(src, link, transport=transport)
    state = fine_tuning_state(2, frozen=2)
    stats = s3ckpt.save(state, url, transport=transport, base=link)
    assert stats.base == link and stats.bytes_copied >= 10 * MiB
    assert stored_bytes(transport, url) == torch_save_bytes(state)

"""Sharded and full-state checkpoints on S3 through Lightning Fabric: ``fabric.save`` / ``fabric.load`` with
``s3ckpt.fabric.S3ModelParallelStrategy`` (FSDP2) and ``S3FSDPStrategy`` (FSDP1), 2 real gloo rank processes
on CPU against the session's S3 server. The rank side is tests/distributed/_fabric_ranks.py.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from s3ckpt.catalog import list_checkpoints
from s3ckpt.server import LocalS3Server
from tests.distributed._sharded_ranks import run_two_ranks
from tests.distributed.test_resume_broadcast import make_transport

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_fabric_save_load_model_parallel_fsdp_full_and_async(
    s3_server: LocalS3Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bucket = f"fab-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    prefix = f"s3://{bucket}/fabric"
    workdir = tmp_path_factory.mktemp("sharded-fabric")
    phases: list[dict[str, Any]] = [
        {"kind": "mp", "url": f"{prefix}/mp"},
        {"kind": "mp", "url": f"{prefix}/mp-async", "async": True},
        {"kind": "fsdp", "url": f"{prefix}/fsdp", "pathlib": True},
        {"kind": "full", "url": f"{prefix}/full.ckpt"},
    ]
    start = time.monotonic()
    per_rank = run_two_ranks("tests.distributed._fabric_ranks", s3_server, workdir, phases, 1)
    seconds = {k: v["seconds"] for k, v in per_rank[0].items() if k != "local_s3_dir"}
    print(f"fabric phases: {time.monotonic() - start:.1f} s in all; per phase {seconds}")

    assert not any(r["local_s3_dir"] for r in per_rank), "a local s3: folder was created"
    assert not (ROOT / "s3:").exists()
    r0 = per_rank[0]
    for tag in ("mp", "mp-async", "fsdp", "full"):
        for rank, r in enumerate(per_rank):
            res = r[tag]
            assert res["fresh"]["weights"] != res["trained"]["weights"], f"{tag}: a fresh model is already trained"
            assert res["loaded"] == res["trained"], f"{tag} rank {rank}: other weights or optimizer state after load"
            assert (res["step"], res["counter"], res["remainder"]) == (3, 3, {"note": "kept"}), f"{tag} rank {rank}"
            # FSDP2 digests are of the gathered full state, the same on every rank. FSDP1 on CPU: torch's
            # full-state API hands back each rank's local shard (nothing gathered), so those differ by rank.
            if tag != "fsdp":
                assert res["trained"] == r0[tag]["trained"], f"{tag} rank {rank}: ranks disagree"
    assert r0["mp-async"]["saved"] == [f"{prefix}/mp-async"]
    assert r0["fsdp"]["saved"] == [f"{prefix}/fsdp"], "s3:/ (pathlib) is read as the s3:// URL"

    for rank, r in enumerate(per_rank):
        assert r["mp"]["errors"] == {
            "missing_key": "KeyError",
            "missing_optimizer": "KeyError",
            "raw_sharded": "ValueError",
            "filter_sharded": "NotImplementedError",
            "storage_options": "TypeError",
        }, f"rank {rank}"
        assert r["mp"]["non_strict"] == {"rest": ["counter", "note", "step"], "absent": 1}, f"rank {rank}"
        assert r["mp"]["local"] == {"step": 7, "meta": True}, f"rank {rank}: a local path is Lightning's"
        assert r["full"]["raw"] == r0["full"]["trained"]["weights"], f"rank {rank}: load_raw of the file"
    assert r0["full"]["filtered"] == {"keys": ["model", "step"], "model": ["0.bias", "0.weight"]}

    t = make_transport({"endpoint": s3_server.endpoint_url, "ak": s3_server.access_key, "sk": s3_server.secret_key})
    entries = {e.name: e for e in list_checkpoints(t, prefix)}
    assert sorted(entries) == ["fsdp", "full-filtered.ckpt", "full-raw.ckpt", "full.ckpt", "mp", "mp-async"], sorted(
        entries
    )
    for name in ("mp", "mp-async", "fsdp"):
        e = entries[name]
        assert e.kind == "sharded" and e.committed, (name, e)
        assert any(k.endswith("/meta.pt") for k in e.keys), (name, e.keys)
    assert entries["full.ckpt"].kind == "file" and entries["full.ckpt"].committed


def test_fabric_strategy_arguments() -> None:
    from lightning.fabric.plugins import TorchCheckpointIO

    from s3ckpt.fabric import S3FSDPStrategy, S3ModelParallelStrategy
    from s3ckpt.lightning import S3CheckpointIO

    io = S3CheckpointIO("s3://bucket/run")
    mp = S3ModelParallelStrategy(lambda module, mesh: module, checkpoint_io=io)
    assert mp.s3_checkpoint_io is io
    with pytest.raises(NotImplementedError):
        mp.checkpoint_io  # noqa: B018 - Lightning's property stays as it is
    built = S3FSDPStrategy(state_dict_type="full", dirpath="s3://bucket/run", chunk_size_MB=8).s3_checkpoint_io
    assert (built.dirpath, built.transfer.chunk_size_MB) == ("s3://bucket/run", 8)
    with pytest.raises(TypeError, match=r"checkpoint_io= and \['async_checkpointing'\]"):
        S3FSDPStrategy(checkpoint_io=io, async_checkpointing=True)
    with pytest.raises(TypeError, match="takes an s3ckpt S3CheckpointIO"):
        S3ModelParallelStrategy(lambda module, mesh: module, checkpoint_io=TorchCheckpointIO())  # type: ignore[arg-type]

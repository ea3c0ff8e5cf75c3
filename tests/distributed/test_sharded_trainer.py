"""Sharded checkpoints on S3 through Lightning's own Trainer API: ``S3ModelParallelStrategy`` (FSDP2) and
``S3FSDPStrategy`` (FSDP1, sharded and full state), 2 real gloo rank processes on CPU against the session's
S3 server. The rank side is tests/distributed/_sharded_ranks.py.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from s3ckpt.catalog import list_checkpoints
from s3ckpt.server import LocalS3Server
from s3ckpt.transport.context import S3Transport
from tests.distributed._sharded_ranks import run_two_ranks
from tests.distributed.test_resume_broadcast import make_transport

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


def _run(
    s3_server: LocalS3Server, workdir: Path, phases: list[dict[str, Any]], returncodes: list[int] | None = None
) -> list[dict[str, Any]]:
    from tests.conftest import READER

    return run_two_ranks(
        "tests.distributed._sharded_ranks",
        s3_server,
        workdir,
        phases,
        2 * len(phases),
        returncodes,
        reader_ak=READER.access_key,
        reader_sk=READER.secret_key,
    )


def _transport(s3_server: LocalS3Server) -> S3Transport:
    return make_transport({"endpoint": s3_server.endpoint_url, "ak": s3_server.access_key, "sk": s3_server.secret_key})


@pytest.mark.timeout(300)
def test_model_parallel_fsdp2_save_topk_last_resume(
    s3_server: LocalS3Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """FSDP2 through ``S3ModelParallelStrategy``: top-2 of three sharded saves plus ``last.ckpt``, the oldest
    removed whole, and a new Trainer resumes ``ckpt_path="last"`` with equal weights, optimizer and step;
    the same with ``async_checkpointing=True`` (removals wait for the newer upload's commit)."""
    bucket = f"shd-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    sync_dir, async_dir = f"s3://{bucket}/mp", f"s3://{bucket}/mp-async"
    workdir = tmp_path_factory.mktemp("sharded-mp")
    denied = f"s3://{bucket}/mp-denied"
    phases = [
        # incremental: each save composes from the one before (the items are too small to be copied: the
        # DCP test covers copying; this one that composing saves resume exactly)
        {"kind": "mp", "dirpath": sync_dir, "steps": 6, "last": True, "resume": "last", "incremental": True},
        # Every upload refused (a read-only identity), async, on_save_error="warn": training goes on, each
        # failed save is recorded on every rank, and no removal runs for a save that did not commit.
        {"kind": "mp", "label": "denied", "dirpath": denied, "steps": 6, "last": False, "resume": "last"}
        | {"async": True, "reader": True, "on_save_error": "warn", "train_only": True},
        {
            "kind": "mp",
            "label": "async",
            "dirpath": async_dir,
            "steps": 6,
            "last": True,
            "resume": "last",
            "async": True,
        },
    ]
    per_rank = _run(s3_server, workdir, phases)
    assert all(r["mp:incremental"] for r in per_rank)
    assert not any(r["local_s3_dir"] for r in per_rank), "a local s3: folder was created"
    assert not (ROOT / "s3:").exists()
    t = _transport(s3_server)
    for label, dirpath in (("mp", sync_dir), ("async", async_dir)):
        r0 = per_rank[0]
        for rank, r in enumerate(per_rank):
            resumed, trained = r[f"{label}:resumed"], r0[f"{label}:trained"]
            assert resumed["step"] == trained["step"] == 6, f"{label} rank {rank}: {resumed}"
            assert resumed["weights"] == trained["weights"], f"{label} rank {rank}: other weights"
            assert resumed["optim"] == trained["optim"], f"{label} rank {rank}: other optimizer state"
            assert r[f"{label}:resumed_path"] == f"{dirpath}/last.ckpt"
        # ckpt_path="last": rank 0 alone listed and chose; rank 1 sent only the ranged GETs of its shards.
        rank1 = per_rank[1][f"{label}:resume_requests"]
        assert set(rank1) <= {"GetObject *.distcp"}, rank1
        entries = {e.name: e for e in list_checkpoints(t, dirpath)}
        # top-2 of steps 2, 4, 6 by score: 4 and 6 kept, 2 removed whole (no object left under it).
        assert sorted(entries) == ["epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"], sorted(entries)
        assert all(e.kind == "sharded" and e.committed for e in entries.values())
        assert all(any(k.endswith("/meta.pt") for k in e.keys) for e in entries.values())
        assert r0[f"{label}:removed"] == [f"{dirpath}/epoch=0-step=2.ckpt"]
        assert f"{dirpath}/epoch=0-step=6.ckpt" in r0[f"{label}:saved"]
    # Async: the training step waited for the host copy only, a fraction of each save's time to commit.
    stalls = per_rank[0]["async:stall_vs_save"]
    assert stalls and all(stall < save for stall, save in stalls), stalls
    for rank, r in enumerate(per_rank):
        assert r["denied:trained"]["step"] == 6, f"rank {rank} stopped: {r['denied:trained']}"
        assert r["denied:failed"] == [f"{denied}/epoch=0-step={s}.ckpt" for s in (2, 4, 6)], r["denied:failed"]
        assert r["denied:saved"] == []
    # No removal ran for a save that did not commit: top-k either forgot the failed saves before it asked
    # (their failure already known), or asked and the removal was cancelled, depending on upload timing.
    assert per_rank[0]["denied:removed"] == []
    assert set(per_rank[0]["denied:cancelled"]) <= {f"{denied}/epoch=0-step={s}.ckpt" for s in (2, 4)}
    assert list_checkpoints(t, denied) == []


@pytest.mark.timeout(300)
def test_fsdp1_sharded_and_full_state(s3_server: LocalS3Server, tmp_path_factory: pytest.TempPathFactory) -> None:
    bucket = f"shd-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    sharded, full = f"s3://{bucket}/fsdp", f"s3://{bucket}/full"
    workdir = tmp_path_factory.mktemp("sharded-fsdp")
    phases = [
        {"kind": "fsdp", "dirpath": sharded, "steps": 4, "last": "link", "resume": f"{sharded}/epoch=0-step=4.ckpt"},
        {"kind": "full", "dirpath": full, "steps": 4, "last": True, "resume": "last"},
    ]
    per_rank = _run(s3_server, workdir, phases)
    assert not any(r["local_s3_dir"] for r in per_rank), "a local s3: folder was created"
    t = _transport(s3_server)
    for kind, dirpath, shape in (("fsdp", sharded, "sharded"), ("full", full, "file")):
        r0 = per_rank[0]
        for rank, r in enumerate(per_rank):
            assert r[f"{kind}:resumed"]["step"] == 4, f"{kind} rank {rank}: {r[f'{kind}:resumed']}"
            assert r[f"{kind}:resumed"]["weights"] == r0[f"{kind}:trained"]["weights"], f"{kind} rank {rank}"
            assert r[f"{kind}:resumed"]["optim"] == r0[f"{kind}:trained"]["optim"], f"{kind} rank {rank}"
        entries = {e.name: e for e in list_checkpoints(t, dirpath)}
        assert sorted(entries) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"], (kind, sorted(entries))
        assert {e.kind for e in entries.values()} == {shape}, kind
        assert all(e.committed for e in entries.values())
    # save_last="link": last.ckpt is a server-side copy of the sharded top-k checkpoint, never uploaded again.
    r0 = per_rank[0]
    assert r0["fsdp:copies"] == [f"{sharded}/last.ckpt"] * 2, r0["fsdp:copies"]  # after step 2 and step 4
    assert f"{sharded}/last.ckpt" not in r0["fsdp:saved"]
    # Loads that scale: rank 0 alone fetched .metadata, its manifest and meta.pt, once each; rank 1 sent no
    # LIST or HEAD and GETs only its byte ranges of the shards.
    assert r0["fsdp:resume_requests"].get("GetObject .metadata") == 1, r0["fsdp:resume_requests"]
    assert r0["fsdp:resume_requests"].get("GetObject meta.pt") == 1, r0["fsdp:resume_requests"]
    rank1 = per_rank[1]["fsdp:resume_requests"]
    assert set(rank1) <= {"GetObject *.distcp"}, rank1


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("victim", "at"), [(1, "shard"), (0, "commit")])
def test_sigkill_mid_save_keeps_previous_checkpoint(
    s3_server: LocalS3Server, tmp_path_factory: pytest.TempPathFactory, victim: int, at: str
) -> None:
    """A rank SIGKILLed in the sharded save of step 6 (rank 1 after its shards are stored; rank 0, the
    coordinator, after shards, meta.pt and manifest, just before .metadata): step 6 stays uncommitted, steps 2
    and 4 and last.ckpt (step 4) stay whole, and a new job resumes from step 4."""
    bucket = f"shd-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    dirpath = f"s3://{bucket}/kill"
    workdir = tmp_path_factory.mktemp("sharded-kill")
    crash = [{"kind": "mp", "dirpath": dirpath, "steps": 8, "last": True, "resume": "last"}]
    crash[0]["kill"] = {"rank": victim, "at": at, "step": 6}
    # The victim dies by SIGKILL; the other rank's fit fails once its peer is gone.
    codes = [-9, 1] if victim == 0 else [1, -9]
    _run(s3_server, workdir / "crash", crash, returncodes=codes)
    t = _transport(s3_server)
    entries = {e.name: e for e in list_checkpoints(t, dirpath)}
    assert entries["epoch=0-step=6.ckpt"].committed is False, entries["epoch=0-step=6.ckpt"]
    assert all(entries[n].committed for n in ("epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"))
    resume = [{"kind": "mp", "dirpath": dirpath, "steps": 4, "last": True, "resume": "last", "resume_only": True}]
    per_rank = _run(s3_server, workdir / "resume", resume)
    for rank, r in enumerate(per_rank):
        assert r["mp:resumed"]["step"] == 4, f"rank {rank}: {r['mp:resumed']}"
        assert r["mp:resumed_path"] == f"{dirpath}/last.ckpt"

"""Sharded checkpoints on S3 through Lightning's own Trainer API: ``S3ModelParallelStrategy`` (FSDP2) and
``S3FSDPStrategy`` (FSDP1, sharded and full state), 2 real gloo rank processes on CPU against the session's
S3 server. The rank side is tests/distributed/_sharded_ranks.py.
"""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from s3ckpt.catalog import list_checkpoints
from s3ckpt.server import LocalS3Server
from s3ckpt.transport.context import S3Transport
from tests.distributed._sharded_ranks import RESULT_TAG
from tests.distributed.test_resume_broadcast import make_transport, run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(s3_server: LocalS3Server, workdir: Path, phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cfg: dict[str, Any] = {
        "endpoint": s3_server.endpoint_url,
        "ak": s3_server.access_key,
        "sk": s3_server.secret_key,
        "workdir": str(workdir),
        "phases": phases,
        "ports": [_free_port() for _ in range(2 * len(phases))],
    }
    env = {"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2", "NODE_RANK": "0"}
    start = time.monotonic()
    per_rank = run_ranks(
        "tests.distributed._sharded_ranks",
        cfg,
        2,
        workdir,
        timeout_s=240,
        rank_env=lambda r: {**env, "LOCAL_RANK": str(r), "RANK": str(r)},
        result_tag=RESULT_TAG,
    )
    print(f"phases {[p['kind'] for p in phases]}: {time.monotonic() - start:.1f} s")
    return per_rank


def _transport(s3_server: LocalS3Server) -> S3Transport:
    return make_transport({"endpoint": s3_server.endpoint_url, "ak": s3_server.access_key, "sk": s3_server.secret_key})


@pytest.mark.timeout(300)
def test_model_parallel_fsdp2_save_topk_last_resume(
    s3_server: LocalS3Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bucket = f"shd-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    dirpath = f"s3://{bucket}/mp"
    workdir = tmp_path_factory.mktemp("sharded-mp")
    phases = [{"kind": "mp", "dirpath": dirpath, "steps": 6, "last": True, "resume": "last"}]
    per_rank = _run(s3_server, workdir, phases)
    r0 = per_rank[0]
    assert not any(r["local_s3_dir"] for r in per_rank), "a local s3: folder was created"
    assert not (ROOT / "s3:").exists()
    for rank, r in enumerate(per_rank):
        assert r["mp:resumed"]["step"] == r0["mp:trained"]["step"] == 6, f"rank {rank}: {r['mp:resumed']}"
        assert r["mp:resumed"]["weights"] == r0["mp:trained"]["weights"], f"rank {rank}: other weights"
        assert r["mp:resumed"]["optim"] == r0["mp:trained"]["optim"], f"rank {rank}: other optimizer state"
        assert r["mp:resumed_path"] == f"{dirpath}/last.ckpt"
    t = _transport(s3_server)
    entries = {e.name: e for e in list_checkpoints(t, dirpath)}
    # top-2 of steps 2, 4, 6 by score: 4 and 6 kept, 2 removed whole (no object left under it).
    assert sorted(entries) == ["epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"], sorted(entries)
    assert all(e.kind == "sharded" and e.committed for e in entries.values())
    assert all(any(k.endswith("/meta.pt") for k in e.keys) for e in entries.values())
    assert r0["mp:removed"] == [f"{dirpath}/epoch=0-step=2.ckpt"]

"""catalog.list_checkpoints: grouping files, model-parallel ranks and sharded directories from one listing."""

from __future__ import annotations

import pytest
import torch

import s3ckpt
from s3ckpt.catalog import list_checkpoints, parse_step_epoch, uninject_model_parallel_rank
from s3ckpt.transport import S3Transport, ops

pytestmark = pytest.mark.integration


def test_uninject_and_parse() -> None:
    assert uninject_model_parallel_rank("run/mp_rank_01/x-last.ckpt") == "run/x-last.ckpt"
    assert uninject_model_parallel_rank("run/tp_rank_00_pp_rank_001/x.ckpt") == "run/x.ckpt"
    assert uninject_model_parallel_rank("run/x.ckpt") == "run/x.ckpt"
    assert parse_step_epoch("epoch=3-step=400.ckpt") == (400, 3)
    assert parse_step_epoch("megatron--val_loss=1.2-step=10-last.ckpt") == (10, None)
    assert parse_step_epoch("last.ckpt") == (None, None)


def test_groups_and_commit_status(transport: S3Transport, bucket: str) -> None:
    for name in ("epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt", "last.ckpt"):
        s3ckpt.save(
            {"epoch": 1, "global_step": 20, "w": torch.ones(2)}, f"s3://{bucket}/run/{name}", transport=transport
        )
    for rank in (0, 1):
        ops.put_bytes(transport, bucket, f"run/mp_rank_0{rank}/m-step=30-last.ckpt", b"x")
    ops.put_bytes(transport, bucket, "run/m-step=30-last.ckpt.s3ckpt-group.json", b"{}")
    ops.put_bytes(transport, bucket, "run/mp_rank_00/u-step=40.ckpt", b"x")  # group without marker
    ops.put_bytes(transport, bucket, "run/dcp-step=50/__0_0.distcp", b"x")
    ops.put_bytes(transport, bucket, "run/dcp-step=50/.metadata", b"x")
    ops.put_bytes(transport, bucket, "run/dcp-step=60/__0_0.distcp", b"x")
    ops.put_bytes(transport, bucket, "run/notes.txt", b"x")

    entries = list_checkpoints(transport, f"s3://{bucket}/run", with_manifests=True)
    by_name = {e.name: e for e in entries}
    assert set(by_name) == {
        "epoch=0-step=10.ckpt",
        "epoch=1-step=20.ckpt",
        "last.ckpt",
        "m-step=30-last.ckpt",
        "u-step=40.ckpt",
        "dcp-step=50",
        "dcp-step=60",
    }
    assert by_name["m-step=30-last.ckpt"].kind == "model_parallel" and by_name["m-step=30-last.ckpt"].committed
    assert len(by_name["m-step=30-last.ckpt"].keys) == 2
    assert not by_name["u-step=40.ckpt"].committed and "marker" in by_name["u-step=40.ckpt"].reason
    assert by_name["dcp-step=50"].kind == "sharded" and by_name["dcp-step=50"].committed
    assert not by_name["dcp-step=60"].committed
    assert by_name["last.ckpt"].step == 20, "step read from the manifest"
    assert entries[0].name == "dcp-step=60"  # newest step first
    committed = list_checkpoints(transport, f"s3://{bucket}/run", include_uncommitted=False)
    assert {e.name for e in committed} == set(by_name) - {"u-step=40.ckpt", "dcp-step=60"}
    with pytest.raises(FileNotFoundError):
        list_checkpoints(transport, "s3://no-such-bucket-cat/run")


def test_unreadable_manifest_does_not_hide_the_listing(transport: S3Transport, bucket: str) -> None:
    s3ckpt.save({"w": torch.ones(1)}, f"s3://{bucket}/r/a-step=1.ckpt", transport=transport)
    s3ckpt.save({"w": torch.ones(1)}, f"s3://{bucket}/r/b-step=2.ckpt", transport=transport)
    ops.put_bytes(transport, bucket, "r/b-step=2.ckpt.s3ckpt.json", b"not json")
    entries = list_checkpoints(transport, f"s3://{bucket}/r", with_manifests=True)
    assert [e.name for e in entries] == ["b-step=2.ckpt", "a-step=1.ckpt"]
    assert entries[0].manifest is None and entries[1].manifest is not None

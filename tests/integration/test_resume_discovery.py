"""Which checkpoint a run resumes from (NeMo's exp_manager rules), in one process against a real S3 server.

``resolve_resume_path`` without a process group is rank 0 of 1: it lists, checks and returns the answer itself.
"""

from __future__ import annotations

import json
import pickle
import time
from typing import Any

import pytest
import torch

import s3ckpt
from s3ckpt.distributed import _capture, commit_model_parallel, model_parallel_rank_url, resolve_resume_path
from s3ckpt.errors import CheckpointNotFoundError, ConfigError, ResumeError, S3CheckpointError, S3NotFoundError
from s3ckpt.layout import Manifest, manifest_key, read_manifest
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport, ops

# portable: make test also runs these on moto (tests/backends.py).
pytestmark = [pytest.mark.integration, pytest.mark.portable]


def _save(t: S3Transport, url: str, step: int = 0) -> None:
    s3ckpt.save({"global_step": step, "w": torch.full((8,), float(step))}, url, transport=t)


def _resolve(t: S3Transport, url: str, **kwargs: Any) -> str | None:
    return resolve_resume_path(url, transport=t, **kwargs)


def test_end_checkpoint_is_an_error_unless_resume_past_end(transport: S3Transport, bucket: str) -> None:
    run = f"s3://{bucket}/run"
    _save(transport, f"{run}/x-step=10-last.ckpt", 10)
    _save(transport, f"{run}/x-step=20-end.ckpt", 20)
    with pytest.raises(ResumeError, match=r"x-step=20-end\.ckpt indicating that the last training run"):
        _resolve(transport, run)
    with pytest.raises(ResumeError):
        _resolve(transport, run, resume_ignore_no_checkpoint=True)  # a finished run is not "nothing found"
    assert _resolve(transport, run, resume_past_end=True) == f"{run}/x-step=20-end.ckpt"


def test_newest_last_by_step_then_time(transport: S3Transport, bucket: str) -> None:
    run = f"s3://{bucket}/run"
    for step in (10, 30, 20):
        _save(transport, f"{run}/x-step={step}-last.ckpt", step)
    # A top-k checkpoint is not a resume candidate (one with a higher step than the last would be taken:
    # resume never goes back past a committed checkpoint, see test_resume_never_behind.py).
    _save(transport, f"{run}/epoch=0-step=20.ckpt", 20)
    assert _resolve(transport, run) == f"{run}/x-step=30-last.ckpt"

    # Without a step in the name the newer object wins, even when its name sorts first.
    other = f"s3://{bucket}/other"
    _save(transport, f"{other}/b/last.ckpt")
    time.sleep(1.1)  # LastModified has a resolution of one second
    _save(transport, f"{other}/a/last.ckpt")
    assert _resolve(transport, other) == f"{other}/a/last.ckpt"


def test_model_parallel_files_are_one_checkpoint(transport: S3Transport, bucket: str) -> None:
    run = f"s3://{bucket}/run"
    committed = f"{run}/m-step=30-last.ckpt"
    for tp in (0, 1):
        _save(transport, model_parallel_rank_url(committed, tp), 30)
    marker = commit_model_parallel(committed, tensor_parallel_size=2, transport=transport)
    assert marker == committed + ".s3ckpt-group.json"
    record = json.loads(ops.get_bytes(transport, bucket, "run/m-step=30-last.ckpt.s3ckpt-group.json"))
    assert sorted(record["files"]) == ["run/mp_rank_00/m-step=30-last.ckpt", "run/mp_rank_01/m-step=30-last.ckpt"]
    assert _resolve(transport, run) == committed

    # A newer group whose marker was never written (one rank's save did not finish) is skipped, by name.
    unfinished = f"{run}/m-step=40-last.ckpt"
    _save(transport, model_parallel_rank_url(unfinished, 0), 40)
    with pytest.raises(CheckpointNotFoundError, match=r"1 of 2 rank files are missing.*mp_rank_01"):
        commit_model_parallel(unfinished, tensor_parallel_size=2, transport=transport)
    with pytest.warns(UserWarning, match=r"m-step=40-last\.ckpt: not committed \(no group commit marker"):
        assert _resolve(transport, run) == committed

    # Tensor x pipeline parallel names, and a rank file replaced after the commit.
    tp_pp = f"{run}/g-step=50-last.ckpt"
    for pp in (0, 1):
        _save(transport, model_parallel_rank_url(tp_pp, 0, pp, 2), 50)
    commit_model_parallel(tp_pp, tensor_parallel_size=1, pipeline_parallel_size=2, transport=transport)
    assert ops.exists(transport, bucket, "run/tp_rank_00_pp_rank_001/g-step=50-last.ckpt")
    assert _resolve(transport, run) == tp_pp, "newest first: the unfinished step 40 is not even looked at"
    _save(transport, model_parallel_rank_url(tp_pp, 0, 1, 2), 51)
    with pytest.warns(UserWarning) as caught:
        assert _resolve(transport, run) == committed
    skipped = [str(w.message) for w in caught]
    assert "g-step=50-last.ckpt: " in skipped[0] and "replaced after the group was committed" in skipped[0]
    assert "m-step=40-last.ckpt: not committed" in skipped[1]

    with pytest.raises(ConfigError):
        commit_model_parallel(committed, tensor_parallel_size=1, transport=transport)
    with pytest.raises(ConfigError, match="without the rank folder"):
        commit_model_parallel(model_parallel_rank_url(committed, 0), tensor_parallel_size=2, transport=transport)


def test_nothing_found(transport: S3Transport, bucket: str) -> None:
    run = f"s3://{bucket}/run"
    _save(transport, f"{run}/epoch=0-step=10.ckpt")  # not a *last.ckpt
    with pytest.raises(CheckpointNotFoundError, match=r"no usable .* Cannot resume; pass resume_ignore_no_checkpoint"):
        _resolve(transport, run)
    with pytest.warns(UserWarning, match="Training from scratch"):
        assert _resolve(transport, run, resume_ignore_no_checkpoint=True) is None
    with pytest.raises(S3NotFoundError, match="does not exist"):  # a typo is never "start fresh"
        _resolve(transport, "s3://no-such-bucket-resume/run", resume_ignore_no_checkpoint=True)

    sent: list[str] = []
    transport.clients.get().meta.events.register("before-send.s3", lambda **kw: sent.append(kw["event_name"]))
    assert _resolve(transport, run, resume_if_exists=False) is None
    assert sent == [], "resume_if_exists=False sends no request"


def test_unfinished_newest_is_skipped(transport: S3Transport, bucket: str) -> None:
    run = f"s3://{bucket}/run"
    _save(transport, f"{run}/u-step=10-last.ckpt", 10)
    # A multipart upload that never completed: S3 shows nothing, so the older checkpoint is chosen.
    client = transport.clients.get()
    upload = client.create_multipart_upload(Bucket=bucket, Key="run/u-step=20-last.ckpt")
    client.upload_part(
        Bucket=bucket, Key="run/u-step=20-last.ckpt", UploadId=upload["UploadId"], PartNumber=1, Body=b"x"
    )
    assert _resolve(transport, run) == f"{run}/u-step=10-last.ckpt"

    # A sharded (DCP) directory is committed by its .metadata, written last.
    ops.put_bytes(transport, bucket, "run/d-step=30-last/__0_0.distcp", b"shard")
    with pytest.warns(UserWarning, match=r"d-step=30-last/: not committed \(no \.metadata"):
        assert _resolve(transport, run) == f"{run}/u-step=10-last.ckpt"
    ops.put_bytes(transport, bucket, "run/d-step=30-last/.metadata", b"meta")
    assert _resolve(transport, run) == f"{run}/d-step=30-last/"


def test_replaced_newest_falls_back_with_a_warning(
    transport: S3Transport, bucket: str, s3_server: LocalS3Server
) -> None:
    run = f"s3://{bucket}/run"
    _save(transport, f"{run}/c-step=10-last.ckpt", 10)
    _save(transport, f"{run}/c-step=20-last.ckpt", 20)
    # Overwritten outside s3ckpt (no CRC32C stored): its manifest no longer matches it.
    s3_server.client().put_object(Bucket=bucket, Key="run/c-step=20-last.ckpt", Body=b"not a checkpoint")
    with pytest.warns(UserWarning, match=r"Skipping checkpoint .*c-step=20-last\.ckpt: .*does not match its manifest"):
        assert _resolve(transport, run) == f"{run}/c-step=10-last.ckpt"
    with pytest.raises(s3ckpt.CheckpointCorruptedError):
        s3ckpt.load(f"{run}/c-step=20-last.ckpt", transport=transport)
    assert _resolve(transport, run, verify_candidates=False) == f"{run}/c-step=20-last.ckpt"


def test_altered_bytes_need_full_verification(transport: S3Transport, bucket: str, s3_server: LocalS3Server) -> None:
    run = f"s3://{bucket}/run"
    _save(transport, f"{run}/r-step=10-last.ckpt", 10)
    _save(transport, f"{run}/r-step=20-last.ckpt", 20)
    key = "run/r-step=20-last.ckpt"
    saved = read_manifest(transport, bucket, key)
    assert saved is not None
    data = bytearray(ops.get_bytes(transport, bucket, key))
    data[len(data) // 2] ^= 0xFF
    # Bit rot behind a record that still matches: same size, a manifest naming the new ETag, the old CRC32C.
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=bytes(data))
    info = ops.head(transport, bucket, key)
    forged = Manifest(key, info.size, saved.crc32c, info.etag, saved.nonce, saved.created)
    ops.put_bytes(transport, bucket, manifest_key(key), forged.to_json())

    assert _resolve(transport, run) == f"{run}/{key[4:]}", "HEAD checks cannot see altered bytes"
    with pytest.warns(UserWarning, match=r"Skipping checkpoint .*r-step=20-last\.ckpt: .*is corrupted: CRC32C"):
        assert _resolve(transport, run, verify_candidates=True) == f"{run}/r-step=10-last.ckpt"


def test_an_error_that_does_not_pickle_still_reaches_the_other_ranks() -> None:
    class Local(Exception):  # a local class cannot be pickled: the broadcast would fail on rank 0
        pass

    def fail() -> None:
        raise Local("rank 0 broke")

    outcome = _capture(fail)
    received = pickle.loads(pickle.dumps(outcome))
    with pytest.raises(Local):
        outcome.unwrap()  # the rank that failed raises its own exception, traceback and all
    with pytest.raises(S3CheckpointError, match=r"\.Local: rank 0 broke$") as info:
        received.unwrap()
    assert "broadcast to this one" in info.value.__notes__[0] and "in fail" in info.value.__notes__[0]

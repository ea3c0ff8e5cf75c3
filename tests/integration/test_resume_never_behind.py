"""Resume never goes back past a committed checkpoint (issue 18, item 7), against the real S3 server.

With ``save_last="link"`` a crash between a top-k save's commit and its ``last.ckpt`` copy leaves ``last.ckpt``
one interval behind. Both resume paths take the newer committed checkpoint of the same run instead, with a
warning: rank 0's discovery (``resolve_resume_path``, as ``configure_s3_resume`` uses it) and Lightning's
``trainer.fit(ckpt_path="last")`` through ``S3ModelCheckpoint._find_last_checkpoints``.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections import Counter
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn

import s3ckpt
import s3ckpt.dcp
from s3ckpt.distributed import commit_model_parallel, model_parallel_rank_url, resolve_resume_path
from s3ckpt.lightning import S3CheckpointIO, S3ModelCheckpoint
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport, ops
from tests.conftest import client_config_for

pytestmark = pytest.mark.integration


def _save(t: S3Transport, url: str, step: int) -> None:
    s3ckpt.save({"global_step": step, "epoch": step // 60, "w": torch.full((8,), float(step))}, url, transport=t)


def _crashed_link_run(t: S3Transport, run: str) -> None:
    """What the demo left: top-k (k=2) at 80 and 100, ``last.ckpt`` still the copy of 80 (killed before the
    copy of 100)."""
    _save(t, f"{run}/epoch=1-step=80.ckpt", 80)
    s3ckpt.copy(f"{run}/epoch=1-step=80.ckpt", f"{run}/last.ckpt", transport=t)
    _save(t, f"{run}/epoch=1-step=100.ckpt", 100)


def _wire(t: S3Transport) -> Counter[str]:
    sent: Counter[str] = Counter()

    def count(**kw: Any) -> None:
        sent[kw["event_name"].rsplit(".", 1)[-1]] += 1

    t.clients.get().meta.events.register("before-send.s3", count)
    return sent


def test_resume_takes_a_newer_committed_checkpoint_and_says_why(
    transport: S3Transport, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    run = f"s3://{bucket}/run"
    _crashed_link_run(transport, run)
    sent = _wire(transport)
    with caplog.at_level(logging.WARNING, logger="s3ckpt.resume"), pytest.warns(UserWarning) as caught:
        assert resolve_resume_path(run, transport=transport) == f"{run}/epoch=1-step=100.ckpt"
    why = r"Resuming from .*epoch=1-step=100\.ckpt \(step 100\) instead of .*last\.ckpt \(step 80\)"
    assert any(re.search(why, str(w.message)) for w in caught), [str(w.message) for w in caught]
    assert "never goes back past a committed checkpoint" in caplog.text
    # One LIST, the GET of last.ckpt's manifest (its step), and the check of the checkpoint taken.
    assert sent["ListObjectsV2"] == 1 and sent["GetObject"] <= 2 and sent["HeadObject"] == 1, sent


def test_last_at_the_newest_step_is_kept(transport: S3Transport, bucket: str) -> None:
    run = f"s3://{bucket}/run"
    _crashed_link_run(transport, run)
    s3ckpt.copy(f"{run}/epoch=1-step=100.ckpt", f"{run}/last.ckpt", transport=transport)
    sent = _wire(transport)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_resume_path(run, transport=transport) == f"{run}/last.ckpt"
    # The manifest read for the step is the one the HEAD check uses: fetched once.
    assert sent == {"ListObjectsV2": 1, "GetObject": 1, "HeadObject": 1}, sent


def test_uncommitted_corrupt_or_foreign_newer_ones_are_not_taken(
    transport: S3Transport, bucket: str, s3_server: LocalS3Server
) -> None:
    run = f"s3://{bucket}/run"
    _crashed_link_run(transport, run)
    # Newer, but not committed: a model-parallel group without its marker, a sharded save without .metadata.
    group = f"{run}/epoch=2-step=120.ckpt"
    _save(transport, model_parallel_rank_url(group, 0), 120)
    ops.put_bytes(transport, bucket, "run/epoch=2-step=140.ckpt/__0_0.distcp", b"shard")
    # Newer, but not of this run: another directory, another kind of file.
    _save(transport, f"{run}/other/epoch=9-step=900.ckpt", 900)
    _save(transport, f"{run}/optimizer-step=500.pt", 500)
    with pytest.warns(UserWarning, match=r"instead of .*last\.ckpt \(step 80\)"):
        assert resolve_resume_path(run, transport=transport) == f"{run}/epoch=1-step=100.ckpt"

    # Once the group commits, it is the newest committed checkpoint of the run.
    _save(transport, model_parallel_rank_url(group, 1), 120)
    commit_model_parallel(group, tensor_parallel_size=2, transport=transport)
    with pytest.warns(UserWarning, match=r"Resuming from .*epoch=2-step=120\.ckpt \(step 120\)"):
        assert resolve_resume_path(run, transport=transport) == group

    # A newer one that fails its check is skipped with a warning; the next one down is taken.
    s3_server.client().put_object(Bucket=bucket, Key="run/mp_rank_01/epoch=2-step=120.ckpt", Body=b"replaced")
    with pytest.warns(UserWarning) as caught:
        assert resolve_resume_path(run, transport=transport) == f"{run}/epoch=1-step=100.ckpt"
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("Not resuming from") and "epoch=2-step=120.ckpt" in m for m in messages), messages


def test_unknown_step_is_compared_by_commit_time(transport: S3Transport, bucket: str) -> None:
    run = f"s3://{bucket}/run"
    s3ckpt.save({"w": torch.ones(2)}, f"{run}/last.ckpt", transport=transport)  # no step anywhere
    _save(transport, f"{run}/epoch=0-step=20.ckpt", 20)
    # Same second as last.ckpt at most: not shown to be newer (LastModified has a resolution of one second).
    if (
        ops.head(transport, bucket, "run/epoch=0-step=20.ckpt").last_modified
        == ops.head(transport, bucket, "run/last.ckpt").last_modified
    ):
        assert resolve_resume_path(run, transport=transport) == f"{run}/last.ckpt"
    time.sleep(1.1)
    _save(transport, f"{run}/epoch=0-step=40.ckpt", 40)
    with pytest.warns(UserWarning, match=r"instead of .*last\.ckpt \(no recorded step, last written"):
        assert resolve_resume_path(run, transport=transport) == f"{run}/epoch=0-step=40.ckpt"


# -- trainer.fit(ckpt_path="last") ---------------------------------------------------------------------------


def _last_path(s3_server: LocalS3Server, run: str) -> str | None:
    """What Lightning's ``ckpt_path="last"`` resolves to (the connector's own code, no fit)."""
    io = S3CheckpointIO(run, client=client_config_for(s3_server))
    trainer = Trainer(
        plugins=[io],
        callbacks=[S3ModelCheckpoint(dirpath=run)],
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    path = trainer._checkpoint_connector._parse_ckpt_path(
        TrainerFn.FITTING, "last", model_provided=True, model_connected=False
    )
    return None if path is None else str(path)


def test_ckpt_path_last_takes_a_newer_committed_checkpoint(
    transport: S3Transport, bucket: str, s3_server: LocalS3Server
) -> None:
    run = f"s3://{bucket}/run"
    _crashed_link_run(transport, run)
    with pytest.warns(UserWarning, match=r"Resuming from .*epoch=1-step=100\.ckpt \(step 100\) instead of"):
        assert _last_path(s3_server, run) == f"{run}/epoch=1-step=100.ckpt"
    s3ckpt.copy(f"{run}/epoch=1-step=100.ckpt", f"{run}/last.ckpt", transport=transport)
    assert _last_path(s3_server, run) == f"{run}/last.ckpt"


def test_ckpt_path_last_finds_a_committed_sharded_last(
    transport: S3Transport, bucket: str, s3_server: LocalS3Server
) -> None:
    run = f"s3://{bucket}/run"
    state = {"w": torch.arange(16.0), "step": torch.tensor(3)}
    s3ckpt.dcp.save(state, f"{run}/last.ckpt", no_dist=True, transport=transport)
    assert _last_path(s3_server, run) == f"{run}/last.ckpt"

    # An unfinished, newer sharded last-v1.ckpt/ (no .metadata) is skipped, by name.
    ops.put_bytes(transport, bucket, "run/last-v1.ckpt/__0_0.distcp", b"shard")
    with pytest.warns(UserWarning, match=r"Not resuming from .*last-v1\.ckpt/: not committed \(no \.metadata"):
        assert _last_path(s3_server, run) == f"{run}/last.ckpt"

    # A sharded top-k committed after last.ckpt/ (whose step is recorded nowhere s3ckpt reads) replaces it.
    time.sleep(1.1)
    s3ckpt.dcp.save(state, f"{run}/epoch=0-step=40.ckpt", no_dist=True, transport=transport)
    with pytest.warns(UserWarning, match=r"Resuming from .*epoch=0-step=40\.ckpt/ \(step 40\) instead of"):
        assert _last_path(s3_server, run) == f"{run}/epoch=0-step=40.ckpt"


def test_modified_of_a_sharded_checkpoint_is_its_commit_time(transport: S3Transport, bucket: str) -> None:
    from s3ckpt.lightning import S3FileSystem

    url = f"s3://{bucket}/run/last.ckpt"
    s3ckpt.dcp.save({"w": torch.ones(4)}, url, no_dist=True, transport=transport)
    fs = S3FileSystem(transport)
    assert fs.modified(url) == ops.head(transport, bucket, "run/last.ckpt/.metadata").last_modified
    ops.put_bytes(transport, bucket, "run/unfinished.ckpt/__0_0.distcp", b"shard")
    with pytest.raises(FileNotFoundError, match="committed sharded checkpoint"):
        fs.modified(f"s3://{bucket}/run/unfinished.ckpt")

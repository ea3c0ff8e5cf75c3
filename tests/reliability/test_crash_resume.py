"""Crash and race scenarios against the real server, with real processes:

* a training process saving repeatedly (sync and async, with top-k style removals) is SIGKILLed 30 times at
  random instants; after every kill the resume checkpoint loads, verifies, and is never older than the last
  one seen: nothing partial, nothing lost;
* two writers racing for the same checkpoint path: the result is one writer's checkpoint, whole.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time
from typing import Any

import pytest
import torch

import s3ckpt
from s3ckpt.catalog import list_checkpoints
from s3ckpt.config import ClientConfig, RetryConfig, TransferConfig
from s3ckpt.distributed import find_resume_checkpoint
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport, ops
from tests.conftest import client_config_for

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

KILLS = 30
ELEMENTS = 3 * 1024 * 1024  # 12 MiB of float32 per checkpoint: 3 parts of 5 MiB


def _transport(cfg: ClientConfig) -> S3Transport:
    return S3Transport.create(
        client=cfg,
        retry=RetryConfig(max_attempts=5, base_delay_s=0.05, deadline_s=30),
        transfer=TransferConfig(chunk_size_MB=5, max_write_concurrency=2, max_read_concurrency=4),
    )


def _trainer(cfg: ClientConfig, dirpath: str, async_mode: bool, events: Any) -> None:
    """A stand-in training loop: resume from what rank-0 discovery picks, then save a new checkpoint every
    step (a step file plus last.ckpt) and remove the older step file, like ModelCheckpoint(save_top_k=1)."""
    from s3ckpt.lightning import S3CheckpointIO

    t = _transport(cfg)
    io = S3CheckpointIO(
        dirpath,
        chunk_size_MB=5,
        max_write_concurrency=2,
        async_checkpointing=async_mode,
        client=cfg,
        retry=RetryConfig(max_attempts=5, base_delay_s=0.05, deadline_s=30),
    )
    resume = find_resume_checkpoint(dirpath, transport=t, resume_ignore_no_checkpoint=True)
    step = int(s3ckpt.load(resume, transport=t)["step"]) if resume else 0
    previous: str | None = None
    while True:
        step += 1
        state = {"step": step, "w": torch.full((ELEMENTS,), float(step))}
        path = f"{dirpath}/step={step:05d}.ckpt"
        io.save_checkpoint(state, path)
        io.save_checkpoint(state, f"{dirpath}/last.ckpt")
        if previous is not None:
            io.remove_checkpoint(previous)
        previous = path
        events.put(step)  # sync: committed; async: submitted (only the first, synchronous run waits on it)


@pytest.mark.slow
def test_sigkill_at_random_instants_never_loses_or_tears_a_checkpoint(
    s3_server: LocalS3Server, transport: S3Transport, bucket: str
) -> None:
    cfg = client_config_for(s3_server)
    dirpath = f"s3://{bucket}/crashy"
    ctx = mp.get_context("forkserver")
    # Workers fork from a server that has torch and s3ckpt imported already: each restart costs milliseconds,
    # not the seconds of a fresh interpreter. No S3 client exists before the fork (clients are per process).
    ctx.set_forkserver_preload(["torch", "s3ckpt", "s3ckpt.lightning", "s3ckpt.distributed"])
    rng = random.Random(1234)
    last_step = 0
    resumes: list[int] = []
    for kill in range(KILLS):
        events = ctx.Queue()
        proc = ctx.Process(target=_trainer, args=(cfg, dirpath, kill % 2 == 1, events), daemon=True)
        proc.start()
        if kill == 0:
            events.get(timeout=120)  # the first checkpoint exists before the first crash
        time.sleep(rng.uniform(0.05, 1.5))
        os.kill(proc.pid, 9)
        proc.join(timeout=30)
        assert proc.exitcode == -9

        resume = find_resume_checkpoint(dirpath, transport=transport, verify_candidates=True)
        assert resume is not None, f"kill {kill}: no checkpoint to resume from"
        state = s3ckpt.load(resume, transport=transport, verify="require")
        step = int(state["step"])
        assert torch.equal(state["w"], torch.full((ELEMENTS,), float(step))), "a checkpoint mixed two saves"
        assert step >= last_step, f"kill {kill}: resume went back from step {last_step} to {step}"
        last_step = step
        resumes.append(step)
        for entry in list_checkpoints(transport, dirpath):
            assert entry.committed
            loaded = s3ckpt.load(entry.url, transport=transport, verify="require")
            assert torch.equal(loaded["w"], torch.full((ELEMENTS,), float(loaded["step"])))
    assert resumes[-1] > resumes[0], "training made progress across the crashes"
    leftovers = ops.list_uploads(transport, bucket, "crashy/")
    for u in leftovers:  # killed uploads stay invisible until `s3ckpt gc` aborts them
        ops.abort_upload(transport, bucket, u.key, u.upload_id)


def _racer(cfg: ClientConfig, url: str, value: float, go: Any) -> None:
    t = _transport(cfg)
    go.wait(30)
    s3ckpt.save({"writer": value, "w": torch.full((ELEMENTS,), value)}, url, transport=t)


def test_two_writers_racing_for_one_path(s3_server: LocalS3Server, transport: S3Transport, bucket: str) -> None:
    cfg = client_config_for(s3_server)
    url = f"s3://{bucket}/race/last.ckpt"
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "s3ckpt"])
    for round_ in range(3):
        go = ctx.Event()
        procs = [ctx.Process(target=_racer, args=(cfg, url, float(v), go)) for v in (round_ * 10 + 1, round_ * 10 + 2)]
        for p in procs:
            p.start()
        go.set()
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0
        state = s3ckpt.load(url, transport=transport, verify="require")
        assert state["writer"] in (round_ * 10 + 1, round_ * 10 + 2)
        assert torch.equal(state["w"], torch.full((ELEMENTS,), state["writer"])), "the result mixes two writers"
    assert ops.list_uploads(transport, bucket, "race/") == []

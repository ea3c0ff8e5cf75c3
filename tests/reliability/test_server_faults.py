"""Faults of the store itself, on a dedicated real SeaweedFS (never the session's shared one):

* **crash and restart mid-save**: weed is SIGKILLed at random instants while several saves (sync and async,
  multipart) are in flight, and restarted on the same ports and data; every save whose retry deadline outlasts
  the outage completes with the exact bytes, everything committed before loads and verifies, nothing partial
  is visible, and ``s3ckpt gc`` leaves no incomplete multipart upload;
* **the store refuses writes** (volumes read-only under ``-volume.minFreeSpace``): a save fails within its
  deadline with the store's own message, its upload is aborted, the previous checkpoint still loads.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import s3ckpt
from s3ckpt.catalog import list_checkpoints
from s3ckpt.cli.main import main as cli_main
from s3ckpt.config import RetryConfig, TransferConfig
from s3ckpt.errors import S3TransferError
from s3ckpt.lightning import S3CheckpointIO
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport, ops
from tests.conftest import client_config_for

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

KILLS = 10
SAVES_PER_KILL = 3  # two sync saves on threads and one async save in flight at each kill
ELEMENTS = 3 * 1024 * 1024 + 1000  # 12 MiB of float32: three 5 MiB parts, the last one short
SMALL = TransferConfig(chunk_size_MB=5, max_write_concurrency=2, max_read_concurrency=4, read_chunk_size_MB=5)
# Few attempts on purpose: the outage must be ridden out by the deadline, not by the attempt count.
RIDE_OUT = RetryConfig(max_attempts=3, base_delay_s=0.05, max_delay_s=1.0, deadline_s=60)


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3Server]:
    """A server of this module's own: it is killed, restarted and made read-only."""
    server = LocalS3Server(data_dir=tmp_path_factory.mktemp("weed-faults"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _transport(server: LocalS3Server, retry: RetryConfig = RIDE_OUT) -> S3Transport:
    return S3Transport.create(client=client_config_for(server), retry=retry, transfer=SMALL)


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(ELEMENTS, generator=g), "step": seed}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["step"] == b["step"] and torch.equal(a["w"], b["w"])


@pytest.mark.slow
def test_crash_and_restart_mid_save(own_server: LocalS3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    server = own_server
    bucket = server.create_bucket("crash-restart")
    t = _transport(server)
    io = S3CheckpointIO(
        f"s3://{bucket}/run",
        chunk_size_MB=5,
        max_write_concurrency=2,
        async_checkpointing=True,
        client=client_config_for(server),
        retry=RIDE_OUT,
    )
    rng = random.Random(1234)
    expected: dict[str, int] = {}  # url -> seed of every checkpoint that must load at the end

    # Committed before any crash: these must survive every kill untouched.
    for seed in (1, 2):
        url = f"s3://{bucket}/run/before-{seed}.ckpt"
        s3ckpt.save(_state(seed), url, transport=t)
        expected[url] = seed
    io.save_checkpoint(_state(3), f"s3://{bucket}/run/before-3.ckpt")
    io.wait()
    expected[f"s3://{bucket}/run/before-3.ckpt"] = 3

    in_flight_at_kill = 0
    errors: list[BaseException] = []
    downtimes: list[float] = []
    t_start = time.monotonic()
    for kill in range(KILLS):
        seeds = [100 + kill * SAVES_PER_KILL + i for i in range(SAVES_PER_KILL)]
        urls = [f"s3://{bucket}/run/k{kill}-{i}.ckpt" for i in range(SAVES_PER_KILL)]
        states = [_state(s) for s in seeds]

        def sync_save(state: dict[str, Any], url: str) -> None:
            try:
                s3ckpt.save(state, url, transport=t)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=sync_save, args=(states[i], urls[i])) for i in range(SAVES_PER_KILL - 1)]
        for th in threads:
            th.start()
        io.save_checkpoint(states[-1], urls[-1])  # async: returns once snapshotted
        time.sleep(rng.uniform(0.05, 0.5))  # a random instant, parts in flight
        in_flight_at_kill += sum(th.is_alive() for th in threads) + io._saver.is_pending(urls[-1])  # type: ignore[union-attr]
        down_at = time.monotonic()
        server.kill()
        time.sleep(rng.uniform(0.0, 1.0))  # down for a while: every request meets a refused connection
        server.restart()
        downtimes.append(time.monotonic() - down_at)
        for th in threads:
            th.join(RIDE_OUT.deadline_s + 10)
        io.wait()
        assert not errors, f"a save failed although the store came back within its deadline: {errors[0]!r}"
        expected.update(zip(urls, seeds, strict=True))
    elapsed = time.monotonic() - t_start
    print(
        f"\n{KILLS} kills, {in_flight_at_kill} saves in flight at a kill, all completed; downtime "
        f"{min(downtimes):.1f}-{max(downtimes):.1f} s; {elapsed:.1f} s; retries {dict(t.retrier.stats.retries)}"
    )
    assert in_flight_at_kill >= 10, f"only {in_flight_at_kill} saves were in flight at a kill"
    assert t.retrier.stats.total_retries > 0

    # Everything committed loads with the exact bytes, and verifies.
    fresh = _transport(server)
    for url, seed in expected.items():
        assert _same(s3ckpt.load(url, transport=fresh, verify="require"), _state(seed)), url
    # Nothing partial is visible: every checkpoint listed under the run is committed and known.
    listed = list_checkpoints(fresh, f"s3://{bucket}/run/")
    assert {e.url for e in listed} == set(expected)
    assert all(e.committed for e in listed)

    # Uploads orphaned by a kill (a CreateMultipartUpload whose answer was lost) are invisible, and gc
    # aborts them.
    orphans = len(ops.list_uploads(fresh, bucket, "run/"))
    print(f"incomplete multipart uploads left by the kills before gc: {orphans}")
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    assert cli_main(["--endpoint-url", server.endpoint_url, "gc", f"s3://{bucket}/run/", "--older-than", "0s"]) == 0
    assert ops.list_uploads(fresh, bucket, "run/") == []


def test_store_refuses_writes(own_server: LocalS3Server) -> None:
    server = own_server
    bucket = server.create_bucket("read-only")
    t = _transport(server)
    good = f"s3://{bucket}/run/good.ckpt"
    s3ckpt.save(_state(7), good, transport=t)
    # `weed mini` has no -volume.minFreeSpace, so the store is made to run out of room as a full disk does
    # to it: every volume over its size limit is full (read-only), and no new volume may be created. Writes
    # then answer 500 (weed logs "no writable volumes"; its S3 gateway says InternalError); reads work.
    server.restart(extra_flags=["-master.volumeSizeLimitMB=1", "-volume.max=1"])
    try:
        short = _transport(server, RetryConfig(max_attempts=5, base_delay_s=0.05, max_delay_s=0.5, deadline_s=3))
        t0 = time.monotonic()
        with pytest.raises(S3TransferError) as info:
            s3ckpt.save(_state(8), f"s3://{bucket}/run/refused.ckpt", transport=short)
        took = time.monotonic() - t0
        text = str(info.value)
        print(f"\nrefused in {took:.1f} s: {text[:300]}")
        # Each request stops retrying at its 3 s deadline; the abort and the listing add little to it.
        assert took < 3 + 5, "the save outlived its retry deadline"
        assert "InternalError" in text and "internal error" in text, "the store's own answer is not in the error"
        assert "gave up after" in text, "the error does not say the retry budget ran out"
        assert ops.list_uploads(short, bucket, "run/") == []  # aborted
        # The previous checkpoint stays and loads; loads keep working while writes are refused.
        assert _same(s3ckpt.load(good, transport=short, verify="require"), _state(7))
        assert [e.url for e in list_checkpoints(short, f"s3://{bucket}/run/")] == [good]
    finally:
        server.restart(extra_flags=[])
    s3ckpt.save(_state(9), f"s3://{bucket}/run/after.ckpt", transport=_transport(server))

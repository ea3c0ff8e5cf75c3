"""Hung connections: the fault proxy accepts a request and then neither answers nor resets the connection.

The client's socket read timeout (``ClientConfig.read_timeout_s``, ``S3CKPT_READ_TIMEOUT_S``) is what ends
such a request; the retry layer then sends it again. These tests state their time bounds from the configured
timeouts: a hung request costs at most one read timeout plus one backoff, and a store that hangs every
request cannot hold a save longer than its retry deadline plus one read timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch

import s3ckpt
from s3ckpt.config import RetryConfig
from s3ckpt.errors import S3TransferError
from s3ckpt.transport import S3Transport, ops
from tests.faults.proxy import FaultProxy

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

READ_TIMEOUT_S = 1.0
RETRY = RetryConfig(max_attempts=10, base_delay_s=0.02, max_delay_s=0.5, deadline_s=30)
ELEMENTS = 6 * 1024 * 1024  # 24 MiB of float32: five 5 MiB parts, five 5 MiB ranged GETs
SLACK_S = 10.0  # the transfer itself and process noise on a shared 2-core machine


def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.randn(ELEMENTS, generator=torch.Generator().manual_seed(3))}


def test_hung_requests_time_out_and_are_retried(
    fault_proxy: FaultProxy, make_faulty_transport: Callable[..., S3Transport], bucket: str
) -> None:
    t = make_faulty_transport(retry=RETRY, read_timeout_s=READ_TIMEOUT_S, connect_timeout_s=READ_TIMEOUT_S)
    state = _state()
    url = f"s3://{bucket}/hung.ckpt"
    per_hang_s = READ_TIMEOUT_S + RETRY.max_delay_s  # the read timeout fires, then one backoff

    fault_proxy.inject("UploadPart", "hang", probability=0.4, count=3)
    # The server completes the upload, but its answer never comes: the retried Complete must be recognised
    # as ours (the nonce check), not fail and not be reported as another writer's object.
    fault_proxy.inject("CompleteMultipartUpload", "hang", where="response", count=1)
    t0 = time.monotonic()
    s3ckpt.save(state, url, transport=t)
    save_s = time.monotonic() - t0
    save_hangs = fault_proxy.count(action="hang")
    assert fault_proxy.count("UploadPart", action="hang") >= 1
    assert fault_proxy.count("CompleteMultipartUpload") == 2  # the hung one and its retry
    assert save_s < save_hangs * per_hang_s + SLACK_S, f"save took {save_s:.1f} s for {save_hangs} hangs"

    fault_proxy.clear()
    fault_proxy.inject("GetObject", "hang", probability=0.4, count=3)
    t0 = time.monotonic()
    loaded = s3ckpt.load(url, transport=t, verify="require")
    load_s = time.monotonic() - t0
    load_hangs = fault_proxy.count("GetObject", action="hang")
    assert load_hangs >= 1
    assert torch.equal(loaded["w"], state["w"])
    assert load_s < load_hangs * per_hang_s + SLACK_S, f"load took {load_s:.1f} s for {load_hangs} hangs"
    assert t.retrier.stats.retries["ReadTimeoutError"] >= save_hangs + load_hangs - 1
    print(
        f"\nsave {save_s:.1f} s with {save_hangs} hung requests, load {load_s:.1f} s with {load_hangs}; "
        f"retries {dict(t.retrier.stats.retries)}"
    )


def test_a_store_that_hangs_forever_cannot_hold_a_save_past_its_deadline(
    fault_proxy: FaultProxy, make_faulty_transport: Callable[..., S3Transport], bucket: str
) -> None:
    deadline_s = 3.0
    retry = RetryConfig(max_attempts=100, base_delay_s=0.02, max_delay_s=0.5, deadline_s=deadline_s)
    t = make_faulty_transport(retry=retry, read_timeout_s=READ_TIMEOUT_S, connect_timeout_s=READ_TIMEOUT_S)
    fault_proxy.inject("UploadPart", "hang")  # every part, for ever
    t0 = time.monotonic()
    with pytest.raises(S3TransferError, match="ReadTimeout"):
        s3ckpt.save(_state(), f"s3://{bucket}/never.ckpt", transport=t)
    took = time.monotonic() - t0
    print(f"\ngave up after {took:.1f} s (deadline {deadline_s:g} s, read timeout {READ_TIMEOUT_S:g} s)")
    # No new attempt starts after the deadline; the one in flight ends within one read timeout.
    assert took < deadline_s + READ_TIMEOUT_S + 2.0
    assert fault_proxy.count("AbortMultipartUpload") >= 1
    assert ops.list_uploads(t, bucket) == []

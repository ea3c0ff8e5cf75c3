"""Scenario: 5% of all requests, of every kind, answered 503 SlowDown or 500 InternalError or cut by a
connection reset, through a real HTTP fault-injecting proxy in front of the real server. Twenty save-and-load
cycles of a 64 MiB checkpoint must all succeed and load byte-identical state."""

from __future__ import annotations

import collections
from collections.abc import Callable

import pytest
import torch

import s3ckpt
from s3ckpt.config import RetryConfig
from s3ckpt.transport import S3Transport, ops
from tests.faults.proxy import Fault, FaultProxy

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.slow]

CYCLES = 20
ELEMENTS = 16 * 1024 * 1024  # 64 MiB of float32


def test_twenty_cycles_under_five_percent_random_faults(
    fault_proxy: FaultProxy, make_faulty_transport: Callable[..., S3Transport], bucket: str, transport: S3Transport
) -> None:
    faulty = make_faulty_transport(
        retry=RetryConfig(max_attempts=12, base_delay_s=0.02, max_delay_s=0.5, deadline_s=60)
    )
    rules = [
        fault_proxy.add(Fault(kind=None, action="status_503", probability=0.02)),
        fault_proxy.add(Fault(kind=None, action="status_500", probability=0.0153)),
        fault_proxy.add(Fault(kind=None, action="reset", probability=0.0153)),
    ]
    for cycle in range(CYCLES):
        g = torch.Generator().manual_seed(cycle)
        state = {"step": cycle, "w": torch.randn(ELEMENTS, generator=g)}
        url = f"s3://{bucket}/random-faults/step={cycle:03d}.ckpt"
        s3ckpt.save(state, url, transport=faulty)
        loaded = s3ckpt.load(url, transport=faulty, verify="require")
        assert loaded["step"] == cycle
        assert torch.equal(loaded["w"], state["w"]), f"cycle {cycle}: data differs"
    injected = sum(r.injected for r in rules)
    kinds = collections.Counter(e.kind for e in fault_proxy.log if e.action is not None)
    # Faults really happened, on several request kinds, and every one was absorbed by a retry.
    assert injected >= 5, f"only {injected} faults were injected"
    assert len(kinds) >= 2, kinds
    assert faulty.retrier.stats.total_retries >= injected - 2
    assert ops.list_uploads(transport, bucket, "random-faults/") == []
    print(f"\n{len(fault_proxy.log)} requests, {injected} faults injected by kind {dict(kinds)}, all absorbed")

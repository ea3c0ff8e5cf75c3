"""The demo reports a top-k deletion only once it happened (issue 18, item 7).

Async, a removal is requested when Lightning evicts a checkpoint but carried out only after the newer save has
committed; a SIGKILL in between leaves the old checkpoint on S3. The demo once printed ``top-k deleted
epoch=0-step=60.ckpt`` for a checkpoint that was still there after the crash.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("lightning")

from s3ckpt.demo import Run, _narrate, _summary
from s3ckpt.demo.worker import Reporter
from s3ckpt.lightning.records import RemovalRecord


def _events(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_worker_reports_a_removal_once_carried_out(capsys: pytest.CaptureFixture[str]) -> None:
    pending = RemovalRecord("s3://b/run/epoch=0-step=60.ckpt", requested_at=1.0)
    cancelled = RemovalRecord("s3://b/run/epoch=0-step=40.ckpt", requested_at=2.0, cancelled=True)
    io = SimpleNamespace(records=[], removals=[pending, cancelled], copies=[])
    reporter = Reporter(io, state_out=None)  # type: ignore[arg-type]

    reporter._flush()
    assert [(e["event"], e["path"]) for e in _events(capsys.readouterr().out)] == [("removed", cancelled.path)]

    pending.done_at = 3.0  # the newer save committed; the delete ran
    reporter._flush()
    reporter._flush()
    (event,) = _events(capsys.readouterr().out)  # once
    assert event["path"] == pending.path and event["done_at"] == 3.0


def test_parent_prints_deleted_only_for_a_deletion_that_happened(capsys: pytest.CaptureFixture[str]) -> None:
    done = {"event": "removed", "path": "s3://b/run/a.ckpt", "done_at": 3.0, "cancelled": False}
    requested = {"event": "removed", "path": "s3://b/run/b.ckpt", "done_at": None, "cancelled": False}
    for event in (done, requested):
        _narrate(event)
    out = capsys.readouterr().out
    assert "top-k    deleted s3://b/run/a.ckpt" in out and "b.ckpt" not in out

    _summary(Run(events=[done, requested]), Run(), [], None, None, 0.0, [])
    out = capsys.readouterr().out
    assert "deleted by top-k         s3://b/run/a.ckpt" in out and "b.ckpt" not in out

"""The demo reports a top-k deletion only once it happened (issue 18, item 7), and what each save uploaded
and copied on the store.

Async, a removal is requested when Lightning evicts a checkpoint but carried out only after the newer save has
committed; a SIGKILL in between leaves the old checkpoint on S3. The demo once printed ``top-k deleted
epoch=0-step=60.ckpt`` for a checkpoint that was still there after the crash.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("lightning")

from s3ckpt.demo.report import Run, narrate, summary
from s3ckpt.demo.worker import Reporter
from s3ckpt.lightning.records import RemovalRecord, SaveRecord


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
        narrate(event)
    out = capsys.readouterr().out
    assert "top-k    deleted s3://b/run/a.ckpt" in out and "b.ckpt" not in out

    summary(Run(events=[done, requested]), Run(), [], None, None, 0.0, [])
    out = capsys.readouterr().out
    assert "deleted by top-k         s3://b/run/a.ckpt" in out and "b.ckpt" not in out


def _saved(name: str, copied: int, base: str | None, **extra: object) -> dict[str, object]:
    size = 22_000_000
    return {
        "event": "saved",
        "path": f"s3://b/run/{name}",
        "bytes": size,
        "upload_s": 0.5,
        "stall_s": 0.01,
        "bytes_uploaded": size - copied,
        "bytes_copied": copied,
        "base": base,
        **extra,
    }


def test_worker_reports_bytes_uploaded_and_copied(capsys: pytest.CaptureFixture[str]) -> None:
    record = SaveRecord(
        "s3://b/run/b.ckpt", 100, 0.0, 1.0, 2.0, upload_s=0.5, bytes_copied=60, base="s3://b/run/a.ckpt"
    )
    io = SimpleNamespace(records=[record], removals=[], copies=[], incremental=True)
    Reporter(io, state_out=None)._flush()  # type: ignore[arg-type]
    (event,) = _events(capsys.readouterr().out)
    assert (event["bytes_uploaded"], event["bytes_copied"], event["base"]) == (40, 60, "s3://b/run/a.ckpt")
    assert event["incremental"] is True


def test_saves_that_copied_are_shown_with_bytes_uploaded_and_copied(capsys: pytest.CaptureFixture[str]) -> None:
    plain = _saved("epoch=0-step=20.ckpt", 0, None)
    first = _saved("epoch=3-step=220.ckpt", 0, None, incremental=True)
    composed = _saved("epoch=4-step=260.ckpt", 14_600_000, "s3://b/run/epoch=3-step=220.ckpt", incremental=True)
    for event in (plain, first, composed):
        narrate(event)
    out = capsys.readouterr().out
    assert out.count("uploaded") == 2, out
    assert "uploaded in full: no usable base to copy from" in out
    assert "uploaded 7.4 MB, copied 14.6 MB on the store from epoch=3-step=220.ckpt" in out

    summary(Run(events=[plain]), Run(), [], None, None, 0.0, [], Run(events=[first, composed]))
    out = capsys.readouterr().out
    assert "checkpoints saved        3 (66.0 MB: 51.4 MB uploaded, 14.6 MB copied on the store)" in out, out
    assert "incremental saves        1 copied" in out
    line = next(line for line in out.splitlines() if line.strip().startswith("epoch=4-step=260.ckpt"))
    assert line.split()[1:] == [
        "uploaded",
        "7.4",
        "MB",
        "copied",
        "14.6",
        "MB",
        "(66%)",
        "from",
        "epoch=3-step=220.ckpt",
    ]
    assert "fine-tuned checkpoints load" in out

    summary(Run(events=[plain]), Run(), [], None, None, 0.0, [])  # nothing copied: the summary as before
    out = capsys.readouterr().out
    assert "checkpoints uploaded     1 (22.0 MB uploaded in total)" in out and "incremental" not in out

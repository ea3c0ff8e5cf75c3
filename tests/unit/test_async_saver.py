"""AsyncSaver ordering rules: back-pressure, removal only after commit, no silent failure."""

from __future__ import annotations

import threading
import time

import pytest

from s3ckpt.async_saver import AsyncSaver


def test_back_pressure_one_in_flight() -> None:
    saver = AsyncSaver(max_pending=1)
    release = threading.Event()
    saver.submit_save("a", release.wait)
    t0 = time.perf_counter()
    threading.Timer(0.3, release.set).start()
    waited = saver.wait_for_room()
    assert waited >= 0.25 and time.perf_counter() - t0 >= 0.25
    saver.close()


def test_removal_waits_for_pending_save_and_runs_after_commit() -> None:
    saver = AsyncSaver()
    order: list[str] = []
    gate = threading.Event()

    def save() -> None:
        gate.wait()
        order.append("save")

    saver.submit_save("new", save)
    saver.submit_removal("old", lambda: order.append("remove"))
    time.sleep(0.1)
    assert order == []  # the removal has not jumped ahead of the save
    gate.set()
    saver.close()
    assert order == ["save", "remove"]
    assert saver.cancelled_removals == []


def test_failed_save_cancels_removal_and_surfaces_error() -> None:
    saver = AsyncSaver()
    removed: list[str] = []

    def failing() -> None:
        raise OSError("upload failed on the wire")

    saver.submit_save("new", failing)
    saver.submit_removal("old", lambda: removed.append("old"))
    with pytest.raises(OSError, match="upload failed"):
        saver.close()
    assert removed == []
    assert saver.cancelled_removals == ["old"]


def test_error_raised_at_next_save_once() -> None:
    saver = AsyncSaver()
    saver.submit_save("a", lambda: 1 / 0)
    saver.wait_for_room()
    time.sleep(0.05)
    with pytest.raises(ZeroDivisionError):
        saver.submit_save("b", lambda: None)
    saver.submit_save("b", lambda: None)  # raised once, then cleared
    saver.close()


def test_removal_after_unseen_failure_is_cancelled() -> None:
    """A save that already failed (error not yet raised) still protects the checkpoint it would replace."""
    saver = AsyncSaver()
    saver.submit_save("a", lambda: 1 / 0)
    saver.wait_for_room()
    removed: list[int] = []
    saver.submit_removal("old", lambda: removed.append(1))
    with pytest.raises(ZeroDivisionError):
        saver.close()
    assert removed == []


def test_wait_for_label_and_restart_after_close() -> None:
    saver = AsyncSaver()
    gate = threading.Event()
    saver.submit_save("s3://b/x", gate.wait)
    assert saver.is_pending("s3://b/x")
    threading.Timer(0.1, gate.set).start()
    saver.wait_for("s3://b/x")
    assert not saver.is_pending("s3://b/x")
    saver.close()
    out: list[int] = []
    saver.submit_save("again", lambda: out.append(1))  # usable after teardown (fit then validate)
    saver.close()
    assert out == [1]


def test_invalid_max_pending() -> None:
    with pytest.raises(ValueError, match="max_pending"):
        AsyncSaver(0)

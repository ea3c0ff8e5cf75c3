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


def test_default_two_pending_saves_next_save_does_not_wait() -> None:
    """Default max_pending=2: while one upload runs, the next save queues at once (the steady state stalls for
    its snapshot only); a third waits for room, so at most two snapshots are held."""
    saver = AsyncSaver()
    assert saver.max_pending == 2
    gate = threading.Event()
    order: list[str] = []
    saver.submit_save("a", lambda: (gate.wait(), order.append("a")))
    assert saver.wait_for_room() < 0.05
    saver.submit_save("b", lambda: order.append("b"))
    threading.Timer(0.2, gate.set).start()
    assert saver.wait_for_room() >= 0.15  # two pending: the third save waits
    saver.close()
    assert order == ["a", "b"]  # one worker: commits stay in order


def test_copy_runs_after_commit_and_is_cancelled_if_the_save_failed() -> None:
    saver = AsyncSaver()
    gate = threading.Event()
    order: list[str] = []
    saver.submit_save("s3://b/step=2.ckpt", lambda: (gate.wait(), order.append("save")))
    saver.submit_after_commit("s3://b/last.ckpt", lambda: order.append("copy"))
    assert saver.is_pending("s3://b/step=2.ckpt")
    threading.Timer(0.1, gate.set).start()
    saver.wait_for("s3://b/last.ckpt")  # read-your-writes waits for the copy too
    assert order == ["save", "copy"]

    cancelled: list[str] = []
    saver.submit_save("s3://b/step=4.ckpt", lambda: 1 / 0)
    saver.submit_after_commit(
        "s3://b/last.ckpt", lambda: order.append("copy2"), on_cancel=lambda: cancelled.append("x")
    )
    with pytest.raises(ZeroDivisionError):
        saver.close()
    assert order == ["save", "copy"] and cancelled == ["x"]


def test_failed_copy_surfaces_at_next_save() -> None:
    saver = AsyncSaver()
    saver.submit_after_commit("s3://b/last.ckpt", lambda: 1 / 0)
    saver.wait_for("s3://b/last.ckpt")
    with pytest.raises(ZeroDivisionError):
        saver.submit_save("b", lambda: None)
    saver.close()


def test_writers_paused_holds_the_background_serializer() -> None:
    """While a snapshot runs under ``writers_paused()``, a background writer's ``write()`` waits (no GIL
    convoy with the training thread); it resumes when the block ends. Nothing reaches the network: the bytes
    stay below one part."""
    from s3ckpt.config import ClientConfig, TransferConfig
    from s3ckpt.transport import S3Transport
    from s3ckpt.transport.upload import MultipartWriter, writers_paused

    t = S3Transport.create(
        client=ClientConfig(endpoint_url="http://127.0.0.1:9", region="us-east-1"),
        transfer=TransferConfig(chunk_size_MB=5),
    )
    writer = MultipartWriter(t, "bucket", "key")
    wrote = threading.Event()
    with writers_paused():
        th = threading.Thread(target=lambda: (writer.write(b"x" * 10), wrote.set()))
        th.start()
        assert not wrote.wait(0.2)  # held at the gate
    assert wrote.wait(5)
    th.join()
    assert writer.bytes_written == 10
    writer.abort()


def test_snapshot_pool_reuses_buffers_within_its_bound() -> None:
    """The next snapshot is copied into the buffers of a finished one (no fresh pages in the stall), and the
    pool never holds more than ``capacity`` snapshots' worth, in use or kept."""
    import torch

    from s3ckpt.serialization import clone_to_host
    from s3ckpt.snapshot import SnapshotPool

    state = {"w": torch.randn(256, 64), "b": torch.randn(64), "opt": [torch.randn(256, 64)]}
    size = sum(t.numel() * 4 for t in (state["w"], state["b"], state["opt"][0]))
    pool = SnapshotPool(capacity=2)
    copy, first = pool.copier()
    snap1 = clone_to_host(state, copy=copy)
    assert torch.equal(snap1["w"], state["w"]) and snap1["w"].data_ptr() != state["w"].data_ptr()
    copy2, second = pool.copier()
    clone_to_host(state, copy=copy2)  # two in use: both fresh
    pool.release(first)
    assert pool.kept_bytes == size and pool.reused_bytes == 0
    copy3, third = pool.copier()
    state["w"].add_(1)
    snap3 = clone_to_host(state, copy=copy3)
    assert pool.reused_bytes == size and torch.equal(snap3["w"], state["w"])  # same buffers, new values
    pool.release(second)
    pool.release(third)
    assert pool.kept_bytes == 2 * size  # in use 0 + kept 2 = capacity
    copy4, _fourth = pool.copier()
    clone_to_host({"other": torch.randn(1000)}, copy=copy4)  # a miss: kept buffers make room
    assert pool.kept_bytes + 4000 <= 2 * size
    pool.clear()
    assert pool.kept_bytes == 0

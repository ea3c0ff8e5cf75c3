"""budget: NeMo's request-rate rule (concurrency x tp x pp x 1.15 per prefix) and the key-spreading helpers."""

from __future__ import annotations

import logging
import warnings

import pytest

from s3ckpt.budget import (
    S3_READS_PER_PREFIX,
    S3_WRITES_PER_PREFIX,
    check_request_budget,
    spread_key,
    spread_prefixes,
    spread_url,
)
from s3ckpt.errors import ConfigError


def test_defaults_fit_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        budget = check_request_budget(10, 15)
    assert budget.ok
    assert budget.writes == pytest.approx(10 * 1.15)
    assert budget.reads == pytest.approx(15 * 1.15)
    assert (budget.write_limit, budget.read_limit) == (S3_WRITES_PER_PREFIX, S3_READS_PER_PREFIX) == (3500, 5500)


def test_math_at_the_boundary() -> None:
    # 10 x 304 x 1.15 = 3496 writes/s: fits; 305 tp ranks -> 3507.5: does not.
    assert check_request_budget(10, 1, tp=304).writes_ok
    with pytest.warns(UserWarning, match="write budget"):
        over = check_request_budget(10, 1, tp=305)
    assert over.writes == pytest.approx(3507.5) and not over.writes_ok and over.reads_ok


def test_warning_names_numbers_and_fix(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="s3ckpt.budget"), pytest.warns(UserWarning) as record:
        budget = check_request_budget(10, 15, tp=64, pp=8)
    assert not budget.writes_ok and not budget.reads_ok
    text = str(record[0].message)
    assert "max_write_concurrency=10 x tp*pp=512 x headroom 1.15" in text
    assert "5,888 writes/s per prefix, over S3's 3,500" in text
    assert "lower max_write_concurrency to 5" in text and "at least 2 prefixes" in text
    assert "max_read_concurrency=15" in text and "8,832 reads/s" in text
    assert "S3 write budget exceeded" in caplog.text


def test_strict_raises_config_error() -> None:
    with pytest.raises(ConfigError, match=r"read budget exceeded: max_read_concurrency=100 x tp\*pp=64"):
        check_request_budget(1, 100, tp=8, pp=8, strict=True)
    check_request_budget(10, 15, tp=8, pp=8, strict=True)  # 736 / 1104: fits


def test_prefixes_and_readers_change_the_budget() -> None:
    with pytest.warns(UserWarning):
        assert not check_request_budget(10, 1, tp=400).writes_ok
    assert check_request_budget(10, 1, tp=400, n_prefixes=2).writes_ok
    with pytest.raises(ConfigError, match="x 8 readers per shard"):
        check_request_budget(1, 15, tp=64, readers_per_shard=8, strict=True)
    with pytest.raises(ConfigError, match="cannot go low enough"):
        check_request_budget(1, 1, tp=4000, strict=True)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((0, 15), {}),
        ((10, -1), {}),
        ((10, 15, 0), {}),
        ((True, 15), {}),
        ((10, 15), {"headroom": 0.5}),
        ((10, 15), {"headroom": float("nan")}),
        ((10, 15), {"connection_MBps": 0}),
        ((10, 15), {"connection_MBps": True}),
        ((10, 15), {"part_size_MB": float("nan")}),
        ((10, 15), {"read_size_MB": "16"}),
    ],
)
def test_rejects_bad_arguments(args: tuple[int, ...], kwargs: dict[str, float]) -> None:
    """Each bad argument is named in the error, with the value given."""
    with pytest.raises(ConfigError, match="must be") as caught:
        check_request_budget(*args, **kwargs)  # type: ignore[arg-type]
    name = next(iter(kwargs), None)
    assert name is None or name in str(caught.value)


def test_spread_key_is_stable_and_spread() -> None:
    keys = [spread_key("run/x.ckpt", rank, 4) for rank in range(8)]
    assert keys[:4] == keys[4:], "rank r and r + n share a prefix"
    assert len(set(keys[:4])) == 4
    assert all(k.endswith("/run/x.ckpt") for k in keys)
    assert len({k[:2] for k in keys[:4]}) > 1, "tags differ in their first characters"
    assert spread_key("run/x.ckpt", 3, 1) == "run/x.ckpt"
    assert [p + "x.ckpt" for p in spread_prefixes("run/", 4)] == keys[:4]
    assert spread_url("s3://bkt/run/x.ckpt", 2, 4) == f"s3://bkt/{keys[2]}"
    with pytest.raises(ConfigError):
        spread_key("run/x.ckpt", -1, 4)


def test_checkpoint_io_checks_the_budget_on_construction() -> None:
    """The plugin applies NeMo's rule to its own settings: a warning by default, an error when strict."""
    import warnings

    from s3ckpt.errors import ConfigError
    from s3ckpt.lightning import S3CheckpointIO

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        io = S3CheckpointIO(
            "s3://bucket/run", max_write_concurrency=100, tensor_parallel_size=8, pipeline_parallel_size=4
        )
    assert any("3500" in str(w.message) or "3,500" in str(w.message) for w in caught)
    assert io.request_budget is not None
    with pytest.raises(ConfigError):
        S3CheckpointIO(
            "s3://bucket/run",
            max_write_concurrency=100,
            tensor_parallel_size=8,
            pipeline_parallel_size=4,
            strict_request_budget=True,
        )
    S3CheckpointIO("s3://bucket/run", strict_request_budget=True)  # NeMo's defaults fit the budget


def test_rate_model_counts_requests_per_second_from_part_size() -> None:
    """``concurrency x max(1, connection_MBps / part_MB) x tp x pp x 1.15``: smaller parts, more requests;
    without part sizes (or with parts larger than a second's worth) it is NeMo's floor."""
    from s3ckpt.budget import DEFAULT_CONNECTION_MBPS

    nemo = check_request_budget(10, 15, tp=8, pp=4)
    assert nemo.writes == pytest.approx(10 * 32 * 1.15) and nemo.write_rate == 1.0
    big = check_request_budget(10, 15, tp=8, pp=4, part_size_MB=128, read_size_MB=128)
    assert big.writes == pytest.approx(nemo.writes)  # 128 MiB parts at 100 MiB/s: under one a second: floor
    small = check_request_budget(8, 8, tp=2, pp=2, part_size_MB=16, read_size_MB=16)
    rate = DEFAULT_CONNECTION_MBPS / 16
    assert small.write_rate == pytest.approx(rate)
    assert small.writes == pytest.approx(8 * rate * 4 * 1.15) and small.reads == pytest.approx(8 * rate * 4 * 1.15)
    assert check_request_budget(8, 8, part_size_MB=8).writes == pytest.approx(
        2 * check_request_budget(8, 8, part_size_MB=16).writes
    )


def test_rate_warning_names_the_part_size_knob() -> None:
    """64 ranks x 8 writers of 16 MiB parts: 64 x 8 x 6.25 x 1.15 = 3,680 writes/s > 3,500. The fix offered
    first is larger parts (the NeMo floor, 589/s, fits), with the number to set."""
    with pytest.warns(UserWarning) as caught:
        budget = check_request_budget(8, 4, tp=8, pp=8, part_size_MB=16, read_size_MB=16)
    assert not budget.writes_ok and budget.reads_ok
    text = str(caught[0].message)
    assert "3,680 writes/s" in text and "chunk_size_MB to 17" in text and "max_write_concurrency to 7" in text
    with pytest.raises(ConfigError, match="read_chunk_size_MB"):
        check_request_budget(1, 16, tp=8, pp=8, part_size_MB=16, read_size_MB=8, strict=True)
    with pytest.raises(ConfigError, match="part_size_MB"):
        check_request_budget(1, 1, part_size_MB=0)


def test_checkpoint_io_defaults_and_nemo_knobs_verbatim() -> None:
    """No knob: the measured defaults (16 MiB x 4, 8 readers, 2 pending saves); NeMo's knobs are kept as given."""
    from s3ckpt.lightning import S3CheckpointIO

    io = S3CheckpointIO("s3://bucket/run")
    t = io.transport.transfer
    assert (t.chunk_size_MB, t.max_write_concurrency, t.max_read_concurrency) == (16, 4, 8)
    assert io.request_budget.write_rate == pytest.approx(100 / 16)
    nemo = S3CheckpointIO("s3://bucket/run", chunk_size_MB=64, max_read_concurrency=15, max_write_concurrency=10)
    t = nemo.transport.transfer
    assert (t.chunk_size_MB, t.max_write_concurrency, t.max_read_concurrency) == (64, 10, 15)
    assert S3CheckpointIO("s3://bucket/r", async_checkpointing=True)._saver.max_pending == 2  # type: ignore[union-attr]

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


# -- sharded saves: every writing rank a writer, the busiest prefix against 3,500 writes/s ------------------------


def test_shard_budget_math_at_the_defaults() -> None:
    """4 writers x 6.25 parts/s (16 MiB at 100 MiB/s) x 1.15 = 28.75 writes/s per rank: 121 ranks fit one
    prefix (3,478.75/s), 122 do not, and two prefixes take them."""
    from s3ckpt.budget import check_shard_budget

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fits = check_shard_budget(121, 4, part_size_MB=16)
    assert fits.ok and fits.writes == pytest.approx(121 * 4 * 6.25 * 1.15) and fits.prefixes_needed == 1
    with pytest.warns(UserWarning, match="NumericPrefixStrategy\\(2\\)"):
        over = check_shard_budget(122, 4, part_size_MB=16)
    assert not over.ok and over.writes == pytest.approx(3507.5) and over.prefixes_needed == 2
    assert (over.ranks, over.ranks_on_busiest, over.prefixes, over.write_rate) == (122, 122, 1, 6.25)


def test_shard_budget_takes_the_busiest_prefix() -> None:
    """Ranks spread round-robin over ``__shard{r % n}``: the busiest prefix holds ceil(ranks / n) of them."""
    from s3ckpt.budget import check_shard_budget

    prefixes = [f"run/step-1/__shard{r % 5}" for r in range(512)]
    spread = check_shard_budget(prefixes, 4, part_size_MB=16, strict=True)
    assert spread.ok and (spread.ranks, spread.prefixes, spread.ranks_on_busiest) == (512, 5, 103)
    assert spread.busiest_prefix == "run/step-1/__shard0"
    assert spread.writes == pytest.approx(103 * 28.75)
    # Uneven: one prefix holding most ranks decides, whatever the others hold.
    lopsided = ["a/"] * 130 + [f"b{i}/" for i in range(50)]
    with pytest.warns(UserWarning, match="130 writing ranks under 'a/'"):
        assert not check_shard_budget(lopsided, 4, part_size_MB=16).ok
    assert check_shard_budget([], 4, part_size_MB=16).ok, "no rank writes (all its items deduplicated away)"


def test_shard_budget_message_names_the_prefix_strategy_and_numbers(caplog: pytest.LogCaptureFixture) -> None:
    from s3ckpt.budget import check_shard_budget

    with caplog.at_level(logging.WARNING, logger="s3ckpt.budget"), pytest.warns(UserWarning) as record:
        budget = check_shard_budget(512, 4, part_size_MB=16, where="s3://b/run/step-1/")
    text = str(record[0].message)
    assert "sharded save to s3://b/run/step-1/: 512 writing ranks under one prefix" in text
    assert "max_write_concurrency=4 x 6.25 requests/s per connection (100 MiB/s / 16 MiB parts)" in text
    assert "14,720 writes/s per prefix, over S3's 3,500" in text
    assert "S3StorageWriter(prefix_strategy=NumericPrefixStrategy(5))" in text and "at most 121 writing" in text
    assert budget.prefixes_needed == 5 and "S3 write budget exceeded by a sharded save" in caplog.text
    # Larger parts are offered since one request per connection per second fits (512 x 4 x 1.15 = 2,355/s):
    # 68 MiB parts give 512 x 4 x 100/68 x 1.15 = 3,463/s. Even one writer per rank (512 x 6.25 x 1.15) does not.
    assert "raise chunk_size_MB to 68" in text and "lower max_write_concurrency" not in text


def test_shard_budget_files_per_rank_and_strict() -> None:
    from s3ckpt.budget import check_shard_budget

    one = check_shard_budget(10, 8, part_size_MB=8)
    four = check_shard_budget(10, 8, files_per_rank=4, part_size_MB=8, strict=False)
    assert four.writes == pytest.approx(4 * one.writes) == pytest.approx(10 * 8 * 4 * 12.5 * 1.15)
    with pytest.raises(ConfigError, match=r"x files_per_rank=4 .* or lower files_per_rank"):
        check_shard_budget(100, 8, files_per_rank=4, part_size_MB=8, strict=True)
    # Without a part size: NeMo's floor, one request per connection per second.
    assert check_shard_budget(100, 8).writes == pytest.approx(100 * 8 * 1.15)


def test_shard_budget_when_no_number_of_prefixes_fits() -> None:
    """One rank alone over the limit (1,000 writers of 5 MiB parts: 23,000/s): spreading ranks cannot help, so
    the message offers the other knobs only."""
    from s3ckpt.budget import check_shard_budget

    with pytest.raises(ConfigError) as caught:
        check_shard_budget(1, 1000, part_size_MB=5, strict=True)
    text = str(caught.value)
    assert "NumericPrefixStrategy" not in text and "lower max_write_concurrency to 152" in text
    with pytest.warns(UserWarning):
        assert check_shard_budget(1, 1000, part_size_MB=5).prefixes_needed == 0
    with pytest.warns(UserWarning):  # 10,001 prefixes would be needed: more than NumericPrefixStrategy takes
        assert check_shard_budget(10_001 * 121, 4, part_size_MB=16).prefixes_needed == 0


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        ((0, 4), {}, "rank_prefixes"),
        ((True, 4), {}, "rank_prefixes"),
        (("run/", 4), {}, "rank_prefixes"),
        ((8, 0), {}, "max_write_concurrency"),
        ((8, 4), {"files_per_rank": 0}, "files_per_rank"),
        ((8, 4), {"part_size_MB": 0}, "part_size_MB"),
        ((8, 4), {"headroom": 0.9}, "headroom"),
    ],
)
def test_shard_budget_rejects_bad_arguments(args: tuple[object, ...], kwargs: dict[str, float], name: str) -> None:
    from s3ckpt.budget import check_shard_budget

    with pytest.raises(ConfigError, match=name):
        check_shard_budget(*args, **kwargs)  # type: ignore[arg-type]


def test_storage_writer_checks_the_shard_budget_before_any_request() -> None:
    """The coordinator checks in ``prepare_global_plan``, before it clears the prefix: with
    ``strict_request_budget=True`` the save fails with the fix in the message and no request is sent (the
    endpoint here accepts no connection)."""
    import torch

    from s3ckpt import dcp as s3dcp
    from s3ckpt.config import ClientConfig, RetryConfig, TransferConfig
    from s3ckpt.transport import S3Transport

    t = S3Transport.create(
        client=ClientConfig(endpoint_url="http://127.0.0.1:9", access_key_id="k", secret_access_key="s"),
        retry=RetryConfig(max_attempts=1, deadline_s=5),
        transfer=TransferConfig(chunk_size_MB=5, max_write_concurrency=200),
    )
    state = {"w": torch.zeros(4)}
    with pytest.raises(ConfigError, match=r"1 writing ranks under 'run/step-1/__shard0' x max_write_concurrency=200"):
        s3dcp.save(
            state,
            "s3://bkt/run/step-1",
            transport=t,
            no_dist=True,
            strict_request_budget=True,
            prefix_strategy=s3dcp.NumericPrefixStrategy(2),
        )
    writer = s3dcp.S3StorageWriter("s3://bkt/run/step-1", transport=t)
    assert writer.strict_request_budget is False and writer.request_budget is None

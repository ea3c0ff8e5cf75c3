"""Config dataclasses: validation messages, environment variables, the part-size adjuster."""

from __future__ import annotations

import dataclasses

import pytest

from s3ckpt.config import (
    MAX_PARTS,
    MIN_PART_SIZE,
    ClientConfig,
    MiB,
    RetryConfig,
    TransferConfig,
    adjust_part_size,
)
from s3ckpt.errors import ConfigError


def test_defaults_are_the_measured_ones() -> None:
    """16 MiB parts x 4 writers, 8 readers of 16 MiB ranges (the sweep in the README); NeMo's are kept apart."""
    from s3ckpt.config import NEMO_CHUNK_SIZE_MB, NEMO_MAX_READ_CONCURRENCY, NEMO_MAX_WRITE_CONCURRENCY

    cfg = TransferConfig()
    assert (cfg.chunk_size_MB, cfg.max_read_concurrency, cfg.max_write_concurrency) == (16, 8, 4)
    assert cfg.upload_memory_bytes == 5 * 16 * MiB
    assert (NEMO_CHUNK_SIZE_MB, NEMO_MAX_READ_CONCURRENCY, NEMO_MAX_WRITE_CONCURRENCY) == (64, 15, 10)


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TransferConfig().chunk_size_MB = 8  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"chunk_size_MB": 4}, "chunk_size_MB=4 is out of range: it must be at least 5 MiB and at most 5120 MiB"),
        ({"chunk_size_MB": 6000}, "chunk_size_MB=6000"),
        ({"max_write_concurrency": 0}, "max_write_concurrency=0"),
        ({"max_read_concurrency": -1}, "max_read_concurrency=-1"),
        ({"chunk_size_MB": 8.5}, "whole number"),
        ({"chunk_size_MB": True}, "must be a number"),
    ],
)
def test_transfer_validation_names_field_and_limits(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        TransferConfig(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_env_vars_and_override_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3CKPT_CHUNK_SIZE_MB", "16")
    monkeypatch.setenv("S3CKPT_MAX_WRITE_CONCURRENCY", "3")
    cfg = TransferConfig.from_env(max_write_concurrency=7)
    assert cfg.chunk_size_MB == 16
    assert cfg.max_write_concurrency == 7
    monkeypatch.setenv("S3CKPT_CHUNK_SIZE_MB", "sixteen")
    with pytest.raises(ConfigError, match="S3CKPT_CHUNK_SIZE_MB"):
        TransferConfig.from_env()
    with pytest.raises(ConfigError, match="unknown TransferConfig field"):
        TransferConfig.from_env(chunk_size_mb=8)


def test_retry_validation() -> None:
    with pytest.raises(ConfigError, match="max_attempts=0"):
        RetryConfig(max_attempts=0)
    with pytest.raises(ConfigError, match="deadline_s"):
        RetryConfig(deadline_s=0)


def test_client_from_env_region_and_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    cfg = ClientConfig.from_env()
    assert cfg.endpoint_url == "http://127.0.0.1:9"
    assert cfg.region == "eu-west-1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    cfg = ClientConfig.from_env()
    assert (cfg.endpoint_url, cfg.region) == ("http://127.0.0.1:10", "us-west-2")


def test_client_secret_not_in_repr() -> None:
    cfg = ClientConfig(access_key_id="AKIAEXAMPLE", secret_access_key="very-secret-value")
    assert "very-secret-value" not in repr(cfg)
    assert "very-secret-value" not in str(cfg)
    with pytest.raises(ConfigError, match="both access_key_id and secret_access_key"):
        ClientConfig(access_key_id="x")
    with pytest.raises(ConfigError, match="http:// or https://"):
        ClientConfig(endpoint_url="127.0.0.1:9000")


def test_adjust_part_size_keeps_within_10000_parts() -> None:
    assert adjust_part_size(64 * MiB, None) == 64 * MiB
    assert adjust_part_size(1, None) == MIN_PART_SIZE
    huge = 1024 * 1024 * MiB  # 1 TiB
    size = adjust_part_size(8 * MiB, huge)
    assert size * MAX_PARTS >= huge
    assert size % MiB == 0
    assert adjust_part_size(8 * MiB, 10 * MiB) == 8 * MiB

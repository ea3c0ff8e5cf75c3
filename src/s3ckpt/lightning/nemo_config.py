"""NeMo's ``s3_checkpointing`` YAML section, read into :class:`~s3ckpt.lightning.S3CheckpointIO`'s arguments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError

__all__ = ["CONFIG_KEYS", "checkpoint_io_args"]

CONFIG_KEYS = ("chunk_size_MB", "max_read_concurrency", "max_write_concurrency", "enable_async_checkpointing")
"""The section's keys, as NeMo names them."""


def checkpoint_io_args(cfg: Any) -> dict[str, Any]:
    """``S3CheckpointIO`` keyword arguments from the section (a mapping, an OmegaConf node, or None).

    Raises:
        ConfigError: an unknown key (naming it and the known ones), or a section that is not a mapping.
    """
    raw = _to_dict(cfg)
    unknown = sorted(set(raw) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"unknown s3_checkpointing key(s) {unknown}; known keys: {list(CONFIG_KEYS)}")
    args = {k: raw[k] for k in CONFIG_KEYS[:3] if k in raw}
    if "enable_async_checkpointing" in raw:
        args["async_checkpointing"] = bool(raw["enable_async_checkpointing"])
    return args


def _to_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, Mapping):
        return dict(cfg)
    try:
        from omegaconf import OmegaConf
    except ImportError as exc:
        raise ConfigError(f"s3_checkpointing config must be a mapping, got {type(cfg).__name__}") from exc
    container = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(container, dict):
        raise ConfigError(f"s3_checkpointing config must be a mapping, got {type(container).__name__}")
    return {str(k): v for k, v in container.items()}

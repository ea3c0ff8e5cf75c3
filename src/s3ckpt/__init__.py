"""s3ckpt: fast, crash-safe PyTorch and Lightning checkpoints on S3 and S3-compatible stores.

Plain PyTorch::

    import s3ckpt
    s3ckpt.save(model.state_dict(), "s3://bucket/run/step-100.pt")
    state = s3ckpt.load("s3://bucket/run/step-100.pt")

Lightning::

    from s3ckpt import S3CheckpointIO
    trainer = Trainer(plugins=[S3CheckpointIO("s3://bucket/run")])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ClientConfig, RetryConfig, TransferConfig
from .errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    ConfigError,
    ConflictError,
    ResumeError,
    S3AccessDeniedError,
    S3CheckpointError,
    S3NotFoundError,
    S3TransferError,
    UnsafeCheckpointError,
    UnverifiableCheckpointError,
)

if TYPE_CHECKING:
    from .checkpoint import SaveStats, VerifyResult, delete, load, save, verify
    from .checkpoint_copy import CopyStats, copy
    from .inspection import CheckpointSummary, inspect
    from .lightning.checkpoint_io import S3CheckpointIO
    from .s3_utils import S3Utils

__version__ = "0.1.0"

__all__ = [
    "CheckpointCorruptedError",
    "CheckpointNotFoundError",
    "CheckpointSummary",
    "ClientConfig",
    "ConfigError",
    "ConflictError",
    "CopyStats",
    "ResumeError",
    "RetryConfig",
    "S3AccessDeniedError",
    "S3CheckpointError",
    "S3CheckpointIO",
    "S3NotFoundError",
    "S3TransferError",
    "S3Utils",
    "SaveStats",
    "TransferConfig",
    "UnsafeCheckpointError",
    "UnverifiableCheckpointError",
    "VerifyResult",
    "copy",
    "delete",
    "inspect",
    "load",
    "save",
    "verify",
]


_LAZY = {
    "SaveStats": "checkpoint",
    "VerifyResult": "checkpoint",
    "delete": "checkpoint",
    "load": "checkpoint",
    "save": "checkpoint",
    "verify": "checkpoint",
    "inspect": "inspection",
    "CheckpointSummary": "inspection",
    "copy": "checkpoint_copy",
    "CopyStats": "checkpoint_copy",
    "S3Utils": "s3_utils",
    "S3CheckpointIO": "lightning.checkpoint_io",
}


def __getattr__(name: str) -> Any:
    # Imported on first use: torch (checkpoint, S3Utils) costs seconds, and `python -m s3ckpt.server` or the
    # CLI's help should not pay it; S3CheckpointIO subclasses Lightning's CheckpointIO, so importing it lazily
    # keeps `import s3ckpt` and plain save/load working without the lightning extra.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 's3ckpt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value

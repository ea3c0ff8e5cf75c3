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

from .checkpoint import SaveStats, VerifyResult, delete, load, save, verify
from .config import ClientConfig, RetryConfig, TransferConfig
from .errors import (
    CheckpointCorruptedError,
    CheckpointNotFoundError,
    ConfigError,
    ConflictError,
    S3AccessDeniedError,
    S3CheckpointError,
    S3NotFoundError,
    S3TransferError,
    UnsafeCheckpointError,
)
from .s3_utils import S3Utils

if TYPE_CHECKING:
    from .lightning.checkpoint_io import S3CheckpointIO

__version__ = "0.1.0"

__all__ = [
    "CheckpointCorruptedError",
    "CheckpointNotFoundError",
    "ClientConfig",
    "ConfigError",
    "ConflictError",
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
    "VerifyResult",
    "delete",
    "load",
    "save",
    "verify",
]


def __getattr__(name: str) -> Any:
    # S3CheckpointIO subclasses Lightning's CheckpointIO; importing it lazily keeps `import s3ckpt` (and
    # plain save/load) working without the lightning extra.
    if name == "S3CheckpointIO":
        from .lightning.checkpoint_io import S3CheckpointIO

        return S3CheckpointIO
    raise AttributeError(f"module 's3ckpt' has no attribute {name!r}")

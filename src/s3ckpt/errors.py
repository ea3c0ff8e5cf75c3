"""The s3ckpt exception hierarchy.

One base class, :class:`S3CheckpointError`, so callers can catch everything this library raises. Where a
Python builtin says the same thing, the subclass inherits it too, so code that already handles
``FileNotFoundError`` or ``PermissionError`` keeps working. The original botocore error (or whatever caused
it) is kept as ``__cause__``; messages name the bucket and key and never contain a credential.
"""

from __future__ import annotations

__all__ = [
    "CheckpointCorruptedError",
    "CheckpointNotFoundError",
    "ConfigError",
    "ConflictError",
    "ResumeError",
    "S3AccessDeniedError",
    "S3CheckpointError",
    "S3NotFoundError",
    "S3TransferError",
    "UnsafeCheckpointError",
    "UnverifiableCheckpointError",
]


class S3CheckpointError(Exception):
    """Base class of every error s3ckpt raises."""


class ConfigError(S3CheckpointError, ValueError):
    """A setting is out of range, unknown, or inconsistent with another one."""


class S3NotFoundError(S3CheckpointError, FileNotFoundError):
    """A bucket or object does not exist."""


class CheckpointNotFoundError(S3NotFoundError):
    """No checkpoint exists at the given location (or none that is committed)."""


class S3AccessDeniedError(S3CheckpointError, PermissionError):
    """The server refused the credentials or the operation (AccessDenied, InvalidAccessKeyId, ...)."""


class S3TransferError(S3CheckpointError, OSError):
    """An S3 operation failed after its retry budget was spent, or with an error retrying cannot fix."""


class ConflictError(S3CheckpointError, FileExistsError):
    """Another writer won a race for the same key (a conditional write failed)."""


class CheckpointCorruptedError(S3CheckpointError, ValueError):
    """A checkpoint's bytes do not match the checksum recorded when it was saved."""


class UnverifiableCheckpointError(S3CheckpointError, ValueError):
    """Nothing records what a checkpoint's bytes should be (no checksum in the store, no manifest), so its
    integrity cannot be checked. Not the same as corrupted: raised only when verification is required."""


class UnsafeCheckpointError(S3CheckpointError, ValueError):
    """``weights_only=True`` refused to unpickle an object that could run code."""


class ResumeError(S3CheckpointError, ValueError):
    """The resume rules refuse the checkpoints found (e.g. a ``*end.ckpt`` says the run already finished)."""

"""Lightning integration: ``S3CheckpointIO``, ``S3ModelCheckpoint`` and resume helpers.

Importing this package imports ``lightning`` at once, so a missing extra fails here with a clear message
instead of deep inside a training run.
"""

try:
    import lightning  # noqa: F401
except ModuleNotFoundError as exc:  # pragma: no cover - exercised by a test with lightning hidden
    raise ModuleNotFoundError(
        "s3ckpt.lightning needs the 'lightning' package: pip install 's3ckpt[lightning]'"
    ) from exc

from .callbacks import S3CheckpointMetrics
from .checkpoint_io import S3CheckpointIO
from .connector import S3CheckpointConnector, configure_s3_resume
from .fs import S3FileSystem
from .model_checkpoint import S3ModelCheckpoint, find_s3_checkpoint_io
from .records import SaveRecord
from .strategies import S3FSDPStrategy, S3ModelParallelStrategy

__all__ = [
    "S3CheckpointConnector",
    "S3CheckpointIO",
    "S3CheckpointMetrics",
    "S3FSDPStrategy",
    "S3FileSystem",
    "S3ModelCheckpoint",
    "S3ModelParallelStrategy",
    "SaveRecord",
    "configure_s3_resume",
    "find_s3_checkpoint_io",
]

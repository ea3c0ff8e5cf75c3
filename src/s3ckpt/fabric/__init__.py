"""Lightning Fabric integration: ``S3FSDPStrategy`` and ``S3ModelParallelStrategy`` save and load ``s3://``
checkpoints through ``fabric.save`` / ``fabric.load``.

Importing this package imports ``lightning`` at once, so a missing extra fails here with a clear message
instead of deep inside a training run.
"""

try:
    import lightning  # noqa: F401
except ModuleNotFoundError as exc:  # pragma: no cover - exercised by a test with lightning hidden
    raise ModuleNotFoundError("s3ckpt.fabric needs the 'lightning' package: pip install 's3ckpt[lightning]'") from exc

from .strategies import S3FSDPStrategy, S3ModelParallelStrategy

__all__ = ["S3FSDPStrategy", "S3ModelParallelStrategy"]

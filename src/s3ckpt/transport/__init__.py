"""Bytes to and from S3, and nothing else: this package never imports torch.

Layers above it hand it bytes (or a stream to write bytes into) and get bytes back.
"""

from .client import ClientFactory
from .context import S3Transport
from .download import ObjectChangedError, download_into
from .ops import ListedObject, ObjectInfo, PendingUpload
from .retry import Retrier
from .upload import MultipartWriter, UploadResult

__all__ = [
    "ClientFactory",
    "ListedObject",
    "MultipartWriter",
    "ObjectChangedError",
    "ObjectInfo",
    "PendingUpload",
    "Retrier",
    "S3Transport",
    "UploadResult",
    "download_into",
]

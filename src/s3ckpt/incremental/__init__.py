"""Incremental checkpoints that stay plain ``torch.save`` files: upload only the records that changed.

A save given a ``base`` (the previous checkpoint) composes the new object on the store: records whose bytes
are unchanged since the base are copied server-side (``UploadPartCopy``), the rest is uploaded. The result is
byte for byte what ``torch.save`` writes. See :func:`s3ckpt.save` (``base=``) and
``S3CheckpointIO(incremental=True)``.
"""

from .composer import COPY_PART_SIZE, RecordComposer
from .records import BaseLayout, ZipRecord, load_base

__all__ = ["COPY_PART_SIZE", "BaseLayout", "RecordComposer", "ZipRecord", "load_base"]

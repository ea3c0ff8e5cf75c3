"""Deleting a checkpoint made of many objects: its commit record first, then the rest in batches.

The commit record (a sharded checkpoint's ``.metadata``) goes first, so from that instant the checkpoint is
an uncommitted leftover that resume and ``ls`` ignore, never a committed checkpoint with shards missing. The
shards follow through ``DeleteObjects`` (1,000 keys per request), and any multipart upload still open under
the prefix (a rank killed mid-save) is aborted: invisible, but billed until it is.
"""

from __future__ import annotations

import logging

from .transport import ops
from .transport.context import S3Transport

__all__ = ["COMMIT_RECORD", "delete_sharded"]

log = logging.getLogger(__name__)

COMMIT_RECORD = ".metadata"
"""A sharded checkpoint's commit record (DCP's metadata, written last by s3ckpt's writer)."""


def delete_sharded(t: S3Transport, bucket: str, prefix: str) -> int:
    """Delete the sharded checkpoint at ``prefix`` (ending in ``/``), commit record first. Returns how many
    objects were deleted (0 if there was none: deleting a missing checkpoint is not an error).

    Raises:
        ValueError: an empty prefix (the whole bucket).
    """
    if not prefix.strip("/"):
        raise ValueError(f"refusing to delete every object in bucket {bucket!r}: give a checkpoint prefix")
    if not prefix.endswith("/"):
        prefix += "/"
    keys = [o.key for o in ops.list_objects(t, bucket, prefix)]
    count = 0
    if prefix + COMMIT_RECORD in keys:
        ops.delete_object(t, bucket, prefix + COMMIT_RECORD)
        count += 1
    rest = [k for k in keys if k != prefix + COMMIT_RECORD]
    if rest:
        count += ops.delete_objects(t, bucket, rest)
    # Only where a checkpoint was: a removal of a single-file checkpoint costs one LIST, not two (`s3ckpt gc`
    # aborts uploads left where nothing else was).
    for upload in ops.list_uploads(t, bucket, prefix) if keys else ():
        ops.abort_upload(t, bucket, upload.key, upload.upload_id)
    if count:
        log.info("deleted the sharded checkpoint s3://%s/%s (%d objects)", bucket, prefix, count)
    return count

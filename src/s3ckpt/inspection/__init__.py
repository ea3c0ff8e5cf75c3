"""Checkpoint inspection without unpickling code: :func:`inspect` describes a checkpoint on S3 (keys, tensors,
dtypes, step) from a few ranged reads.

* :mod:`.zipread`: one member of a zip archive on S3 via ranged GETs.
* :mod:`.safe_pickle`: a pickle read with an allow-list that builds descriptions, never objects.
* :mod:`.summary`: :func:`inspect` and its result, :class:`CheckpointSummary`.
"""

from __future__ import annotations

from .summary import CheckpointSummary, describe, inspect
from .zipread import NotAZipError

__all__ = ["CheckpointSummary", "NotAZipError", "describe", "inspect"]

"""Moved to :mod:`s3ckpt.inspection.safe_pickle` (the library owns checkpoint inspection; the CLI formats it).
Re-exported here so existing imports keep working."""

from ..inspection.safe_pickle import *  # noqa: F403
from ..inspection.safe_pickle import __all__ as __all__

"""Moved to :mod:`s3ckpt.inspection.zipread` (the library owns checkpoint inspection; the CLI formats it).
Re-exported here so existing imports keep working."""

from ..inspection.zipread import *  # noqa: F403
from ..inspection.zipread import __all__ as __all__

"""``python -m s3ckpt.cli``: the same as the ``s3ckpt`` console script."""

from __future__ import annotations

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())

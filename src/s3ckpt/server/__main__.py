"""``python -m s3ckpt.server``: a foreground server that prints its ``export`` lines (see :func:`.cli.main`)."""

import sys

from .cli import main

sys.exit(main())

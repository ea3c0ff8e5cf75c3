"""The ``s3ckpt`` command: ``ls``, ``inspect``, ``verify``, ``cp``, ``rm``, ``prune``, ``gc``, ``server``,
``demo`` and ``bench`` for checkpoints on S3 and S3-compatible stores.

Run ``s3ckpt --help`` (or ``python -m s3ckpt.cli --help``). From Python::

    from s3ckpt.cli import main
    status = main(["ls", "s3://bucket/run/"])
"""

from __future__ import annotations

from .main import build_parser, main

__all__ = ["build_parser", "main"]

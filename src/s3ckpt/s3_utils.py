"""``S3Utils``: NeMo's S3 helper, method for method, as a thin face over :mod:`s3ckpt.transport`.

Code written against ``nemo.utils.s3_utils.S3Utils`` can switch its import and keep working. Unlike NeMo's,
every operation here (list and delete included) retries throttling and transient errors, and errors come
out as :class:`~s3ckpt.errors.S3CheckpointError` subclasses that also inherit the natural builtin.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from . import s3_dirpath_utils
from .checkpoint import resolve_transport
from .errors import S3NotFoundError
from .transport import ops
from .transport.context import S3Transport
from .transport.download import download_into, download_to_path
from .transport.upload import MultipartWriter

__all__ = ["S3Utils"]

_COPY_CHUNK = 8 * 1024 * 1024


class S3Utils:
    """Static S3 helpers with NeMo's names. Settings come from the environment (see ``ClientConfig``), or
    from a transport installed with :meth:`use_transport`."""

    _transport: S3Transport | None = None

    @classmethod
    def use_transport(cls, transport: S3Transport | None) -> None:
        """Route every S3Utils call through ``transport`` (``None``: back to the environment's default)."""
        cls._transport = transport

    @classmethod
    def _t(cls) -> S3Transport:
        return resolve_transport(cls._transport)

    # -- URLs --------------------------------------------------------------------------------------------

    @staticmethod
    def is_s3_url(path: object) -> bool:
        """True if ``path`` starts with ``s3://``."""
        return s3_dirpath_utils.is_s3_url(path)

    @staticmethod
    def parse_s3_url(s3_url: str) -> tuple[str, str]:
        """``s3://bucket/key`` -> ``(bucket, key)``; raises ValueError for a malformed URL."""
        return s3_dirpath_utils.parse_s3_url(s3_url)

    @staticmethod
    def build_s3_url(bucket: str, key: str) -> str:
        """``(bucket, key)`` -> ``s3://bucket/key``."""
        return s3_dirpath_utils.build_s3_url(bucket, key)

    # -- queries -----------------------------------------------------------------------------------------

    @staticmethod
    def s3_path_exists(s3_path: str, match_directory: bool = False) -> bool:
        """True if the object exists; with ``match_directory``, true if any object lies under the prefix.

        A missing bucket raises :class:`S3NotFoundError` rather than answering False, so a typo in a
        bucket name is never read as "no checkpoint, start from scratch".
        """
        bucket, key = s3_dirpath_utils.parse_s3_url(s3_path)
        t = S3Utils._t()
        if match_directory:
            prefix = key if not key or key.endswith("/") else key + "/"
            try:
                found = any(True for _ in ops.list_objects(t, bucket, prefix, max_keys=1))
            except S3NotFoundError:
                ops.check_bucket(t, bucket)
                raise
            return found or (bool(key) and ops.exists(t, bucket, key))
        return ops.exists(t, bucket, key)

    @staticmethod
    def find_files_with_suffix(base_path: str, suffix: str | None = None, return_key_only: bool = False) -> list[str]:
        """Every object under ``base_path`` whose key ends with ``suffix`` (all of them if None), sorted.

        Returns keys if ``return_key_only``, else full ``s3://`` URLs.
        """
        bucket, prefix = s3_dirpath_utils.parse_s3_url(base_path)
        keys = sorted(
            o.key for o in ops.list_objects(S3Utils._t(), bucket, prefix) if suffix is None or o.key.endswith(suffix)
        )
        return keys if return_key_only else [s3_dirpath_utils.build_s3_url(bucket, k) for k in keys]

    # -- writes ------------------------------------------------------------------------------------------

    @staticmethod
    def remove_object(s3_path: str) -> None:
        """Delete one object (a missing one is not an error)."""
        bucket, key = s3_dirpath_utils.parse_s3_url(s3_path, require_key=True)
        ops.delete_object(S3Utils._t(), bucket, key)

    @staticmethod
    def upload_file_stream_to_s3(
        stream: BinaryIO | io.BytesIO, s3_path: str, progress: Callable[[int], None] | None = None
    ) -> None:
        """Upload everything readable from ``stream`` (from its current position) to ``s3_path``."""
        bucket, key = s3_dirpath_utils.parse_s3_url(s3_path, require_key=True)
        with MultipartWriter(S3Utils._t(), bucket, key, progress=progress) as writer:
            while True:
                chunk = stream.read(_COPY_CHUNK)
                if not chunk:
                    break
                writer.write(chunk)

    @staticmethod
    def upload_file(
        local_path: str | os.PathLike[str], s3_path: str, progress: Callable[[int], None] | None = None
    ) -> None:
        """Upload a local file with a streaming multipart upload."""
        with open(local_path, "rb") as f:
            S3Utils.upload_file_stream_to_s3(f, s3_path, progress=progress)

    # -- reads -------------------------------------------------------------------------------------------

    @staticmethod
    def download_s3_file_to_path(
        s3_path: str, local_path: str | os.PathLike[str], progress: Callable[[int], None] | None = None
    ) -> None:
        """Download ``s3_path`` to ``local_path`` with parallel ranged GETs.

        The file is written under a temporary name and renamed into place, so ``local_path`` is never
        left half-written.
        """
        bucket, key = s3_dirpath_utils.parse_s3_url(s3_path, require_key=True)
        t = S3Utils._t()
        download_to_path(t, ops.head(t, bucket, key), Path(local_path), progress=progress)

    @staticmethod
    def download_s3_file_to_stream(s3_path: str, progress: Callable[[int], None] | None = None) -> io.BytesIO:
        """Download ``s3_path`` into a new ``BytesIO`` (positioned at 0)."""
        bucket, key = s3_dirpath_utils.parse_s3_url(s3_path, require_key=True)
        t = S3Utils._t()
        info = ops.head(t, bucket, key)
        buf = bytearray(info.size)
        download_into(t, info, memoryview(buf), progress=progress)
        return io.BytesIO(buf)

"""``S3FileSystem``: the few fsspec calls Lightning's ``ModelCheckpoint`` makes, answered by our transport.

Lightning asks an fsspec filesystem whether checkpoints exist, lists the checkpoint directory to find
``last.ckpt``, reads timestamps and writes ``best_k_models.yaml``. For ``s3://`` fsspec would load ``s3fs``,
a second S3 client with its own endpoint, credentials and retry settings. This class answers those calls
through the same :class:`~s3ckpt.transport.S3Transport` as the checkpoint plugin instead.

It is deliberately *not* registered with fsspec: ``fsspec.filesystem("s3")`` keeps meaning whatever the
user installed. :class:`~s3ckpt.lightning.S3ModelCheckpoint` hands it to Lightning directly.

Paths follow fsspec's convention (as ``s3fs`` does): methods accept ``s3://bucket/key`` or ``bucket/key``
and :meth:`S3FileSystem.ls` returns ``bucket/key`` names without the protocol; ``unstrip_protocol`` adds
it back. S3 has no directories: a prefix with objects under it is one, and ``makedirs`` does nothing.
Checkpoint manifests (``*.s3ckpt.json``) are hidden from listings and removed with their checkpoint.
"""

from __future__ import annotations

import errno
import io
from datetime import datetime
from typing import Any

from fsspec.spec import AbstractFileSystem  # type: ignore[import-untyped]
from typing_extensions import override

from .. import checkpoint as ck
from ..catalog import DCP_METADATA
from ..errors import S3NotFoundError
from ..layout import is_manifest_key
from ..s3_dirpath_utils import S3_PATH_PREFIX, parse_s3_url
from ..transport import ops
from ..transport.context import S3Transport
from ..transport.upload import MultipartWriter

__all__ = ["S3FileSystem"]


class S3FileSystem(AbstractFileSystem):  # type: ignore[misc]
    """A minimal fsspec filesystem for ``s3://`` backed by :class:`~s3ckpt.transport.S3Transport`.

    Every request goes through the transport, so retries, endpoint and credentials are the plugin's.
    ``open`` is meant for small files (``best_k_models.yaml``): reads load the whole object, writes stream
    through a multipart upload and become visible when the file is closed.

    Args:
        transport: the transport to use; default: the shared one built from the environment.
    """

    protocol = "s3"
    root_marker = ""
    # fsspec caches instances by constructor arguments; two transports must never share one.
    cachable = False

    def __init__(self, transport: S3Transport | None = None) -> None:
        super().__init__()
        self._transport = transport

    @property
    def transport(self) -> S3Transport:
        """The transport every request goes through."""
        return ck.resolve_transport(self._transport)

    # -- paths -------------------------------------------------------------------------------------------

    @classmethod
    @override
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        text = str(path)
        # `os.path.normpath` and `pathlib` turn "s3://b/k" into "s3:/b/k"; read that as the URL it was.
        if text.startswith("s3:/") and not text.startswith(S3_PATH_PREFIX):
            text = S3_PATH_PREFIX + text[len("s3:/") :]
        if text.startswith(S3_PATH_PREFIX):
            text = text[len(S3_PATH_PREFIX) :]
        return text.rstrip("/")

    def _split(self, path: Any) -> tuple[str, str]:
        bucket, key = parse_s3_url(S3_PATH_PREFIX + self._strip_protocol(path))
        return bucket, key.rstrip("/")

    def url(self, path: Any) -> str:
        """``path`` as an ``s3://bucket/key`` URL."""
        return S3_PATH_PREFIX + str(self._strip_protocol(path))

    # -- queries -----------------------------------------------------------------------------------------

    def _has_children(self, bucket: str, key: str) -> bool:
        prefix = f"{key}/" if key else ""
        return any(True for _ in ops.list_objects(self.transport, bucket, prefix, max_keys=1))

    def _not_found(self, bucket: str, path: Any) -> FileNotFoundError:
        # A missing bucket is reported as such (S3NotFoundError names it), so a typo is never read as
        # "no checkpoint yet".
        ops.check_bucket(self.transport, bucket)
        return FileNotFoundError(errno.ENOENT, "no such S3 object or prefix", self.url(path))

    @override
    def info(self, path: Any, **kwargs: Any) -> dict[str, Any]:
        """``{"name", "size", "type", ...}`` of an object (``"file"``) or a non-empty prefix (``"directory"``).

        Raises:
            FileNotFoundError: nothing at ``path`` (an ``S3NotFoundError`` naming the bucket if it is missing).
        """
        bucket, key = self._split(path)
        if not key:
            ops.check_bucket(self.transport, bucket)
            return {"name": bucket, "size": 0, "type": "directory"}
        try:
            obj = ops.head(self.transport, bucket, key)
        except S3NotFoundError:
            pass
        else:
            return {
                "name": f"{bucket}/{key}",
                "size": obj.size,
                "type": "file",
                "ETag": obj.etag,
                "LastModified": obj.last_modified,
            }
        if self._has_children(bucket, key):
            return {"name": f"{bucket}/{key}", "size": 0, "type": "directory"}
        raise self._not_found(bucket, path)

    @override
    def exists(self, path: Any, **kwargs: Any) -> bool:
        """True if an object or a non-empty prefix is at ``path``.

        Unlike fsspec's default, errors other than "not found" are raised, not read as ``False``; so is a
        missing bucket.
        """
        try:
            self.info(path)
        except S3NotFoundError:
            raise
        except FileNotFoundError:
            return False
        return True

    @override
    def isfile(self, path: Any) -> bool:
        """True if an object is at ``path``."""
        bucket, key = self._split(path)
        if not key:
            return False
        try:
            ops.head(self.transport, bucket, key)
        except S3NotFoundError:
            return False
        return True

    @override
    def isdir(self, path: Any) -> bool:
        """True if objects exist under ``path/`` (or ``path`` is an existing bucket)."""
        bucket, key = self._split(path)
        try:
            if not key:
                ops.check_bucket(self.transport, bucket)
                return True
            return self._has_children(bucket, key)
        except S3NotFoundError:
            return False

    @override
    def ls(self, path: Any, detail: bool = True, **kwargs: Any) -> list[Any]:
        """Direct children of the prefix ``path`` (delimiter ``/``), manifests left out.

        Names are ``bucket/key`` (no protocol), as with ``s3fs``. A file's listing is the file itself.

        Raises:
            FileNotFoundError: nothing at or under ``path``.
        """
        bucket, key = self._split(path)
        prefix = f"{key}/" if key else ""
        t = self.transport
        entries: list[dict[str, Any]] = []
        objects, subdirs = ops.list_dir(t, bucket, prefix)
        saw_any = bool(objects or subdirs)
        for obj in objects:
            if obj.key == prefix or is_manifest_key(obj.key):
                continue
            entries.append(
                {
                    "name": f"{bucket}/{obj.key}",
                    "size": obj.size,
                    "type": "file",
                    "ETag": obj.etag,
                    "LastModified": obj.last_modified,
                }
            )
        for sub in subdirs:
            entries.append({"name": f"{bucket}/{sub.rstrip('/')}", "size": 0, "type": "directory"})
        if not saw_any:
            if key and self.isfile(path):
                entries = [self.info(path)]
            elif key:
                raise self._not_found(bucket, path)
            else:
                ops.check_bucket(t, bucket)
        entries.sort(key=lambda e: str(e["name"]))
        return entries if detail else [e["name"] for e in entries]

    @override
    def modified(self, path: Any) -> datetime:
        """LastModified of the object at ``path``; for a committed sharded checkpoint (a
        ``torch.distributed.checkpoint`` directory such as ``last.ckpt/``), of its ``.metadata``, the commit
        record written last (so the time it was committed).

        Raises:
            FileNotFoundError: no object at ``path`` and no committed sharded checkpoint under it (other
                prefixes have no timestamp).
        """
        bucket, key = self._split(path)
        stamp = None
        for candidate in (key, f"{key}/{DCP_METADATA}") if key else ():
            try:
                stamp = ops.head(self.transport, bucket, candidate).last_modified
                break
            except S3NotFoundError:
                continue
        if stamp is None:
            raise FileNotFoundError(
                errno.ENOENT, "no object, nor a committed sharded checkpoint (so no timestamp) at", self.url(path)
            )
        return stamp

    # -- changes -----------------------------------------------------------------------------------------

    @override
    def makedirs(self, path: Any, exist_ok: bool = False) -> None:
        """No-op: S3 has no directories; a prefix exists once an object is written under it."""

    @override
    def mkdir(self, path: Any, create_parents: bool = True, **kwargs: Any) -> None:
        """No-op, as :meth:`makedirs`."""

    @override
    def rm_file(self, path: Any) -> None:
        """Delete the object at ``path`` and its checkpoint manifest. A missing object is not an error."""
        ck.delete(self.url(path), transport=self.transport)

    @override
    def _rm(self, path: Any) -> None:
        self.rm_file(path)

    @override
    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        """Delete objects; ``recursive=True`` deletes everything under a prefix (never a whole bucket)."""
        for p in path if isinstance(path, list) else [path]:
            bucket, key = self._split(p)
            if recursive and key and self._has_children(bucket, key):
                ops.delete_prefix(self.transport, bucket, f"{key}/")
            if key:
                self.rm_file(p)

    @override
    def _open(
        self,
        path: Any,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        bucket, key = self._split(path)
        if not key:
            raise IsADirectoryError(errno.EISDIR, "a bucket is not a file", self.url(path))
        if mode == "rb":
            # S3NotFoundError is a FileNotFoundError, as open() callers expect.
            return io.BytesIO(ops.get_bytes(self.transport, bucket, key))
        if mode in ("wb", "xb"):
            writer = MultipartWriter(self.transport, bucket, key, if_none_match=mode == "xb")
            return _AbortOnErrorWriter(writer)
        raise ValueError(f"S3FileSystem.open: mode {mode!r} is not supported; use 'rb', 'wb' or 'xb' (or text)")


class _AbortOnErrorWriter(io.BufferedWriter):
    """A buffered S3 writer whose ``with`` block aborts the upload on an exception.

    A plain ``BufferedWriter`` closes (and so completes the upload of) whatever was written when the block
    raises, which would replace a good object with a truncated one.
    """

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        raw = self.raw
        assert isinstance(raw, MultipartWriter)
        raw.abort()
        try:
            self.close()  # flushes into the aborted writer, which refuses; the upload stays aborted
        except Exception:
            pass

"""Sharded checkpoints on S3 through ``torch.distributed.checkpoint`` (DCP).

With DCP directly::

    import torch.distributed.checkpoint as dcp
    from s3ckpt.dcp import S3StorageReader, S3StorageWriter

    dcp.save(state_dict, storage_writer=S3StorageWriter("s3://bucket/run/step-100"))
    dcp.load(state_dict, storage_reader=S3StorageReader("s3://bucket/run/step-100"))

or through :func:`save` / :func:`load`, which take the same options and raise s3ckpt's own errors
(:class:`~s3ckpt.errors.CheckpointCorruptedError`, ...) instead of DCP's ``CheckpointException`` wrapper.

Each checkpoint is its own prefix, committed once its ``.metadata`` exists (see :mod:`s3ckpt.dcp.commit`).
Any world size loads any other's checkpoint (DCP reshards).
"""

from __future__ import annotations

import os
from typing import Any

from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict_loader import load as _dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as _dcp_save

from ..checkpoint import resolve_transport
from ..errors import S3CheckpointError
from .layout import (
    MANIFEST_NAME,
    METADATA_NAME,
    FlatPrefixStrategy,
    NumericPrefixStrategy,
    PrefixStrategy,
)
from .reader import S3StorageReader
from .shared import PreloadedCheckpoint, fetch_committed, fetch_shared
from .writer import S3StorageWriter

__all__ = [
    "MANIFEST_NAME",
    "METADATA_NAME",
    "FlatPrefixStrategy",
    "NumericPrefixStrategy",
    "PrefixStrategy",
    "PreloadedCheckpoint",
    "S3StorageReader",
    "S3StorageWriter",
    "fetch_committed",
    "fetch_shared",
    "load",
    "save",
    "unwrap",
]


def _collective(process_group: Any) -> bool:
    """True when a load runs on several ranks of the default group (the broadcast's group)."""
    import torch.distributed as dist

    return process_group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def unwrap(exc: CheckpointException) -> BaseException:
    """The first (lowest-rank) s3ckpt error inside a DCP ``CheckpointException``, else ``exc`` itself.

    DCP gathers every rank's exception into one ``CheckpointException`` (a ``BaseException``, so
    ``except Exception`` misses it); this recovers the typed error, e.g. ``CheckpointCorruptedError``.
    """
    for rank in sorted(exc.failures):
        failure = exc.failures[rank]
        err = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(err, S3CheckpointError):
            return err
    return exc


def save(
    state_dict: dict[str, Any],
    url: str | os.PathLike[str],
    *,
    process_group: Any = None,
    no_dist: bool = False,
    planner: Any = None,
    **writer_options: Any,
) -> Metadata:
    """``dcp.save`` to ``url`` through :class:`S3StorageWriter` (``writer_options`` are its keyword arguments).

    Raises:
        S3CheckpointError: the first rank's s3ckpt error (e.g. ``ConflictError`` for a committed prefix).
        CheckpointException: any other failure, as DCP reports it.
    """
    writer = S3StorageWriter(url, **writer_options)
    try:
        metadata: Metadata = _dcp_save(
            state_dict, storage_writer=writer, process_group=process_group, no_dist=no_dist, planner=planner
        )
        return metadata
    except CheckpointException as exc:
        err = unwrap(exc)
        if err is exc:
            raise
        raise err from (err.__cause__ or exc)


def load(
    state_dict: dict[str, Any],
    url: str | os.PathLike[str],
    *,
    process_group: Any = None,
    no_dist: bool = False,
    planner: Any = None,
    **reader_options: Any,
) -> None:
    """``dcp.load`` from ``url`` in place, through :class:`S3StorageReader` (``reader_options`` are its
    keyword arguments). In a multi-rank job (default process group), ``.metadata`` and its sidecar are fetched
    by rank 0 alone and broadcast (:func:`fetch_shared`); other ranks GET only their shards' byte ranges.

    Raises:
        CheckpointNotFoundError: nothing committed at ``url``.
        CheckpointCorruptedError: the manifest, ``.metadata`` or an item does not match its checksum.
        CheckpointException: any other failure, as DCP reports it.
    """
    if not no_dist and reader_options.get("preloaded") is None and _collective(process_group):
        # Every rank would GET .metadata and its sidecar on every dcp.load; rank 0 fetches them once instead
        # and broadcasts the bytes (or the error), so the requests do not grow with the number of ranks.
        reader_options["preloaded"] = fetch_shared(
            str(url), resolve_transport(reader_options.get("transport")), verify=reader_options.get("verify", True)
        )
    reader = S3StorageReader(url, **reader_options)
    try:
        _dcp_load(state_dict, storage_reader=reader, process_group=process_group, no_dist=no_dist, planner=planner)
    except CheckpointException as exc:
        err = reader.metadata_error or unwrap(exc)
        if err is exc:
            raise
        raise err from (err.__cause__ or exc)

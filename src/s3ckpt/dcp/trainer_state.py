"""A trainer's sharded checkpoint on S3: model and optimizer shards through DCP, the rest of the trainer state
(``meta.pt``) inside the same commit. Torch only: the Lightning and Fabric strategies translate their calls
into these functions.

Layout (Lightning's, so Lightning's own tools read a downloaded copy): one DCP checkpoint whose top-level keys
are the module (``"model"`` for FSDP, ``"state_dict"`` for ModelParallel) and ``"optimizer_{i}"``, plus
``meta.pt``, a ``torch.save`` of everything else (loops, callbacks, hyperparameters). s3ckpt's writer uploads
``meta.pt`` on the coordinator before ``.metadata``, so a committed checkpoint always has its trainer state;
Lightning itself writes ``meta.pt`` after ``.metadata``, which leaves a window where a crash makes a
checkpoint that looks committed but cannot resume.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..distributed import get_rank, run_on_rank0
from ..errors import CheckpointNotFoundError, S3NotFoundError
from ..s3_dirpath_utils import parse_s3_url
from ..transport import ops
from ..transport.context import S3Transport
from . import load as dcp_load
from . import save as dcp_save
from .layout import loads_metadata
from .shared import PreloadedCheckpoint, fetch_committed

__all__ = ["META_NAME", "Probe", "load_state", "probe", "read_meta", "save_state"]

log = logging.getLogger(__name__)

META_NAME = "meta.pt"
"""Lightning's name for the non-tensor trainer state of a sharded checkpoint."""


@dataclass(frozen=True)
class Probe:
    """What rank 0 found at a checkpoint URL, broadcast to every rank."""

    kind: Literal["sharded", "file"]
    sharded: PreloadedCheckpoint | None = None
    """``.metadata``, manifest and ``meta.pt`` of a sharded checkpoint, fetched once."""


def save_state(
    url: str,
    converted: dict[str, Any],
    meta: Mapping[str, Any] | None,
    *,
    transport: S3Transport,
    process_group: Any = None,
    base: str | None = None,
) -> None:
    """Save ``converted`` (module and optimizer state dicts, sharded) and ``meta`` as one committed
    checkpoint at ``url``, replacing a checkpoint there (its ``.metadata`` is deleted before any rank
    writes, so an interrupted save never looks committed). Collective.

    Args:
        meta: the trainer state for ``meta.pt``; only the coordinator's (global rank 0) is used. ``None``
            writes no ``meta.pt`` (Fabric without extra state).
        base: an earlier committed checkpoint to copy unchanged items from (``S3StorageWriter(base=...)``).
    """
    extra: dict[str, bytes] = {}
    if meta is not None and get_rank() == 0:
        buf = io.BytesIO()
        torch.save(dict(meta), buf)
        extra[META_NAME] = buf.getvalue()
    dcp_save(
        converted,
        url,
        transport=transport,
        overwrite=True,
        extra_files=extra,
        process_group=process_group,
        base=base,
    )


def probe(url: str, transport: S3Transport, *, verify: bool = True) -> Probe:
    """Whether ``url`` is a committed sharded checkpoint (with its small objects) or a single file, decided
    on global rank 0 and broadcast. Collective.

    Raises:
        CheckpointNotFoundError: neither (on every rank). An uncommitted sharded save counts as nothing.
    """

    def look() -> Probe:
        try:
            return Probe("sharded", fetch_committed(transport, url, verify=verify, extras=(META_NAME,)))
        except CheckpointNotFoundError:
            pass
        bucket, key = parse_s3_url(url, require_key=True)
        try:
            ops.head(transport, bucket, key.rstrip("/"))
            return Probe("file")
        except S3NotFoundError:
            raise CheckpointNotFoundError(
                f"no checkpoint at {url}: neither a checkpoint file nor a committed sharded checkpoint (a sharded "
                "save that did not finish has no .metadata and is never loaded)"
            ) from None

    return run_on_rank0(look)


def read_meta(found: PreloadedCheckpoint, *, weights_only: bool | None = None) -> dict[str, Any]:
    """The trainer state (``meta.pt``) of a probed sharded checkpoint; ``{}`` if it has none.

    ``weights_only=None`` lets torch decide, as Lightning does (the trainer state may hold objects that
    ``weights_only=True`` refuses; pass ``False`` only for checkpoints you trust).
    """
    data = found.extras.get(META_NAME)
    if data is None:
        return {}
    meta = torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)
    if not isinstance(meta, dict):
        raise TypeError(f"{found.url}{META_NAME} holds a {type(meta).__name__}, not a dict")
    return meta


def load_state(
    found: PreloadedCheckpoint,
    module: nn.Module,
    optimizers: Mapping[str, torch.optim.Optimizer],
    *,
    module_key: str,
    strict: bool = True,
    transport: S3Transport,
    process_group: Any = None,
) -> list[str]:
    """Load the module and optimizer shards of ``found`` into ``module`` and ``optimizers`` in one
    ``dcp.load`` (one plan, no ``.metadata`` request: it came with ``found``). Works for FSDP
    (``FullyShardedDataParallel``) and FSDP2 / tensor parallel (``fully_shard``, DTensor) alike, through
    torch's ``get/set_model_state_dict`` and ``get/set_optimizer_state_dict``. Collective.

    Returns:
        The optimizer keys that were loaded (an optimizer the checkpoint has no state for, e.g. one saved
        with ``save_weights_only``, is left as it is).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    saved = loads_metadata(found.metadata).state_dict_metadata
    present = {key.split(".", 1)[0] for key in saved}
    state: dict[str, Any] = {module_key: get_model_state_dict(module)}
    loaded = [k for k in optimizers if k in present]
    for key in loaded:
        state[key] = get_optimizer_state_dict(module, optimizers[key])
    reader_opts: dict[str, Any] = {"transport": transport, "preloaded": found, "verify": found.manifest is not None}
    dcp_load(state, found.url, process_group=process_group, **reader_opts)
    set_model_state_dict(module, state[module_key], options=StateDictOptions(strict=strict))
    for key in loaded:
        set_optimizer_state_dict(module, optimizers[key], optim_state_dict=state[key])
    return loaded

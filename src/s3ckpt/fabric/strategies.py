"""``S3FSDPStrategy`` and ``S3ModelParallelStrategy`` for Lightning Fabric: ``fabric.save`` / ``fabric.load`` with
``s3://`` paths.

Lightning's Fabric strategies turn a checkpoint path into ``pathlib.Path`` first, so ``s3://bucket/run``
becomes the local folder ``./s3:/bucket/run`` and every shard lands on local disk without an error; they have
no ``CheckpointIO`` to plug in either. These subclasses take the same arguments as Lightning's classes, behave
exactly like them for local paths, and for ``s3://`` paths (or ``s3:/`` ones that ``pathlib`` already mangled)
never touch the local disk:

* sharded saves (``FSDPStrategy(state_dict_type="sharded")``, ``ModelParallelStrategy`` by default) convert
  modules and optimizers as Lightning does and store them through s3ckpt's DCP writer in Lightning's layout
  (one DCP checkpoint keyed by the state's keys, plus ``meta.pt`` with the other entries), committed once for
  the shards and ``meta.pt`` together;
* full-state saves gather as Lightning does and store one file from rank 0;
* loads: rank 0 probes the path once and broadcasts ``.metadata`` and ``meta.pt``; the module and optimizer
  shards load in one ``dcp.load``; a single file is downloaded, verified, into memory and loaded by Lightning's
  own full-state code.

The S3 settings come from ``checkpoint_io=S3CheckpointIO(...)`` or from the s3ckpt keyword arguments
(``async_checkpointing``, ``chunk_size_MB``, ...), which build one; it is :attr:`s3_checkpoint_io` (Fabric's
``checkpoint_io`` property stays Lightning's, which refuses any). With ``async_checkpointing=True``,
``fabric.save`` returns once the shards are copied to host memory; call ``strategy.teardown()`` (or
``strategy.s3_checkpoint_io.wait()``) before the process exits. ``fabric.load`` of a path still uploading waits
for that save.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from lightning.fabric.strategies.fsdp import (
    FSDPStrategy,
    _get_full_state_dict_context,
    _get_sharded_state_dict_context,
    _has_fsdp_modules,
)
from lightning.fabric.strategies.model_parallel import ModelParallelStrategy, _has_dtensor_modules
from lightning.fabric.strategies.strategy import _apply_filter, _validate_keys_for_strict_loading
from lightning.fabric.utilities.load import _move_state_into
from lightning.fabric.utilities.types import _Stateful
from torch.nn import Module
from torch.optim import Optimizer

from ..lightning.checkpoint_io import S3CheckpointIO
from ..lightning.sharded import S3ShardedCheckpoints, local_broadcast, s3_url_of, weights_only_kwargs
from ..lightning.strategies import _S3_OPTIONS

__all__ = ["S3FSDPStrategy", "S3ModelParallelStrategy"]

_Filter = dict[str, Callable[[str, Any], bool]]
_State = Module | Optimizer | dict[str, Any]


class _S3FabricSharded:
    """What both Fabric strategies add: ``s3://`` saves and loads through :class:`S3ShardedCheckpoints`."""

    _s3: S3ShardedCheckpoints

    # Provided by Lightning's strategy classes.
    world_size: int
    broadcast: Callable[..., Any]

    def _init_s3(self, checkpoint_io: S3CheckpointIO | None, options: dict[str, Any]) -> None:
        name = type(self).__name__
        if checkpoint_io is not None and not isinstance(checkpoint_io, S3CheckpointIO):
            raise TypeError(
                f"{name}(checkpoint_io=...) takes an s3ckpt S3CheckpointIO, got {type(checkpoint_io).__name__}; "
                "Lightning's Fabric strategies use no CheckpointIO for local paths"
            )
        given = sorted(k for k, v in options.items() if v is not None)
        if checkpoint_io is not None and given:
            raise TypeError(
                f"{name} got checkpoint_io= and {given}: set these on the S3CheckpointIO, or drop checkpoint_io= "
                "so the strategy builds one from them"
            )
        self._s3 = S3ShardedCheckpoints(checkpoint_io, **options)

    @property
    def s3_checkpoint_io(self) -> S3CheckpointIO:
        """The :class:`S3CheckpointIO` the ``s3://`` checkpoints go through (its records, ``wait()``)."""
        return self._s3.io()

    # -- what each strategy supplies ---------------------------------------------------------------------

    def _s3_saves_sharded(self) -> bool:
        raise NotImplementedError

    def _s3_is_model(self, obj: object) -> bool:
        """Whether ``obj`` is the (single) sharded model of a checkpoint, as Lightning decides it."""
        raise NotImplementedError

    def _s3_state_dicts(
        self, module: Module, state: dict[str, Any], filter: _Filter | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The state dicts of the modules and optimizers in ``state`` (sharded or gathered full, as the
        strategy saves them) and the other entries, as Lightning converts them."""
        raise NotImplementedError

    # -- Fabric's calls ----------------------------------------------------------------------------------

    def _s3_url(self, path: Any) -> str | None:
        # Rank 0's path wins, as in Lightning, which broadcasts the path before using it.
        shared: str | None = self.broadcast(s3_url_of(path))
        return shared

    def save_checkpoint(
        self,
        path: Any,
        state: dict[str, Any],
        storage_options: Any | None = None,
        filter: _Filter | None = None,
    ) -> None:
        """Lightning's ``save_checkpoint``; an ``s3://`` path is saved through s3ckpt (see the module docstring).

        Raises:
            TypeError: ``storage_options`` with an ``s3://`` path (configure transfers on the
                :class:`S3CheckpointIO` or the strategy's s3ckpt arguments).
            NotImplementedError: ``filter`` with a sharded save (as Lightning: a filtered sharded checkpoint
                could not be loaded).
            ValueError: ``state`` holds no sharded model, or more than one.
        """
        url = self._s3_url(path)
        if url is None:
            super().save_checkpoint(path, state, storage_options, filter)  # type: ignore[misc]
            return
        name = type(self).__name__
        if storage_options is not None:
            raise TypeError(
                f"{name}.save_checkpoint(storage_options=...) is not supported for s3:// paths; configure "
                "transfers on S3CheckpointIO or the strategy's s3ckpt arguments"
            )
        sharded = self._s3_saves_sharded()
        if filter is not None and sharded:
            # https://github.com/pytorch/pytorch/issues/105379, as in Lightning.
            raise NotImplementedError(
                f"{name} doesn't support loading sharded filtered checkpoints, so saving them is disabled; save "
                "the full state (FSDP state_dict_type='full', ModelParallel save_distributed_checkpoint=False) "
                "to filter it"
            )
        _, module = self._s3_model(state, "save_checkpoint")
        converted, meta = self._s3_state_dicts(module, state, filter)
        if sharded:
            self._s3.save_sharded(url, converted, meta)
        else:
            converted.update(meta)
            self._s3.save_file(url, converted)

    def load_checkpoint(
        self,
        path: Any,
        state: _State | None = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Lightning's ``load_checkpoint``; an ``s3://`` path is loaded through s3ckpt, with Lightning's
        semantics: the model and optimizers in ``state`` are loaded in place, the requested other entries are
        moved into ``state`` (``load_state_dict`` for stateful ones) and the rest is returned.

        Raises:
            ValueError: no ``state``, no or several sharded models in it, or a bare module with a sharded
                checkpoint (a module alone loads from a full-state file, as in Lightning).
            NotImplementedError: ``state`` is a bare optimizer (as Lightning).
            KeyError: ``strict`` and a requested entry is not in the checkpoint; an optimizer's state is
                missing.
            s3ckpt.errors.CheckpointNotFoundError: nothing committed at the path.
        """
        url = self._s3_url(path)
        if url is None:
            return super().load_checkpoint(path, state, strict, **weights_only_kwargs(weights_only))  # type: ignore[misc,no-any-return]
        name = type(self).__name__
        if not state:
            raise ValueError(
                f"Got {name}.load_checkpoint(..., state={state!r}) but a state with at least a model instance to "
                f"reload is required. Pass it in like so: {name}.load_checkpoint(..., state={{'model': model, ...}})"
            )
        if isinstance(state, Optimizer):
            raise NotImplementedError(f"Loading a single optimizer object from a checkpoint is not supported by {name}")
        if isinstance(state, Module):
            module = state
            self._s3.load(
                url,
                module=module,
                optimizers={},
                module_key=None,
                strict=strict,
                weights_only=weights_only,
                load_file=lambda p: self._lightning_load(p, module, strict, weights_only),
            )
            return {}

        module_key, module = self._s3_model(state, "load_checkpoint")
        optimizers = {k: v for k, v in state.items() if isinstance(v, Optimizer)}
        full_file = False

        def load_file(local: Path) -> dict[str, Any]:
            nonlocal full_file
            full_file = True
            return self._lightning_load(local, state, strict, weights_only)

        rest = self._s3.load(
            url,
            module=module,
            optimizers=optimizers,
            module_key=module_key,
            strict=strict,
            weights_only=weights_only,
            load_file=load_file,
            require_optimizers=True,
        )
        if full_file:  # Lightning's own code moved the requested entries already
            return rest
        requested = state.keys() - {module_key} - optimizers.keys()
        _validate_keys_for_strict_loading(requested, rest.keys(), strict=strict)
        _move_state_into(source=rest, destination=state, keys=set(requested))
        return rest

    def teardown(self) -> None:
        """Finish background saves (raising a stored failure), then Lightning's teardown."""
        try:
            self._s3.teardown()
        finally:
            try:
                super().teardown()  # type: ignore[misc]
            except NotImplementedError:
                # Strategy.teardown ends with checkpoint_io.teardown(), which these Fabric strategies refuse
                # (they have no CheckpointIO); everything before it has run.
                pass

    # -- helpers -----------------------------------------------------------------------------------------

    def _s3_model(self, state: dict[str, Any], call: str) -> tuple[str, Module]:
        models = [(k, v) for k, v in state.items() if self._s3_is_model(v)]
        if len(models) != 1:
            problem = "Could not find a sharded model" if not models else "Found several sharded models"
            raise ValueError(
                f"{problem} in the state given to {type(self).__name__}.{call}: a checkpoint holds exactly one, "
                f"set up through the strategy (fabric.setup_module) and passed like so: "
                f"{call}(..., state={{'model': model, 'optimizer': optimizer, ...}}); save other models to other "
                "paths"
            )
        return models[0]

    def _lightning_load(self, path: Path, state: _State, strict: bool, weights_only: bool | None) -> dict[str, Any]:
        """Lightning's own full-state load of the verified in-memory download at ``path``."""
        with local_broadcast(self):
            return super().load_checkpoint(path, state, strict, **weights_only_kwargs(weights_only))  # type: ignore[misc,no-any-return]


def _split(
    state: dict[str, Any],
    filter: _Filter | None,
    module_state: Callable[[Module], dict[str, Any]],
    optimizer_state: Callable[[Optimizer], dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Lightning's conversion: modules and optimizers to state dicts, everything else (``state_dict()`` of a
    stateful object) to the metadata; ``filter`` applied per key."""
    converted: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for key, obj in state.items():
        value: Any
        if isinstance(obj, Module):
            value, target = module_state(obj), converted
        elif isinstance(obj, Optimizer):
            value, target = optimizer_state(obj), converted
        else:
            value, target = (obj.state_dict() if isinstance(obj, _Stateful) else obj), meta
        _apply_filter(key, filter or {}, value, target)
    return converted, meta


class S3FSDPStrategy(_S3FabricSharded, FSDPStrategy):
    """Lightning Fabric's ``FSDPStrategy`` with ``s3://`` checkpoints (see the module docstring).

    Args:
        *args, **kwargs: as :class:`lightning.fabric.strategies.FSDPStrategy`.
        checkpoint_io: the :class:`S3CheckpointIO` to use (not together with the options below).
        dirpath, chunk_size_MB, max_read_concurrency, max_write_concurrency, async_checkpointing, client,
            retry, verify, on_save_error, incremental: build the :class:`S3CheckpointIO` when none is given (same
            meaning; ``dirpath`` defaults to the bucket of the first checkpoint).

    Example::

        fabric = Fabric(devices=8, strategy=S3FSDPStrategy(state_dict_type="sharded", async_checkpointing=True))
        fabric.save("s3://bucket/run/step-1000", {"model": model, "optimizer": optimizer, "step": 1000})
    """

    def __init__(self, *args: Any, checkpoint_io: S3CheckpointIO | None = None, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in _S3_OPTIONS if k in kwargs}
        super().__init__(*args, **kwargs)
        self._init_s3(checkpoint_io, options)

    def _s3_saves_sharded(self) -> bool:
        return bool(self._state_dict_type == "sharded")

    def _s3_is_model(self, obj: object) -> bool:
        return bool(_has_fsdp_modules(obj))

    def _s3_state_dicts(
        self, module: Module, state: dict[str, Any], filter: _Filter | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        ctx: AbstractContextManager[Any]
        if self._s3_saves_sharded():
            ctx = _get_sharded_state_dict_context(module)  # type: ignore[assignment]
        else:
            ctx = _get_full_state_dict_context(module, world_size=self.world_size)  # type: ignore[assignment]
        with ctx:
            return _split(state, filter, lambda m: m.state_dict(), lambda o: FSDP.optim_state_dict(module, o))


class S3ModelParallelStrategy(_S3FabricSharded, ModelParallelStrategy):
    """Lightning Fabric's ``ModelParallelStrategy`` (FSDP2 ``fully_shard`` and tensor parallel) with ``s3://``
    checkpoints (see the module docstring).

    Args:
        *args, **kwargs: as :class:`lightning.fabric.strategies.ModelParallelStrategy`.
        checkpoint_io: the :class:`S3CheckpointIO` to use (not together with the options below).
        dirpath, chunk_size_MB, max_read_concurrency, max_write_concurrency, async_checkpointing, client,
            retry, verify, on_save_error, incremental: build the :class:`S3CheckpointIO` when none is given.

    Example::

        strategy = S3ModelParallelStrategy(parallelize, data_parallel_size=8, async_checkpointing=True)
        fabric = Fabric(devices=8, strategy=strategy)
        remainder = fabric.load("s3://bucket/run/step-1000", {"model": model, "optimizer": optimizer})
    """

    def __init__(self, *args: Any, checkpoint_io: S3CheckpointIO | None = None, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in _S3_OPTIONS if k in kwargs}
        super().__init__(*args, **kwargs)
        self._init_s3(checkpoint_io, options)

    def _s3_saves_sharded(self) -> bool:
        return bool(self._save_distributed_checkpoint)

    def _s3_is_model(self, obj: object) -> bool:
        return bool(_has_dtensor_modules(obj))

    def _s3_state_dicts(
        self, module: Module, state: dict[str, Any], filter: _Filter | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        # Full state: gathered to rank 0 only (cpu_offload), as Lightning does.
        options = StateDictOptions(full_state_dict=not self._s3_saves_sharded(), cpu_offload=True)
        return _split(
            state,
            filter,
            lambda m: get_model_state_dict(m, options=options),
            lambda o: get_optimizer_state_dict(module, o, options=options),
        )

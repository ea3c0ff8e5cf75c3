"""``S3FSDPStrategy`` and ``S3ModelParallelStrategy``: Lightning's sharded strategies with ``s3://`` checkpoints.

Lightning 2.x turns a checkpoint path into ``pathlib.Path`` before anything else, so ``s3://bucket/run`` becomes
the local folder ``./s3:/bucket/run`` and every shard lands on local disk without an error. These subclasses
take the same arguments as Lightning's classes, behave exactly like them for local paths, and for ``s3://``
paths (or ``s3:/`` ones that ``pathlib`` already mangled):

* sharded saves (``FSDPStrategy(state_dict_type="sharded")``, ``ModelParallelStrategy`` by default) go through
  s3ckpt's DCP writer in Lightning's layout (``model`` or ``state_dict``, ``optimizer_{i}``, ``meta.pt``), one
  commit for the shards and ``meta.pt`` together;
* full-state saves go through :class:`~s3ckpt.lightning.S3CheckpointIO` on rank 0, loads download the file
  verified into memory;
* loads: rank 0 probes the path once and broadcasts ``.metadata`` and ``meta.pt``; model and optimizer shards
  load in one ``dcp.load``;
* removals (top-k) delete a sharded checkpoint's ``.metadata`` first, then every object under it.

The S3 settings come from the ``S3CheckpointIO`` given as ``checkpoint_io=`` or ``Trainer(plugins=[...])``, or
from the s3ckpt keyword arguments (``async_checkpointing``, ``chunk_size_MB``, ...), which build one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn

from .checkpoint_io import S3CheckpointIO
from .sharded import S3ShardedCheckpoints, local_broadcast, s3_plugin_of, s3_url_of, weights_only_kwargs

__all__ = ["S3FSDPStrategy", "S3ModelParallelStrategy"]

_S3_OPTIONS = (
    "dirpath",
    "chunk_size_MB",
    "max_read_concurrency",
    "max_write_concurrency",
    "async_checkpointing",
    "client",
    "retry",
    "verify",
    "on_save_error",
    "incremental",
)


class _S3Sharded:
    """What both Trainer strategies add: ``s3://`` saves, loads and removals through s3ckpt."""

    _module_key = "model"
    _s3: S3ShardedCheckpoints

    # Provided by Lightning's strategy classes (annotations only: the mixin must not shadow them).
    broadcast: Callable[..., Any]
    checkpoint_io: CheckpointIO
    model: Any
    optimizers: list[Any]
    lightning_module: Any

    def _init_s3(self, options: dict[str, Any]) -> None:
        unknown = set(options) - set(_S3_OPTIONS)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {sorted(unknown)}")
        self._s3 = S3ShardedCheckpoints(None, **options)

    @property
    def s3_checkpoint_io(self) -> S3CheckpointIO:
        """The :class:`S3CheckpointIO` the ``s3://`` checkpoints go through."""
        plugin = s3_plugin_of(self.checkpoint_io)
        if plugin is not None:
            self._s3._io = plugin
        return self._s3.io()

    def _s3_saves_sharded(self) -> bool:
        raise NotImplementedError

    def _s3_url(self, path: Any) -> str | None:
        url = s3_url_of(path)
        shared: str | None = self.broadcast(url)
        if shared is not None:
            self.s3_checkpoint_io  # noqa: B018 - bind the trainer's plugin before the first S3 call
        return shared

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        url = self._s3_url(filepath)
        if url is None:
            super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]
            return
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint(storage_options=...) is not supported for s3:// paths; "
                "configure transfers on S3CheckpointIO or the strategy's s3ckpt arguments"
            )
        if not self._s3_saves_sharded():
            self._s3.save_file(url, checkpoint)
            return
        converted = {self._module_key: checkpoint.pop("state_dict")}
        converted.update({f"optimizer_{i}": state for i, state in enumerate(checkpoint.pop("optimizer_states", []))})
        self._s3.save_sharded(url, converted, checkpoint)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        url = self._s3_url(checkpoint_path)
        if url is None:
            return super().load_checkpoint(checkpoint_path, **weights_only_kwargs(weights_only))  # type: ignore[misc,no-any-return]
        assert self.model is not None and self.lightning_module is not None
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        optimizers = {f"optimizer_{i}": o for i, o in enumerate(self.optimizers)} if fitting else {}

        def load_file(path: Path) -> dict[str, Any]:
            # Lightning's own full-state logic, on the verified in-memory download.
            with local_broadcast(self):
                return super(_S3Sharded, self).load_checkpoint(path, **weights_only_kwargs(weights_only))  # type: ignore[misc,no-any-return]

        return self._s3.load(
            url,
            module=self.model,
            optimizers=optimizers,
            module_key=self._module_key,
            strict=self.lightning_module.strict_loading,
            weights_only=weights_only,
            load_file=load_file,
        )

    def remove_checkpoint(self, filepath: Any) -> None:
        url = s3_url_of(filepath)
        if url is None:
            super().remove_checkpoint(filepath)  # type: ignore[misc]
            return
        self.s3_checkpoint_io  # noqa: B018
        self._s3.remove(url)

    def teardown(self) -> None:
        try:
            self._s3.teardown()
        finally:
            super().teardown()  # type: ignore[misc]


class S3FSDPStrategy(_S3Sharded, FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with ``s3://`` checkpoints (see the module docstring).

    Args:
        *args, **kwargs: as :class:`lightning.pytorch.strategies.FSDPStrategy` (``checkpoint_io`` may be an
            :class:`S3CheckpointIO`).
        dirpath, chunk_size_MB, max_read_concurrency, max_write_concurrency, async_checkpointing, client,
            retry, verify, on_save_error, incremental: build the :class:`S3CheckpointIO` when none is given (same
            meaning; ``incremental=True`` copies a rank's unchanged items from the previous checkpoint).

    Example::

        strategy = S3FSDPStrategy(state_dict_type="sharded", async_checkpointing=True)
        trainer = Trainer(strategy=strategy, callbacks=[S3ModelCheckpoint("s3://bucket/run", save_top_k=2)])
    """

    _module_key = "model"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in _S3_OPTIONS if k in kwargs}
        super().__init__(*args, **kwargs)
        self._init_s3(options)

    def _s3_saves_sharded(self) -> bool:
        return bool(self._state_dict_type == "sharded")


class S3ModelParallelStrategy(_S3Sharded, ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2 ``fully_shard`` and tensor parallel) with ``s3://``
    checkpoints (see the module docstring).

    Args:
        *args, **kwargs: as :class:`lightning.pytorch.strategies.ModelParallelStrategy`.
        checkpoint_io: an :class:`S3CheckpointIO` (Lightning's class takes none; ``Trainer(plugins=[io])``
            works too).
        dirpath, chunk_size_MB, max_read_concurrency, max_write_concurrency, async_checkpointing, client,
            retry, verify, on_save_error, incremental: build the :class:`S3CheckpointIO` when none is given.
    """

    _module_key = "state_dict"

    def __init__(self, *args: Any, checkpoint_io: CheckpointIO | None = None, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in _S3_OPTIONS if k in kwargs}
        super().__init__(*args, **kwargs)
        if checkpoint_io is not None:
            self.checkpoint_io = checkpoint_io
        self._init_s3(options)

    def _s3_saves_sharded(self) -> bool:
        return bool(self._save_distributed_checkpoint)

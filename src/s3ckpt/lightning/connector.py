"""Resume a Lightning run from S3 with one listing on global rank 0, whatever the number of ranks.

Lightning's ``trainer.fit(ckpt_path="last")`` looks for ``last*.ckpt`` on every rank, so N ranks list the
checkpoint directory N times. Here, as in NeMo (``exp_manager`` plus ``NeMoCheckpointConnector``), global
rank 0 alone finds the checkpoint and every rank loads what rank 0 chose::

    io = S3CheckpointIO("s3://bucket/run")
    trainer = Trainer(plugins=[io], strategy="ddp", callbacks=[S3ModelCheckpoint(save_last=True)])
    configure_s3_resume(trainer, "s3://bucket/run", resume_ignore_no_checkpoint=True)
    trainer.fit(model)          # no ckpt_path: the resume path is already set

:func:`configure_s3_resume` installs :class:`S3CheckpointConnector` and applies the rules of
:func:`s3ckpt.distributed.resolve_resume_path` on rank 0. Lightning creates the process group inside
``fit``, so when it does not exist yet rank 0 keeps its answer (or its error) and the connector broadcasts
it when ``fit`` starts loading: then every rank loads the same checkpoint, or raises the same error.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from ..distributed import (
    VerifyPolicy,
    _capture,
    _Outcome,
    destroy_process_group_at_exit,
    find_resume_checkpoint,
    is_initialized,
    resolve_resume_path,
)
from ..transport.context import S3Transport
from .model_checkpoint import find_s3_checkpoint_io

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["S3CheckpointConnector", "configure_s3_resume", "install_s3_connector"]

log = logging.getLogger(__name__)


class S3CheckpointConnector(_CheckpointConnector):
    """Lightning's checkpoint connector, loading on every rank the checkpoint global rank 0 chose.

    Install it as NeMo users do, ``trainer._checkpoint_connector = S3CheckpointConnector(trainer)``, or
    through :func:`configure_s3_resume`. In ``resume_start`` rank 0's checkpoint path (the one ``fit`` was
    given, or that rank 0 alone set as ``trainer.ckpt_path``) is broadcast, then loaded through the
    strategy (so through :class:`~s3ckpt.lightning.S3CheckpointIO`); each rank logs its load time.

    Attributes:
        load_seconds: how long this rank took to load the last checkpoint it resumed from.
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        super().__init__(trainer)
        self.load_seconds: float | None = None
        self._configured = False
        self._pending: _Outcome[Any] | None = None

    @override
    def _select_ckpt_path(self, state_fn: Any, ckpt_path: Any, model_provided: bool, model_connected: bool) -> Any:
        if ckpt_path == "last" and self._configured:
            # Lightning's "last" lookup lists S3 on every rank; configure_s3_resume already chose on rank 0.
            rank_zero_info("ckpt_path='last': resuming from the checkpoint configure_s3_resume chose on rank 0")
            ckpt_path = None
        return super()._select_ckpt_path(state_fn, ckpt_path, model_provided, model_connected)

    @override
    def resume_start(self, checkpoint_path: Any = None, weights_only: bool | None = None) -> None:
        path = self._agreed_path(checkpoint_path)
        # Lightning < 2.6 has no weights_only argument here.
        kwargs: dict[str, Any] = {} if weights_only is None else {"weights_only": weights_only}
        if not path:
            super().resume_start(None, **kwargs)
            return
        rank = self.trainer.global_rank
        log.info("global rank %d: loading checkpoint %s", rank, path)
        start = time.perf_counter()
        super().resume_start(path, **kwargs)
        self.load_seconds = time.perf_counter() - start
        log.info("global rank %d: loaded checkpoint %s in %.2f s", rank, path, self.load_seconds)

    def _agreed_path(self, checkpoint_path: Any) -> Any:
        """Rank 0's checkpoint path on every rank; rank 0's resume error raised on every rank."""
        pending, self._pending = self._pending, None
        strategy = self.trainer.strategy
        if is_initialized() and self.trainer.world_size > 1:
            # Collective: Lightning calls resume_start on every rank.
            sent: Any = (pending, checkpoint_path) if self.trainer.global_rank == 0 else None
            pending, checkpoint_path = strategy.broadcast(sent, src=0)
        if self._configured:
            # configure_s3_resume's path is for this fit only (trainer.ckpt_path still reports it): a later
            # validate or test without ckpt_path uses the trained model, not the checkpoint resumed from.
            self._configured = self._user_managed = False
        if pending is not None:
            if pending.error is not None or pending.local is not None:
                # Raised on every rank, out of fit, which leaves Lightning's process group alive.
                destroy_process_group_at_exit()
            pending.unwrap()
        return checkpoint_path


def install_s3_connector(trainer: pl.Trainer) -> S3CheckpointConnector:
    """The trainer's :class:`S3CheckpointConnector`, installed in place of Lightning's if needed (keeping a
    path the user already set with ``trainer.ckpt_path = ...``)."""
    connector = trainer._checkpoint_connector
    if not isinstance(connector, S3CheckpointConnector):
        previous = connector
        connector = S3CheckpointConnector(trainer)
        connector._ckpt_path, connector._user_managed = previous._ckpt_path, previous._user_managed
        trainer._checkpoint_connector = connector
    return connector


def configure_s3_resume(
    trainer: pl.Trainer,
    dirpath: str,
    *,
    resume_if_exists: bool = True,
    resume_ignore_no_checkpoint: bool = False,
    resume_past_end: bool = False,
    verify_candidates: VerifyPolicy = "head",
    transport: S3Transport | None = None,
) -> str | None:
    """Resume ``trainer`` from the checkpoint global rank 0 finds under ``dirpath``; call before ``fit``.

    Installs :class:`S3CheckpointConnector` and sets ``trainer.ckpt_path``, so ``trainer.fit(model)``
    resumes with no ``ckpt_path`` (``ckpt_path="last"`` means the same and lists nothing more). The rules
    are :func:`s3ckpt.distributed.resolve_resume_path`'s: ``*end.ckpt`` first (an error unless
    ``resume_past_end``), then the newest committed ``*last.ckpt``; unfinished or corrupt ones are skipped.
    Resume never goes back past a committed checkpoint: where a top-k checkpoint beside ``last.ckpt`` records a
    higher step (a crash between its save and the ``save_last`` copy), it is chosen instead, with a warning
    (:func:`s3ckpt.resume.newest_of_run`).

    Where the process group already exists (or there is one process), the answer is resolved now and
    errors are raised here. Otherwise (Lightning creates the group inside ``fit``), rank 0 resolves now and
    the other ranks learn the answer, or raise rank 0's error, when ``fit`` starts loading.

    Args:
        trainer: the trainer to resume.
        dirpath: ``s3://bucket/prefix`` of the checkpoints (normally the ``S3CheckpointIO`` dirpath).
        resume_if_exists: ``False`` installs the connector and starts fresh without listing.
        resume_ignore_no_checkpoint: start fresh (with a warning) when no checkpoint is usable.
        resume_past_end: allow resuming from a ``*end.ckpt``.
        verify_candidates: how rank 0 checks the candidate (see ``resolve_resume_path``).
        transport: default: the trainer's ``S3CheckpointIO`` transport, else one built from the environment.

    Returns:
        The checkpoint URL where it is known on this rank now; ``None`` for a fresh start, and on non-zero
        ranks while the process group does not exist yet.

    Raises:
        CheckpointNotFoundError, ResumeError, S3CheckpointError: as ``resolve_resume_path``, when resolved now.
    """
    connector = install_s3_connector(trainer)
    if not resume_if_exists:
        return None
    connector._configured = True
    if transport is None:
        plugin = find_s3_checkpoint_io(trainer)
        transport = plugin.transport if plugin is not None else None
    options: dict[str, Any] = {
        "resume_ignore_no_checkpoint": resume_ignore_no_checkpoint,
        "resume_past_end": resume_past_end,
        "transport": transport,
        "verify_candidates": verify_candidates,
    }
    if is_initialized() or trainer.world_size == 1:
        path = resolve_resume_path(dirpath, **options)
    elif trainer.global_rank == 0:
        outcome = _capture(lambda: find_resume_checkpoint(dirpath, **options))
        connector._pending = outcome if outcome.error is not None else None
        path = outcome.value
    else:
        return None
    if path:
        trainer.ckpt_path = path
    return path

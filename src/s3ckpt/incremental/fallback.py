"""When an incremental save uploads everything instead: no usable base, or a store that cannot copy parts.

Never an error: an incremental save that cannot compose is a plain save, said in the log (once per store
for a store without ``UploadPartCopy``).
"""

from __future__ import annotations

import logging
import os

from ..transport.compose import CopyPartError
from ..transport.context import S3Transport
from ..transport.retry import error_code
from .records import BaseLayout, load_base

__all__ = ["STORE_CHECKSUM_ENV", "choose_base", "compose_store_checksum", "copy_failed"]

log = logging.getLogger(__name__)

STORE_CHECKSUM_ENV = "S3CKPT_COMPOSE_STORE_CHECKSUM"


def compose_store_checksum() -> bool:
    """Whether a composed upload asks the store for its full-object CRC32C (env ``S3CKPT_COMPOSE_STORE_CHECKSUM``,
    ``1``/``0``; default off). Decided by measurement (``make bench ARGS=--incremental``, SeaweedFS): with it on,
    the store recomputes the checksum of every copied byte, so a composed save cost 1.3x the server CPU of a
    plain upload and took longer than one; off, 0.5x. Off, the object's CRC32C (combined from its parts') is in
    the manifest, which ``load`` and ``verify`` check; each copied part is still checked against the client's
    CRC32C where the store returns one, and the base against its ETag. On, the store also checks the whole
    composition at Complete: for a store that copies checksummed parts cheaply (AWS S3)."""
    raw = os.environ.get(STORE_CHECKSUM_ENV, "0").strip().lower()
    return raw in ("1", "true", "yes", "on")


# Stores (endpoints) that refused UploadPartCopy: later saves upload everything without trying again.
_no_part_copy: set[str] = set()
_NOT_SUPPORTED = frozenset({"NotImplemented", "MethodNotAllowed", "XNotImplemented", "501", "405"})


def _endpoint(t: S3Transport) -> str:
    return t.clients.config.endpoint_url or "AWS S3"


def choose_base(t: S3Transport, base: str, url: str) -> BaseLayout | None:
    """The base to compose ``url`` from, or None (logged) when the save must upload everything."""
    if _endpoint(t) in _no_part_copy:
        return None
    # The base may be ``url`` itself (``last.ckpt`` saved again): every copy completes before the new object
    # replaces it at Complete, so the copies read the old bytes (pinned by its ETag).
    layout, why = load_base(t, base)
    if layout is None:
        log.warning("incremental save of %s: %s; uploading everything", url, why)
    return layout


def copy_failed(t: S3Transport, url: str, exc: CopyPartError) -> None:
    codes = set()
    cause: BaseException | None = exc
    while cause is not None:
        codes.add(error_code(cause))
        cause = cause.__cause__
    if codes & _NOT_SUPPORTED:
        _no_part_copy.add(_endpoint(t))
        log.warning(
            "%s does not support UploadPartCopy (server-side copy of a part): incremental saves to it upload "
            "everything from now on (%s)",
            _endpoint(t),
            exc,
        )
        return
    log.warning("incremental save of %s: %s; uploading everything instead", url, exc)

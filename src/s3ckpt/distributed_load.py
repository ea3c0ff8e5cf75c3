"""Load one checkpoint on every rank of a node with one download per node.

Data-parallel replicas load the same checkpoint object. Loaded rank by rank, a node of 8 GPUs downloads it
8 times, holds 8 copies in host memory and sends 8 x the GET requests to one S3 prefix. :func:`load_shared`
downloads it once per node instead:

1. the node's first rank downloads the object and checks its CRC32C (``checkpoint._download_verified``,
   the same code as :func:`s3ckpt.load`) into an anonymous in-memory file (``memfd``);
2. it broadcasts the file's ``/proc/<pid>/fd/<n>`` path to the node's ranks, which check they can open it;
   where one cannot (another user, a locked-down ``/proc``), the bytes are copied once into a file in
   ``/dev/shm``, or in the temporary directory if ``/dev/shm`` is missing or too small;
3. every rank of the node ``torch.load(..., mmap=True)``'s that file, so the tensors of all ranks share one
   copy of the pages (copy-on-write);
4. after a barrier the first rank closes (or unlinks) the file; the mappings keep the pages alive.

The memfd first: it needs no second copy and is not limited by ``/dev/shm``'s size (64 MB in Docker by
default). A node is ``LOCAL_WORLD_SIZE`` consecutive ranks when that variable is set (torchrun sets it),
else all ranks are one node.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from . import checkpoint as ck
from .distributed import _capture, _Outcome, barrier, broadcast_object, get_rank, get_world_size, is_initialized
from .errors import S3CheckpointError
from .serialization import LoadBuffer, load_from_buffer
from .transport.context import S3Transport

__all__ = ["load_shared"]

log = logging.getLogger(__name__)

# Room left in a shared-memory directory beyond the checkpoint itself.
_SPARE_BYTES = 64 * 1024 * 1024
_node_groups: dict[tuple[int, int, int], Any] = {}


@dataclass(frozen=True)
class _Shared:
    path: str
    size: int


class _MappedFile(LoadBuffer):
    """A file another rank wrote, seen through :class:`LoadBuffer`'s interface so that ``load_from_buffer``
    loads it; it owns nothing, so closing it does nothing."""

    def __init__(self, path: str, size: int) -> None:  # no super().__init__(): nothing to allocate
        self.size, self.path, self.fd, self._tmp_path, self._map = size, path, -1, None, None


def _node_group() -> tuple[Any, int, int]:
    """``(group, first global rank, size)`` of this rank's node; ``group`` None means every rank."""
    world = get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local >= world:
        return None, 0, world
    if local < 1 or world % local:
        raise S3CheckpointError(f"LOCAL_WORLD_SIZE={local} does not divide the world size {world}")
    rank = get_rank()
    key = (id(dist.group.WORLD), world, local)
    if key not in _node_groups:
        # Collective on every rank, and each new group holds sockets (gloo) or a communicator (nccl): once.
        _node_groups[key], _ = dist.new_subgroups(group_size=local)  # type: ignore[no-untyped-call]
    if int(os.environ.get("LOCAL_RANK", rank % local)) != rank % local:
        log.warning("LOCAL_RANK does not match rank %% LOCAL_WORLD_SIZE: nodes are taken as consecutive ranks")
    return _node_groups[key], rank - rank % local, local


def _can_open(shared: _Shared) -> bool:
    try:
        fd = os.open(shared.path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return os.fstat(fd).st_size == shared.size
    finally:
        os.close(fd)


def _all(flag: bool, group: Any, size: int) -> bool:
    flags: list[Any] = [None] * size
    dist.all_gather_object(flags, flag, group=group)
    return all(flags)


def _copy_to_file(buf: LoadBuffer) -> str:
    """Copy the downloaded bytes into a new file in ``/dev/shm`` (or the temporary directory if that has no
    room) readable by this user's other processes."""
    for directory in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(directory) and shutil.disk_usage(directory).free >= buf.size + _SPARE_BYTES:
            break
    else:
        raise S3CheckpointError(
            f"load_shared: no room for a {buf.size:,}-byte checkpoint in /dev/shm or {tempfile.gettempdir()}"
        )
    path = os.path.join(directory, f"s3ckpt-shared-{os.getpid()}-{uuid.uuid4().hex[:8]}.ckpt")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(buf.view)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return path


def load_shared(
    url: str,
    *,
    map_location: Any = None,
    weights_only: bool | None = True,
    transport: S3Transport | None = None,
    verify: bool | str = True,
) -> Any:
    """:func:`s3ckpt.load` on every rank, with one download and one host copy per node.

    Collective: every rank of the default process group calls it with the same ``url``. Without a process
    group (or one rank per node) it is :func:`s3ckpt.load`.

    Args:
        url: ``s3://bucket/key`` of the checkpoint every rank loads.
        map_location, weights_only, verify: as :func:`s3ckpt.load` (the CRC32C is checked once per node,
            before any rank unpickles).
        transport: used by each node's first rank; default: built from the environment.

    Returns:
        The loaded object; its CPU tensors share one copy of the bytes per node.

    Raises:
        CheckpointNotFoundError, CheckpointCorruptedError, S3CheckpointError: a failure of the downloading
            rank, raised on every rank of its node with the same type and message.
        UnsafeCheckpointError: ``weights_only=True`` refused the pickle (on every rank).
    """
    if not is_initialized() or get_world_size() == 1:
        return ck.load(url, map_location, weights_only, transport=transport, verify=verify)
    group, leader, size = _node_group()
    if size == 1:
        return ck.load(url, map_location, weights_only, transport=transport, verify=verify)
    is_leader = get_rank() == leader
    buf: LoadBuffer | None = None
    copied: str | None = None
    try:
        sent: _Outcome[_Shared] | None = None
        if is_leader:

            def download() -> _Shared:
                nonlocal buf
                buf, _, _ = ck._download_verified(ck.resolve_transport(transport), url, verify=verify, progress=None)
                return _Shared(f"/proc/{os.getpid()}/fd/{buf.fd}", buf.size)

            sent = _capture(download)
        outcome = broadcast_object(sent, src=leader, group=group)
        assert outcome is not None
        shared = outcome.unwrap()
        if not _all(is_leader or _can_open(shared), group, size):
            # Some rank may not open another process's fd (a hardened /proc): share a plain file instead.
            sent = None
            if is_leader:

                def copy() -> _Shared:
                    nonlocal copied
                    assert buf is not None
                    copied = _copy_to_file(buf)
                    return _Shared(copied, buf.size)

                sent = _capture(copy)
            outcome = broadcast_object(sent, src=leader, group=group)
            assert outcome is not None
            shared = outcome.unwrap()
        if is_leader:
            assert buf is not None
            target: LoadBuffer = buf
        elif _can_open(shared):
            target = _MappedFile(shared.path, shared.size)
        else:
            log.warning("load_shared: rank %d cannot open %s; downloading %s itself", get_rank(), shared.path, url)
            target = ck._download_verified(ck.resolve_transport(transport), url, verify=verify, progress=None)[0]
        loaded = _capture(
            lambda: load_from_buffer(target, url=url, map_location=map_location, weights_only=weights_only)
        )
        # Every rank has mapped the file before its owner lets go of it.
        barrier(group)
        if target is not buf:
            target.close()
        return loaded.unwrap()
    finally:
        if buf is not None:
            buf.close()
        if copied is not None:
            with contextlib.suppress(OSError):
                os.unlink(copied)

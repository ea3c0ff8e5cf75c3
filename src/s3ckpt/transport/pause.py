"""``writers_paused()``: hold every streaming upload's serializer while latency-critical work runs.

The GIL convoy it avoids: a background ``torch.save`` streaming into a writer holds the GIL almost all the
time (the C++ serializer calls ``write()`` for every chunk); every torch op on the training thread releases
the GIL and then waits up to ``sys.getswitchinterval()`` (5 ms) to get it back, so a snapshot of a few
hundred tensors took 5-10x as long while the previous checkpoint was uploading.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["wait_while_paused", "writers_paused"]

_writers_may_run = threading.Event()
_writers_may_run.set()
_pause_lock = threading.Lock()
_pauses = 0
_MAX_PAUSE_S = 60.0  # a writer never waits longer than this, whatever happens to the pausing thread


@contextlib.contextmanager
def writers_paused() -> Iterator[None]:
    """Hold every :class:`~s3ckpt.transport.upload.MultipartWriter` of this process at its next ``write()``
    while the block runs.

    For short, latency-critical work on another thread (the async snapshot a training step waits for):
    parts already handed to the upload threads keep going (they spend their time in socket writes, without
    the GIL); only the serializer feeding the writer stops. A writer waits at most 60 s.
    """
    global _pauses
    with _pause_lock:
        _pauses += 1
        _writers_may_run.clear()
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0:
                _writers_may_run.set()


def wait_while_paused() -> None:
    """Called by a writer before it takes more bytes: returns at once unless :func:`writers_paused` is on."""
    if not _writers_may_run.is_set():
        _writers_may_run.wait(_MAX_PAUSE_S)

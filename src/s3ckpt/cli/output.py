"""What the CLI prints: human lines and tables on stdout, JSON lines for ``--json``, progress bars on stderr.

Streams are looked up at the time of each write (``sys.stdout``/``sys.stderr``), never captured when the
object is built: tests and embedding programs swap them between calls.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..units import human_size

__all__ = ["PROG", "Output", "StderrHandler", "format_table", "format_time", "human_size"]

PROG = "s3ckpt"

# tqdm's own threshold: a transfer that ends within this many seconds never draws a bar.
_PROGRESS_DELAY_S = 1.0


def format_time(ts: datetime | None) -> str:
    """Local time to the second, or ``-`` when unknown."""
    return ts.astimezone().strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    """Rows aligned in columns; the columns whose index is in ``right`` are right-aligned (numbers)."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class StderrHandler(logging.Handler):
    """Log records as ``s3ckpt: warning: ...`` lines on whatever ``sys.stderr`` is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            print(f"{PROG}: {record.levelname.lower()}: {msg}", file=sys.stderr)
        except Exception:
            self.handleError(record)


@dataclass
class Output:
    """The CLI's printer, configured by the global flags.

    Attributes:
        json: one JSON object per line on stdout instead of human text.
        quiet: print only errors (and JSON records, which are the requested output).
        verbose: ``-v`` count; shows tracebacks on errors.
    """

    json: bool = False
    quiet: bool = False
    verbose: int = 0

    def line(self, text: str = "") -> None:
        """A human line on stdout (suppressed by ``--json`` and ``--quiet``)."""
        if not self.json and not self.quiet:
            print(text, file=sys.stdout)

    def result(self, text: str) -> None:
        """A human line that is the command's answer (``ls`` rows): shown even with ``--quiet``."""
        if not self.json:
            print(text, file=sys.stdout)

    def record(self, obj: dict[str, Any]) -> None:
        """One JSON line (only with ``--json``)."""
        if self.json:
            print(json.dumps(obj, sort_keys=False, default=_json_default), file=sys.stdout)

    def note(self, text: str) -> None:
        """A remark for the user on stderr (plans, summaries of what was skipped)."""
        if not self.quiet:
            print(text, file=sys.stderr)

    def error(self, text: str) -> None:
        """One ``s3ckpt: error: ...`` line on stderr; never suppressed."""
        print(f"{PROG}: error: {text}", file=sys.stderr)

    @property
    def show_progress(self) -> bool:
        return not (self.json or self.quiet) and _is_tty(sys.stderr)

    @contextmanager
    def progress(self, total: int, desc: str) -> Iterator[Callable[[int], None] | None]:
        """A byte-count callback drawing a tqdm bar, or None when bars are off.

        Bars appear only on a terminal, without ``--json``/``--quiet``, and only for transfers that last
        longer than about a second (short ones would just flicker).
        """
        if not self.show_progress or total <= 0:
            yield None
            return
        try:
            from tqdm import tqdm
        except ImportError:  # the `cli` extra is optional: no bar, same transfer
            yield None
            return
        bar = tqdm(
            total=total,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            delay=_PROGRESS_DELAY_S,
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        try:
            # Parts and ranges complete on worker threads; tqdm.update takes its own lock.
            yield bar.update
        finally:
            bar.close()


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)

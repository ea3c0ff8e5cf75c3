"""A fork server: one process per interpreter that has done the heavy imports and forks a fresh child for
every measurement.

Why: importing torch, boto3 and Lightning takes 2-5 s per process here, and a full run makes about 60
measurements. A forked child is still a process of its own: its CPU counters start from zero, its peak RSS is
reset before the operation (see :mod:`benchmarks.methods`), and whatever it allocates dies with it. The
imported modules are shared with the server and counted in the child's RSS baseline, not in its peak above
it. The server holds no threads besides the one torch starts at import, which torch re-creates after a fork
(DataLoader workers rely on the same).

Protocol (text lines): the client writes a spec path; the server answers ``pid <child>`` after forking and
``done <wait status>`` when the child has exited. The client may SIGKILL the child on a timeout.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

__all__ = ["PREIMPORT", "ForkServer", "serve"]

# Imported by the server before any fork; modules missing from an interpreter are skipped.
PREIMPORT = (
    "torch",
    "boto3",
    "boto3.s3.transfer",
    "botocore.config",
    "s3ckpt.lightning",
    "nemo.utils.callbacks.s3_checkpoint_io",
    "lightning.pytorch.plugins.io",
    "fsspec",
    "s3fs",
    "s3torchconnector",
    "benchmarks.raw",
    "benchmarks.workload",
)


def serve(
    run: Callable[[list[str]], int],
    stdin: IO[str] = sys.stdin,
    stdout: IO[str] = sys.stdout,
    preimport: Sequence[str] = PREIMPORT,
) -> int:
    """The server loop: for each spec path read, fork a child that calls ``run([path])`` and exits."""
    for name in preimport:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    stdout.write("ready\n")
    stdout.flush()
    for line in stdin:
        path = line.strip()
        if not path:
            continue
        pid = os.fork()
        if pid == 0:  # the child: a fresh process for one measurement
            code = 1
            try:
                os.dup2(2, 1)  # nothing a library prints may reach the protocol pipe
                code = run([path])
            finally:
                os._exit(code)
        stdout.write(f"pid {pid}\n")
        stdout.flush()
        _, status = os.waitpid(pid, 0)
        stdout.write(f"done {status}\n")
        stdout.flush()
    return 0


class ForkServer:
    """The orchestrator's side: start ``python -m <module> --serve`` and run specs through it (``module``:
    :mod:`benchmarks.methods`, or :mod:`benchmarks.sharded_worker`, whose child forks the ranks)."""

    def __init__(
        self, python: str, cwd: Path, env: dict[str, str], log_path: Path, module: str = "benchmarks.methods"
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [python, "-m", module, "--serve"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self._expect("ready", 300)

    def _readline(self, timeout: float) -> str | None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, timeout))
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server exited ({self.proc.poll()}); see {self.log_path}:\n{self.log_tail()}")
        return line.strip()

    def _expect(self, word: str, timeout: float) -> str:
        line = self._readline(timeout)
        if line is None or not line.startswith(word):
            raise RuntimeError(f"fork server: expected {word!r}, got {line!r}; log:\n{self.log_tail()}")
        return line

    def run(self, spec_path: Path, timeout: float) -> tuple[int | None, bool]:
        """Run one spec; return (the child's wait status, whether it was killed for the timeout)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{spec_path}\n")
        self.proc.stdin.flush()
        pid = int(self._expect("pid", 60).split()[1])
        deadline = time.monotonic() + timeout
        line = self._readline(timeout)
        killed = line is None
        if killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            line = self._readline(max(30.0, deadline - time.monotonic()))
        status = int(line.split()[1]) if line and line.startswith("done") else None
        return status, killed

    def log_tail(self, n: int = 12) -> str:
        self._log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self) -> None:
        """Close its stdin (the loop ends) and wait; kill it if it does not exit."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

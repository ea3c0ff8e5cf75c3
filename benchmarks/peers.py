"""The separate virtual environment for the tools users would pick instead of s3ckpt.

s3fs (through aiobotocore) pins an older botocore than the one s3ckpt pins, so the peers cannot share the
project's venv without breaking ``pip check``. They live in ``benchmarks/.venv-peers``, created on first use:

1. ``python -m venv benchmarks/.venv-peers``
2. ``pip install torch==2.13.0`` first and on its own: the CPU wheel is on this machine's disk, and an
   unpinned torch resolved beside other packages pulls GBs of CUDA wheels.
3. ``pip install torch==2.13.0 lightning==2.4.0 s3fs s3torchconnector==1.5.0`` plus what NeMo's import chain
   needs (torch stays pinned; NeMo 3.0.0 refuses Lightning 2.6, so the peers run Lightning 2.4.0).
4. ``pip install --no-deps nemo_toolkit==3.0.0``: NeMo's own ``S3CheckpointIO`` without its hundreds of
   optional dependencies (CUDA bindings, aistore, tensorboard, ...), which the S3 plugin never touches.

A stamp file records the requirement list; a venv whose stamp matches is reused as it is. If anything fails
(no network in CI, a wheel missing for this platform), :func:`ensure_peers` returns the reason instead of an
interpreter, and the benchmark writes that reason where the peers' numbers would have been.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PEERS_DIR", "PeerEnv", "ensure_peers", "peer_requirements", "peers_doc"]

PEERS_DIR = Path(__file__).resolve().parent / ".venv-peers"
_STAMP = ".bench-peers.json"
TORCH_PIN = "torch==2.13.0"
S3TORCHCONNECTOR_PIN = "s3torchconnector==1.5.0"
# Lightning 2.4.0 (NeMo's) needs fsspec < 2026, so s3fs 2025.12.0 (which pins fsspec 2025.12.0); it needs
# aiobotocore < 3, which pins a narrow botocore range that boto3 (NeMo's client) must match. Without these
# pins pip backtracks through dozens of boto3 / aiobotocore / fsspec / huggingface_hub releases for many
# minutes before it finds (or fails to find) a solution.
S3FS_PINS = ["s3fs==2025.12.0", "aiobotocore==2.26.0", "boto3>=1.41.0,<1.41.6", "fsspec[http]==2025.12.0"]
NEMO_PIN = "nemo_toolkit==3.0.0"
# NeMo 3.0.0 checks Lightning's version on import and refuses 2.6; 2.4.0 is what it was released against.
NEMO_LIGHTNING_PIN = "lightning==2.4.0"
# What `import nemo.utils.callbacks.s3_checkpoint_io` pulls in (found by importing it in a --no-deps install).
NEMO_IMPORT_CHAIN = [
    "tenacity",
    "hydra-core",
    "antlr4-python3-runtime==4.9.3",
    "wrapt",
    "huggingface_hub",
    "onnx",
    "protobuf",
    "ml_dtypes",
    "nv_one_logger_core",
    "nv_one_logger_training_telemetry",
    "nv_one_logger_pytorch_lightning_integration",
    "pydantic",
    "overrides",
    "toml",
    "strenum",
    "einops",
    "transformers",
    "sentencepiece",
    "pandas",
]
_INSTALL_TIMEOUT_S = 1800


def peer_requirements() -> list[str]:
    """What the peers' venv gets, in the second ``pip install`` (torch pinned again so it cannot move)."""
    return [TORCH_PIN, NEMO_LIGHTNING_PIN, *S3FS_PINS, S3TORCHCONNECTOR_PIN, *NEMO_IMPORT_CHAIN]


def peer_no_deps() -> list[str]:
    """Installed last with ``--no-deps``."""
    return [NEMO_PIN]


@dataclass
class PeerEnv:
    """The outcome of :func:`ensure_peers`.

    Attributes:
        python: the peers' interpreter, or None if the venv could not be made.
        error: why not (the tail of pip's output), when ``python`` is None.
        versions: installed versions of the packages that matter (``pip freeze`` subset).
        install_s: seconds spent installing in this run (0 when reused).
    """

    python: str | None
    error: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    install_s: float = 0.0


def peers_doc(peers: PeerEnv | None) -> dict[str, Any] | None:
    """The results document's ``peers``: the outcome and what was (to be) installed; None when not requested."""
    if peers is None:
        return None
    return {**peers.__dict__, "requirements": peer_requirements(), "no_deps": peer_no_deps()}


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=_INSTALL_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"`{' '.join(cmd[2:6])} ...` exited {proc.returncode}:\n" + "\n".join(tail))


def _freeze(python: str) -> dict[str, str]:
    wanted = {"torch", "lightning", "s3fs", "aiobotocore", "botocore", "fsspec", "s3torchconnector"}
    wanted |= {"s3torchconnectorclient", "awscrt", "nemo_toolkit", "nemo-toolkit", "boto3"}
    out = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True, check=False).stdout
    versions = {}
    for line in out.splitlines():
        name, sep, ver = line.partition("==")
        if sep and name.lower() in wanted:
            versions[name.lower()] = ver
    return versions


def ensure_peers(install: bool = True, venv_dir: Path = PEERS_DIR, quiet: bool = False) -> PeerEnv:
    """Return the peers' interpreter, creating the venv first if needed and allowed.

    Args:
        install: create or repair the venv when it is missing or stale; False only reuses one.
        venv_dir: where the venv lives.
        quiet: print nothing about progress.
    """
    python = venv_dir / "bin" / "python"
    stamp = venv_dir / _STAMP
    reqs = peer_requirements() + peer_no_deps()
    if python.exists() and stamp.exists():
        try:
            if json.loads(stamp.read_text()).get("requirements") == reqs:
                return PeerEnv(str(python), versions=json.loads(stamp.read_text()).get("versions", {}))
        except (OSError, ValueError):
            pass
    if not install:
        return PeerEnv(None, error=f"peers venv {venv_dir} missing or stale, and installation was turned off")
    log = venv_dir / "install.log"
    t0 = time.monotonic()
    if not quiet:
        print(f"[peers] creating {venv_dir} ({', '.join(reqs)}); log: {log}", file=sys.stderr, flush=True)
    try:
        if not python.exists():
            shutil.rmtree(venv_dir, ignore_errors=True)
            venv_dir.mkdir(parents=True)
            log.write_text("")
            _run([sys.executable, "-m", "venv", str(venv_dir)], log)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
        _run([*pip, TORCH_PIN], log)
        _run([*pip, *peer_requirements()], log)
        _run([*pip, "--no-deps", *peer_no_deps()], log)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return PeerEnv(None, error=f"could not create the peers venv: {exc}", install_s=time.monotonic() - t0)
    versions = _freeze(str(python))
    stamp.write_text(json.dumps({"requirements": reqs, "versions": versions}, indent=1))
    elapsed = time.monotonic() - t0
    if not quiet:
        print(f"[peers] ready in {elapsed:.0f} s: {versions}", file=sys.stderr, flush=True)
    return PeerEnv(str(python), versions=versions, install_s=elapsed)


if __name__ == "__main__":
    env = ensure_peers()
    print(json.dumps(env.__dict__, indent=1))
    sys.exit(0 if env.python else 1)

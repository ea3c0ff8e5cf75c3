"""`s3ckpt demo` end to end (a short run): it trains, is SIGKILLed, resumes, checks, and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_short_run_passes() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # the demo starts its own server
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "s3ckpt.cli",
            "demo",
            "--resume-steps",
            "30",
            "--every",
            "10",
            "--kill-after",
            "2",
            "--width",
            "128",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "killed the training process" in out.stdout
    assert "rank 0 resolved the resume checkpoint" in out.stdout
    assert "OK: the resumed weights, optimizer state, step and epoch equal the last committed checkpoint." in out.stdout
    assert "deleted by top-k" in out.stdout

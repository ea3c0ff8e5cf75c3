"""`s3ckpt server` in the foreground: it prints the environment to export, serves S3 with it, and stops
cleanly on SIGTERM (no weed process left)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

import s3ckpt
from s3ckpt.config import ClientConfig
from s3ckpt.transport import S3Transport

pytestmark = pytest.mark.integration


def test_server_command_prints_env_serves_and_stops() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "s3ckpt.cli", "server", "--bucket", "cli-served"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    exported: dict[str, str] = {}
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "AWS_SECRET_ACCESS_KEY" not in exported:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("export "):
                key, _, value = line[len("export ") :].strip().partition("=")
                exported[key] = shlex.split(value)[0] if value else ""
        assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(exported), exported
        weed = [c for c in psutil.Process(proc.pid).children(recursive=True) if "weed" in c.name()]
        assert weed, "the server command should run weed"
        t = S3Transport.create(
            client=ClientConfig(
                endpoint_url=exported["AWS_ENDPOINT_URL"],
                access_key_id=exported["AWS_ACCESS_KEY_ID"],
                secret_access_key=exported["AWS_SECRET_ACCESS_KEY"],
            )
        )
        s3ckpt.save({"w": torch.ones(3)}, "s3://cli-served/x.pt", transport=t)
        assert torch.equal(s3ckpt.load("s3://cli-served/x.pt", transport=t)["w"], torch.ones(3))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        _gone, alive = psutil.wait_procs(weed, timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "weed outlived the server command"
    finally:
        if proc.poll() is None:
            proc.kill()

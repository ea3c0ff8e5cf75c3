"""A process SIGKILLed in the middle of a save (the way a node dies) leaves the previous checkpoint of
that name loadable and verified, and no partial checkpoint visible anywhere."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import s3ckpt
from s3ckpt.catalog import list_checkpoints
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport, ops

pytestmark = pytest.mark.integration

WRITER = textwrap.dedent(
    """
    import json, sys, torch, s3ckpt
    from s3ckpt.config import ClientConfig, TransferConfig
    from s3ckpt.transport import S3Transport
    cfg = json.loads(sys.argv[1])
    t = S3Transport.create(
        client=ClientConfig(endpoint_url=cfg["endpoint"], access_key_id=cfg["ak"], secret_access_key=cfg["sk"]),
        transfer=TransferConfig(chunk_size_MB=5, max_write_concurrency=2),
    )
    state = {f"w{i}": torch.full((1024, 1024), float(i)) for i in range(96)}  # 384 MiB: many parts
    print("saving", flush=True)
    for url in cfg["urls"]:
        s3ckpt.save(state, url, transport=t)
    print("done", flush=True)
    """
)


def test_sigkill_mid_save_keeps_previous_checkpoint(
    s3_server: LocalS3Server, transport: S3Transport, bucket: str
) -> None:
    good = {"w": torch.arange(100.0), "global_step": 7}
    last_url = f"s3://{bucket}/run/last.ckpt"
    s3ckpt.save(good, last_url, transport=transport)

    cfg = {
        "endpoint": s3_server.endpoint_url,
        "ak": s3_server.access_key,
        "sk": s3_server.secret_key,
        "urls": [last_url, f"s3://{bucket}/run/epoch=1-step=8.ckpt"],
    }
    proc = subprocess.Popen([sys.executable, "-c", WRITER, json.dumps(cfg)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "saving"
        deadline = time.monotonic() + 60
        # Kill once the overwrite of last.ckpt is under way: parts are on the server, Complete is not.
        while time.monotonic() < deadline and not ops.list_uploads(transport, bucket, "run/last.ckpt"):
            time.sleep(0.05)
        assert ops.list_uploads(transport, bucket, "run/last.ckpt"), "the writer never started its upload"
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    loaded = s3ckpt.load(last_url, transport=transport, verify="require")
    assert torch.equal(loaded["w"], good["w"]) and loaded["global_step"] == 7
    entries = list_checkpoints(transport, f"s3://{bucket}/run")
    assert [e.name for e in entries] == ["last.ckpt"], "no partial checkpoint may be visible"
    assert all(e.committed for e in entries)
    # The dead writer's upload is left for `s3ckpt gc`; it is invisible and does not affect loads.
    stale = ops.list_uploads(transport, bucket, "run/")
    assert stale and all(u.key == "run/last.ckpt" for u in stale)
    for u in stale:
        ops.abort_upload(transport, bucket, u.key, u.upload_id)

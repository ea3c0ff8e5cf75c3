"""Peak memory of a save and of a load, each in a fresh process against the real server.

Bounds (issue "S3CheckpointIO"): a save holds at most (max_write_concurrency + 2) x chunk + 150 MiB above
the state dict; a load at most 1.25 x the checkpoint size + 150 MiB, tensors included.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from s3ckpt.server import LocalS3Server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024

SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    import psutil, torch
    import s3ckpt
    from s3ckpt.config import ClientConfig, TransferConfig
    from s3ckpt.transport import S3Transport
    cfg = json.loads(sys.argv[1])
    t = S3Transport.create(
        client=ClientConfig(endpoint_url=cfg["endpoint"], access_key_id=cfg["ak"], secret_access_key=cfg["sk"]),
        transfer=TransferConfig(chunk_size_MB=cfg["chunk_mb"], max_write_concurrency=cfg["conc"],
                                max_read_concurrency=cfg["conc"]),
    )
    url = cfg["url"]
    s3ckpt.save({"warm": torch.zeros(1)}, url + ".warm", transport=t)  # import + connect before the baseline
    s3ckpt.load(url + ".warm", transport=t)
    proc = psutil.Process()
    peak = 0
    stop = False
    def sample():
        global peak
        while not stop:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.002)
    if cfg["op"] == "save":
        n = cfg["size_mb"] // 64
        state = {f"w{i}": torch.randn(16, 1024, 1024) for i in range(n)}  # 64 MiB each
        base = proc.memory_info().rss
        th = threading.Thread(target=sample, daemon=True); th.start()
        stats = s3ckpt.save(state, url, transport=t)
        size = stats.bytes
    else:
        base = proc.memory_info().rss
        th = threading.Thread(target=sample, daemon=True); th.start()
        out = s3ckpt.load(url, transport=t)
        total = sum(float(v.sum()) for v in out.values())  # touch every page of every tensor
        size = sum(v.numel() * v.element_size() for v in out.values())
    stop = True; th.join()
    print(json.dumps({"base": base, "peak": max(peak, proc.memory_info().rss), "size": size}))
    """
)


def _run(server: LocalS3Server, **cfg: object) -> dict[str, int]:
    cfg.update(endpoint=server.endpoint_url, ak=server.access_key, sk=server.secret_key)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(cfg)], capture_output=True, text=True, timeout=400, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_save_and_load_peak_memory(s3_server: LocalS3Server, bucket: str) -> None:
    chunk_mb, conc = 16, 4
    url = f"s3://{bucket}/mem/2gib.ckpt"
    save = _run(s3_server, op="save", url=url, size_mb=2048, chunk_mb=chunk_mb, conc=conc)
    assert save["size"] >= 2048 * MiB
    save_growth = save["peak"] - save["base"]
    save_bound = (conc + 2) * chunk_mb * MiB + 150 * MiB
    assert save_growth <= save_bound, f"save grew {save_growth / MiB:.0f} MiB > bound {save_bound / MiB:.0f} MiB"

    load = _run(s3_server, op="load", url=url, chunk_mb=chunk_mb, conc=conc)
    load_growth = load["peak"] - load["base"]
    load_bound = 1.25 * save["size"] + 150 * MiB
    assert load["size"] == 2048 * MiB
    assert load_growth <= load_bound, f"load grew {load_growth / MiB:.0f} MiB > bound {load_bound / MiB:.0f} MiB"
    # And the load really materialised the tensors (the bound is not met by loading nothing).
    assert load_growth >= 0.9 * 2048 * MiB

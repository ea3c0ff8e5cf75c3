"""Resume at scale with real gloo ranks: only global rank 0 talks to S3 to find the checkpoint, and a checkpoint
loaded by every rank of a node is downloaded once per node.

Requests are counted on the wire: a botocore ``before-send.s3`` handler on each rank's client runs once per
HTTP request actually sent (retries included), so the counts are real requests, not API calls.

Ranks are subprocesses (``python -m tests.distributed.test_resume_broadcast <cfg> <rank>``) rendezvousing
through a FileStore (no port to pick). Each runs every scenario once and prints its results; the tests assert
on them. Every collective has a 30 s timeout and every launch a deadline, so a hang fails instead of blocking.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

import s3ckpt
from s3ckpt.config import ClientConfig, RetryConfig, TransferConfig
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport

ROOT = Path(__file__).resolve().parents[2]
RESULT_TAG = "RESUME-RESULT "
SHARED_ELEMENTS = 3_000_000  # 12 MB of fp32: three 5 MiB ranged GETs

pytestmark = [pytest.mark.distributed, pytest.mark.integration]


# -- shared by the test process and the rank processes --------------------------------------------------------


class WireCounter:
    """Counts the S3 requests a botocore client sends, by operation, from the moment it is attached."""

    def __init__(self, t: S3Transport) -> None:
        self._lock = threading.Lock()
        self.ops: Counter[str] = Counter()
        t.clients.get().meta.events.register("before-send.s3", self)

    def __call__(self, event_name: str, **kwargs: Any) -> None:
        with self._lock:  # ranged GETs are sent from several threads
            self.ops[event_name.rsplit(".", 1)[-1]] += 1
        # Returning None lets botocore send the request (a value would be taken as the response).

    def take(self) -> dict[str, int]:
        with self._lock:
            out = dict(self.ops)
            self.ops.clear()
        return out


def make_transport(cfg: dict[str, Any], *, secret: str | None = None) -> S3Transport:
    return S3Transport.create(
        client=ClientConfig(
            endpoint_url=cfg["endpoint"], access_key_id=cfg["ak"], secret_access_key=secret or cfg["sk"]
        ),
        retry=RetryConfig(max_attempts=3, base_delay_s=0.05, max_delay_s=0.5, deadline_s=30),
        transfer=TransferConfig(chunk_size_MB=5, max_write_concurrency=2, max_read_concurrency=4, read_chunk_size_MB=5),
    )


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def run_ranks(
    module: str,
    cfg: dict[str, Any],
    world_size: int,
    workdir: Path,
    *,
    timeout_s: float,
    rank_env: Callable[[int], dict[str, str]] | None = None,
    result_tag: str = RESULT_TAG,
    expected_returncode: int | list[int] = 0,
) -> list[Any]:
    """Run ``python -m <module> <cfg> <rank>`` for each rank; return what each printed after ``result_tag``.

    Every rank must exit with ``expected_returncode`` (a signal, e.g. SIGABRT at exit, fails the test).

    Kills the ranks (each by its own pid) and fails with their output tails if they are not done in time.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(OMP_NUM_THREADS="1", TORCH_CPP_LOG_LEVEL="ERROR", PYTHONWARNINGS="ignore", GLOO_SOCKET_IFNAME="lo")
    logs = [workdir / f"rank{r}.log" for r in range(world_size)]
    procs = []
    for r in range(world_size):
        with open(logs[r], "wb") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", module, json.dumps(cfg), str(r)],
                    cwd=ROOT,
                    env={**env, **(rank_env(r) if rank_env else {})},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + timeout_s

    def tails() -> str:
        return "\n".join(f"--- rank {r} ---\n" + logs[r].read_text()[-4000:] for r in range(world_size))

    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"ranks did not finish in {timeout_s} s (a hang?)\n{tails()}") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    expected = expected_returncode if isinstance(expected_returncode, list) else [expected_returncode] * world_size
    if [p.returncode for p in procs] != expected:
        raise AssertionError(f"rank(s) failed: {[p.returncode for p in procs]}, expected {expected}\n{tails()}")
    results = []
    for log in logs:
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith(result_tag)]
        # A rank killed on purpose (a negative expected status) prints no result.
        results.append(json.loads(lines[-1][len(result_tag) :]) if lines else None)
    return results


# -- rank process ------------------------------------------------------------------------------------------------


def _failure(fn: Callable[[], Any]) -> dict[str, str]:
    try:
        fn()
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": "", "message": "no error"}


def _rank_main(cfg_json: str, rank_arg: str) -> None:  # pragma: no cover - runs in the rank processes
    import torch.distributed as dist

    from s3ckpt import distributed_load
    from s3ckpt.distributed import resolve_resume_path

    cfg, rank = json.loads(cfg_json), int(rank_arg)
    ws = cfg["world_size"]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{cfg['store']}", rank=rank, world_size=ws, timeout=timedelta(seconds=30)
    )
    out: dict[str, Any] = {}

    t = make_transport(cfg)
    wire = WireCounter(t)
    path = resolve_resume_path(cfg["run"], transport=t)
    out["resolve"] = {"path": path, "ops": wire.take()}

    out["missing_bucket"] = _failure(lambda: resolve_resume_path("s3://no-such-bucket-resume/run", transport=t))
    out["missing_bucket_ops"] = wire.take()
    # Wrong credentials on rank 0 only: the other ranks would have been fine, and must fail the same way.
    bad = make_transport(cfg, secret="wrong-secret") if rank == 0 else t
    out["access_denied"] = _failure(lambda: resolve_resume_path(cfg["run"], transport=bad))

    def load(tag: str) -> None:
        start = time.perf_counter()
        state = distributed_load.load_shared(cfg["shared"], transport=t)
        out[tag] = {"ops": wire.take(), "digest": digest(state["w"]), "s": round(time.perf_counter() - start, 3)}

    wire.take()
    load("shared_one_node")
    # A /proc this rank may not read: the node shares a plain file in /dev/shm instead of the memfd.
    can_open = distributed_load._can_open
    distributed_load._can_open = lambda shared: not shared.path.startswith("/proc/") and can_open(shared)
    load("shared_file")
    distributed_load._can_open = can_open
    if ws == 4:
        os.environ.update(LOCAL_WORLD_SIZE="2", LOCAL_RANK=str(rank % 2))
        load("shared_two_nodes")
    out["missing_shared"] = _failure(lambda: distributed_load.load_shared(cfg["shared"] + ".gone", transport=t))
    dist.barrier()
    dist.destroy_process_group()
    print(RESULT_TAG + json.dumps(out), flush=True)


# -- test process --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(s3_server: LocalS3Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    bucket = f"resume-{uuid.uuid4().hex[:10]}"
    s3_server.create_bucket(bucket)
    cfg: dict[str, Any] = {
        "endpoint": s3_server.endpoint_url,
        "ak": s3_server.access_key,
        "sk": s3_server.secret_key,
        "run": f"s3://{bucket}/run",
        "shared": f"s3://{bucket}/shared/model.pt",
    }
    t = make_transport(cfg)
    for name in ("x-step=10-last.ckpt", "x-step=20-last.ckpt", "epoch=0-step=20.ckpt"):
        s3ckpt.save({"w": torch.ones(4)}, f"{cfg['run']}/{name}", transport=t)
    weights = torch.randn(SHARED_ELEMENTS, generator=torch.Generator().manual_seed(7))
    s3ckpt.save({"w": weights}, cfg["shared"], transport=t)
    wire = WireCounter(t)
    s3ckpt.load(cfg["shared"], transport=t)
    return {"cfg": cfg, "digest": digest(weights), "one_download": wire.take(), "runs": {}, "tmp": tmp_path_factory}


def results(setup: dict[str, Any], world_size: int) -> list[dict[str, Any]]:
    runs = setup["runs"]
    if world_size not in runs:
        workdir = setup["tmp"].mktemp(f"ranks{world_size}")
        cfg = {**setup["cfg"], "world_size": world_size, "store": str(workdir / f"store-{uuid.uuid4().hex}")}
        start = time.monotonic()
        runs[world_size] = run_ranks("tests.distributed.test_resume_broadcast", cfg, world_size, workdir, timeout_s=120)
        print(f"{world_size} ranks: {time.monotonic() - start:.1f} s")
    return runs[world_size]  # type: ignore[no-any-return]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_only_rank0_lists(setup: dict[str, Any], world_size: int) -> None:
    per_rank = results(setup, world_size)
    run = setup["cfg"]["run"]
    assert [r["resolve"]["path"] for r in per_rank] == [f"{run}/x-step=20-last.ckpt"] * world_size
    assert per_rank[0]["resolve"]["ops"] == {"ListObjectsV2": 1, "HeadObject": 1}
    for r in per_rank[1:]:
        assert r["resolve"]["ops"] == {}, "non-zero ranks send no request to find the checkpoint"
        assert r["missing_bucket_ops"] == {}


@pytest.mark.timeout(180)
def test_rank0_requests_do_not_grow_with_world_size(setup: dict[str, Any]) -> None:
    counts = {n: results(setup, n)[0]["resolve"]["ops"] for n in (1, 2, 4)}
    assert counts[1] == counts[2] == counts[4], counts


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 4])
def test_rank0_failure_raises_the_same_error_everywhere(setup: dict[str, Any], world_size: int) -> None:
    per_rank = results(setup, world_size)
    for scenario, expected_type, text in (
        ("missing_bucket", "S3NotFoundError", "no-such-bucket-resume"),
        ("access_denied", "S3AccessDeniedError", ""),
        ("missing_shared", "CheckpointNotFoundError", "model.pt.gone"),
    ):
        errors = [r[scenario] for r in per_rank]
        assert errors[0]["type"] == expected_type, errors[0]
        assert text in errors[0]["message"]
        assert errors == [errors[0]] * world_size, f"{scenario}: every rank raises rank 0's error"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 4])
def test_load_shared_downloads_once_per_node(setup: dict[str, Any], world_size: int) -> None:
    per_rank = results(setup, world_size)
    one = setup["one_download"]
    assert one["GetObject"] == 3 and one["HeadObject"] == 1, one
    cases = [("shared_one_node", [0]), ("shared_file", [0])]
    if world_size == 4:
        cases.append(("shared_two_nodes", [0, 2]))
    for tag, leaders in cases:
        for rank, r in enumerate(per_rank):
            assert r[tag]["digest"] == setup["digest"], f"{tag}: rank {rank} loaded other bytes"
            assert r[tag]["ops"] == (one if rank in leaders else {}), f"{tag}: rank {rank} sent {r[tag]['ops']}"
        total = sum(r[tag]["ops"].get("GetObject", 0) for r in per_rank)
        assert total == one["GetObject"] * len(leaders), f"{tag}: {total} GETs across {world_size} ranks"


if __name__ == "__main__":  # pragma: no cover
    _rank_main(sys.argv[1], sys.argv[2])

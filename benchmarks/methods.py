"""One measurement in a fresh process: ``python -m benchmarks.methods SPEC.json``.

The orchestrator (:mod:`benchmarks.run`) runs every measurement in a process of its own, with the project's
interpreter or the peers' one (:mod:`benchmarks.peers`), so peak RSS and CPU are the method's own: either a
child forked from a fork server that has done the imports (:mod:`benchmarks.forkserver`, the default: it
saves 2-5 s of imports per measurement) or, with ``--spawn``, a new interpreter. Each measurement writes
a JSON result to ``spec["out"]``: ``wall_s``, ``cpu_s``, ``peak_rss_bytes``, ``server_cpu_s``,
``bytes`` and, for async saves, ``stall_s``; or ``error``.

How each figure is taken:

* ``wall_s``: ``time.perf_counter()`` around the operation alone. Imports, building the state dict and
  constructing the method's client are outside it (a training job builds its client once, not per
  checkpoint); for the boto3-based methods the client also makes one HeadBucket first, so it has its
  credentials resolved and a connection open, as it would from a previous checkpoint.
* ``cpu_s``: user+system CPU of this process, all threads, from ``getrusage(RUSAGE_SELF)`` deltas.
* ``peak_rss_bytes``: the kernel's peak resident set (``VmHWM``) is reset (``/proc/self/clear_refs`` = 5)
  just before the operation, read after it, and the resident set just before it is subtracted. On save that
  baseline holds the state dict, so the figure is what the save needs on top of it; on load it holds only the
  interpreter and imports, so the figure includes the loaded tensors themselves (+1x the state).
* ``server_cpu_s``: the weed process's user+system CPU over the operation (``/proc/<pid>/stat``).

Only the standard library, torch and the method's own client are imported, so the module runs in either venv.
"""

from __future__ import annotations

import io
import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from benchmarks.workload import build_state, tensor_bytes

MiB = 1024 * 1024
_CLK = os.sysconf("SC_CLK_TCK")

Spec = dict[str, Any]


# -- the methods -------------------------------------------------------------------------------------------


def _url(spec: Spec) -> str:
    return f"s3://{spec['bucket']}/{spec['key']}"


_KNOBS = ("chunk_size_MB", "max_read_concurrency", "max_write_concurrency")


def _s3ckpt_io(spec: Spec, async_checkpointing: bool = False) -> Any:
    """``S3CheckpointIO(dirpath)`` with only the knobs the settings name: none means s3ckpt's defaults."""
    import dataclasses

    from s3ckpt.lightning import S3CheckpointIO

    s = spec["settings"]
    kwargs: dict[str, Any] = {k: s[k] for k in _KNOBS if k in s}
    if "max_pending_saves" in s:
        kwargs["max_pending_saves"] = s["max_pending_saves"]
    ckio = S3CheckpointIO(f"s3://{spec['bucket']}/bench", async_checkpointing=async_checkpointing, **kwargs)
    if "read_chunk_size_MB" in s:  # not a NeMo knob: the sweep sets it on the transport
        transfer = dataclasses.replace(ckio.transport.transfer, read_chunk_size_MB=s["read_chunk_size_MB"])
        ckio.transport = ckio.transport.with_transfer(transfer)
    ckio.transport.clients.get().head_bucket(Bucket=spec["bucket"])
    return ckio


def _nemo_io(spec: Spec) -> Any:
    """NeMo 3.0.0's own ``S3CheckpointIO`` at its defaults, with the 1-rank gloo group its log lines need."""
    import socket

    import torch.distributed as dist
    from nemo.utils.callbacks.s3_checkpoint_io import S3CheckpointIO as NeMoS3CheckpointIO

    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return NeMoS3CheckpointIO(f"s3://{spec['bucket']}/bench")


def _boto3_client(spec: Spec, raw: bool = False) -> Any:
    import boto3
    from botocore.config import Config

    extra: dict[str, Any] = {}
    s3: dict[str, Any] = {"addressing_style": "path"}
    if raw:  # the fewest CPU cycles per byte botocore can spend: no payload SHA-256, no checksums
        s3["payload_signing_enabled"] = False
        extra = {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}
    config = Config(s3=s3, max_pool_connections=32, **extra)
    session = boto3.session.Session()
    client = session.client("s3", endpoint_url=spec["endpoint"], region_name=spec["region"], config=config)
    client.head_bucket(Bucket=spec["bucket"])
    return client


def _s3tc(spec: Spec) -> Any:
    from s3torchconnector import S3Checkpoint, S3ClientConfig

    part = spec["settings"].get("part_size_MB", 8) * MiB
    cfg = S3ClientConfig(force_path_style=True, part_size=part)
    return S3Checkpoint(spec["region"], endpoint=spec["endpoint"], s3client_config=cfg)


def _configure_fsspec(spec: Spec) -> None:
    import fsspec.config

    fsspec.config.conf["s3"] = {
        "key": os.environ["AWS_ACCESS_KEY_ID"],
        "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": spec["endpoint"], "region_name": spec["region"]},
        "config_kwargs": {"s3": {"addressing_style": "path"}},
    }


def _prepare(spec: Spec) -> Callable[..., Any]:
    """Import and construct the method's client outside the timed region; return the operation."""
    import torch

    method, op, s = spec["method"], spec["op"], spec["settings"]
    url = _url(spec)
    if method in ("s3ckpt", "s3ckpt-nemo-knobs"):
        ckio = _s3ckpt_io(spec)
        if op == "save":
            return lambda state: ckio.save_checkpoint(state, url)
        return lambda: ckio.load_checkpoint(url)
    if method == "s3ckpt-async":
        return _async_run(spec)
    if method == "nemo":
        nemo = _nemo_io(spec)
        # Its client is a fresh boto3 resource per call (by design, for expiring tokens): nothing to warm.
        if op == "save":
            return lambda state: nemo.save_checkpoint(state, url)
        return lambda: nemo.load_checkpoint(url)
    if method == "nemo-ref":
        from boto3.s3.transfer import TransferConfig

        client = _boto3_client(spec)
        chunk = s.get("chunk_size_MB", 64) * MiB
        if op == "save":
            tc = TransferConfig(multipart_chunksize=chunk, max_concurrency=s.get("max_write_concurrency", 10))

            def nemo_save(state: Any) -> None:
                buf = io.BytesIO()
                torch.save(state, buf)
                buf.seek(0)
                client.upload_fileobj(buf, spec["bucket"], spec["key"], Config=tc)

            return nemo_save
        tc = TransferConfig(multipart_chunksize=chunk, max_concurrency=s.get("max_read_concurrency", 15))

        def nemo_load() -> Any:
            buf = io.BytesIO()
            client.download_fileobj(spec["bucket"], spec["key"], buf, Config=tc)
            buf.seek(0)
            return torch.load(buf, map_location="cpu", weights_only=True)

        return nemo_load
    if method == "lightning-s3fs":
        _configure_fsspec(spec)
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        tio = TorchCheckpointIO()
        if op == "save":
            return lambda state: tio.save_checkpoint(state, url)
        return lambda: tio.load_checkpoint(url)  # its default map_location keeps storages where saved (CPU)
    if method == "s3torchconnector":
        ck = _s3tc(spec)
        if op == "save":

            def s3tc_save(state: Any) -> None:
                with ck.writer(url) as writer:
                    torch.save(state, writer)

            return s3tc_save

        def s3tc_load() -> Any:
            with ck.reader(url) as reader:
                return torch.load(reader, map_location="cpu", weights_only=True)

        return s3tc_load
    if method == "torch-tmpfs":
        path = os.path.join(spec["tmpfs_dir"], spec["key"].replace("/", "_") + ".pt")
        if op == "save":
            return lambda state: torch.save(state, path)
        return lambda: torch.load(path, map_location="cpu", weights_only=True)
    if method == "raw":
        from benchmarks import raw

        client = _boto3_client(spec, raw=True)
        if op == "save":
            return lambda _state: raw.multipart_put(client, spec, spec["expect_bytes"])
        return lambda: raw.ranged_get(client, spec)
    raise ValueError(f"unknown method {method!r}")


def _async_run(spec: Spec) -> Callable[..., Any]:
    """``saves`` consecutive async saves, a simulated training interval apart; the stall of each.

    The interval is ``interval_factor`` x one synchronous save of the same state, measured first (outside
    the timed part), so uploads keep up on average: the steady state in which a save should stall for its
    snapshot only. The snapshot time alone is also measured first, nothing else running: ``snapshot_s``
    (``clone_to_host`` into fresh memory, what any snapshot costs) and ``snapshot_reused_s`` (into the
    buffers of a finished snapshot, what the plugin's snapshot pool does in the steady state). The training
    step is a sleep: on a real job the accelerator computes while the host CPU uploads.
    """
    from s3ckpt.serialization import clone_to_host
    from s3ckpt.snapshot import SnapshotPool

    s = spec["settings"]
    saves, factor = int(s.get("saves", 10)), float(s.get("interval_factor", 1.2))
    base = f"s3://{spec['bucket']}/{spec['key']}"
    sync_io = _s3ckpt_io({**spec, "settings": {k: v for k, v in s.items() if k in _KNOBS}})
    ckio = _s3ckpt_io(spec, async_checkpointing=True)
    pre: dict[str, float] = {}

    def before(state: Any) -> None:
        t0 = time.perf_counter()
        sync_io.save_checkpoint(state, base + "-sync")
        pre["sync_save_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        snap = clone_to_host(state)
        pre["snapshot_s"] = time.perf_counter() - t0
        del snap
        # The same into the buffers of a finished snapshot (what S3CheckpointIO's SnapshotPool reuses).
        pool = SnapshotPool(1)
        copy, used = pool.copier()
        clone_to_host(state, copy=copy)
        pool.release(used)
        copy, used = pool.copier()
        t0 = time.perf_counter()
        clone_to_host(state, copy=copy)
        pre["snapshot_reused_s"] = time.perf_counter() - t0
        pool.clear()

    def run(state: Any) -> dict[str, Any]:
        interval = factor * pre["sync_save_s"]
        stalls: list[float] = []
        for i in range(saves):
            t0 = time.perf_counter()
            ckio.save_checkpoint(state, f"{base}-{i}")
            stall = time.perf_counter() - t0
            stalls.append(stall)
            if i + 1 < saves:
                time.sleep(max(0.0, interval - stall))
        ckio.wait()
        ckio.teardown()
        queued = [r.queued_s for r in ckio.records] if ckio.records and hasattr(ckio.records[0], "queued_s") else []
        return {
            "stall_s": sorted(stalls)[len(stalls) // 2],
            "stalls_s": stalls,
            "stall_max_s": max(stalls),
            "queued_s": queued,
            "interval_s": interval,
            "saves": saves,
            **pre,
        }

    run.before = before  # type: ignore[attr-defined]
    return run


# -- measuring ---------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _server_cpu(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK
    except (OSError, IndexError, ValueError):
        return None


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def measure(spec: Spec) -> dict[str, Any]:
    """Run one operation and return its figures (see the module docstring)."""
    import gc

    os.environ.update(spec.get("env", {}))
    operation = _prepare(spec)
    state = None
    result: dict[str, Any] = {}
    if spec["op"] == "save":
        state, result["bytes"] = build_state(spec["size"], spec.get("seed", 0))
        if hasattr(operation, "before"):
            operation.before(state)
    gc.collect()
    exact_peak = _reset_peak()
    rss0, cpu0, srv0 = _rss(), _cpu(), _server_cpu(spec.get("server_pid"))
    t0 = time.perf_counter()
    out = operation(state) if state is not None else operation()
    wall = time.perf_counter() - t0
    cpu1, srv1 = _cpu(), _server_cpu(spec.get("server_pid"))
    peak = _peak_rss()  # without the reset (old kernels) this is ru_maxrss: the whole process's peak
    result.update(
        wall_s=wall,
        cpu_s=cpu1 - cpu0,
        peak_rss_bytes=max(0, peak - rss0),
        rss_before_bytes=rss0,
        server_cpu_s=(srv1 - srv0) if srv0 is not None and srv1 is not None else None,
        exact_peak=exact_peak,
    )
    if isinstance(out, dict) and "stall_s" in out:
        result.update(out)
    if spec["op"] == "load":
        got = len(out) if spec["method"] == "raw" else tensor_bytes(out)
        if got != spec["expect_bytes"]:
            raise RuntimeError(f"loaded {got} tensor bytes, expected {spec['expect_bytes']}")
        result["bytes"] = got
    return result


def run_spec(argv: list[str], measure: Callable[[Spec], dict[str, Any]], **extra: Any) -> int:
    """Read the spec at ``argv[0]``, ``measure`` it, write the result (or the error), with ``extra``, to
    ``spec['out']``; 0 when measured, 3 when not."""
    with open(argv[0]) as f:
        spec = json.load(f)
    try:
        result = measure(spec)
    except BaseException as exc:  # reported, not raised: the orchestrator records why a method has no number
        tail = traceback.format_exc().strip().splitlines()[-6:]
        result = {"error": f"{type(exc).__name__}: {exc}"[:600], "traceback": tail}
    result.update(extra)
    with open(spec["out"], "w") as f:
        json.dump(result, f)
    return 0 if "error" not in result else 3


def main(argv: list[str]) -> int:
    """Read the spec, measure, write the result (or the error) to ``spec['out']``."""
    return run_spec(argv, measure, python=sys.executable)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        from benchmarks.forkserver import serve

        sys.exit(serve(main))
    sys.exit(main(sys.argv[1:]))

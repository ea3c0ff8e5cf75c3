"""One incremental-save measurement in a fresh process: ``python -m benchmarks.incremental_worker SPEC.json``.

A child of a fork server that has done the imports (:mod:`benchmarks.forkserver`; with ``--spawn`` a new
interpreter) reads the spec, builds what it needs outside the timed part (the S3 transport, which also opens
its connection with a HeadBucket, and the state of checkpoint ``step``), times one operation and writes the
figures to ``spec['out']``. Operations:

* ``save``: ``s3ckpt.save(state, url, base=...)`` (no base for the plain chain). Afterwards, untimed: the changed
  regions found by comparing the new object's records (its manifest) with the chain's previous checkpoint's,
  and, for a composed save, its parts in order (recorded as the writer sends them, for the raw replay);
* ``load`` / ``verify``: ``s3ckpt.load`` / ``s3ckpt.verify`` of the object just saved;
* ``raw-put``: a raw multipart PUT of as many bytes (:func:`benchmarks.raw.multipart_put`), then deleted;
* ``raw-compose``: the composed save's parts replayed by boto3 with no torch and no checksums: UploadPart of
  random bytes of each uploaded part's size, UploadPartCopy of each copied range of the same base, 8 at a time.

Figures around the operation: wall (``perf_counter``), client CPU (``getrusage``, all threads), the weed
process's CPU, peak RSS above the RSS before it, and the bytes this process wrote to its sockets (a counting
wrapper on ``socket.socket.send``/``sendall``, which every HTTP request and body goes through: headers
included).
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.incremental import FULL, Layout, changed_regions, upload_floor
from benchmarks.methods import _boto3_client, _cpu, _peak_rss, _reset_peak, _rss, _server_cpu, run_spec
from benchmarks.sharded_worker import _fill

__all__ = ["PREIMPORT", "build_state", "main"]

MiB = 1024 * 1024
RAW_SETTINGS = {"part_size_MB": 16, "concurrency": 8}
PREIMPORT = (
    "torch",
    "boto3",
    "botocore.config",
    "s3ckpt",
    "s3ckpt.checkpoint",
    "s3ckpt.layout",
    "s3ckpt.transport.compose",
    "benchmarks.raw",
    "benchmarks.incremental",
    "benchmarks.methods",
)

Spec = dict[str, Any]


# -- the state ---------------------------------------------------------------------------------------------


def build_state(layout: Layout, state: str, step: int) -> dict[str, Any]:
    """Checkpoint ``step`` of a state: frozen tensors from a pool seeded 0 (the same at every step), the ones
    that change (adapters and Adam state; every tensor in ``full-training``) from a pool seeded by ``step``."""
    import torch

    def pool(seed: int) -> Any:
        return torch.empty(8 * MiB).uniform_(-1, 1, generator=torch.Generator().manual_seed(seed))

    frozen, moving = pool(0), pool(1000 + step)
    model: dict[str, Any] = {}
    for i, (name, shape, trainable) in enumerate(layout.model()):
        changes = trainable or state == FULL
        model[name] = _fill(torch.empty(shape), moving if changes else frozen, i * 7919)
    adam = {
        i: {
            "step": torch.tensor(float(step)),
            "exp_avg": _fill(torch.empty(shape), moving, 100_003 + i * 7919),
            "exp_avg_sq": _fill(torch.empty(shape), moving, 200_003 + i * 7919).abs_(),
        }
        for i, (_, shape) in enumerate(layout.trainable())
    }
    lr = 1e-4 * 0.999**step
    return {
        "state_dict": model,
        "optimizer_states": [
            {"state": adam, "param_groups": [{"lr": lr, "betas": (0.9, 0.999), "params": list(range(len(adam)))}]}
        ],
        "lr_schedulers": [{"last_epoch": step, "_last_lr": [lr]}],
        "epoch": 0,
        "global_step": step,
    }


# -- instruments -------------------------------------------------------------------------------------------


class SentBytes:
    """Bytes written to every socket of this process while entered (``send`` and ``sendall``, which
    http.client uses for request lines, headers and bodies alike), counted under a lock: the upload threads
    send at once. Leaving restores the socket class."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()
        self._saved: tuple[Any, Any] | None = None

    def __enter__(self) -> SentBytes:
        cls: Any = socket.socket
        send, sendall = cls.send, cls.sendall
        self._saved = (send, sendall)

        def counted_sendall(sock: socket.socket, data: Any, *args: Any) -> Any:
            result = sendall(sock, data, *args)
            self._add(memoryview(data).nbytes)
            return result

        def counted_send(sock: socket.socket, data: Any, *args: Any) -> Any:
            n = send(sock, data, *args)
            self._add(n)
            return n

        cls.sendall, cls.send = counted_sendall, counted_send
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            cls: Any = socket.socket
            cls.send, cls.sendall = self._saved
            self._saved = None

    def _add(self, n: int) -> None:
        with self._lock:
            self.value += n


@contextlib.contextmanager
def record_parts() -> Iterator[list[list[Any]]]:
    """The parts a composed save sends, in part order: ``["upload", bytes]`` / ``["copy", first, bytes]``.

    Wraps the writer's two ways of adding a part (both called on the writer thread, in part order); a list
    append per part of 5 MiB or more, nothing the timings can see.
    """
    from s3ckpt.transport.compose import ComposingWriter
    from s3ckpt.transport.upload import MultipartWriter

    plan: list[list[Any]] = []
    submit, copy_part = MultipartWriter._submit, ComposingWriter.copy_part

    def recorded_submit(self: Any, buf: bytearray, n: int, crc: int) -> None:
        plan.append(["upload", n])
        submit(self, buf, n, crc)

    def recorded_copy(self: Any, first: int, length: int, crc32c: int) -> None:
        plan.append(["copy", first, length])
        copy_part(self, first, length, crc32c)

    MultipartWriter._submit = recorded_submit  # type: ignore[method-assign]
    ComposingWriter.copy_part = recorded_copy  # type: ignore[method-assign]
    try:
        yield plan
    finally:
        MultipartWriter._submit = submit  # type: ignore[method-assign]
        ComposingWriter.copy_part = copy_part  # type: ignore[method-assign]


def regions_since(t: Any, bucket: str, prev_key: str, key: str) -> dict[str, Any]:
    """The changed regions of ``key`` against ``prev_key``, from their manifests' records: a record is unchanged
    when the previous object has one of the same name, size, CRC32C and zip CRC-32 (what the composer copies);
    the bytes after the last record (the zip's central directory) always count as changed."""
    from s3ckpt.layout import read_manifest

    prev, new = read_manifest(t, bucket, prev_key), read_manifest(t, bucket, key)
    if prev is None or new is None or not new.records:
        return {"regions_error": "no manifest records to compare"}
    old = {(r.name, r.size, r.crc32c, r.crc32) for r in prev.records}
    segs: list[tuple[int, bool]] = []
    at = 0
    for r in sorted(new.records, key=lambda r: r.start):
        if r.start > at:
            segs.append((r.start - at, True))
        segs.append((r.end - r.start, (r.name, r.size, r.crc32c, r.crc32) not in old))
        at = r.end
    segs.append((new.size - at, True))
    regions, _ = changed_regions(segs)
    return {
        "regions": len(regions),
        "region_bytes": [r.changed for r in regions],
        "upload_floor_bytes": upload_floor(segs),
    }


# -- the operations ----------------------------------------------------------------------------------------


def _transport(spec: Spec) -> Any:
    from s3ckpt.transport import S3Transport

    t = S3Transport.create()  # the environment (the spec's env) names the server
    t.clients.get().head_bucket(Bucket=spec["bucket"])
    return t


def _raw_compose(client: Any, spec: Spec) -> None:
    """Replay ``spec['plan']`` into ``spec['key']``, copying from ``spec['base_key']``; then delete it."""
    bucket, key, plan = spec["bucket"], spec["key"], spec["plan"]
    block = os.urandom(max([p[1] for p in plan if p[0] == "upload"] + [1]))
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]

    def part(i: int) -> dict[str, Any]:
        kind, *args = plan[i]
        common = {"Bucket": bucket, "Key": key, "UploadId": upload_id, "PartNumber": i + 1}
        if kind == "upload":
            return {"PartNumber": i + 1, "ETag": client.upload_part(Body=block[: args[0]], **common)["ETag"]}
        first, length = args
        resp = client.upload_part_copy(
            CopySource={"Bucket": bucket, "Key": spec["base_key"]},
            CopySourceRange=f"bytes={first}-{first + length - 1}",
            **common,
        )
        return {"PartNumber": i + 1, "ETag": resp["CopyPartResult"]["ETag"]}

    try:
        with ThreadPoolExecutor(RAW_SETTINGS["concurrency"]) as pool:
            parts = list(pool.map(part, range(len(plan))))
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
    except BaseException:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise


def _prepare(spec: Spec) -> tuple[Callable[[], Any], Callable[[Any], dict[str, Any]]]:
    """Everything before the timed part; returns the operation and what to record after it (untimed)."""
    op, bucket, key = spec["op"], spec["bucket"], spec["key"]
    url = f"s3://{bucket}/{key}"
    if op in ("raw-put", "raw-compose"):
        from benchmarks import raw

        raw_spec = {**spec, "settings": RAW_SETTINGS}
        client = _boto3_client(raw_spec, raw=True)

        def after_raw(_: Any) -> dict[str, Any]:
            client.delete_object(Bucket=bucket, Key=key)
            return {"object_bytes": spec["object_bytes"]}

        if op == "raw-put":
            return lambda: raw.multipart_put(client, raw_spec, spec["object_bytes"]), after_raw
        return lambda: _raw_compose(client, spec), after_raw
    import s3ckpt

    t = _transport(spec)
    if op == "load":

        def after_load(obj: Any) -> dict[str, Any]:
            from benchmarks.workload import tensor_bytes

            got = tensor_bytes(obj)
            if got != spec["expect_bytes"]:
                raise RuntimeError(f"loaded {got} tensor bytes, expected {spec['expect_bytes']}")
            return {"tensor_bytes": got}

        return lambda: s3ckpt.load(url, transport=t), after_load
    if op == "verify":
        return lambda: s3ckpt.verify(url, transport=t), lambda v: {"object_bytes": v.size, "verified_by": v.origin}
    if op != "save":
        raise ValueError(f"unknown operation {op!r}")
    layout = Layout(**spec["layout"])
    state = build_state(layout, spec["state"], spec["step"])
    base = f"s3://{bucket}/{spec['base_key']}" if spec.get("base_key") else None
    plan: list[list[Any]] = []
    parts = contextlib.ExitStack()
    if base is not None:
        plan = parts.enter_context(record_parts())

    def after_save(stats: Any) -> dict[str, Any]:
        parts.close()
        out = {
            "object_bytes": stats.bytes,
            "bytes_uploaded": stats.bytes_uploaded,
            "bytes_copied": stats.bytes_copied,
            "base": stats.base,
            "parts": stats.parts,
            "plan": plan,
        }
        if spec.get("prev_key"):
            out.update(regions_since(t, bucket, spec["prev_key"], key))
        return out

    return lambda: s3ckpt.save(state, url, transport=t, base=base), after_save


def measure(spec: Spec) -> dict[str, Any]:
    """Run the spec's operation between the readings (see the module docstring)."""
    os.environ.update(spec.get("env", {}))
    with SentBytes() as sent:
        return _measure(spec, sent)


def _measure(spec: Spec, sent: SentBytes) -> dict[str, Any]:
    operation, after = _prepare(spec)
    gc.collect()
    exact_peak = _reset_peak()
    rss0, cpu0, srv0, sent0 = _rss(), _cpu(), _server_cpu(spec.get("server_pid")), sent.value
    t0 = time.perf_counter()
    out = operation()
    wall = time.perf_counter() - t0
    cpu1, srv1, sent1 = _cpu(), _server_cpu(spec.get("server_pid")), sent.value
    peak = _peak_rss()
    result = {
        "wall_s": wall,
        "cpu_s": cpu1 - cpu0,
        "server_cpu_s": (srv1 - srv0) if srv0 is not None and srv1 is not None else None,
        "sent_bytes": sent1 - sent0,
        "peak_rss_bytes": max(0, peak - rss0),
        "exact_peak": exact_peak,
    }
    result.update(after(out))
    return result


def main(argv: list[str]) -> int:
    """Read the spec, measure, write the result (or the error) to ``spec['out']``."""
    return run_spec(argv, measure)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        from benchmarks.forkserver import serve

        sys.exit(serve(main, preimport=PREIMPORT))
    sys.exit(main(sys.argv[1:]))

"""Each checkpoint uploaded once: ``save_last="link"`` makes ``last.ckpt`` a server-side copy of the newest
top-k file, and :func:`s3ckpt.copy` / :func:`s3ckpt.transport.copy.copy_object` underneath it.

Requests are counted by the fault proxy (tests/faults/proxy.py) in front of the real SeaweedFS, and the bytes
the client sends by a handler on the plugin's own botocore ``before-send`` event.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import torch

pytest.importorskip("lightning")

from botocore.awsrequest import AWSResponse
from torch import nn

import s3ckpt
from s3ckpt import ClientConfig, ConflictError, S3TransferError
from s3ckpt.catalog import list_checkpoints
from s3ckpt.distributed import find_resume_checkpoint
from s3ckpt.layout import read_manifest
from s3ckpt.lightning import S3CheckpointIO, S3ModelCheckpoint
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport, ops
from s3ckpt.transport.copy import copy_object
from tests.conftest import EPOCH_END_LAST_SAVES
from tests.faults.fixtures import FAST_RETRY, fault_proxy
from tests.faults.proxy import FaultProxy

from . import _lightning_resume_script as script

pytestmark = pytest.mark.integration

__all__ = ["fault_proxy"]

MiB = 1024 * 1024


class WideModel(script.TinyModel):
    """About 12 MiB of checkpoint (4 MiB of weights, 8 MiB of Adam moments): three 5 MiB parts."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.Linear(1024, 1))


def _plugin(endpoint: str, server: LocalS3Server, dirpath: str) -> S3CheckpointIO:
    client = ClientConfig(
        endpoint_url=endpoint,
        region=server.region,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
    )
    return S3CheckpointIO(
        dirpath,
        chunk_size_MB=5,
        max_write_concurrency=4,
        max_read_concurrency=4,
        async_checkpointing=True,
        client=client,
        retry=FAST_RETRY,
    )


def _count_sent_bytes(io: S3CheckpointIO) -> Counter[str]:
    """Bytes of request bodies the plugin's client sends, per ``<operation> <key suffix>`` (checkpoint data
    ``.ckpt`` vs manifests ``.json``)."""
    sent: Counter[str] = Counter()

    def count(request: Any, event_name: str, **_: Any) -> None:
        n = int(request.headers.get("Content-Length") or 0)
        key = unquote(urlsplit(request.url).path)
        sent[f"{event_name.rsplit('.', 1)[-1]} {os.path.splitext(key)[1]}"] += n

    io.transport.clients.get().meta.events.register("before-send.s3", count)
    return sent


def _train(io: S3CheckpointIO, save_last: Any, steps: int = 6) -> None:
    cb = S3ModelCheckpoint(
        filename="{step}", monitor="score", mode="max", save_top_k=2, save_last=save_last, every_n_train_steps=2
    )
    trainer = script.trainer(io, [cb], steps)
    trainer.fit(WideModel(), script.loader())


def test_link_uploads_each_checkpoint_once(s3_server: LocalS3Server, fault_proxy: FaultProxy, bucket: str) -> None:
    """Per checkpoint interval (every 2 steps, 3 intervals): ``save_last=True`` uploads the checkpoint twice
    (top-k file and last.ckpt), ``save_last="link"`` once plus one server-side copy; the link then loads,
    verifies, lists and resumes as a checkpoint of its own."""
    uploaded: dict[str, int] = {}
    parts: dict[str, int] = {}
    for mode, save_last in (("full", True), ("link", "link")):
        dirpath = f"s3://{bucket}/{mode}"
        io = _plugin(fault_proxy.url, s3_server, dirpath)
        sent = _count_sent_bytes(io)
        since = fault_proxy.log[-1].time if fault_proxy.log else 0.0
        _train(io, save_last)
        uploaded[mode] = sent["UploadPart .ckpt"] + sent["PutObject .ckpt"]
        parts[mode] = fault_proxy.count("UploadPart", since=since)
        one_checkpoint = io.records[0].bytes
        if mode == "full":
            # Lightning < 2.6 also saves last.ckpt at the epoch end (step 5).
            assert uploaded[mode] == sum(r.bytes for r in io.records) and len(io.records) == 6 + EPOCH_END_LAST_SAVES
            continue
        # One upload per interval: the three top-k files, and nothing for last.ckpt but a copy request.
        assert len(io.records) == 3 and all(
            r.path.endswith(("step=2.ckpt", "step=4.ckpt", "step=6.ckpt")) for r in io.records
        )
        assert uploaded[mode] == sum(r.bytes for r in io.records)
        assert abs(uploaded[mode] / 3 - one_checkpoint) < 64 * 1024  # per interval: one checkpoint, not two
        assert [c.src.rsplit("/", 1)[-1] for c in io.copies] == ["step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]
        assert all(c.done_at is not None and not c.cancelled for c in io.copies)
        copies = [e for e in fault_proxy.entries("PutObject", since=since) if unquote(e.path).endswith("/last.ckpt")]
        assert len(copies) == 3  # CopyObject is a PUT on the destination key; no multipart upload of last.ckpt
    assert uploaded["full"] >= 1.9 * uploaded["link"] and parts["full"] >= 2 * parts["link"]

    # The link is a checkpoint of its own: same tensors as its source, verified by its manifest (source's
    # CRC32C, the copy's ETag and nonce), listed with the source's step, and chosen for resume.
    t = io.transport
    link, src = f"s3://{bucket}/link/last.ckpt", f"s3://{bucket}/link/step=6.ckpt"
    got, want = s3ckpt.load(link, weights_only=False, transport=t), s3ckpt.load(src, weights_only=False, transport=t)
    assert got["global_step"] == want["global_step"] == 6
    for k, v in want["state_dict"].items():
        assert torch.equal(got["state_dict"][k], v)
    result = s3ckpt.verify(link, transport=t)
    assert result.crc32c == s3ckpt.verify(src, transport=t).crc32c
    manifest = read_manifest(t, bucket, "link/last.ckpt")
    info = ops.head(t, bucket, "link/last.ckpt")
    assert manifest is not None and manifest.matches(info) and manifest.meta["copy_of"] == "link/step=6.ckpt"
    entries = {e.name: e for e in list_checkpoints(t, f"s3://{bucket}/link", with_manifests=True)}
    assert set(entries) == {"last.ckpt", "step=4.ckpt", "step=6.ckpt"} and entries["last.ckpt"].step == 6
    assert entries["last.ckpt"].copy_of == "link/step=6.ckpt" and entries["step=6.ckpt"].copy_of is None
    assert find_resume_checkpoint(f"s3://{bucket}/link", transport=t) == link


def test_failed_save_cancels_its_link_copy(s3_server: LocalS3Server, bucket: str) -> None:
    """The upload of step=4 fails on every attempt: its last.ckpt copy is cancelled (never a copy of an
    uncommitted object), the failure surfaces at the next save, and last.ckpt stays the copy of step=2."""
    dirpath = f"s3://{bucket}/run"
    io = _plugin(s3_server.endpoint_url, s3_server, dirpath)

    def fail_step4(request: Any, **_: Any) -> AWSResponse | None:
        if not unquote(urlsplit(request.url).path).endswith("/run/step=4.ckpt"):
            return None
        body = b"<Error><Code>InternalError</Code><Message>injected by the test</Message></Error>"
        return AWSResponse(request.url, 500, {"Content-Type": "application/xml"}, _Body(body))

    io.transport.clients.get().meta.events.register("before-send.s3.CreateMultipartUpload", fail_step4)
    with pytest.raises(S3TransferError, match=r"step=4\.ckpt"):
        _train(io, "link")
    io.teardown()
    by_src = {c.src.rsplit("/", 1)[-1]: c for c in io.copies}
    assert by_src["step=2.ckpt"].done_at is not None
    assert by_src["step=4.ckpt"].cancelled and by_src["step=4.ckpt"].done_at is None
    last = s3ckpt.load(f"{dirpath}/last.ckpt", weights_only=False, transport=io.transport)
    assert last["global_step"] == 2


@pytest.mark.portable
@pytest.mark.needs("server_side_copy", "conditional_copy")
def test_copy_function_and_multipart_copy(transport: S3Transport, bucket: str) -> None:
    """``s3ckpt.copy`` on a small checkpoint; UploadPartCopy ranges past the threshold; a source replaced
    after its HEAD is refused (ETag pinned with CopySourceIfMatch), and the failed multipart copy aborted."""
    state = {"w": torch.arange(3 * MiB, dtype=torch.float32)}  # 12 MiB: three 5 MiB copy ranges
    src, dst = f"s3://{bucket}/a/step=1.ckpt", f"s3://{bucket}/b/copy.ckpt"
    s3ckpt.save(state, src, transport=transport)
    stats = s3ckpt.copy(src, dst, transport=transport)
    assert stats.bytes == ops.head(transport, bucket, "a/step=1.ckpt").size and stats.parts == 0
    assert torch.equal(s3ckpt.load(dst, transport=transport)["w"], state["w"])
    assert s3ckpt.verify(dst, transport=transport).crc32c == stats.crc32c

    info = ops.head(transport, bucket, "a/step=1.ckpt")
    result = copy_object(
        transport, bucket, "a/step=1.ckpt", bucket, "c/big.ckpt", multipart_threshold=5 * MiB, part_size=5 * MiB
    )
    assert result.parts == 3 and result.size == info.size
    assert ops.get_bytes(transport, bucket, "c/big.ckpt") == ops.get_bytes(transport, bucket, "a/step=1.ckpt")

    s3ckpt.save({"w": torch.zeros(4)}, src, transport=transport)  # replaced: the old HEAD's ETag is stale
    for threshold in (5 * 1024 * MiB, 5 * MiB):
        with pytest.raises(ConflictError, match="source changed"):
            copy_object(
                transport,
                bucket,
                "a/step=1.ckpt",
                bucket,
                "d/x.ckpt",
                source=info,
                multipart_threshold=threshold,
                part_size=5 * MiB,
            )
    assert not ops.list_uploads(transport, bucket, "d/")
    assert not ops.exists(transport, bucket, "d/x.ckpt")


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Any:
        yield self.data

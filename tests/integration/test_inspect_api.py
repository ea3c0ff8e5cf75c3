"""``s3ckpt.inspect``: the Python API behind ``s3ckpt inspect``, against the real server."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch

import s3ckpt
from s3ckpt import CheckpointNotFoundError
from s3ckpt.inspection import NotAZipError
from s3ckpt.layout import manifest_key
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport, ops

pytestmark = pytest.mark.integration


def _touch(path: str) -> None:  # pragma: no cover - must never run
    Path(path).touch()


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_touch, (self.path,))


def test_inspect_api(transport: S3Transport, bucket: str, s3_server: LocalS3Server, tmp_path: Path) -> None:
    """A frozen summary from a few ranged reads (well under 1% of the bytes), code in the pickle never run;
    a file another tool uploaded is read the same way; missing and non-checkpoint objects raise."""
    state = {
        "state_dict": {f"l{i}.weight": torch.zeros(512, 1024) for i in range(4)},
        "half": torch.zeros(10, dtype=torch.float16),
        "epoch": 2,
        "global_step": 250,
        "pytorch-lightning_version": "2.4.0",
        "hook": _Evil(str(tmp_path / "pwned")),
    }
    url = f"s3://{bucket}/run/last.ckpt"
    s3ckpt.save(state, url, transport=transport)
    s = s3ckpt.inspect(url, transport=transport)
    assert isinstance(s, s3ckpt.CheckpointSummary)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.step = 1  # type: ignore[misc]
    assert (s.kind, s.format, s.step, s.epoch, s.lightning_version) == ("file", "torch.save zip", 250, 2, "2.4.0")
    assert s.tensors == 5 and s.dtypes == {"float32": 4, "float16": 1}
    assert s.tensor_bytes == 4 * 512 * 1024 * 4 + 20
    assert s.keys["state_dict"].startswith("dict, 4 key(s), 4 tensor(s)")
    assert 0 < s.bytes_fetched < s.size / 100 and 1 <= s.requests <= 4  # the zip's end, the pickle, the manifest
    assert any(name.endswith("_touch") for name in s.not_loaded)
    assert not (tmp_path / "pwned").exists(), "inspect must never run code from the pickle"
    assert s.to_dict()["step"] == 250
    assert (s.bytes_uploaded, s.bytes_copied, s.base, s.manifest_error) == (s.size, 0, None, None)
    assert s.zip_records is not None and s.zip_records >= 5

    buf = io.BytesIO()
    torch.save({"w": torch.ones(3, dtype=torch.int64), "step": 9}, buf)
    s3_server.client().put_object(Bucket=bucket, Key="foreign.pt", Body=buf.getvalue())
    other = s3ckpt.inspect(f"s3://{bucket}/foreign.pt", transport=transport)
    assert (other.tensors, other.dtypes, other.step) == (1, {"int64": 1}, 9)
    assert other.bytes_uploaded is None and other.manifest_error is None  # no s3ckpt manifest: nothing to say

    with pytest.raises(CheckpointNotFoundError):
        s3ckpt.inspect(f"s3://{bucket}/run/missing.ckpt", transport=transport)
    s3_server.client().put_object(Bucket=bucket, Key="notes.txt", Body=b"hello")
    with pytest.raises(NotAZipError, match=r"not a zip-format torch\.save"):
        s3ckpt.inspect(f"s3://{bucket}/notes.txt", transport=transport)


def test_inspect_transfer_of_older_saves_copies_and_replaced_objects(
    transport: S3Transport, bucket: str, s3_server: LocalS3Server
) -> None:
    """A manifest from before incremental saves (no ``transfer``, no ``records``): everything uploaded. A
    server-side copy: nothing uploaded, its source named. An object replaced behind s3ckpt's back: its manifest
    is not believed."""
    url = f"s3://{bucket}/run/step=1.ckpt"
    s3ckpt.save({"w": torch.ones(1024), "global_step": 1}, url, transport=transport)
    key = manifest_key("run/step=1.ckpt")
    raw = json.loads(ops.get_bytes(transport, bucket, key))
    old = {k: v for k, v in raw.items() if k not in ("transfer", "records")}
    ops.put_bytes(transport, bucket, key, json.dumps(old).encode())
    s = s3ckpt.inspect(url, transport=transport)
    assert (s.bytes_uploaded, s.bytes_copied, s.base, s.zip_records) == (s.size, 0, None, 0)

    s3ckpt.copy(url, f"s3://{bucket}/run/last.ckpt", transport=transport)
    c = s3ckpt.inspect(f"s3://{bucket}/run/last.ckpt", transport=transport)
    assert (c.bytes_uploaded, c.bytes_copied, c.copy_of) == (0, c.size, "run/step=1.ckpt")
    assert c.to_dict()["copy_of"] == "run/step=1.ckpt"

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1024)}, buf)
    s3_server.client().put_object(Bucket=bucket, Key="run/step=1.ckpt", Body=buf.getvalue())
    r = s3ckpt.inspect(url, transport=transport)
    assert r.bytes_uploaded is None and r.manifest_error is not None and "describes other bytes" in r.manifest_error
    assert r.to_dict()["manifest_error"] == r.manifest_error

"""``s3ckpt.inspect``: the Python API behind ``s3ckpt inspect``, against the real server."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch

import s3ckpt
from s3ckpt import CheckpointNotFoundError
from s3ckpt.inspection import NotAZipError
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport

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
    assert 0 < s.bytes_fetched < s.size / 100 and 1 <= s.requests <= 3
    assert any(name.endswith("_touch") for name in s.not_loaded)
    assert not (tmp_path / "pwned").exists(), "inspect must never run code from the pickle"
    assert s.to_dict()["step"] == 250

    buf = io.BytesIO()
    torch.save({"w": torch.ones(3, dtype=torch.int64), "step": 9}, buf)
    s3_server.client().put_object(Bucket=bucket, Key="foreign.pt", Body=buf.getvalue())
    other = s3ckpt.inspect(f"s3://{bucket}/foreign.pt", transport=transport)
    assert (other.tensors, other.dtypes, other.step) == (1, {"int64": 1}, 9)

    with pytest.raises(CheckpointNotFoundError):
        s3ckpt.inspect(f"s3://{bucket}/run/missing.ckpt", transport=transport)
    s3_server.client().put_object(Bucket=bucket, Key="notes.txt", Body=b"hello")
    with pytest.raises(NotAZipError, match=r"not a zip-format torch\.save"):
        s3ckpt.inspect(f"s3://{bucket}/notes.txt", transport=transport)

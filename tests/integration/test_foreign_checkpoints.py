"""Checkpoints s3ckpt did not write: uploaded with plain boto3 (``put_object``, ``upload_fileobj``), carrying
whatever checksum the uploader and the store chose. ``load`` and ``verify`` check each against that checksum
(full-object CRC32, CRC32C, CRC64NVME, SHA-1, SHA-256; composite CRC32 and SHA-256 part by part), and tell
"cannot be verified" from "corrupted"."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from boto3.s3.transfer import TransferConfig as BotoTransferConfig
from botocore.config import Config

import s3ckpt
from s3ckpt import CheckpointCorruptedError, UnverifiableCheckpointError
from s3ckpt.cli import main
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport, ops
from s3ckpt.transport import checksums as cs
from tests.conftest import client_config_for
from tests.faults.damage import FlipOneByte

pytestmark = pytest.mark.integration

_MIB = 1024 * 1024


def _plain_client(server: LocalS3Server, **config: Any) -> Any:
    """A boto3 client as a user would make one, from the same settings s3ckpt's fixtures use."""
    cfg = client_config_for(server)
    return boto3.client(
        "s3",
        endpoint_url=cfg.endpoint_url,
        region_name=cfg.region,
        aws_access_key_id=cfg.access_key_id,
        aws_secret_access_key=cfg.secret_access_key,
        config=Config(**config),
    )


def _blob(rows: int = 2600) -> tuple[dict[str, Any], bytes]:
    """A torch.save'd state dict of about 10 MiB: two 5 MiB parts and a tail when uploaded multipart."""
    g = torch.Generator().manual_seed(rows)
    state = {"w": torch.randn(rows, 1000, generator=g), "step": rows}
    buf = io.BytesIO()
    torch.save(state, buf)
    return state, buf.getvalue()


def _upload(client: Any, bucket: str, key: str, data: bytes, how: str) -> None:
    if how == "put":  # botocore's default: a full-object CRC32 computed by the client
        client.put_object(Bucket=bucket, Key=key, Body=data)
    elif how in ("SHA1", "SHA256"):
        client.put_object(Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm=how)
    elif how in ("CRC32C", "CRC64NVME"):
        # botocore computes these only with awscrt installed; a value given explicitly needs nothing.
        client.put_object(Bucket=bucket, Key=key, Body=data, **{f"Checksum{how}": cs.b64(cs.checksum_of(how, data))})
    elif how.startswith("multipart"):
        extra = {"ChecksumAlgorithm": how.split("-")[1]} if "-" in how else {}
        parts = BotoTransferConfig(multipart_threshold=5 * _MIB, multipart_chunksize=5 * _MIB)
        client.upload_fileobj(io.BytesIO(data), bucket, key, ExtraArgs=extra, Config=parts)
    else:
        raise AssertionError(how)


# (how it is uploaded, the algorithm verify reports, the checksum type, where it came from)
_CASES = [
    ("put", "CRC32", "FULL_OBJECT", "store full-object"),
    ("CRC32C", "CRC32C", "FULL_OBJECT", "store full-object"),
    ("CRC64NVME", "CRC64NVME", "FULL_OBJECT", "store full-object"),
    ("SHA1", "SHA1", "FULL_OBJECT", "store full-object"),
    ("SHA256", "SHA256", "FULL_OBJECT", "store full-object"),
    ("multipart", "CRC32", "COMPOSITE", "store composite"),
    ("multipart-SHA256", "SHA256", "COMPOSITE", "store composite"),
]


def test_foreign_uploads_load_and_verify(transport: S3Transport, bucket: str, s3_server: LocalS3Server) -> None:
    """Each way boto3 uploads: load returns the state dict, verify names the algorithm and the source."""
    big = _blob()
    small = _blob(300)  # for CRC64NVME without awscrt: pure Python hashes about 5 MB/s
    client = _plain_client(s3_server)
    for how, algorithm, kind, origin in _CASES:
        state, data = small if how == "CRC64NVME" and cs._crt is None else big
        _upload(client, bucket, how, data, how)
        url = f"s3://{bucket}/{how}"
        info = ops.head(transport, bucket, how)
        assert info.checksums and info.checksum_type == kind, (how, info.checksums)
        res = s3ckpt.verify(url, transport=transport)
        assert (res.algorithm, res.checksum_type, res.origin, res.size) == (algorithm, kind, origin, len(data)), how
        assert res.checksum == info.checksums[algorithm], how
        loaded = s3ckpt.load(url, transport=transport, verify="require")
        assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == state["step"]


@pytest.mark.parametrize("how", ["put", "multipart", "multipart-SHA256"])
def test_damage_in_transit_detected_for_foreign_checksums(
    transport: S3Transport, bucket: str, s3_server: LocalS3Server, how: str
) -> None:
    """The object on the server is intact; one byte of the third ranged GET's body is flipped on the way in
    (a botocore event hook on the real HTTP path, as in test_checkpoint_api). A full-object CRC32 and the
    composite CRC32 / SHA-256 (per part, then the checksum of checksums) each catch it, before unpickling."""
    _, data = _blob()
    _upload(_plain_client(s3_server), bucket, "obj", data, how)
    client = transport.clients.get()
    gets: list[int] = []

    def damage(http_response: object, parsed: dict[str, Any], **_: object) -> None:
        gets.append(1)
        if len(gets) == 3:
            parsed["Body"] = FlipOneByte(parsed["Body"], at=12345)

    client.meta.events.register("after-call.s3.GetObject", damage)
    try:
        with pytest.raises(CheckpointCorruptedError, match="is corrupted") as info:
            s3ckpt.load(f"s3://{bucket}/obj", transport=transport)
    finally:
        client.meta.events.unregister("after-call.s3.GetObject", damage)
    assert len(gets) >= 3
    algorithm = "SHA256" if how.endswith("SHA256") else "CRC32"
    assert algorithm in str(info.value) and ("composite" in str(info.value)) == how.startswith("multipart")
    assert s3ckpt.verify(f"s3://{bucket}/obj", transport=transport).algorithm == algorithm


def test_unverifiable_is_not_corrupted_and_cli_exit_codes(
    transport: S3Transport,
    bucket: str,
    s3_server: LocalS3Server,
    s3_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """No checksum at all (boto3 with checksums only "when required") and no manifest: ``verify`` raises
    UnverifiableCheckpointError and the CLI exits 3 saying why; a CRC32 object exits 0 with the algorithm and
    its source in --json; an s3ckpt checkpoint replaced behind its manifest's back exits 1."""
    _, data = _blob(300)
    _plain_client(s3_server, request_checksum_calculation="when_required").put_object(
        Bucket=bucket, Key="bare.pt", Body=data
    )
    assert ops.head(transport, bucket, "bare.pt").checksums == {}
    with pytest.raises(UnverifiableCheckpointError, match="cannot be verified: no checksum") as info:
        s3ckpt.verify(f"s3://{bucket}/bare.pt", transport=transport)
    assert not isinstance(info.value, CheckpointCorruptedError)
    _plain_client(s3_server).put_object(Bucket=bucket, Key="crc32.pt", Body=data)
    s3ckpt.save({"w": torch.ones(3)}, f"s3://{bucket}/mine.pt", transport=transport)
    _plain_client(s3_server).put_object(Bucket=bucket, Key="mine.pt", Body=data)  # the manifest is now stale

    def cli(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["--endpoint-url", s3_server.endpoint_url, *argv])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    code, out, err = cli("verify", f"s3://{bucket}/bare.pt")
    assert code == 3 and "cannot be verified" in err and "no checksum stored" in err, (code, err)
    code, out, err = cli("--json", "verify", f"s3://{bucket}/bare.pt")
    (rec,) = [json.loads(line) for line in out.splitlines()]
    assert code == 3 and rec["ok"] is None and rec["unverifiable"] is True

    code, out, err = cli("--json", "verify", f"s3://{bucket}/crc32.pt")
    (rec,) = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and rec["ok"] is True, err
    assert (rec["algorithm"], rec["checksum_type"], rec["from"]) == ("CRC32", "FULL_OBJECT", "store full-object")
    code, out, err = cli("verify", f"s3://{bucket}/crc32.pt")
    assert code == 0 and out.startswith("OK  ") and "crc32=" in out

    code, out, err = cli("verify", f"s3://{bucket}/mine.pt")
    assert code == 1 and "does not match its manifest" in err

    # `s3ckpt cp` to a local file verifies the same way as the bytes arrive: another tool's CRC32 checks, and
    # a checkpoint whose manifest describes other bytes is refused with nothing written.
    code, out, err = cli("cp", f"s3://{bucket}/crc32.pt", str(tmp_path) + "/")
    assert code == 0 and (tmp_path / "crc32.pt").read_bytes() == data, err
    code, out, err = cli("--json", "cp", f"s3://{bucket}/crc32.pt", str(tmp_path / "again.pt"))
    assert code == 0 and "CRC32 verified against the store full-object" in out, (out, err)
    code, out, err = cli("cp", f"s3://{bucket}/mine.pt", str(tmp_path) + "/")
    assert code == 1 and "does not match its manifest" in err and not (tmp_path / "mine.pt").exists()

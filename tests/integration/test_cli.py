"""The ``s3ckpt`` command, run in-process through ``main([...])`` against the embedded server.

Every command, its JSON output, and its error paths: exit 1 with one ``s3ckpt: error:`` line (missing bucket,
access denied, corruption, refused deletion), exit 2 for usage errors, never a traceback or a secret.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import pytest
import torch

import s3ckpt
from s3ckpt.cli import main
from s3ckpt.cli.output import Output, human_size
from s3ckpt.layout import manifest_key, read_manifest
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport, ops

pytestmark = pytest.mark.integration

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(s3_server: LocalS3Server, s3_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> Run:
    """``cli("ls", url)`` -> (exit status, stdout, stderr), with ``--endpoint-url`` given explicitly."""

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["--endpoint-url", s3_server.endpoint_url, *argv])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    return run


def _small(step: int) -> dict[str, object]:
    return {"w": torch.full((4,), float(step)), "epoch": step // 20, "global_step": step}


def _json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _keys(t: S3Transport, bucket: str, prefix: str = "") -> set[str]:
    return {o.key for o in ops.list_objects(t, bucket, prefix)}


def _run_dir(t: S3Transport, bucket: str) -> str:
    """Three committed file checkpoints, an unfinished model-parallel group and a committed sharded dir."""
    for step, name in ((10, "epoch=0-step=10.ckpt"), (20, "epoch=1-step=20.ckpt"), (20, "last.ckpt")):
        s3ckpt.save(_small(step), f"s3://{bucket}/run/{name}", transport=t)
    ops.put_bytes(t, bucket, "run/mp_rank_00/m-step=40.ckpt", b"rank0")  # no group marker: incomplete
    ops.put_bytes(t, bucket, "run/dcp-step=5/__0_0.distcp", b"shard")
    ops.put_bytes(t, bucket, "run/dcp-step=5/.metadata", b"meta")
    return f"s3://{bucket}/run/"


def test_ls_table_json_and_resume_mark(cli: Run, transport: S3Transport, bucket: str) -> None:
    url = _run_dir(transport, bucket)
    code, out, err = cli("ls", url)
    assert code == 0, err
    rows = {line.split()[-1]: line for line in out.splitlines()[1:]}
    assert set(rows) == {"epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt", "last.ckpt", "m-step=40.ckpt", "dcp-step=5/"}
    assert rows["last.ckpt"].startswith("*") and sum(r.startswith("*") for r in rows.values()) == 1
    assert "INCOMPLETE" in rows["m-step=40.ckpt"] and "MiB" not in out
    assert "5 checkpoint(s)" in err

    code, out, _ = cli("--json", "ls", "--bytes", url.rstrip("/"))
    records = {r["name"]: r for r in _json_lines(out)}
    assert code == 0 and len(records) == 5
    assert records["last.ckpt"]["resume"] is True and records["last.ckpt"]["step"] == 20
    assert records["epoch=0-step=10.ckpt"]["epoch"] == 0 and records["m-step=40.ckpt"]["committed"] is False
    assert sum(bool(r["resume"]) for r in records.values()) == 1

    code, out, err = cli("--no-verify-ssl", "ls", url)
    assert code == 0 and "last.ckpt" in out and "s3ckpt: warning: TLS certificate verification is OFF" in err
    code, out, err = cli("-q", "ls", url)
    assert code == 0 and "last.ckpt" in out and not err


def _pwned(path: str) -> None:  # pragma: no cover - must never run
    Path(path).write_text("code ran")


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_pwned, (self.path,))


def test_inspect_reads_only_the_pickle(
    cli: Run, transport: S3Transport, bucket: str, tmp_path: Path, s3_server: LocalS3Server
) -> None:
    g = torch.Generator().manual_seed(0)
    state = {
        "state_dict": collections.OrderedDict(
            (f"layer{i}.weight", torch.randn(1024, 1024, generator=g)) for i in range(5)
        ),
        "bf16": torch.randn(1000, dtype=torch.bfloat16, generator=g),
        "ids": torch.arange(100, dtype=torch.int64),
        "epoch": 7,
        "global_step": 700,
        "hook": _Evil(str(tmp_path / "pwned")),
    }
    s3ckpt.save(state, f"s3://{bucket}/big.ckpt", transport=transport)
    code, out, err = cli("--json", "inspect", f"s3://{bucket}/big.ckpt")
    assert code == 0, err
    (rec,) = _json_lines(out)
    size = ops.head(transport, bucket, "big.ckpt").size
    assert rec["size"] == size >= 20 * 1024 * 1024
    assert rec["tensors"] == 7 and rec["dtypes"] == {"float32": 5, "bfloat16": 1, "int64": 1}
    assert rec["tensor_bytes"] == 5 * 1024 * 1024 * 4 + 1000 * 2 + 100 * 8
    assert rec["step"] == 700 and rec["epoch"] == 7
    assert isinstance(rec["bytes_fetched"], int) and rec["bytes_fetched"] < size / 100, rec["bytes_fetched"]
    assert not (tmp_path / "pwned").exists(), "inspect must never run code from the pickle"
    assert any(name.endswith("_pwned") for name in rec["not_loaded"])

    code, out, _ = cli("inspect", f"s3://{bucket}/big.ckpt")
    assert code == 0 and "fetched" in out and "float32 x5" in out and "state_dict" in out

    s3_server.client().put_object(Bucket=bucket, Key="notes.ckpt", Body=b"not a zip")
    code, _, err = cli("inspect", f"s3://{bucket}/notes.ckpt")
    assert code == 1 and "not a zip-format torch.save" in err


def test_inspect_shows_how_a_composed_checkpoint_was_saved(cli: Run, transport: S3Transport, bucket: str) -> None:
    """Bytes uploaded and copied, the base, and the zip records the manifest lists (text and JSON)."""
    frozen = torch.randn(3 * 1024, 1024, generator=torch.Generator().manual_seed(0))  # 12 MiB, unchanged
    base, url = f"s3://{bucket}/ft/step=1.ckpt", f"s3://{bucket}/ft/step=2.ckpt"
    s3ckpt.save({"frozen": frozen, "head": torch.ones(8), "global_step": 1}, base, transport=transport)
    stats = s3ckpt.save(
        {"frozen": frozen, "head": torch.zeros(8), "global_step": 2}, url, transport=transport, base=base
    )
    assert stats.bytes_copied >= 5 * 1024 * 1024 and stats.base == base, stats
    manifest = read_manifest(transport, bucket, "ft/step=2.ckpt")
    assert manifest is not None

    code, out, err = cli("inspect", url)
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.startswith("  ") and line[2] != " "}
    assert f"{human_size(stats.bytes_uploaded)} (" in rows["uploaded"], out
    assert f"{human_size(stats.bytes_copied)} (" in rows["copied"], out
    assert base in rows["base"] and f"{len(manifest.records)} listed in the manifest" in rows["zip"], out
    code, out, _ = cli("--json", "inspect", url)
    (rec,) = _json_lines(out)
    assert (rec["bytes_uploaded"], rec["bytes_copied"]) == (stats.bytes_uploaded, stats.bytes_copied)
    assert rec["base"] == base and rec["zip_records"] == len(manifest.records) > 2 and rec["copy_of"] is None

    # The base itself: a plain save, everything uploaded, nothing copied, no base shown.
    code, out, _ = cli("inspect", base)
    assert code == 0 and "  copied       0 B (0.0%)" in out and "  base" not in out, out


def test_sharded_inspect_verify_and_copy(
    cli: Run, transport: S3Transport, bucket: str, s3_server: LocalS3Server, tmp_path: Path
) -> None:
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is not initialised": a single-process save
        dcp_save({"w": torch.ones(64, 64), "b": torch.zeros(8, dtype=torch.bfloat16)}, checkpoint_id=tmp_path)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # The DCP writer's sidecar; its name is what layout.manifest_key(".metadata") would be, in another format.
    sidecar = {
        "format": "s3ckpt-dcp/1",
        "metadata": {"size": len(files[".metadata"]), "crc32c": crc32c.crc32c(files[".metadata"])},
        "files": {
            n: {"size": len(b), "crc32c": crc32c.crc32c(b), "etag": "-"} for n, b in files.items() if n != ".metadata"
        },
        "items": {},
    }
    files[".metadata.s3ckpt.json"] = json.dumps(sidecar).encode()
    raw = s3_server.client()  # boto's own checksum (CRC32): the store keeps no CRC32C for these objects
    for name in sorted(files, key=lambda n: n == ".metadata"):
        raw.put_object(Bucket=bucket, Key=f"run/dcp-step=9/{name}", Body=files[name])
    url = f"s3://{bucket}/run/dcp-step=9"

    code, out, err = cli("--json", "inspect", url)
    (rec,) = _json_lines(out)
    assert code == 0 and rec["kind"] == "sharded", err
    assert rec["tensors"] == 2 and rec["dtypes"] == {"float32": 1, "bfloat16": 1}
    assert rec["tensor_bytes"] == 64 * 64 * 4 + 8 * 2 and ".metadata" in rec["files"]

    code, out, err = cli("verify", url)
    assert code == 0 and out.count("(from DCP manifest)") == 2, err
    code, out, err = cli("cp", "-r", url, f"s3://{bucket}/copy/dcp-step=9/")
    assert code == 0, err
    assert out.splitlines()[-1].split()[1].endswith("/.metadata"), "the commit record is copied last"
    code, out, err = cli("verify", f"s3://{bucket}/copy/dcp-step=9/")
    assert code == 0 and out.count("OK") == 2, err
    assert _keys(transport, bucket, "copy/") == {f"copy/dcp-step=9/{n}" for n in files}


def test_verify_ok_and_corrupted(cli: Run, transport: S3Transport, bucket: str, s3_server: LocalS3Server) -> None:
    url = _run_dir(transport, bucket)
    code, out, err = cli("verify", url + "last.ckpt")
    assert code == 0 and out.startswith("OK  ") and not err

    # Same length, other bytes, written behind s3ckpt's back: the manifest no longer matches.
    size = ops.head(transport, bucket, "run/last.ckpt").size
    s3_server.client().put_object(Bucket=bucket, Key="run/last.ckpt", Body=b"\0" * size)
    code, out, err = cli("verify", url + "last.ckpt")
    assert code == 1 and "s3ckpt: error:" in err and "last.ckpt" in err and "manifest" in err
    assert len(err.strip().splitlines()) == 1

    code, out, err = cli("--json", "verify", url)
    records = _json_lines(out)
    assert code == 1
    assert {r["url"] for r in records if r["ok"] is False} >= {url + "last.ckpt"}
    assert any(r["ok"] is True and r["url"] == url + "epoch=0-step=10.ckpt" for r in records)


def test_cp_every_direction_verifies(cli: Run, transport: S3Transport, bucket: str, tmp_path: Path) -> None:
    src = f"s3://{bucket}/run/last.ckpt"
    s3ckpt.save(_small(30), src, transport=transport)

    code, out, err = cli("cp", "--dry-run", src, str(tmp_path) + "/")
    assert code == 0 and "(dry run)" in out and not list(tmp_path.iterdir())

    code, out, err = cli("cp", src, str(tmp_path) + "/")
    local = tmp_path / "last.ckpt"
    assert code == 0, err
    assert torch.equal(torch.load(local, weights_only=True)["w"], torch.full((4,), 30.0))

    code, _, err = cli("cp", str(local), f"s3://{bucket}/up/")
    assert code == 0, err
    manifest = read_manifest(transport, bucket, "up/last.ckpt")
    assert manifest is not None and manifest.meta["global_step"] == 30

    for flags, dest in (([], "copy/a.ckpt"), (["--stream"], "copy/b.ckpt")):
        code, out, err = cli("--json", "cp", *flags, src, f"s3://{bucket}/{dest}")
        (rec,) = _json_lines(out)
        assert code == 0 and rec["method"] == ("stream" if flags else "server-side"), err
    code, out, err = cli("verify", f"s3://{bucket}/up/")
    assert code == 0 and "1 ok, 0 failed" in err
    code, out, err = cli("verify", f"s3://{bucket}/copy/")
    assert code == 0 and "2 ok, 0 failed" in err
    assert s3ckpt.load(f"s3://{bucket}/copy/b.ckpt", transport=transport)["global_step"] == 30

    code, _, err = cli("cp", f"s3://{bucket}/run/missing.ckpt", str(tmp_path) + "/")
    assert code == 1 and "no object at" in err


def test_rm_and_prune_confirm_dry_run_and_delete(
    cli: Run, transport: S3Transport, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _run_dir(transport, bucket)
    before = _keys(transport, bucket)

    code, _, err = cli("rm", url + "epoch=0-step=10.ckpt")  # stdin is not a terminal under pytest
    assert code == 1 and "-y" in err and _keys(transport, bucket) == before
    code, _, err = cli("prune", url, "--keep", "1")
    assert code == 1 and "-y" in err and _keys(transport, bucket) == before
    code, out, _ = cli("prune", url, "--keep", "0", "--dry-run")
    assert code == 0 and "(dry run) delete" in out and _keys(transport, bucket) == before

    class _Terminal:
        def __init__(self, answer: str) -> None:
            self.answer = answer

        def isatty(self) -> bool:
            return True

        def readline(self) -> str:
            return self.answer

    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))
    code, _, err = cli("rm", url + "epoch=0-step=10.ckpt")
    assert code == 1 and "aborted" in err and _keys(transport, bucket) == before
    monkeypatch.setattr(sys, "stdin", _Terminal("yes\n"))
    code, _, err = cli("rm", url + "epoch=0-step=10.ckpt")
    assert code == 0, err
    assert "run/epoch=0-step=10.ckpt" not in _keys(transport, bucket)
    assert manifest_key("run/epoch=0-step=10.ckpt") not in _keys(transport, bucket)

    # --keep 0 still keeps what a resume would load (last.ckpt), and never the incomplete group.
    code, out, err = cli("--json", "prune", url, "--keep", "0", "-y")
    actions = {(r["action"], r["url"]) for r in _json_lines(out)}
    assert code == 0, err
    assert ("keep", url + "last.ckpt") in actions and ("delete", url + "epoch=1-step=20.ckpt") in actions
    left = _keys(transport, bucket)
    assert "run/last.ckpt" in left and "run/mp_rank_00/m-step=40.ckpt" in left
    assert not any(k.startswith("run/dcp-step=5/") for k in left)

    code, _, err = cli("rm", "-y", f"s3://{bucket}")
    assert code == 2 and "whole bucket" in err
    code, _, err = cli("rm", "-y", url + "mp_rank_00/m-step=40.ckpt")
    assert code == 1 and f"rm {url}m-step=40.ckpt" in err
    assert "run/mp_rank_00/m-step=40.ckpt" in _keys(transport, bucket)


def test_gc_stale_uploads_and_leftovers(cli: Run, transport: S3Transport, bucket: str) -> None:
    url = _run_dir(transport, bucket)
    ops.put_bytes(transport, bucket, manifest_key("run/gone.ckpt"), b"{}")  # manifest without its data
    upload_id = transport.clients.get().create_multipart_upload(Bucket=bucket, Key="run/stale.ckpt")["UploadId"]
    before = _keys(transport, bucket)

    code, out, err = cli("gc", url)  # everything is younger than the default 24h
    assert code == 0 and "nothing to delete" in err and _keys(transport, bucket) == before
    code, out, err = cli("gc", url, "--older-than", "0s", "--dry-run")
    assert code == 0 and "abort" in out and "gone.ckpt" in out and _keys(transport, bucket) == before
    code, out, err = cli("gc", url, "--older-than", "0s")
    assert code == 1 and "-y" in err

    code, out, err = cli("--json", "gc", url, "--older-than", "0s", "-y")
    assert code == 0, err
    assert {r["action"] for r in _json_lines(out)} == {"delete", "abort"}
    left = _keys(transport, bucket)
    assert manifest_key("run/gone.ckpt") not in left and "run/mp_rank_00/m-step=40.ckpt" not in left
    assert {"run/last.ckpt", "run/dcp-step=5/.metadata"} <= left, "committed checkpoints are never collected"
    assert upload_id not in {u.upload_id for u in ops.list_uploads(transport, bucket, "run/")}

    code, _, err = cli("gc", url, "--older-than", "soon")
    assert code == 2 and "invalid duration" in err


def test_error_paths(
    cli: Run,
    bucket: str,
    s3_server: LocalS3Server,
    s3_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = cli("ls", "s3://no-such-bucket-cli/run/")
    assert code == 1 and err.startswith("s3ckpt: error:") and "no-such-bucket-cli" in err and "does not exist" in err
    code, _, err = cli("verify", "s3://no-such-bucket-cli/x.ckpt")
    assert code == 1 and "no-such-bucket-cli" in err

    for bad in ("S3://bucket/x", "s3:/bucket/x", "s3://Bad_Bucket/x", "s3://bucket//x", "/local/path"):
        code, _, err = cli("ls", bad)
        assert code == 2 and err.startswith("s3ckpt: error:") and len(err.strip().splitlines()) == 1, (bad, err)
    code, _, err = cli("prune", f"s3://{bucket}/run")  # --keep is required: argparse's usage error
    assert code == 2 and "--keep" in err
    code, _, err = cli("cp", "a", "b")
    assert code == 2 and "s3://" in err

    handlers = list(logging.getLogger("s3ckpt").handlers)
    code = main(["-v", "--endpoint-url", s3_server.endpoint_url, "ls", "s3://no-such-bucket-cli/"])
    assert code == 1 and "Traceback" in capsys.readouterr().err, "-v shows the traceback"
    assert logging.getLogger("s3ckpt").handlers == handlers, "logging is restored after main()"

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123")
    code, out, err = cli("ls", f"s3://{bucket}/")
    assert code == 1 and "access denied" in err and "SignatureDoesNotMatch" in err
    for secret in ("wrong-secret-value-123", s3_env["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in out + err


def test_server_passthrough_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["server", "--help"]) == 0
    assert "--port" in capsys.readouterr().out
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("ls", "inspect", "verify", "cp", "rm", "prune", "gc", "server", "demo"))


def test_progress_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class _Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", _Tty())
    with Output().progress(100, "x") as bar:
        assert callable(bar)
        bar(100)
    for quiet in (Output(json=True), Output(quiet=True)):
        with quiet.progress(100, "x") as bar:
            assert bar is None
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with Output().progress(100, "x") as bar:
        assert bar is None


def test_console_script_subprocess(s3_server: LocalS3Server, transport: S3Transport, bucket: str) -> None:
    s3ckpt.save(_small(10), f"s3://{bucket}/run/last.ckpt", transport=transport)
    script = Path(sys.executable).parent / "s3ckpt"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "s3ckpt.cli"]
    env = {**os.environ, **s3_server.env()}
    proc = subprocess.run(
        [*cmd, "--json", "ls", f"s3://{bucket}/run/"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    (rec,) = _json_lines(proc.stdout)
    assert rec["name"] == "last.ckpt" and rec["resume"] is True


def test_trainer_sharded_checkpoint_ls_verify_rm_gc(
    cli: Run, transport: S3Transport, bucket: str, s3_server: LocalS3Server
) -> None:
    """A sharded checkpoint as the strategies write it (shards, meta.pt, manifest, .metadata): one entry in
    ``ls``, every object including meta.pt verified, a damaged meta.pt caught, ``rm`` deletes the commit record
    first and leaves nothing, ``gc`` removes an unfinished one."""
    from s3ckpt.dcp.trainer_state import save_state

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a single-process DCP save
        for step in (2, 4):
            url = f"s3://{bucket}/run/epoch=0-step={step}.ckpt"
            save_state(url, {"model": {"w": torch.ones(32, 32) * step}}, {"global_step": step}, transport=transport)
    code, out, err = cli("--json", "ls", f"s3://{bucket}/run/")
    rows = {r["url"].rstrip("/").rsplit("/", 1)[-1]: r for r in _json_lines(out)}
    assert code == 0 and set(rows) == {"epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"}, (rows, err)
    assert {r["kind"] for r in rows.values()} == {"sharded"}

    code, out, err = cli("verify", f"s3://{bucket}/run/epoch=0-step=4.ckpt")
    assert code == 0 and "meta.pt" in out and out.count("OK") == 3, (out, err)  # shard, meta.pt, .metadata
    s3_server.client().put_object(Bucket=bucket, Key="run/epoch=0-step=4.ckpt/meta.pt", Body=b"not the trainer state")
    code, out, err = cli("verify", f"s3://{bucket}/run/epoch=0-step=4.ckpt")
    assert code == 1 and "meta.pt" in err, (out, err)

    code, out, err = cli("rm", "-y", f"s3://{bucket}/run/epoch=0-step=4.ckpt")
    assert code == 0, err
    assert _keys(transport, bucket, "run/epoch=0-step=4.ckpt/") == set()
    assert ops.exists(transport, bucket, "run/epoch=0-step=2.ckpt/meta.pt")

    # An unfinished save (no .metadata): invisible to resume, removed by gc.
    ops.delete_object(transport, bucket, "run/epoch=0-step=2.ckpt/.metadata")
    code, out, err = cli("gc", "-y", "--older-than", "0s", f"s3://{bucket}/run/")
    assert code == 0, err
    assert _keys(transport, bucket, "run/") == set()

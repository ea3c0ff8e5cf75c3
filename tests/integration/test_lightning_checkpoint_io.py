"""S3CheckpointIO, S3ModelCheckpoint, S3FileSystem and S3CheckpointMetrics in real Lightning Trainer runs
(CPU, a 2-layer MLP, a few steps) against the embedded SeaweedFS server, resumed in a new process.

The expensive part (two trainings and one resume process) runs once per module in ``runs``; the tests
then check one property each.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import torch

pytest.importorskip("lightning")

from botocore.awsrequest import AWSResponse
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import SingleDeviceStrategy

import s3ckpt
from s3ckpt import ConfigError, RetryConfig, S3TransferError
from s3ckpt.lightning import S3CheckpointIO, S3CheckpointMetrics, S3FileSystem, S3ModelCheckpoint
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport, ops
from tests.conftest import EPOCH_END_LAST_SAVES, client_config_for, new_bucket_name

from . import _lightning_resume_script as script

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NEMO_KNOBS: dict[str, Any] = {"chunk_size_MB": 5, "max_read_concurrency": 4, "max_write_concurrency": 4}


def _keys(t: S3Transport, bucket: str, prefix: str) -> set[str]:
    return {o.key[len(prefix) :] for o in ops.list_objects(t, bucket, prefix)}


def _ckpts(names: set[str]) -> set[str]:
    return {n for n in names if n.endswith(".ckpt")}


def _assert_same(actual: Any, expected: Any, where: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for k in expected:
            _assert_same(actual[k], expected[k], f"{where}/{k}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


@dataclass
class Runs:
    bucket: str
    transport: S3Transport
    sync_io: S3CheckpointIO
    async_io: S3CheckpointIO
    sync_strategy: Any
    async_strategy: Any
    metrics_csv: Path
    yaml_text: str
    before: dict[str, set[str]]
    expected: dict[str, dict[str, Any]]
    restored: list[dict[str, Any]]
    after: set[str]
    async_records_at_fit_end: int
    async_loaded: dict[str, int]
    """Global step of each async checkpoint, verified and loaded right after that fit (before the resumes)."""


@pytest.fixture(scope="module")
def runs(s3_server: LocalS3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    """Train sync (``plugins=[io]``) and async (``SingleDeviceStrategy(checkpoint_io=io)``) to step 8, then
    resume both in one new process: ``"last"`` (sync, async) and an explicit ``s3://`` path (sync)."""
    # The endpoint and credentials come from the environment, so the constructors are exactly NeMo's. boto3
    # reads credentials when the client is built (first request), so they stay set for the whole module.
    mp = pytest.MonkeyPatch()
    try:
        for k, v in s3_server.env().items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        yield _train_and_resume(s3_server, tmp_path_factory.mktemp("lightning"))
    finally:
        mp.undo()


def _train_and_resume(s3_server: LocalS3Server, tmp: Path) -> Runs:
    bucket = new_bucket_name("pl")
    s3_server.create_bucket(bucket)
    sync_dir, async_dir = f"s3://{bucket}/sync", f"s3://{bucket}/async"
    sync_io = S3CheckpointIO(dirpath=sync_dir, **NEMO_KNOBS, async_checkpointing=False)
    async_io = S3CheckpointIO(dirpath=async_dir, **NEMO_KNOBS, async_checkpointing=True)
    t = sync_io.transport

    csv_logger = CSVLogger(tmp, name="csv")
    sync_cb = script.model_checkpoint(sync_dir)
    sync_trainer = script.trainer(sync_io, [sync_cb, S3CheckpointMetrics()], 8, logger=csv_logger)
    sync_trainer.fit(script.TinyModel(), script.loader())
    # No dirpath: S3ModelCheckpoint takes the plugin's.
    async_trainer = script.trainer(async_io, [script.model_checkpoint(None)], 8, strategy_form=True)
    async_trainer.fit(script.TinyModel(), script.loader())
    async_records = len(async_io.records)  # teardown ran inside fit: every save must be recorded already

    before = {"sync": _keys(t, bucket, "sync/"), "async": _keys(t, bucket, "async/")}
    async_loaded = {}
    for name in sorted(_ckpts(before["async"])):
        s3ckpt.verify(f"{async_dir}/{name}", transport=t)
        async_loaded[name] = s3ckpt.load(f"{async_dir}/{name}", weights_only=False, transport=t)["global_step"]
    sync_cb.to_yaml()
    with S3FileSystem(t).open(f"{sync_dir}/best_k_models.yaml", "r") as fp:
        yaml_text = fp.read()
    expected = {
        url: s3ckpt.load(url, weights_only=False, transport=t)
        for url in (f"{sync_dir}/last.ckpt", f"{sync_dir}/step=6.ckpt", f"{async_dir}/last.ckpt")
    }

    jobs: list[dict[str, Any]] = [
        {"dirpath": sync_dir, "ckpt_path": "last", "max_steps": 9, "async": False},
        # step=6 is the worse of the top 2; training on to step 10 makes top-k drop it.
        {"dirpath": sync_dir, "ckpt_path": f"{sync_dir}/step=6.ckpt", "max_steps": 10, "async": False},
        {"dirpath": async_dir, "ckpt_path": "last", "max_steps": 9, "async": True},
    ]
    for i, job in enumerate(jobs):
        job["out"] = str(tmp / f"restored{i}.pt")
    jobs_file = tmp / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    env = {**os.environ, **s3_server.env(), "PYTHONPATH": str(REPO / "src")}
    env.pop("AWS_PROFILE", None)
    proc = subprocess.run(
        [sys.executable, str(Path(script.__file__)), str(jobs_file)],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    restored = [torch.load(job["out"], weights_only=False) for job in jobs]

    return Runs(
        bucket=bucket,
        transport=t,
        sync_io=sync_io,
        async_io=async_io,
        sync_strategy=sync_trainer.strategy,
        async_strategy=async_trainer.strategy,
        metrics_csv=Path(csv_logger.log_dir) / "metrics.csv",
        yaml_text=yaml_text,
        before=before,
        expected=expected,
        restored=restored,
        after=_keys(t, bucket, "sync/"),
        async_records_at_fit_end=async_records,
        async_loaded=async_loaded,
    )


def test_nemo_constructor_in_both_trainer_forms(runs: Runs) -> None:
    assert runs.sync_strategy.checkpoint_io is runs.sync_io
    assert isinstance(runs.async_strategy, SingleDeviceStrategy)
    assert runs.async_strategy.checkpoint_io is runs.async_io
    assert runs.sync_io.transfer.chunk_size_MB == 5 and runs.sync_io.transfer.max_write_concurrency == 4
    assert not runs.sync_io.async_checkpointing and runs.async_io.async_checkpointing


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_bucket_holds_top_k_and_last(runs: Runs, mode: str) -> None:
    # Saves at steps 2, 4, 6, 8; top-2 by a score that grows with the step keeps 6 and 8.
    want = {"last.ckpt", "step=6.ckpt", "step=8.ckpt"}
    assert runs.before[mode] == want | {k + ".s3ckpt.json" for k in want}


def test_async_teardown_waited_and_every_checkpoint_loads(runs: Runs) -> None:
    # 4 top-k saves + 4 last saves, all committed before fit returned.
    assert runs.async_records_at_fit_end == 8 + EPOCH_END_LAST_SAVES  # Lightning < 2.6: last.ckpt at step 5
    assert runs.async_loaded == {"last.ckpt": 8, "step=6.ckpt": 6, "step=8.ckpt": 8}
    assert runs.async_io.cancelled_removals == []


def test_metrics_callback_logs_every_save(runs: Runs) -> None:
    with runs.metrics_csv.open() as fp:
        rows = [r for r in csv.DictReader(fp) if r.get("ckpt/bytes")]
    assert len(rows) == len(runs.sync_io.records) == 8 + EPOCH_END_LAST_SAVES
    for row in rows:
        assert float(row["ckpt/bytes"]) > 0
        assert float(row["ckpt/save_seconds"]) > 0 and float(row["ckpt/gbps"]) > 0
        # Synchronous: training stalls for the whole save.
        assert float(row["ckpt/stall_seconds"]) == pytest.approx(float(row["ckpt/save_seconds"]))


def test_to_yaml_goes_through_s3_filesystem(runs: Runs) -> None:
    sync_dir = f"s3://{runs.bucket}/sync"
    assert f"{sync_dir}/step=6.ckpt: 5.0" in runs.yaml_text and f"{sync_dir}/step=8.ckpt: 7.0" in runs.yaml_text


@pytest.mark.parametrize(("job", "url"), [(0, "sync/last.ckpt"), (2, "async/last.ckpt")])
def test_resume_last_in_new_process(runs: Runs, job: int, url: str) -> None:
    restored, expected = runs.restored[job], runs.expected[f"s3://{runs.bucket}/{url}"]
    # The s3:// URL survives Lightning's lookup (its own would be normpath'ed to "s3:/...").
    assert restored["ckpt_path"] == f"s3://{runs.bucket}/{url}"
    assert restored["global_step"] == expected["global_step"] == 8
    assert restored["epoch"] == expected["epoch"] == 1
    _assert_same(restored["state_dict"], expected["state_dict"], "state_dict")
    _assert_same(restored["optimizer"], expected["optimizer_states"][0], "optimizer")


def test_resume_explicit_path_and_top_k_keeps_it(runs: Runs) -> None:
    url = f"s3://{runs.bucket}/sync/step=6.ckpt"
    restored, expected = runs.restored[1], runs.expected[url]
    assert restored["ckpt_path"] == url
    assert restored["global_step"] == expected["global_step"] == 6
    assert restored["epoch"] == expected["epoch"] == 1
    _assert_same(restored["state_dict"], expected["state_dict"], "state_dict")
    _assert_same(restored["optimizer"], expected["optimizer_states"][0], "optimizer")
    # Steps 8 (saved as step=8-v1, step=8 exists) and 10 pushed step=6 out of the top 2, yet it is still
    # there: it is the checkpoint the run resumed from.
    assert {"step=6.ckpt", "step=8-v1.ckpt", "step=10.ckpt"} <= _ckpts(runs.after)
    s3ckpt.verify(url, transport=runs.transport)


def test_dirpath_must_be_s3(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"must be an s3:// URL"):
        S3CheckpointIO(dirpath=str(tmp_path), chunk_size_MB=5)
    with pytest.raises(ValueError, match=r"must be an s3:// URL"):
        S3ModelCheckpoint(dirpath=str(tmp_path))
    S3ModelCheckpoint(dirpath="s3://bucket/run", save_last="link")  # a server-side copy on S3 (test_link.py)


def test_from_config_dict_and_omegaconf(s3_env: dict[str, str]) -> None:
    from omegaconf import OmegaConf

    section = {"chunk_size_MB": 8, "max_read_concurrency": 3, "max_write_concurrency": 2}
    io = S3CheckpointIO.from_config({**section, "enable_async_checkpointing": True}, dirpath="s3://b-1/run")
    assert (io.transfer.chunk_size_MB, io.transfer.max_read_concurrency, io.transfer.max_write_concurrency) == (8, 3, 2)
    assert io.async_checkpointing
    io.teardown()
    node = OmegaConf.create({**section, "enable_async_checkpointing": False})
    io = S3CheckpointIO.from_config(node, dirpath="s3://b-1/run")
    assert io.transfer.chunk_size_MB == 8 and not io.async_checkpointing
    with pytest.raises(ConfigError, match=r"chunk_size_mb.*known keys.*chunk_size_MB"):
        S3CheckpointIO.from_config(OmegaConf.create({"chunk_size_mb": 8}), dirpath="s3://b-1/run")


def test_filesystem_operations(transport: S3Transport, bucket: str) -> None:
    fs = S3FileSystem(transport)
    base = f"s3://{bucket}/run"
    s3ckpt.save({"w": torch.ones(3)}, f"{base}/a.ckpt", transport=transport)
    s3ckpt.save({"w": torch.zeros(3)}, f"{base}/sub/b.ckpt", transport=transport)

    assert fs.ls(base, detail=False) == [f"{bucket}/run/a.ckpt", f"{bucket}/run/sub"]  # no manifests
    assert fs.isdir(base) and fs.isdir(f"{bucket}/run/sub") and not fs.isfile(base)
    assert fs.isfile(f"{base}/a.ckpt") and not fs.isdir(f"{base}/a.ckpt")
    assert fs.info(f"{base}/a.ckpt")["type"] == "file" and fs.info(base)["type"] == "directory"
    assert fs.exists(base) and fs.exists(f"{base}/a.ckpt") and not fs.exists(f"{base}/nope.ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fs.exists("s3://no-such-bucket-s3ckpt/run")  # a typo is not "no checkpoint"
    stamp = fs.modified(f"{base}/a.ckpt")
    assert isinstance(stamp, datetime)
    assert fs.modified(os.path.normpath(f"{base}/a.ckpt")) == stamp  # "s3:/bucket/..." is read as the URL

    fs.makedirs(f"{base}/new", exist_ok=True)  # no-op
    assert not fs.exists(f"{base}/new")
    with fs.open(f"{base}/notes.yaml", "w") as fp:
        fp.write("a: 1\n")
    with fs.open(f"{base}/notes.yaml", "r") as fp:
        assert fp.read() == "a: 1\n"
    with pytest.raises(FileNotFoundError):
        fs.open(f"{base}/missing.yaml", "r")

    fs.rm_file(f"{base}/a.ckpt")
    assert _keys(transport, bucket, "run/") == {"notes.yaml", "sub/b.ckpt", "sub/b.ckpt.s3ckpt.json"}
    fs.rm(f"{base}/sub", recursive=True)
    assert _keys(transport, bucket, "run/") == {"notes.yaml"}


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.data


def test_async_failed_third_upload_keeps_committed_checkpoints(s3_server: LocalS3Server, bucket: str) -> None:
    """The third checkpoint's upload fails on the wire: a handler on botocore's ``before-send`` event (the
    real HTTP path of the plugin's own client, after signing) answers its PutObject with HTTP 500 on every
    attempt, so the retry budget runs out. The failure must surface at the next save, and top-k must not
    have deleted the previous checkpoint for the sake of the one that failed."""
    dirpath = f"s3://{bucket}/run"
    io = S3CheckpointIO(
        dirpath=dirpath,
        **NEMO_KNOBS,
        async_checkpointing=True,
        # One pending save, so the next save (last.ckpt of step 3) waits for step 3's outcome and the failure
        # surfaces right there. With the default 2 it would be queued before the failure is known and saved
        # (a valid checkpoint of step 3), the failure surfacing one save later.
        max_pending_saves=1,
        client=client_config_for(s3_server),
        retry=RetryConfig(max_attempts=2, base_delay_s=0.01, deadline_s=2),
    )
    attempts: list[str] = []

    def fail_step3(request: Any, **_: Any) -> AWSResponse | None:
        if not unquote(urlsplit(request.url).path).endswith("/run/step=3.ckpt"):
            return None
        attempts.append(request.url)
        body = b"<Error><Code>InternalError</Code><Message>injected by the test</Message></Error>"
        return AWSResponse(request.url, 500, {"Content-Type": "application/xml"}, _Body(body))

    io.transport.clients.get().meta.events.register("before-send.s3.PutObject", fail_step3)
    cb = S3ModelCheckpoint(dirpath, filename="{step}", save_top_k=1, save_last=True, every_n_train_steps=1)
    trainer = script.trainer(io, [cb], 6)
    with pytest.raises(S3TransferError, match=r"step=3\.ckpt"):
        trainer.fit(script.TinyModel(), script.loader())
    assert len(attempts) == 2  # both attempts of the retry budget hit the fault

    io.teardown()  # the failure was raised once, at the save after it; nothing else is pending
    keys = _keys(io.transport, bucket, "run/")
    assert _ckpts(keys) == {"step=2.ckpt", "last.ckpt"}  # step=1 went once step=2 committed
    assert "step=2.ckpt.s3ckpt.json" in keys
    assert io.cancelled_removals == [f"{dirpath}/step=2.ckpt"]
    for name in ("step=2.ckpt", "last.ckpt"):
        ckpt = s3ckpt.load(f"{dirpath}/{name}", weights_only=False, transport=io.transport)
        assert ckpt["global_step"] == 2


def test_import_without_lightning() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["lightning"] = None  # as if the extra were not installed
        import s3ckpt
        assert callable(s3ckpt.save) and callable(s3ckpt.load)
        for attempt in ("import s3ckpt.lightning", "s3ckpt.S3CheckpointIO"):
            try:
                exec(attempt)
            except ModuleNotFoundError as exc:
                assert "s3ckpt[lightning]" in str(exc), exc
            else:
                raise AssertionError(attempt + " worked without lightning")
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_fs_open_write_aborts_on_exception(s3_server: LocalS3Server, bucket: str) -> None:
    """An exception inside ``with fs.open(..., "wb")`` must not publish the partial bytes."""
    from s3ckpt.lightning import S3FileSystem
    from s3ckpt.transport import S3Transport
    from s3ckpt.transport import ops as s3ops
    from tests.conftest import client_config_for

    t = S3Transport.create(client=client_config_for(s3_server))
    fs = S3FileSystem(t)
    url = f"s3://{bucket}/fs-abort.bin"
    with fs.open(url, "wb") as f:
        f.write(b"good")
    with pytest.raises(RuntimeError, match="boom"), fs.open(url, "wb") as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert s3ops.get_bytes(t, bucket, "fs-abort.bin") == b"good"
    assert s3ops.list_uploads(t, bucket) == []

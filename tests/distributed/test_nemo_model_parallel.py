"""NeMo's model-parallel single files (``<dir>/mp_rank_XX/<name>``), committed as a group with no user call.

The Lightning test runs 4 real gloo ranks (tp=2 x dp=2) with a DDPStrategy that handles paths as NeMo's
``NLPDDPStrategy`` does: it injects the rank folder into every checkpoint path, and saves and removes only on
the ranks of data-parallel rank 0, one per tensor-parallel rank. ``S3CheckpointIO(tensor_parallel_size=2)``
must commit each group once both rank files are stored (sync and async), uncommit it before its files go
(top-k), never commit a group a rank did not save, and resume must choose the newest complete group, from
which each rank loads its own file. One launch runs every phase (imports cost most of the time on a 2-core
machine); the test process then checks the store.

The cheaper tests below it drive :mod:`s3ckpt.model_parallel` in this process: two ranks committing the same
group at once, a marker left by an earlier save of the same name, and rank files of different saves.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import torch

import s3ckpt
from s3ckpt.catalog import GROUP_MARKER_SUFFIX
from s3ckpt.distributed import commit_model_parallel, model_parallel_rank_url
from s3ckpt.errors import ConfigError
from s3ckpt.model_parallel import GroupSizes, commit_if_complete, parse_rank_url, rank_keys, write_group_marker
from s3ckpt.resume import find_resume_checkpoint
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport, ops
from tests.conftest import client_config_for

pytestmark = [pytest.mark.integration]

RESULT_TAG = "NEMO-MP-RESULT "
TP, DP = 2, 2
TRAIN_STEPS = 6  # 32 samples / 4 ranks / batches of 4: 2 steps per epoch; checkpoints at steps 2, 4 and 6


# -- rank processes ----------------------------------------------------------------------------------------------


def _rank_main(cfg_json: str) -> None:  # pragma: no cover - runs in the rank processes
    import torch.distributed as dist
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.strategies import DDPStrategy

    from s3ckpt.config import ClientConfig
    from s3ckpt.lightning import S3CheckpointIO, S3ModelCheckpoint, configure_s3_resume
    from tests.integration._lightning_resume_script import LinearModel

    cfg = json.loads(cfg_json)
    rank = int(os.environ["RANK"])
    tp_rank = rank % TP
    torch.set_num_threads(1)
    out: dict[str, Any] = {"committed": []}

    class Committed(logging.Handler):  # which groups this rank committed (the rank that stored last does)
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("committed the model-parallel checkpoint"):
                out["committed"].append(record.args[0] if isinstance(record.args, tuple) else None)

    mp_log = logging.getLogger("s3ckpt.model_parallel")
    mp_log.setLevel(logging.INFO)
    mp_log.addHandler(Committed())

    class NeMoStyleDDP(DDPStrategy):
        """NeMo's NLPDDPStrategy's checkpoint paths: tp_rank = rank % TP, dp_rank = rank // TP."""

        def _inject(self, path: Any) -> str:
            return model_parallel_rank_url(str(path), self.global_rank % TP)

        def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
            if self.global_rank // TP == 0:
                self.checkpoint_io.save_checkpoint(checkpoint, self._inject(filepath), storage_options)

        def remove_checkpoint(self, filepath: Any) -> None:
            if self.global_rank // TP == 0:
                self.checkpoint_io.remove_checkpoint(self._inject(filepath))

        def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
            return super().load_checkpoint(self._inject(checkpoint_path), *args, **kwargs)

    class ShardedModel(LinearModel):
        """Each tensor-parallel rank adds a shard of its own, so a rank loading another's file shows."""

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.log("score", float(self.global_step))  # grows: top-k always drops the oldest
            return super().training_step(batch, batch_idx)

        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            checkpoint["shard"] = {"tp_rank": tp_rank, "w": torch.full((4,), 100.0 * tp_rank + self.global_step)}

        def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            shard = checkpoint["shard"]
            out["loaded"] = {"tp_rank": shard["tp_rank"], "w": shard["w"].tolist(), "step": checkpoint["global_step"]}

    class Record(Callback):
        def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
            out["start"] = {"step": trainer.global_step, "weights": _weights(pl_module)}

    def _weights(module: LightningModule) -> dict[str, list[Any]]:
        return {k: v.tolist() for k, v in module.state_dict().items()}

    client = ClientConfig(endpoint_url=cfg["endpoint"], access_key_id=cfg["ak"], secret_access_key=cfg["sk"])

    def io(dirpath: str, async_checkpointing: bool) -> S3CheckpointIO:
        return S3CheckpointIO(dirpath, async_checkpointing=async_checkpointing, tensor_parallel_size=TP, client=client)

    def trainer(max_steps: int, plugin: S3CheckpointIO, callbacks: list[Callback], port: int) -> Trainer:
        if dist.is_initialized():  # a new Trainer in the same processes: a new group, as a new job would
            dist.destroy_process_group()
        os.environ["MASTER_PORT"] = str(port)
        strategy = NeMoStyleDDP(checkpoint_io=plugin, process_group_backend="gloo", timeout=timedelta(seconds=60))
        return Trainer(
            accelerator="cpu",
            devices=TP * DP,
            num_nodes=1,
            strategy=strategy,
            callbacks=callbacks,
            max_steps=max_steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=any(isinstance(c, S3ModelCheckpoint) for c in callbacks),
            default_root_dir=cfg["workdir"],
        )

    def checkpoint_callback() -> S3ModelCheckpoint:
        ckpt = S3ModelCheckpoint(
            filename="{step}", monitor="score", mode="max", save_top_k=2, save_last=True, every_n_train_steps=2
        )
        ckpt.CHECKPOINT_NAME_LAST = "{step}-last"  # NeMo's: one name per last checkpoint
        return ckpt

    for phase, async_checkpointing in (("sync", False), ("async", True)):
        start = time.perf_counter()
        model = ShardedModel(features=4, samples=32)
        trainer(TRAIN_STEPS, io(cfg[phase], async_checkpointing), [checkpoint_callback()], cfg["ports"][phase]).fit(
            model
        )
        out[phase] = {"weights": _weights(model), "fit_s": round(time.perf_counter() - start, 2)}

    sync_io = io(cfg["sync"], False)
    if rank == 0:
        # A rank that never saved: tp rank 1's file of a newer last checkpoint is missing.
        lone = {"global_step": 8, "epoch": 4, "shard": {"tp_rank": 0}}
        sync_io.save_checkpoint(lone, model_parallel_rank_url(f"{cfg['sync']}/step=8-last.ckpt", 0))

    resumed = trainer(TRAIN_STEPS + 1, sync_io, [Record()], cfg["ports"]["resume"])
    out["configured"] = configure_s3_resume(resumed, cfg["sync"])
    resumed.fit(ShardedModel(features=4, samples=32))
    out["resumed"] = str(resumed.ckpt_path)
    print(RESULT_TAG + json.dumps(out), flush=True)


# -- the multi-rank test -----------------------------------------------------------------------------------------


def _listing(t: S3Transport, url: str) -> set[str]:
    bucket, prefix = url[len("s3://") :].split("/", 1)
    return {o.key[len(prefix) + 1 :] for o in ops.list_objects(t, bucket, prefix + "/")}


def _rank_files(name: str) -> set[str]:
    return {f"mp_rank_{r:02d}/{name}{suffix}" for r in range(TP) for suffix in ("", ".s3ckpt.json")}


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_nemo_strategy_groups_committed_without_a_call(
    s3_server: LocalS3Server, transport: S3Transport, bucket: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.distributed.test_lightning_resume import _free_port
    from tests.distributed.test_resume_broadcast import run_ranks

    workdir = tmp_path_factory.mktemp("nemo-mp")
    cfg: dict[str, Any] = {
        "endpoint": s3_server.endpoint_url,
        "ak": s3_server.access_key,
        "sk": s3_server.secret_key,
        "sync": f"s3://{bucket}/sync",
        "async": f"s3://{bucket}/async",
        "workdir": str(workdir),
        "ports": {p: _free_port() for p in ("sync", "async", "resume")},
    }
    world = TP * DP
    env = {"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": str(world), "NODE_RANK": "0"}
    start = time.monotonic()
    per_rank = run_ranks(
        "tests.distributed.test_nemo_model_parallel",
        cfg,
        world,
        workdir,
        timeout_s=200,
        rank_env=lambda r: {**env, "LOCAL_RANK": str(r), "RANK": str(r)},
        result_tag=RESULT_TAG,
    )
    print(f"{world} ranks (tp={TP} x dp={DP}): sync, async and resume in {time.monotonic() - start:.1f} s")
    print(json.dumps({r: {p: per_rank[r][p]["fit_s"] for p in ("sync", "async")} for r in range(world)}))

    kept = ("step=4.ckpt", "step=6.ckpt", "step=6-last.ckpt")
    for phase in ("sync", "async"):
        url = cfg[phase]
        expected = {name + GROUP_MARKER_SUFFIX for name in kept}.union(*(_rank_files(n) for n in kept))
        if phase == "sync":
            expected |= {"mp_rank_00/step=8-last.ckpt", "mp_rank_00/step=8-last.ckpt.s3ckpt.json"}
        # Removed by top-k / save_last (step=2, step=2-last, step=4-last): marker, files and manifests gone.
        assert _listing(transport, url) == expected, phase
        for name in kept:
            # Written by the ranks' own saves (nothing here calls commit_model_parallel), recording each file.
            marker = json.loads(ops.get_bytes(transport, bucket, f"{phase}/{name}{GROUP_MARKER_SUFFIX}"))
            assert marker["format"] == "s3ckpt-group/1"
            heads = {k: ops.head(transport, bucket, k) for k in (f"{phase}/mp_rank_{r:02d}/{name}" for r in range(TP))}
            assert marker["files"] == {k: {"size": i.size, "etag": i.etag} for k, i in heads.items()}, name
            # Committed by at least one dp-rank-0 rank (the one that stored its file last), by no other.
            committers = [r for r in range(world) if f"{url}/{name}" in per_rank[r]["committed"]]
            assert committers and set(committers) <= {0, 1}, (name, committers)
        assert per_rank[0][phase]["weights"] == per_rank[world - 1][phase]["weights"]

    # Resume: the newest complete group (step=8-last lacks tp rank 1's file), each rank loading its own file.
    sync_last = f"{cfg['sync']}/step=6-last.ckpt"
    assert [r["configured"] for r in per_rank] == [sync_last, None, None, None]
    for rank, r in enumerate(per_rank):
        assert r["resumed"] == sync_last
        tp_rank = rank % TP
        assert r["loaded"] == {"tp_rank": tp_rank, "w": [100.0 * tp_rank + TRAIN_STEPS] * 4, "step": TRAIN_STEPS}
        assert r["start"] == {"step": TRAIN_STEPS, "weights": per_rank[0]["sync"]["weights"]}, rank

    # The async run's groups are complete once every rank's teardown is done (the processes have exited).
    async_last = f"{cfg['async']}/step=6-last.ckpt"
    assert find_resume_checkpoint(cfg["async"], transport=transport) == async_last
    # A rank file gone (its marker left, or gone too): the group is never picked.
    ops.delete_object(transport, bucket, "async/mp_rank_01/step=6-last.ckpt")
    with pytest.warns(UserWarning, match="step=6-last.ckpt"):
        assert find_resume_checkpoint(cfg["async"], transport=transport, resume_ignore_no_checkpoint=True) is None
    ops.delete_object(transport, bucket, "async/step=6-last.ckpt" + GROUP_MARKER_SUFFIX)
    with pytest.warns(UserWarning, match="step=6-last.ckpt"):
        assert find_resume_checkpoint(cfg["async"], transport=transport, resume_ignore_no_checkpoint=True) is None


# -- the commit itself, in this process ---------------------------------------------------------------------------


def _save_rank(t: S3Transport, group_url: str, tp_rank: int, step: int) -> str:
    url = model_parallel_rank_url(group_url, tp_rank)
    s3ckpt.save({"global_step": step, "epoch": 0, "w": torch.full((8,), float(tp_rank))}, url, transport=t)
    return url


def test_two_ranks_committing_at_once_both_succeed(
    transport: S3Transport, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="s3ckpt.model_parallel")
    group = f"s3://{bucket}/run/step=5.ckpt"
    files = [parse_rank_url(_save_rank(transport, group, r, 5)) for r in range(TP)]
    sizes = GroupSizes(TP)
    results: list[str | None] = [None] * TP
    errors: list[BaseException] = []
    go = threading.Barrier(TP)

    def commit(r: int) -> None:
        try:
            f = files[r]
            assert f is not None
            go.wait()
            results[r] = commit_if_complete(transport, f, sizes)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=(r,)) for r in range(TP)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert results == [group + GROUP_MARKER_SUFFIX] * TP
    # A third writer (a retried request, the manual commit) finds the same marker and succeeds as well.
    first = ops.get_bytes(transport, bucket, "run/step=5.ckpt" + GROUP_MARKER_SUFFIX)
    assert commit_model_parallel(group, tensor_parallel_size=TP, transport=transport) == results[0]
    again = json.loads(ops.get_bytes(transport, bucket, "run/step=5.ckpt" + GROUP_MARKER_SUFFIX))
    assert again == json.loads(first), "an equal marker is kept as it is"
    # The PUT is conditional: the second thread and the manual commit each found the equal marker there.
    assert sum("already committed by another rank" in r.getMessage() for r in caplog.records) == 2


def test_a_marker_of_an_earlier_save_is_replaced(transport: S3Transport, bucket: str) -> None:
    group = f"s3://{bucket}/run/last.ckpt"
    for r in range(TP):
        _save_rank(transport, group, r, 5)
    keys = [f"run/mp_rank_{r:02d}/last.ckpt" for r in range(TP)]
    old = [ops.head(transport, bucket, k) for k in keys]
    write_group_marker(transport, bucket, "run/last.ckpt", old)
    for r in range(TP):
        _save_rank(transport, group, r, 7)  # the same name saved again, without the marker deleted first
    new = [ops.head(transport, bucket, k) for k in keys]
    assert write_group_marker(transport, bucket, "run/last.ckpt", new) == group + GROUP_MARKER_SUFFIX
    marker = json.loads(ops.get_bytes(transport, bucket, "run/last.ckpt" + GROUP_MARKER_SUFFIX))
    assert marker["files"] == {i.key: {"size": i.size, "etag": i.etag} for i in new}
    assert find_resume_checkpoint(f"s3://{bucket}/run", transport=transport) == group


def test_rank_files_of_different_saves_are_not_committed(transport: S3Transport, bucket: str) -> None:
    group = f"s3://{bucket}/run/last.ckpt"
    sizes = GroupSizes(TP)
    rank0 = parse_rank_url(_save_rank(transport, group, 0, 4))
    rank1 = parse_rank_url(_save_rank(transport, group, 1, 2))  # tp rank 1 has not replaced its older file yet
    assert rank0 is not None and rank1 is not None
    assert commit_if_complete(transport, rank0, sizes) is None
    assert not ops.exists(transport, bucket, "run/last.ckpt" + GROUP_MARKER_SUFFIX)
    # Its upload has landed but its manifest is still the old one: not finished either.
    ops.put_bytes(transport, bucket, "run/mp_rank_01/last.ckpt", b"not yet described by its manifest")
    assert commit_if_complete(transport, rank0, sizes) is None
    _save_rank(transport, group, 1, 4)
    assert commit_if_complete(transport, rank1, sizes) == group + GROUP_MARKER_SUFFIX


@pytest.mark.parametrize("async_checkpointing", [False, True])
def test_checkpoint_io_commits_and_uncommits(
    s3_server: LocalS3Server, bucket: str, transport: S3Transport, async_checkpointing: bool
) -> None:
    from s3ckpt.lightning import S3CheckpointIO

    group = f"s3://{bucket}/run/tp_rank_00_pp_rank_000/step=3.ckpt"
    ios = [
        S3CheckpointIO(
            f"s3://{bucket}/run",
            tensor_parallel_size=1,
            pipeline_parallel_size=2,
            async_checkpointing=async_checkpointing,
            client=client_config_for(s3_server),
        )
        for _ in range(2)
    ]
    logical, marker = f"s3://{bucket}/run/step=3.ckpt", "run/step=3.ckpt" + GROUP_MARKER_SUFFIX
    urls = [model_parallel_rank_url(logical, 0, p, 2) for p in range(2)]
    assert urls[0] == group
    state = {"global_step": 3, "epoch": 0}
    ios[0].save_checkpoint({**state, "w": torch.zeros(2)}, urls[0])
    ios[0].wait()
    assert not ops.exists(transport, bucket, marker), "one of two rank files: not committed"
    ios[1].save_checkpoint({**state, "w": torch.ones(2)}, urls[1])
    ios[1].wait()
    assert ops.exists(transport, bucket, marker)
    assert ios[1].load_checkpoint(urls[1])["w"].tolist() == [1.0, 1.0]
    ios[0].remove_checkpoint(urls[0])
    ios[0].wait()
    assert _listing(transport, f"s3://{bucket}/run") == {
        "tp_rank_00_pp_rank_001/step=3.ckpt",
        "tp_rank_00_pp_rank_001/step=3.ckpt.s3ckpt.json",
    }, "the marker went with the first removal"
    with pytest.raises(ConfigError, match="pipeline_parallel_size=2"):
        ios[0].save_checkpoint(state, model_parallel_rank_url(logical, 0))  # mp_rank_00: NeMo's pp=1 folder
    with pytest.raises(ConfigError, match="tensor_parallel_size=1"):
        ios[0].save_checkpoint(state, model_parallel_rank_url(logical, 1, 0, 2))
    for plugin in ios:
        plugin.teardown()


def test_parse_rank_url() -> None:
    f = parse_rank_url("s3://bkt/run/tp_rank_03_pp_rank_002/x.ckpt")
    assert f is not None and (f.tp_rank, f.pp_rank, f.pipeline_folder) == (3, 2, True)
    assert f.group_url == "s3://bkt/run/x.ckpt" and f.marker_url == "s3://bkt/run/x.ckpt" + GROUP_MARKER_SUFFIX
    f = parse_rank_url("s3://bkt/mp_rank_01/x.ckpt")
    assert f is not None and (f.tp_rank, f.pp_rank, f.group_url) == (1, 0, "s3://bkt/x.ckpt")
    assert parse_rank_url("s3://bkt/run/x.ckpt") is None
    assert parse_rank_url("s3://bkt/run/mp_rank_01/sub/x.ckpt") is None
    assert rank_keys("x.ckpt", 2) == ["mp_rank_00/x.ckpt", "mp_rank_01/x.ckpt"]  # a group at a bucket's top
    assert rank_keys("r/x.ckpt", 1, 2)[1] == "r/tp_rank_00_pp_rank_001/x.ckpt"
    assert GroupSizes(1, 1).rank_file("s3://bkt/run/mp_rank_01/x.ckpt") is None  # no sizes: not committed here


if __name__ == "__main__":  # pragma: no cover
    _rank_main(sys.argv[1])

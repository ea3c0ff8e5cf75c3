"""Sharded checkpoints through torch.distributed.checkpoint on the real server, with real gloo ranks.

The rank processes and their launcher live in :mod:`tests.distributed._dcp_ranks`; this module runs them
against the session's server and checks what they left in the bucket, and loads, saves and corrupts
checkpoints in this process (world size 1).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import crc32c
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo

from s3ckpt import dcp as s3dcp
from s3ckpt.catalog import list_checkpoints
from s3ckpt.dcp import S3StorageReader, S3StorageWriter
from s3ckpt.dcp.spans import plan_spans
from s3ckpt.errors import CheckpointCorruptedError, CheckpointNotFoundError, ConflictError, UnsafeCheckpointError
from s3ckpt.transport import S3Transport, ops
from tests.conftest import new_bucket_name
from tests.distributed._dcp_ranks import BIG_ROWS, RANK_BIG_ROWS, MiB, full_state, run_ranks, server_cfg, transport_for

pytestmark = [pytest.mark.distributed, pytest.mark.integration]


@pytest.fixture(scope="module")
def dcp_bucket(s3_server: Any) -> str:
    return str(s3_server.create_bucket(new_bucket_name("dcp")))


@pytest.fixture(scope="module")
def saved_by_4(s3_server: Any, dcp_bucket: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three checkpoints saved by 4 ranks (flat, prefix strategy, async_save), each loaded back by the 4; then
    resume discovery on a directory holding a sharded ``*last`` checkpoint, and two saves of replicated state."""
    base = f"s3://{dcp_bucket}/run4"
    urls = {"flat": f"{base}/step-1", "prefixed": f"{base}/step-2", "async": f"{base}/step-3"}
    urls.update(resume=f"s3://{dcp_bucket}/resume4/step=4-last", ddp=f"{base}-ddp", hsdp=f"{base}-hsdp")
    plan: list[dict[str, Any]] = [
        {"op": "save", "url": urls["flat"], "seed": 1, "big_rows": BIG_ROWS},
        {"op": "save", "url": urls["prefixed"], "seed": 2, "prefixes": 3},
        {"op": "async_save", "url": urls["async"], "seed": 3},
        {"op": "load", "url": urls["flat"], "seed": 1, "big_rows": BIG_ROWS},
        {"op": "load", "url": urls["prefixed"], "seed": 2},
        {"op": "load", "url": urls["async"], "seed": 3},
        {"op": "load", "url": urls["prefixed"], "seed": 2, "via": "wrapper"},
        {"op": "save", "url": urls["resume"], "seed": 4},
        {"op": "resolve", "url": urls["resume"].rsplit("/", 1)[0]},
        {"op": "save_replicated", "url": urls["ddp"], "style": "ddp"},
        {"op": "save_replicated", "url": urls["hsdp"], "style": "hsdp"},
    ]
    return {"urls": urls, "results": run_ranks(s3_server, 4, plan, tmp_path_factory.mktemp("ranks4"))}


@pytest.fixture(scope="module")
def ranks_2(s3_server: Any, saved_by_4: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 2-rank run: load the 4-rank checkpoints, save and load its own, then die mid-save (rank 1 is
    SIGKILLed while its upload is open). One run, not three: process start-up is most of the cost here."""
    urls = saved_by_4["urls"]
    base = urls["flat"].rsplit("/", 2)[0] + "/run2"
    two, killed = f"{base}/step-7", f"{base}/step-8"
    inc = {name: f"{base}/inc-{name}" for name in ("base", "composed", "plain")}
    big, bump = 4 * RANK_BIG_ROWS, ["layer.w"]
    plan = [
        {"op": "load", "url": urls["flat"], "seed": 1, "big_rows": BIG_ROWS},
        {"op": "load", "url": urls["prefixed"], "seed": 2},
        {"op": "load", "url": urls["async"], "seed": 3},
        {"op": "save", "url": two, "seed": 7},
        {"op": "load", "url": two, "seed": 7},
        {"op": "save", "url": inc["base"], "seed": 9, "big_rows": big},
        {"op": "save", "url": inc["composed"], "seed": 9, "big_rows": big, "bump": bump, "base": inc["base"]},
        {"op": "save", "url": inc["plain"], "seed": 9, "big_rows": big, "bump": bump},
        {"op": "load", "url": inc["composed"], "seed": 9, "big_rows": big, "bump": bump, "via": "wrapper"},
        {"op": "kill_save", "url": killed, "seed": 8, "big_rows": 2 * RANK_BIG_ROWS},
    ]
    results = run_ranks(s3_server, 2, plan, tmp_path_factory.mktemp("ranks2"), victim=1)
    return {"results": results, "base": base, "two": two, "killed": killed, "inc": inc}


@pytest.fixture
def t(s3_server: Any) -> S3Transport:
    return transport_for(server_cfg(s3_server))


def _keys(t: S3Transport, url: str) -> list[str]:
    bucket, _, prefix = url[len("s3://") :].partition("/")
    return sorted(o.key[len(prefix) + 1 :] for o in ops.list_objects(t, bucket, prefix + "/"))


def _load_full(url: str, seed: int, t: S3Transport, big_rows: int = 0, **reader: Any) -> None:
    """Load ``url`` in this process (world size 1) into unsharded tensors and compare with the originals."""
    expected = full_state(seed, big_rows)
    state: dict[str, Any] = {k: torch.zeros_like(v) for k, v in expected.items()}
    state["meta"] = {"seed": -1, "tag": ""}
    s3dcp.load(state, url, transport=t, no_dist=True, **reader)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    assert state["meta"] == {"seed": seed, "tag": f"ckpt-{seed}"}


@pytest.mark.timeout(240)
def test_save_and_load_4_ranks(saved_by_4: dict[str, Any], t: S3Transport) -> None:
    urls = saved_by_4["urls"]
    assert len(saved_by_4["results"]) == 4 and all(len(r) == 11 for r in saved_by_4["results"])
    flat = _keys(t, urls["flat"])
    assert flat == [".metadata", ".metadata.s3ckpt.json", *[f"__{r}_0.distcp" for r in range(4)]]
    bucket, key = urls["flat"][5:].split("/", 1)
    manifest = json.loads(ops.get_bytes(t, bucket, key + "/.metadata.s3ckpt.json"))
    assert manifest["world_size"] == 4
    for r in range(4):
        info = ops.head(t, bucket, f"{key}/__{r}_0.distcp")
        assert manifest["files"][f"__{r}_0.distcp"]["size"] == info.size > 5 * MiB
        assert "-" in info.etag, "a multipart upload"
    (entry,) = [e for e in list_checkpoints(t, urls["flat"]) if e.kind == "sharded"]
    assert entry.committed and entry.url.rstrip("/") == urls["flat"]


@pytest.mark.timeout(240)
def test_metadata_requests_do_not_grow_with_ranks(saved_by_4: dict[str, Any]) -> None:
    """At 4 ranks, a plain ``dcp.load`` through ``S3StorageReader`` GETs ``.metadata`` and its sidecar on every
    rank; ``s3ckpt.dcp.load`` GETs each once, on rank 0 (broadcast), and the other ranks only shard ranges.
    Counted per rank on the wire (one botocore ``before-send`` per HTTP request)."""
    per_rank = [{(r["op"], r["url"], r["via"]): r["requests"] for r in rs} for rs in saved_by_4["results"]]
    prefixed = saved_by_4["urls"]["prefixed"]
    plain = [rank[("load", prefixed, "reader")] for rank in per_rank]
    shared = [rank[("load", prefixed, "wrapper")] for rank in per_rank]
    assert [p.get("GetObject .metadata") for p in plain] == [1, 1, 1, 1], plain
    assert [p.get("GetObject .metadata.s3ckpt.json") for p in plain] == [1, 1, 1, 1], plain
    assert shared[0].get("GetObject .metadata") == 1 and shared[0].get("GetObject .metadata.s3ckpt.json") == 1
    for rank, counts in enumerate(shared[1:], start=1):
        assert set(counts) <= {"GetObject *.distcp"}, f"rank {rank} sent {counts}"
    assert not any("ListObjectsV2" in c or "HeadObject .metadata" in c for c in shared), shared


@pytest.mark.timeout(240)
def test_resume_discovery_of_sharded_checkpoints_lists_on_rank0_only(saved_by_4: dict[str, Any]) -> None:
    """``resolve_resume_path`` on a directory of sharded checkpoints: one LIST, from rank 0 alone (a sharded
    candidate is committed by the ``.metadata`` the listing shows, so no HEAD), the path broadcast to all 4."""
    resolved = [next(r for r in rs if r["op"] == "resolve") for rs in saved_by_4["results"]]
    assert [r["path"].rstrip("/") for r in resolved] == [saved_by_4["urls"]["resume"]] * 4
    assert resolved[0]["requests"] == {"ListObjectsV2": 1}, resolved[0]
    assert [r["requests"] for r in resolved[1:]] == [{}, {}, {}], "non-zero ranks send no request to find it"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("style", ["ddp", "hsdp"])
def test_replicated_state_is_uploaded_once_and_spread(saved_by_4: dict[str, Any], t: S3Transport, style: str) -> None:
    """Replicated state saved by 4 ranks (``ddp``: the same full tensors on every rank; ``hsdp``: DTensors
    ``[Replicate(), Shard(0)]`` on a 2 x 2 mesh) is uploaded once, not once per replica (DCP's planner drops the
    duplicates and the writer keeps that), and the upload work is shared: every rank writes about a quarter."""
    url = saved_by_4["urls"][style]
    bucket, key = url[len("s3://") :].split("/", 1)
    manifest = json.loads(ops.get_bytes(t, bucket, key + "/.metadata.s3ckpt.json"))
    per_rank = {int(name.split("_")[2]): record["size"] for name, record in manifest["files"].items()}
    model = 16 * 64 * 256 * 4  # 16 fp32 tensors of 64 x 256: 1 MiB, held 4 times (ddp) or twice (hsdp)
    total = sum(per_rank.values())
    assert model < total < 1.1 * model, f"{total} bytes uploaded for a {model}-byte model: {per_rank}"
    assert sorted(per_rank) == [0, 1, 2, 3], f"every replica takes part: {per_rank}"
    assert max(per_rank.values()) < 0.3 * total, f"no rank writes it all: {per_rank}"
    g = torch.Generator().manual_seed(17)
    expected = {f"layer{i}.weight": torch.randn(64, 256, generator=g) for i in range(16)}
    state = {k: torch.zeros_like(v) for k, v in expected.items()}
    s3dcp.load(state, url, transport=t, no_dist=True)
    assert all(torch.equal(state[k], v) for k, v in expected.items()), "the deduplicated checkpoint is whole"


@pytest.mark.timeout(240)
def test_reshard_4_to_2_and_2_rank_round_trip(ranks_2: dict[str, Any]) -> None:
    for rank_results in ranks_2["results"]:
        assert [r["op"] for r in rank_results] == [
            "load",
            "load",
            "load",
            "save",
            "load",
            "save",
            "save",
            "save",
            "load",
        ]


def test_reshard_4_to_1(saved_by_4: dict[str, Any], t: S3Transport) -> None:
    _load_full(saved_by_4["urls"]["flat"], 1, t, BIG_ROWS)
    _load_full(saved_by_4["urls"]["async"], 3, t)


def test_prefix_strategy_layout(saved_by_4: dict[str, Any], t: S3Transport) -> None:
    keys = _keys(t, saved_by_4["urls"]["prefixed"])
    assert keys == [
        ".metadata",
        ".metadata.s3ckpt.json",
        "__shard0/__0_0.distcp",
        "__shard0/__3_0.distcp",
        "__shard1/__1_0.distcp",
        "__shard2/__2_0.distcp",
    ]
    _load_full(saved_by_4["urls"]["prefixed"], 2, t)


def _save_full(url: str, seed: int, t: S3Transport, **writer: Any) -> None:
    state: dict[str, Any] = dict(full_state(seed))
    state["meta"] = {"seed": seed, "tag": f"ckpt-{seed}"}
    s3dcp.save(state, url, transport=t, no_dist=True, **writer)


@pytest.mark.timeout(240)
def test_rank_killed_mid_save(ranks_2: dict[str, Any], dcp_bucket: str, t: S3Transport) -> None:
    prev, url = ranks_2["two"], ranks_2["killed"]
    prefix = url.split("/", 3)[3] + "/"
    assert _keys(t, url) == ["__0_0.distcp"], "rank 0 finished its file; rank 1's never completed"
    pending = [u.key for u in ops.list_uploads(t, dcp_bucket, prefix)]
    assert pending == [prefix + "__1_0.distcp"], "the victim died with its multipart upload open"
    entries = {e.name: e for e in list_checkpoints(t, ranks_2["base"])}
    assert entries["step-7"].committed
    assert not entries["step-8"].committed and ".metadata" in entries["step-8"].reason
    with pytest.raises(CheckpointNotFoundError, match="did not finish"):
        s3dcp.S3StorageReader(url, transport=t).read_metadata()
    with pytest.raises(CheckpointNotFoundError):
        _load_full(url, 8, t)
    _load_full(prev, 7, t)

    # The next save into the prefix clears what the dead one left: its files and its open upload.
    _save_full(url, 13, t)
    assert ops.list_uploads(t, dcp_bucket, prefix) == []
    assert _keys(t, url) == [".metadata", ".metadata.s3ckpt.json", "__0_0.distcp"]
    _load_full(url, 13, t)


@pytest.mark.timeout(240)
def test_incremental_sharded_save_copies_unchanged_items(ranks_2: dict[str, Any], t: S3Transport) -> None:
    """Two ranks save ``S3StorageWriter(base=...)`` with one small tensor changed: each rank copies its big
    unchanged shard on the store, and every rank file is byte for byte the plain save's."""
    inc = ranks_2["inc"]
    copied = [next(r["copied"] for r in rank if r["url"] == inc["composed"]) for rank in ranks_2["results"]]
    plain = [next(r["copied"] for r in rank if r["url"] == inc["plain"]) for rank in ranks_2["results"]]
    assert plain == [0, 0]
    assert all(c >= 5 * 1024 * 1024 for c in copied), copied  # each rank's 11 MiB layer.big shard, less a part
    bucket = inc["base"][len("s3://") :].split("/", 1)[0]
    prefix = {k: v.split("/", 3)[3] for k, v in inc.items()}
    files = [k for k in _keys(t, inc["plain"]) if k.endswith(".distcp")]
    assert files == [k for k in _keys(t, inc["composed"]) if k.endswith(".distcp")] and len(files) == 2
    for rel in files:
        composed = ops.get_bytes(t, bucket, f"{prefix['composed']}/{rel}")
        assert composed == ops.get_bytes(t, bucket, f"{prefix['plain']}/{rel}"), rel
        assert composed != ops.get_bytes(t, bucket, f"{prefix['base']}/{rel}"), rel


def test_modified_data_file_is_refused(t: S3Transport, bucket: str, s3_server: Any) -> None:
    url, key = f"s3://{bucket}/c/step-1", "c/step-1/__0_0.distcp"
    _save_full(url, 21, t)
    data = bytearray(ops.get_bytes(t, bucket, key))
    data[len(data) // 2] ^= 0xFF
    # Rewritten with a CRC32C the store keeps: the whole-file checksum gives it away before any item is read.
    ops.put_bytes(t, bucket, key, bytes(data))
    with pytest.raises(CheckpointCorruptedError, match=r"__0_0\.distcp is corrupted: its CRC32C is"):
        _load_full(url, 21, t)
    # Rewritten without one (boto's default CRC32, not kept as CRC32C): the item's own CRC32C catches it.
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=bytes(data))
    with pytest.raises(CheckpointCorruptedError, match=r"__0_0\.distcp is corrupted: bytes \d+-\d+ have CRC32C"):
        _load_full(url, 21, t)
    # Plain dcp.load reports it the DCP way: a CheckpointException carrying the rank's error.
    state = {k: torch.zeros_like(v) for k, v in full_state(21).items()}
    with pytest.raises(CheckpointException) as info:
        dcp.load(state, storage_reader=S3StorageReader(url, transport=t), no_dist=True)
    assert isinstance(info.value.failures[0][0], CheckpointCorruptedError)


def test_copied_checkpoint_loads(saved_by_4: dict[str, Any], t: S3Transport) -> None:
    """A copy has new ETags (single PUTs of multipart objects) but the same bytes: it loads, item by item
    verified, as long as nothing was written in between."""
    url = saved_by_4["urls"]["flat"]
    bucket, prefix = url[len("s3://") :].split("/", 1)
    copy = f"s3://{bucket}/copied/step-1"
    for rel in _keys(t, url):
        ops.put_bytes(t, bucket, f"copied/step-1/{rel}", ops.get_bytes(t, bucket, f"{prefix}/{rel}"))
    assert ops.head(t, bucket, "copied/step-1/__0_0.distcp").etag != ops.head(t, bucket, f"{prefix}/__0_0.distcp").etag
    _load_full(copy, 1, t, BIG_ROWS)


@pytest.mark.portable
def test_metadata_verified_before_unpickling(t: S3Transport, bucket: str, tmp_path: Path) -> None:
    url, prefix = f"s3://{bucket}/m/step-1", "m/step-1/"
    _save_full(url, 31, t)
    good = ops.get_bytes(t, bucket, prefix + ".metadata")
    manifest = ops.get_bytes(t, bucket, prefix + ".metadata.s3ckpt.json")

    ops.put_bytes(t, bucket, prefix + ".metadata", good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(CheckpointCorruptedError, match="does not match its manifest"):
        _load_full(url, 31, t)

    # A pickle that runs a command, with a manifest rewritten to match it: refused by the allow-list.
    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {target}",))

    evil = pickle.dumps(Evil())
    doc = json.loads(manifest)
    doc["metadata"] = {"size": len(evil), "crc32c": crc32c.crc32c(evil)}
    ops.put_bytes(t, bucket, prefix + ".metadata", evil)
    ops.put_bytes(t, bucket, prefix + ".metadata.s3ckpt.json", json.dumps(doc).encode())
    with pytest.raises(UnsafeCheckpointError, match="system"):
        _load_full(url, 31, t)
    assert not target.exists()

    # No manifest: refused unless verification is off (how checkpoints of other DCP writers load).
    ops.put_bytes(t, bucket, prefix + ".metadata", good)
    ops.delete_object(t, bucket, prefix + ".metadata.s3ckpt.json")
    with pytest.raises(CheckpointCorruptedError, match="verify=False"):
        _load_full(url, 31, t)
    _load_full(url, 31, t, verify=False)


@pytest.mark.portable
def test_overwrite_policy(t: S3Transport, bucket: str) -> None:
    url = f"s3://{bucket}/o/step-1"
    _save_full(url, 41, t)
    with pytest.raises(ConflictError, match="overwrite=True"):
        _save_full(url, 42, t)
    _load_full(url, 41, t)

    class FailingPlanner(DefaultSavePlanner):
        def resolve_data(self, write_item: Any) -> Any:
            if write_item.index.fqn == "emb":
                raise RuntimeError("simulated crash mid-write")
            return super().resolve_data(write_item)

    # An overwrite that dies mid-write: the old .metadata went first, so neither checkpoint is committed.
    with pytest.raises(CheckpointException):
        dcp.save(
            {**full_state(42), "meta": {}},
            storage_writer=S3StorageWriter(url, transport=t, overwrite=True),
            planner=FailingPlanner(),
            no_dist=True,
        )
    assert ".metadata" not in _keys(t, url)
    assert ops.list_uploads(t, bucket, "o/") == []
    with pytest.raises(CheckpointNotFoundError):
        _load_full(url, 41, t)
    _save_full(url, 43, t)  # nothing committed there now, so no overwrite needed
    _load_full(url, 43, t)


def test_torch_filesystem_reader_reads_a_downloaded_copy(
    saved_by_4: dict[str, Any], t: S3Transport, tmp_path: Path
) -> None:
    url = saved_by_4["urls"]["prefixed"]
    bucket, prefix = url[len("s3://") :].split("/", 1)
    for rel in _keys(t, url):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(ops.get_bytes(t, bucket, f"{prefix}/{rel}"))
    expected = full_state(2)
    state: dict[str, Any] = {k: torch.zeros_like(v) for k, v in expected.items()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(tmp_path)), no_dist=True)
    assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_nearby_items_share_one_ranged_get(t: S3Transport, bucket: str) -> None:
    url = f"s3://{bucket}/g/step-1"
    state = {f"t{i:02d}": torch.full((256,), float(i)) for i in range(20)}
    s3dcp.save(dict(state), url, transport=t, no_dist=True)
    for gap_mb, gets in ((0, 10), (1, 1)):
        wanted = {k: torch.zeros(256) for k in sorted(state)[::2]}  # every other item: 10 ranges, 9 gaps
        before = t.retrier.stats.attempts
        s3dcp.load(wanted, url, transport=t, no_dist=True, coalesce_gap_MB=gap_mb)
        assert t.retrier.stats.attempts - before == 2 + gets, ".metadata, manifest, then the ranged GETs"
        assert all(torch.equal(v, state[k]) for k, v in wanted.items())


def test_plan_spans() -> None:
    infos = [_StorageInfo("b", 0, 10), _StorageInfo("a", 100, 50), _StorageInfo("a", 0, 10), _StorageInfo("a", 30, 10)]
    spans = plan_spans(infos, gap=20, max_span=1000)
    assert [(s.path, s.start, s.end, len(s.items)) for s in spans] == [
        ("a", 0, 40, 2),
        ("a", 100, 150, 1),
        ("b", 0, 10, 1),
    ]
    assert [(s.start, s.end) for s in plan_spans(infos, gap=100, max_span=45)] == [(0, 40), (100, 150), (0, 10)]
    assert [(s.start, s.end) for s in plan_spans(infos, gap=100, max_span=1000)] == [(0, 150), (0, 10)]


def test_catalog_groups_shard_subprefixes(saved_by_4: dict[str, Any], t: S3Transport) -> None:
    entries = [e for e in list_checkpoints(t, saved_by_4["urls"]["prefixed"].rsplit("/", 1)[0]) if e.kind == "sharded"]
    prefixed = [e for e in entries if "step-2" in e.url]
    assert len(prefixed) == 1 and prefixed[0].committed and len(prefixed[0].keys) == 5

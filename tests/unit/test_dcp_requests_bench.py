"""benchmarks.dcp_requests: how requests are told apart, and how per-rank counts become the table's rows."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from benchmarks.dcp_requests import _split, _summarize_requests, category


def _req(key: str, **headers: str) -> SimpleNamespace:
    return SimpleNamespace(url=f"http://127.0.0.1:1/bkt/run/step=10-last/{key}?x=1", headers=headers)


def test_categories() -> None:
    assert category("ListObjectsV2", _req("")) == "LIST"
    assert category("HeadObject", _req("__0_0.distcp")) == "HEAD"
    assert category("GetObject", _req(".metadata")) == "GET .metadata"
    assert category("GetObject", _req(".metadata.s3ckpt.json")) == "GET sidecar"
    assert category("GetObject", _req("__shard1/__3_0.distcp", Range="bytes=0-9")) == "GET shard range"
    assert category("GetObject", _req("__3_0.distcp")) == "GET shard"
    assert category("GetObject", _req("meta.pt")) == "GET meta.pt"
    assert category("UploadPart", _req("__3_0.distcp")) == "UploadPart"


def test_summary_splits_rank0_from_the_others() -> None:
    def rank(requests: dict[str, int], s: float) -> dict[str, Any]:
        return {"rounds": [{"mode": "plain", "round": 0, "s": s, "path": "p", "requests": requests}]}

    ranks = [rank({"LIST": 1, "GET .metadata": 2}, 0.5), rank({"LIST": 1, "GET .metadata": 2}, 0.4)]
    (row,) = _summarize_requests(2, ranks)
    assert row["requests"]["LIST"] == {"total": 2, "rank0": 1, "others": 1}
    assert row["requests_total"] == 6 and row["resume_median_s"] == 0.5 and row["paths_agree"]
    assert _split([{"HEAD": 3}, {}], "HEAD") == {"total": 3, "rank0": 3, "others": 0}

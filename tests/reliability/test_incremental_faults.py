"""Incremental saves (``s3ckpt.save(base=...)``) when the copy side breaks: a store without UploadPartCopy,
a base deleted or replaced while the new object is composed from it, a saver killed mid-compose, a copy
whose checksum is not the one the client computed. Whatever breaks, nothing is lost or torn, nothing is left
pending, and what is stored is exactly ``torch.save``'s bytes of the state being saved.

Every break is made on a real HTTP path: :class:`tests.faults.FaultProxy` sits between the real botocore
client and the real store (SeaweedFS, or moto for the ``portable`` tests) and acts on server-side copies
(requests with an ``x-amz-copy-source`` header, which it classifies as ``UploadPart``). The proxy is a fake
only where noted: neither store can be told to refuse UploadPartCopy or to return a wrong CRC32C for a copy,
and only the proxy sees the exact moment a copy request is on its way, which is when the base must vanish or
change for the test to be deterministic (the store itself is changed then, with plain S3 requests).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import torch

import s3ckpt
from s3ckpt.catalog import list_checkpoints
from s3ckpt.incremental import fallback
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport, ops
from tests import backends
from tests.conftest import BACKEND, new_bucket_name
from tests.faults import Fault, FaultProxy, LogEntry
from tests.integration.test_incremental import fine_tuning_state, stored_bytes, torch_save_bytes

# portable: make test also runs these on moto (tests/backends.py).
pytestmark = [pytest.mark.reliability, pytest.mark.portable]

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
# Two frozen 12 MiB tensors: about 14 MiB of every incremental save is copied, in two copied parts.
FROZEN = 2


@pytest.fixture(autouse=True)
def _fresh_part_copy_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which endpoints refused UploadPartCopy (module-level in the library), before and after each test."""
    monkeypatch.setattr(fallback, "_no_part_copy", set())


@pytest.fixture(scope="module")
def bucket(s3_server: LocalS3Server) -> str:
    """One bucket for the module (SeaweedFS spends about a second on a new bucket's first write); each test
    works under its own :func:`prefix`."""
    return s3_server.create_bucket(new_bucket_name("inc"))


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in request.node.name)
    return f"{name}-{secrets.token_hex(3)}"


def _copies(proxy: FaultProxy, since: float | None = None) -> list[LogEntry]:
    """The UploadPartCopy requests the proxy saw."""
    return [e for e in proxy.entries("UploadPart", since=since) if e.copy_source is not None]


def _upload_id(entry: LogEntry) -> str:
    found = re.search(r"[?&]uploadId=([^&]+)", entry.path)
    assert found, entry.path
    return unquote(found.group(1))


def _assert_compositions_aborted(proxy: FaultProxy) -> None:
    """Every multipart upload that copied parts was aborted, and none was completed: no composition (with
    whatever bytes its copies hold) was committed."""
    composed = {_upload_id(e) for e in _copies(proxy)}
    assert composed, "no part was ever copied: the test did not exercise a composition"
    aborted = {_upload_id(e) for e in proxy.entries("AbortMultipartUpload") if e.status in (200, 204)}
    completed = {_upload_id(e) for e in proxy.entries("CompleteMultipartUpload")}
    assert composed <= aborted, f"compositions not aborted: {composed - aborted}"
    assert not composed & completed, f"a composition was completed: {composed & completed}"


def _fell_back(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "uploading everything instead" in r.getMessage()]


def _on_first_copy(proxy: FaultProxy, action: Callable[[], None]) -> Fault:
    """Run ``action`` (a change to the store) when the first UploadPartCopy reaches the proxy, before that copy
    reaches the store; the copy is then forwarded as it was sent."""
    return proxy.add(Fault("UploadPart", "delay", delay_s=0.0, count=1, copy=True, on_match=lambda _e: action()))


# -- 1. a store without UploadPartCopy ---------------------------------------------------------------------


@pytest.mark.parametrize("refusal", ["status_501", "status_405"], ids=["501-NotImplemented", "405-MethodNotAllowed"])
def test_store_without_part_copy_uploads_everything_and_stops_trying(
    fault_proxy: FaultProxy,
    make_faulty_transport: Callable[..., S3Transport],
    transport: S3Transport,
    bucket: str,
    prefix: str,
    refusal: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The proxy answers every UploadPartCopy with 501 or 405, as S3 gateways without it do (a fake: both test
    stores implement it). The first incremental save falls back to a plain upload and says once that the store
    cannot copy parts; the next one does not even try (no UploadPartCopy at the proxy), and both objects are
    exactly torch.save's bytes."""
    t = make_faulty_transport()
    urls = [f"s3://{bucket}/{prefix}/step={s}.ckpt" for s in (1, 2, 3)]
    s3ckpt.save(fine_tuning_state(1, frozen=FROZEN), urls[0], transport=transport)  # the base, stored directly
    refused = fault_proxy.add(Fault("UploadPart", refusal, copy=True))

    with caplog.at_level(logging.WARNING, logger="s3ckpt"):
        state2 = fine_tuning_state(2, frozen=FROZEN)
        first = s3ckpt.save(state2, urls[1], transport=t, base=urls[0])
        tried = len(_copies(fault_proxy))
        mark = time.monotonic()
        state3 = fine_tuning_state(3, frozen=FROZEN)
        second = s3ckpt.save(state3, urls[2], transport=t, base=urls[1])

    assert refused.injected >= 1 and tried >= 1, "the first save never tried to copy a part"
    # A refusal is an answer, not a fault: not retried (at most the copies already in flight were sent).
    assert tried <= t.transfer.max_write_concurrency, tried
    assert _copies(fault_proxy, since=mark) == [], "the second save tried UploadPartCopy again"
    for stats in (first, second):
        assert stats.base is None and stats.bytes_copied == 0 and stats.bytes_uploaded == stats.bytes
    assert stored_bytes(transport, urls[1]) == torch_save_bytes(state2)
    assert stored_bytes(transport, urls[2]) == torch_save_bytes(state3)
    said = [r for r in caplog.records if "does not support UploadPartCopy" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING, [r.getMessage() for r in caplog.records]
    assert fault_proxy.url in said[0].getMessage()  # names the store
    assert ops.list_uploads(transport, bucket, f"{prefix}/") == []
    _assert_compositions_aborted(fault_proxy)


# -- 2. the base deleted while the save composes from it ---------------------------------------------------


def test_base_deleted_mid_compose_falls_back(
    fault_proxy: FaultProxy,
    make_faulty_transport: Callable[..., S3Transport],
    transport: S3Transport,
    bucket: str,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The base is deleted (object and manifest, as retention would) at the instant the first copy is on its
    way to the store, after the save read the base's manifest and started its upload. The proxy only marks that
    instant (the deletion is a real DeleteObject to the store), which no callback of the save offers: parts are
    copied and uploaded in parallel, so a deletion from ``progress`` could come after every copy."""
    t = make_faulty_transport()
    base_url, url = f"s3://{bucket}/{prefix}/step=1.ckpt", f"s3://{bucket}/{prefix}/step=2.ckpt"
    s3ckpt.save(fine_tuning_state(1, frozen=FROZEN), base_url, transport=transport)
    hook = _on_first_copy(fault_proxy, lambda: s3ckpt.delete(base_url, transport=transport))

    state = fine_tuning_state(2, frozen=FROZEN)
    told: list[int] = []
    with caplog.at_level(logging.WARNING, logger="s3ckpt"):
        stats = s3ckpt.save(state, url, transport=t, base=base_url, progress=told.append)

    assert hook.injected == 1
    assert not ops.exists(transport, bucket, f"{prefix}/step=1.ckpt"), "the base was not deleted"
    # The copy sent after the deletion found no source.
    assert any(e.status == 404 for e in _copies(fault_proxy)), [(e.path, e.status) for e in _copies(fault_proxy)]
    assert _fell_back(caplog), caplog.text
    assert stats.base is None and stats.bytes_copied == 0
    assert stored_bytes(transport, url) == torch_save_bytes(state)
    assert s3ckpt.verify(url, transport=transport).crc32c == stats.crc32c
    assert sum(told) == stats.bytes  # the redo is not counted twice by the caller's progress
    assert ops.list_uploads(transport, bucket, f"{prefix}/") == []
    _assert_compositions_aborted(fault_proxy)


# -- 3. the base replaced while the save composes from it --------------------------------------------------


def test_base_replaced_mid_compose_never_leaks_into_the_new_object(
    fault_proxy: FaultProxy,
    make_faulty_transport: Callable[..., S3Transport],
    transport: S3Transport,
    bucket: str,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The base's key gets other bytes of the same size at the instant the first copy is on its way (the proxy
    marks the instant; the replacement is a real PutObject). A store that honours ``CopySourceIfMatch``
    (SeaweedFS) refuses that copy with 412; one that ignores it (moto) copies the new bytes, and the HEAD of the
    base before Complete must catch the changed ETag. Either way the composition is aborted and the saved
    object is torch.save's bytes of the new state, never holding a byte of the replacement."""
    t = make_faulty_transport()
    base_key, url = f"{prefix}/step=1.ckpt", f"s3://{bucket}/{prefix}/step=2.ckpt"
    base_url = f"s3://{bucket}/{base_key}"
    base_stats = s3ckpt.save(fine_tuning_state(1, frozen=FROZEN), base_url, transport=transport)
    replacement = secrets.token_bytes(base_stats.bytes)
    replaced_at: list[float] = []

    def replace() -> None:
        ops.put_bytes(transport, bucket, base_key, replacement)
        replaced_at.append(time.monotonic())

    hook = _on_first_copy(fault_proxy, replace)
    state = fine_tuning_state(2, frozen=FROZEN)
    with caplog.at_level(logging.WARNING, logger="s3ckpt"):
        stats = s3ckpt.save(state, url, transport=t, base=base_url)

    assert hook.injected == 1 and replaced_at
    assert stored_bytes(transport, url) == torch_save_bytes(state)
    assert stored_bytes(transport, base_url) == replacement  # the replacement really was there to copy from
    assert stats.base is None and stats.bytes_copied == 0
    assert _fell_back(caplog), caplog.text
    copies = _copies(fault_proxy)
    if "conditional_copy" in backends.capabilities(BACKEND):
        assert any(e.status == 412 for e in copies), [(e.path, e.status) for e in copies]
    else:
        # The store copied whatever the key held (its copies all succeeded): only the HEAD check stood
        # between the replacement's bytes and a committed object.
        assert all(e.status == 200 for e in copies), [(e.path, e.status) for e in copies]
        heads = [
            e
            for e in fault_proxy.entries("HeadObject", since=replaced_at[0])
            if unquote(e.path).split("?")[0].endswith(f"/{base_key}")
        ]
        assert heads, "the base was not checked before Complete"
    assert ops.list_uploads(transport, bucket, f"{prefix}/") == []
    _assert_compositions_aborted(fault_proxy)


# -- 4. the saver killed mid-compose -----------------------------------------------------------------------

SAVER = textwrap.dedent(
    """
    import json, sys
    import s3ckpt
    from s3ckpt.config import ClientConfig, TransferConfig
    from s3ckpt.transport import S3Transport
    from tests.integration.test_incremental import fine_tuning_state
    cfg = json.loads(sys.argv[1])
    t = S3Transport.create(
        client=ClientConfig(
            endpoint_url=cfg["endpoint"], region=cfg["region"], access_key_id=cfg["ak"], secret_access_key=cfg["sk"]
        ),
        transfer=TransferConfig(chunk_size_MB=5, max_write_concurrency=4),
    )
    state = fine_tuning_state(2, frozen=cfg["frozen"])
    print("saving", flush=True)
    s3ckpt.save(state, cfg["url"], transport=t, base=cfg["base"])
    print("done", flush=True)
    """
)


def test_sigkill_mid_compose_keeps_the_base_and_the_target(
    fault_proxy: FaultProxy, s3_server: LocalS3Server, transport: S3Transport, bucket: str, prefix: str
) -> None:
    """A real saver process (as in tests/integration/test_kill_during_save.py) is SIGKILLed while its copies
    are in flight: the store has processed them (the proxy forwards each copy and withholds the answer, which
    is what the proxy is for: nothing else holds a copy at a known point). The base still loads and verifies,
    the target still holds what it held before (its manifest agrees), and no other checkpoint is visible."""
    base_url, url = f"s3://{bucket}/{prefix}/step=1.ckpt", f"s3://{bucket}/{prefix}/last.ckpt"
    base_state = fine_tuning_state(1, frozen=FROZEN)
    s3ckpt.save(base_state, base_url, transport=transport)
    before: dict[str, Any] = {"w": torch.arange(10.0), "global_step": 0}
    old = s3ckpt.save(before, url, transport=transport)

    copying = threading.Event()
    fault_proxy.add(Fault("UploadPart", "hang", where="response", copy=True, on_match=lambda _e: copying.set()))
    cfg = {
        "endpoint": fault_proxy.url,
        "region": s3_server.region,
        "ak": s3_server.access_key,
        "sk": s3_server.secret_key,
        "url": url,
        "base": base_url,
        "frozen": FROZEN,
    }
    proc = subprocess.Popen([sys.executable, "-c", SAVER, json.dumps(cfg)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "saving"
        assert copying.wait(60), "the saver never copied a part"
        assert [u.key for u in ops.list_uploads(transport, bucket, f"{prefix}/")] == [f"{prefix}/last.ckpt"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    loaded_base = s3ckpt.load(base_url, transport=transport, verify="require")
    assert torch.equal(loaded_base["state_dict"]["layers.1.weight"], base_state["state_dict"]["layers.1.weight"])
    assert torch.equal(loaded_base["state_dict"]["layers.1.lora_A"], base_state["state_dict"]["layers.1.lora_A"])
    assert stored_bytes(transport, base_url) == torch_save_bytes(base_state)
    target = s3ckpt.load(url, transport=transport, verify="require")
    assert torch.equal(target["w"], before["w"]) and target["global_step"] == 0
    assert ops.head(transport, bucket, f"{prefix}/last.ckpt").etag == old.etag
    entries = list_checkpoints(transport, f"s3://{bucket}/{prefix}/")
    assert sorted(e.name for e in entries) == ["last.ckpt", "step=1.ckpt"], "no partial checkpoint may be visible"
    assert all(e.committed for e in entries)
    # The dead saver's upload (with its copied parts) is invisible and left for `s3ckpt gc`.
    for u in ops.list_uploads(transport, bucket, f"{prefix}/"):
        ops.abort_upload(transport, bucket, u.key, u.upload_id)


# -- 5. a copy whose CRC32C is not the client's --------------------------------------------------------------

_CHECKSUM = re.compile(rb"<ChecksumCRC32C>([^<]*)</ChecksumCRC32C>")


def test_copy_with_a_wrong_crc32c_is_not_committed(
    fault_proxy: FaultProxy,
    make_faulty_transport: Callable[..., S3Transport],
    transport: S3Transport,
    bucket: str,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The proxy rewrites the first CopyPartResult so that its ChecksumCRC32C is not the CRC32C of the bytes the
    client expected (inserting one where the store sends none, as moto does): a fake, since no store can be made
    to copy other bytes and say so. The save must abort that composition, upload everything, and store exactly
    torch.save's bytes."""
    t = make_faulty_transport()
    base_url, url = f"s3://{bucket}/{prefix}/step=1.ckpt", f"s3://{bucket}/{prefix}/step=2.ckpt"
    s3ckpt.save(fine_tuning_state(1, frozen=FROZEN), base_url, transport=transport)
    seen: list[bytes] = []

    def wrong_checksum(body: bytes) -> bytes:
        seen.append(body)
        found = _CHECKSUM.search(body)
        bogus = b"AAAAAQ==" if found and found.group(1) == b"AAAAAA==" else b"AAAAAA=="
        if found:
            return body[: found.start(1)] + bogus + body[found.end(1) :]
        assert b"</CopyPartResult>" in body, body
        return body.replace(b"</CopyPartResult>", b"<ChecksumCRC32C>" + bogus + b"</ChecksumCRC32C></CopyPartResult>")

    rule = fault_proxy.add(Fault("UploadPart", "rewrite", count=1, copy=True, rewrite=wrong_checksum))
    state = fine_tuning_state(2, frozen=FROZEN)
    told: list[int] = []
    with caplog.at_level(logging.WARNING, logger="s3ckpt"):
        stats = s3ckpt.save(state, url, transport=t, base=base_url, progress=told.append)

    assert rule.injected == 1 and len(seen) == 1
    messages = _fell_back(caplog)
    assert messages and "CRC32C" in messages[0], caplog.text
    assert stats.base is None and stats.bytes_copied == 0
    assert stored_bytes(transport, url) == torch_save_bytes(state)
    assert sum(told) == stats.bytes
    assert ops.list_uploads(transport, bucket, f"{prefix}/") == []
    _assert_compositions_aborted(fault_proxy)


# -- the proxy's new tools, checked against a real store -----------------------------------------------------


def test_proxy_tells_copies_apart_and_rewrites_their_answers(
    fault_proxy: FaultProxy, transport: S3Transport, s3_server: LocalS3Server, bucket: str, prefix: str
) -> None:
    """``Fault(copy=True)`` touches server-side copies only; ``LogEntry.copy_source`` names their source; a
    ``rewrite`` changes the body the client parses, and ``on_match`` runs before the store sees the request."""
    client: Any = backends._client(fault_proxy.url, s3_server.region, s3_server.access_key, s3_server.secret_key, None)
    key = f"{prefix}/src"
    client.put_object(Bucket=bucket, Key=key, Body=b"x" * 100)
    calls: list[str] = []
    fault_proxy.add(Fault("PutObject", "status_501", copy=True, count=1, on_match=lambda e: calls.append(e.path)))
    fault_proxy.add(
        Fault("PutObject", "rewrite", copy=True, count=1, rewrite=lambda b: b.replace(b"</ETag>", b"-x</ETag>"))
    )
    with pytest.raises(Exception, match="NotImplemented"):
        client.copy_object(Bucket=bucket, Key=f"{prefix}/dst", CopySource={"Bucket": bucket, "Key": key})
    assert not ops.exists(transport, bucket, f"{prefix}/dst")
    copied = client.copy_object(Bucket=bucket, Key=f"{prefix}/dst", CopySource={"Bucket": bucket, "Key": key})
    assert copied["CopyObjectResult"]["ETag"].strip('"').endswith("-x")
    assert ops.get_bytes(transport, bucket, f"{prefix}/dst") == b"x" * 100
    puts = fault_proxy.entries("PutObject")
    assert [(e.copy_source is not None, e.action, e.status) for e in puts] == [
        (False, None, 200),
        (True, "status_501", 501),
        (True, "rewrite", 200),
    ]
    assert unquote(puts[1].copy_source or "").endswith(key) and len(calls) == 1

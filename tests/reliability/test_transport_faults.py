"""Reliability of the transport under faults injected on a real HTTP path.

Every test here runs the real botocore client against the real SeaweedFS server through
:class:`tests.faults.FaultProxy`, a real HTTP/1.1 proxy that forwards each request byte for byte and
misbehaves on the requests its rules select (503 SlowDown, 500 InternalError, TCP resets mid-body,
truncated bodies, lost responses). Nothing is mocked: the retries, aborts and error translation under test
are the ones a user gets. Two tests check the proxy itself first (framing, headers, keep-alive, ``delay``,
``Expect: 100-continue``), one of them against a stand-in upstream.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import botocore.config
import botocore.exceptions as bce
import pytest
import torch

from s3ckpt.checkpoint import load, save
from s3ckpt.config import MiB, RetryConfig
from s3ckpt.errors import S3AccessDeniedError, S3TransferError
from s3ckpt.layout import read_manifest
from s3ckpt.server import READ_ONLY_ACTIONS, Identity, LocalS3Server
from s3ckpt.transport import MultipartWriter, S3Transport, download_into, ops
from s3ckpt.transport.upload import NONCE_META
from tests.conftest import BACKEND, new_bucket_name
from tests.faults import Fault, FaultProxy
from tests.faults.fixtures import transport_via

pytestmark = pytest.mark.reliability

PART = 5 * MiB
# 3.5 parts: three full 5 MiB parts and a short last one, so the multipart and ranged paths both run.
OBJECT_SIZE = int(3.5 * PART)
PARTS = 4
RANGES = 4
_ERROR_CODES = {"status_503": "SlowDown", "status_500": "InternalError"}


@pytest.fixture(scope="module")
def bucket(s3_server: LocalS3Server) -> str:
    """One bucket for the whole module (each test works under its own :func:`prefix`): SeaweedFS spends about
    a second allocating a volume on the first write into a new bucket, which would dominate every test here."""
    return s3_server.create_bucket(new_bucket_name("rel"))


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own in the shared bucket."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in request.node.name)
    return f"{name}-{secrets.token_hex(3)}/"


@pytest.fixture(scope="module")
def data() -> bytes:
    """17.5 MiB of reproducible random bytes."""
    return random.Random(1234).randbytes(OBJECT_SIZE)


def _upload(t: S3Transport, bucket: str, key: str, data: bytes, **kwargs: object) -> MultipartWriter:
    """Stream ``data`` into a MultipartWriter in 1 MiB writes, as a serializer would."""
    with MultipartWriter(t, bucket, key, **kwargs) as w:  # type: ignore[arg-type]
        for i in range(0, len(data), MiB):
            w.write(data[i : i + MiB])
    return w


def _download(t: S3Transport, bucket: str, key: str) -> bytes:
    info = ops.head(t, bucket, key)
    out = bytearray(info.size)
    download_into(t, info, memoryview(out))
    return bytes(out)


def _state_dict(seed: int = 0, rows: int = 3000) -> dict[str, object]:
    """A small model state dict of ``rows`` x 1000 float32 weights: 3000 rows (12 MB) are three 5 MiB parts."""
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(rows, 1000, generator=g),
        "layer.bias": torch.randn(1000, generator=g),
        "step": 7,
    }


def _assert_state_equal(got: dict[str, object], want: dict[str, object]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[name], value), name  # type: ignore[arg-type]
        else:
            assert got[name] == value, name


# -- the proxy itself ---------------------------------------------------------------------------------------


def test_proxy_is_transparent_and_classifies_requests(
    fault_proxy: FaultProxy, faulty_transport: S3Transport, bucket: str, prefix: str, data: bytes
) -> None:
    """With no rule, the real proxy in front of the real server changes nothing: SigV4-signed requests (signed
    for the proxy's host:port, Host forwarded unchanged) succeed, bodies are byte-identical, nothing is
    retried, and the log classifies each real botocore request as the S3 operation it is."""
    t = faulty_transport
    big, small = prefix + "obj", prefix + "small"
    _upload(t, bucket, big, data)
    assert _download(t, bucket, big) == data
    ops.put_bytes(t, bucket, small, b"hello")
    assert ops.get_bytes(t, bucket, small) == b"hello"
    assert sorted(o.key for o in ops.list_objects(t, bucket, prefix)) == [big, small]
    assert ops.list_uploads(t, bucket, prefix) == []
    ops.delete_object(t, bucket, small)
    assert ops.delete_objects(t, bucket, [big]) == 1
    assert not ops.exists(t, bucket, big)  # HeadObject 404, then HeadBucket

    kinds = [e.kind for e in fault_proxy.log]
    assert kinds.count("CreateMultipartUpload") == 1
    assert kinds.count("UploadPart") == PARTS
    assert kinds.count("CompleteMultipartUpload") == 1
    assert kinds.count("GetObject") == RANGES + 1
    assert kinds.count("PutObject") == 1
    assert kinds.count("ListObjectsV2") == 1
    assert kinds.count("ListMultipartUploads") == 1
    assert kinds.count("DeleteObject") == 1
    assert kinds.count("DeleteObjects") == 1
    assert kinds.count("HeadObject") == 2
    assert kinds.count("HeadBucket") == 1
    assert "Other" not in kinds
    assert all(e.action is None for e in fault_proxy.log)
    assert t.retrier.stats.total_retries == 0


class _EchoUpstream(BaseHTTPRequestHandler):
    """A stand-in upstream: answers every PUT with the body it received, re-sent in chunked encoding, and
    reports the request's Host, framing and a custom header."""

    protocol_version = "HTTP/1.1"

    def do_PUT(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()  # the blank line after the last chunk
        else:
            body = bytearray(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Seen-Host", self.headers["Host"])
        self.send_header("X-Seen-Framing", self.headers.get("Transfer-Encoding", "length"))
        self.send_header("X-Seen-Custom", self.headers.get("X-Custom", ""))
        self.send_header("X-Seen-Connection", self.headers.get("Connection", ""))
        self.end_headers()
        for i in range(0, len(body), 300_000):
            piece = body[i : i + 300_000]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_proxy_streams_chunked_bodies_keeps_host_and_delays() -> None:
    """The proxy itself, on a real socket path to a stand-in upstream: a chunked request body and a chunked
    response body pass through intact (several MiB, both directions), Host and end-to-end headers arrive
    unchanged while the hop-by-hop Connection header does not, the client connection is kept alive across
    requests, and a ``delay`` rule holds a request back."""
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _EchoUpstream)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    payload = random.Random(7).randbytes(3 * MiB + 12345)
    try:
        with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as proxy:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
            chunks = (payload[i : i + 700_000] for i in range(0, len(payload), 700_000))
            headers = {"Host": "signed-host:1234", "X-Custom": "kept", "Connection": "keep-alive"}
            conn.request("PUT", "/bkt/a?x=1", body=chunks, headers=headers, encode_chunked=True)
            resp = conn.getresponse()
            echoed = resp.read()
            assert resp.status == 200
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
            assert resp.getheader("X-Seen-Host") == "signed-host:1234"
            assert resp.getheader("X-Seen-Framing") == "chunked"
            assert resp.getheader("X-Seen-Custom") == "kept"
            assert resp.getheader("X-Seen-Connection") == ""

            proxy.add(Fault("PutObject", "delay", delay_s=0.3, count=1))
            start = time.monotonic()
            conn.request("PUT", "/bkt/b", body=payload[:MiB], headers={"Host": "signed-host:1234"})
            resp = conn.getresponse()
            assert resp.read() == payload[:MiB]
            assert resp.getheader("X-Seen-Framing") == "length"
            assert time.monotonic() - start >= 0.3
            conn.close()

            assert [(e.kind, e.action, e.status) for e in proxy.log] == [
                ("PutObject", None, 200),
                ("PutObject", "delay", 200),
            ]
            assert proxy.errors == []
    finally:
        upstream.shutdown()
        upstream.server_close()


def test_proxy_answers_503_before_an_expected_body(
    fault_proxy: FaultProxy, s3_server: LocalS3Server, bucket: str, prefix: str
) -> None:
    """The proxy itself with a plain boto3 client (its own retries on) in front of the real server: a
    file-like body makes botocore send ``Expect: 100-continue``; the injected 503 is answered without a
    ``100 Continue``, so botocore never sends that body (the connection is closed, as S3 does), the retry
    gets ``100 Continue`` and its body is forwarded, and the object arrives intact."""
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=fault_proxy.url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
        config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 3}),
    )
    payload = random.Random(8).randbytes(2 * MiB)
    fault_proxy.add(Fault("PutObject", "status_503", count=1))

    client.put_object(Bucket=bucket, Key=prefix + "expect.bin", Body=io.BytesIO(payload))

    assert [(e.action, e.status) for e in fault_proxy.entries("PutObject")] == [("status_503", 503), (None, 200)]
    assert client.get_object(Bucket=bucket, Key=prefix + "expect.bin")["Body"].read() == payload


# -- 503 / 500 ----------------------------------------------------------------------------------------------

_STATUS_KINDS = [
    "UploadPart",
    "CreateMultipartUpload",
    "CompleteMultipartUpload",
    "GetObject",
    "ListObjectsV2",
    "DeleteObjects",
]
# Requests of each kind that the scenario below makes when nothing fails.
_BASE_COUNT = {"UploadPart": PARTS, "GetObject": RANGES}


@pytest.mark.parametrize("action", ["status_503", "status_500"])
@pytest.mark.parametrize("kind", _STATUS_KINDS)
def test_server_errors_are_retried(
    fault_proxy: FaultProxy,
    faulty_transport: S3Transport,
    bucket: str,
    prefix: str,
    data: bytes,
    kind: str,
    action: str,
) -> None:
    """The real proxy in front of the real server answers the next two requests of one kind with AWS's
    503 SlowDown (or 500 InternalError) XML. Upload, ranged download, listing and batch delete all still
    succeed, the object round-trips byte-identical, and the retrier's stats show exactly the two retries
    (each fault costs exactly one extra request of that kind, nothing else)."""
    t = faulty_transport
    key = prefix + "data.bin"
    fault = fault_proxy.add(Fault(kind, action, count=2))

    _upload(t, bucket, key, data)
    assert _download(t, bucket, key) == data
    assert [o.key for o in ops.list_objects(t, bucket, prefix)] == [key]
    assert ops.delete_objects(t, bucket, [key]) == 1
    assert not ops.exists(t, bucket, key)

    assert fault.injected == 2
    assert fault_proxy.count(kind, action=action) == 2
    assert fault_proxy.count(kind) == _BASE_COUNT.get(kind, 1) + 2
    assert t.retrier.stats.retries == {_ERROR_CODES[action]: 2}
    assert ops.list_uploads(t, bucket, prefix) == []


def test_checkpoint_save_load_through_server_errors(
    fault_proxy: FaultProxy, faulty_transport: S3Transport, bucket: str, prefix: str
) -> None:
    """``s3ckpt.checkpoint.save``/``load`` of a torch state dict through the real proxy in front of the real
    server, with one 503 or 500 injected on every kind of request they make (create, part, complete,
    manifest PUT, HEAD, GET): both succeed, the loaded tensors are identical, and every fault was retried."""
    t = faulty_transport
    faults = [
        fault_proxy.add(Fault("CreateMultipartUpload", "status_503", count=1)),
        fault_proxy.add(Fault("UploadPart", "status_500", count=1)),
        fault_proxy.add(Fault("CompleteMultipartUpload", "status_503", count=1)),
        fault_proxy.add(Fault("PutObject", "status_503", count=1)),
        fault_proxy.add(Fault("HeadObject", "status_503", count=1)),
        fault_proxy.add(Fault("GetObject", "status_500", count=1)),
    ]
    state = _state_dict()
    url = f"s3://{bucket}/{prefix}step=7.ckpt"

    stats = save(state, url, transport=t)
    loaded = load(url, transport=t)

    assert stats.parts == 3
    _assert_state_equal(loaded, state)
    assert [f.injected for f in faults] == [1] * len(faults)
    assert t.retrier.stats.total_retries == len(faults)


# -- resets, truncation, lost responses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "action", "where", "after_bytes"),
    [
        pytest.param("UploadPart", "reset", "request", None, id="part-reset-mid-request-body"),
        pytest.param("UploadPart", "reset", "request", 0, id="part-reset-before-request-body"),
        pytest.param("UploadPart", "drop_response", "auto", None, id="part-response-lost"),
        pytest.param("GetObject", "reset", "response", None, id="get-reset-mid-response-body"),
        pytest.param("GetObject", "reset", "response", 0, id="get-reset-after-headers"),
        pytest.param("GetObject", "truncate", "auto", None, id="get-truncated-half"),
        pytest.param("GetObject", "truncate", "auto", 1, id="get-truncated-1-byte"),
    ],
)
def test_connection_faults_are_retried(
    fault_proxy: FaultProxy,
    faulty_transport: S3Transport,
    bucket: str,
    prefix: str,
    data: bytes,
    kind: str,
    action: str,
    where: str,
    after_bytes: int | None,
) -> None:
    """The real proxy in front of the real server breaks two connections of one kind: a TCP RST in the
    middle of a part's request body or of a ranged GET's response body, a GET body cut short after its
    headers announced the full Content-Length, or a part whose response is lost after the server stored it.
    Each broken request is retried once, and the object round-trips byte-identical."""
    t = faulty_transport
    fault = fault_proxy.add(Fault(kind, action, count=2, where=where, after_bytes=after_bytes))

    _upload(t, bucket, prefix + "obj", data)
    assert _download(t, bucket, prefix + "obj") == data

    assert fault.injected == 2
    assert fault_proxy.count(kind) == _BASE_COUNT[kind] + 2
    assert t.retrier.stats.total_retries == 2
    assert ops.list_uploads(t, bucket, prefix) == []


@pytest.mark.portable
@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "if-none-match"])
@pytest.mark.parametrize("kind", ["CompleteMultipartUpload", "PutObject"])
def test_lost_write_response(
    fault_proxy: FaultProxy,
    faulty_transport: S3Transport,
    bucket: str,
    prefix: str,
    data: bytes,
    kind: str,
    conditional: bool,
) -> None:
    """The real proxy in front of the real server forwards the request that makes the object visible (the
    CompleteMultipartUpload of a 17.5 MiB upload, or the single PutObject of a 1 MiB one), so SeaweedFS
    stores the object, then resets the connection instead of returning the answer: a lost response. The
    writer retries and takes whatever SeaweedFS answers: 200 again for a plain write, 412 for a conditional
    (If-None-Match) one, where the writer HEADs the key and recognises its own object by its nonce. Either
    way the save reports success, no upload is left open, and the object is complete and byte-identical."""
    t = faulty_transport
    payload = data if kind == "CompleteMultipartUpload" else data[:MiB]
    fault_proxy.add(Fault(kind, "drop_response", count=1))

    key = prefix + "ckpt.bin"
    w = _upload(t, bucket, key, payload, if_none_match=conditional)

    answers = [(e.action, e.status) for e in fault_proxy.entries(kind)]
    # The retried conditional Complete: SeaweedFS answers 412 (the key exists now), moto 200 (that upload is
    # complete already). The writer must succeed either way.
    again = 412 if conditional and (kind == "PutObject" or BACKEND == "seaweedfs") else 200
    assert answers == [("drop_response", 200), (None, again)]
    assert w.result.size == len(payload)
    assert w.result.parts == (PARTS if kind == "CompleteMultipartUpload" else 0)
    info = ops.head(t, bucket, key)
    assert info.metadata[NONCE_META] == w.nonce
    assert info.etag == w.result.etag
    assert ops.list_uploads(t, bucket, prefix) == []
    assert _download(t, bucket, key) == payload


@pytest.mark.portable
def test_lost_complete_response_checkpoint(
    fault_proxy: FaultProxy, faulty_transport: S3Transport, bucket: str, prefix: str
) -> None:
    """``checkpoint.save`` through the real proxy in front of the real server, with the first
    CompleteMultipartUpload response lost: save returns normally, its manifest matches the object (same
    nonce and ETag), and ``load`` (which checks the CRC32C before unpickling) returns identical tensors."""
    t = faulty_transport
    fault_proxy.add(Fault("CompleteMultipartUpload", "drop_response", count=1))
    state = _state_dict(1)
    key = prefix + "last.ckpt"
    url = f"s3://{bucket}/{key}"

    stats = save(state, url, transport=t)

    info = ops.head(t, bucket, key)
    manifest = read_manifest(t, bucket, key)
    assert manifest is not None
    assert manifest.nonce == info.metadata[NONCE_META]
    assert manifest.etag == info.etag == stats.etag
    assert manifest.size == info.size == stats.bytes
    _assert_state_equal(load(url, transport=t), state)


# -- giving up ------------------------------------------------------------------------------------------------


def test_failure_beyond_retry_budget_aborts(
    fault_proxy: FaultProxy, make_faulty_transport: Callable[..., S3Transport], bucket: str, prefix: str
) -> None:
    """The real proxy in front of the real server answers every UploadPart with 503 SlowDown. With a 3 s
    deadline (and an attempt budget that would last about 25 s) the save raises ``S3TransferError`` (its
    botocore error as ``__cause__``) within the deadline plus a margin: no part is attempted again after its
    deadline. It aborts its multipart upload (nothing left in ListMultipartUploads), leaves no object at the
    key, and an earlier checkpoint at another key still loads. The doomed checkpoint (8 parts) is larger than
    the parts in flight, so the error surfaces inside ``torch.save``'s ``write()`` call and must come out as
    ours, not as torch's "unexpected pos" RuntimeError."""
    deadline = 3.0
    t = make_faulty_transport(
        retry=RetryConfig(max_attempts=100, base_delay_s=0.02, max_delay_s=0.5, deadline_s=deadline)
    )
    earlier = _state_dict(2)
    earlier_url, doomed_key = f"s3://{bucket}/{prefix}earlier.ckpt", prefix + "doomed.ckpt"
    start = time.monotonic()
    save(earlier, earlier_url, transport=t)
    # A healthy save of a similar checkpoint on this machine right now: the margin scales with it, so a
    # loaded CI host does not turn the abort's few requests into a false failure.
    margin = 2.0 + 3 * (time.monotonic() - start)
    fault_proxy.add(Fault("UploadPart", "status_503"))

    start = time.monotonic()
    with pytest.raises(S3TransferError) as info:
        save(_state_dict(3, rows=10_000), f"s3://{bucket}/{doomed_key}", transport=t)
    elapsed = time.monotonic() - start

    assert deadline * 0.8 <= elapsed < deadline + margin, (elapsed, margin)
    attempts: dict[str, list[float]] = {}
    for e in fault_proxy.entries("UploadPart", action="status_503"):
        attempts.setdefault(e.path.split("partNumber=")[1].split("&")[0], []).append(e.time)
    # The first part to fail gives up at its deadline; parts still retrying then stop at once (retrying
    # them is wasted time once the upload is doomed), so no part retries past its deadline.
    first_attempt = min(times[0] for times in attempts.values())
    for part, times in attempts.items():
        assert times[-1] - times[0] < deadline + 0.5, f"part {part} retried past its deadline"
        assert times[-1] - first_attempt < deadline + 1.0, f"part {part} kept retrying after the upload failed"
    err = info.value
    assert f"s3://{bucket}/{doomed_key}" in str(err)
    assert "gave up" in str(err)
    assert isinstance(err.__cause__, bce.ClientError)
    assert err.__cause__.response["Error"]["Code"] == "SlowDown"
    assert fault_proxy.count("UploadPart", action="status_503") > 3
    assert fault_proxy.count("AbortMultipartUpload") >= 1

    fault_proxy.clear()
    assert ops.list_uploads(t, bucket, prefix) == []
    assert not ops.exists(t, bucket, doomed_key)
    _assert_state_equal(load(earlier_url, transport=t), earlier)


# -- access denied ------------------------------------------------------------------------------------------------

_READER_SECRET = "reader-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def ro_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3Server]:
    """A second SeaweedFS with a read-only identity ``s3ckpt-reader`` (Read and List only) and a bucket
    ``shared`` holding one object written by the admin."""
    reader = Identity("reader", "s3ckpt-reader", _READER_SECRET, READ_ONLY_ACTIONS)
    with LocalS3Server(tmp_path_factory.mktemp("weed-ro"), identities=[reader]) as server:
        server.create_bucket("shared")
        server.client().put_object(Bucket="shared", Key="existing.bin", Body=b"readable")
        yield server


def _assert_denied_fast(
    err: S3AccessDeniedError, elapsed: float, t: S3Transport, proxy: FaultProxy, where: str, secret: str
) -> None:
    assert isinstance(err, PermissionError)
    assert elapsed < 2.0, elapsed
    assert t.retrier.stats.attempts == 1
    assert t.retrier.stats.total_retries == 0
    assert len(proxy.log) == 1  # one request on the wire: no retry storm
    assert where in str(err)
    assert isinstance(err.__cause__, bce.ClientError)
    for text in (str(err), repr(err), str(err.__cause__)):
        assert secret not in text


@pytest.mark.parametrize(("rows", "first_request"), [(1, "PutObject"), (3000, "CreateMultipartUpload")])
def test_access_denied_read_only_identity_fails_at_once(
    ro_server: LocalS3Server, rows: int, first_request: str
) -> None:
    """A read-only identity saves through the real proxy in front of a real server that refuses the write
    (AccessDenied on the single PutObject of a small checkpoint, or on the CreateMultipartUpload that a
    large one issues from inside ``torch.save``'s ``write()``): ``S3AccessDeniedError`` (a PermissionError)
    after exactly one request, in well under 2 s, naming bucket and key, with the botocore error as
    ``__cause__`` and no secret in the message. The same identity can read, so the refusal is the
    permission, not the credentials."""
    url = f"s3://shared/run/denied-{rows}.ckpt"
    with FaultProxy(ro_server.endpoint_url) as proxy:
        t = transport_via(proxy, ro_server, access_key="s3ckpt-reader", secret_key=_READER_SECRET)
        t.clients.get()  # build the botocore client first: the clock is for the failing call only
        start = time.monotonic()
        with pytest.raises(S3AccessDeniedError) as info:
            save(_state_dict(rows=rows), url, transport=t)
        elapsed = time.monotonic() - start

        err = info.value
        _assert_denied_fast(err, elapsed, t, proxy, url, _READER_SECRET)
        assert err.__cause__.response["Error"]["Code"] == "AccessDenied"  # type: ignore[union-attr]
        assert (proxy.log[0].kind, proxy.log[0].status) == (first_request, 403)
        assert ops.get_bytes(t, "shared", "existing.bin") == b"readable"
        assert proxy.errors == []


@pytest.mark.parametrize("op", ["save", "load"])
def test_access_denied_wrong_secret_fails_at_once(
    fault_proxy: FaultProxy, s3_server: LocalS3Server, bucket: str, prefix: str, op: str
) -> None:
    """A wrong secret key, through the real proxy in front of the real server (SignatureDoesNotMatch on a
    PUT, a bare 403 on the HEAD that starts a load): ``S3AccessDeniedError`` after exactly one request,
    fast, naming bucket and key, with the botocore error as ``__cause__``, and neither the wrong nor the
    right secret in the message."""
    wrong = "wrong-" + secrets.token_hex(16)
    t = transport_via(fault_proxy, s3_server, secret_key=wrong)
    t.clients.get()  # build the botocore client first: the clock is for the failing call only
    url = f"s3://{bucket}/{prefix}x.ckpt"

    start = time.monotonic()
    with pytest.raises(S3AccessDeniedError) as info:
        if op == "save":
            save({"w": torch.zeros(4)}, url, transport=t)
        else:
            load(url, transport=t)
    elapsed = time.monotonic() - start

    _assert_denied_fast(info.value, elapsed, t, fault_proxy, url, wrong)
    assert s3_server.secret_key not in str(info.value)
    assert fault_proxy.log[0].status == 403
    if op == "save":
        assert "secret key is wrong" in str(info.value)


# -- throttling storm -----------------------------------------------------------------------------------------------


def test_throttling_storm_client_backs_off(
    fault_proxy: FaultProxy, make_faulty_transport: Callable[..., S3Transport], bucket: str, prefix: str
) -> None:
    """The real proxy in front of the real server answers 50% of all requests with 503 SlowDown for 3 s,
    then none. With the library's default backoff (0.2 s scale, full jitter), saves of a 30 MiB object in
    5 MiB parts keep running through the storm and the one in flight when it ends finishes after it,
    successfully and byte-identical. The request rate in the storm's second half, from the proxy's log, is
    lower than the unthrottled rate measured just before by the same saves: the client backs off instead of
    hammering a throttling store."""
    t = make_faulty_transport(retry=RetryConfig(max_attempts=20, deadline_s=30))
    payload = random.Random(99).randbytes(30 * MiB)

    # Baseline: back-to-back saves with no fault, for about a second.
    _upload(t, bucket, prefix + "warmup", payload)
    base_start = time.monotonic()
    while time.monotonic() - base_start < 1.0:
        _upload(t, bucket, prefix + "storm.bin", payload)
    base_end = time.monotonic()
    baseline = fault_proxy.rate(base_start, base_end)
    assert t.retrier.stats.total_retries == 0

    storm_s = 3.0
    storm = fault_proxy.add(Fault(None, "status_503", probability=0.5, duration_s=storm_s))
    assert storm.expires_at is not None
    storm_start = storm.expires_at - storm_s
    saves = 0
    while time.monotonic() < storm.expires_at:
        w = _upload(t, bucket, prefix + "storm.bin", payload)
        saves += 1
    finished = time.monotonic()

    assert finished > storm.expires_at
    assert w.result.size == len(payload)
    assert storm.injected > 0
    assert t.retrier.stats.retries["SlowDown"] > 0
    second_half = fault_proxy.rate(storm_start + storm_s / 2, storm.expires_at)
    assert second_half < baseline, (
        f"request rate did not drop under throttling: {second_half:.1f}/s in the storm's second half vs "
        f"{baseline:.1f}/s unthrottled ({saves} save(s), {storm.injected} requests throttled)"
    )
    assert _download(t, bucket, prefix + "storm.bin") == payload
    assert ops.list_uploads(t, bucket, prefix) == []

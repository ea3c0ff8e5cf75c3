"""Credentials that change under a running job, and a client clock that is off, against the real server.

* **Rotation.** The job's credentials come from a ``credential_process`` profile (as with SSO or a vault
  agent). The server rotates the identity's key (the new one valid, the old one gone: a restart with other
  identities, because SeaweedFS reads its identities at start) and the credential source is updated. The
  next request is refused (InvalidAccessKeyId); the retry layer rebuilds the client once, which runs the
  credential process again, and the save goes on: no restart, no access-denied error, no retry storm. If
  the source is *not* updated, the refusal is final after one refresh.
* **Clock skew.** A signer 20 minutes behind (a custom SigV4 signer chosen through botocore's documented
  ``choose-signer`` event): SeaweedFS answers 403 RequestTimeTooSkewed; the error names it and the fix, after
  a single attempt.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.auth
import pytest
import torch

import s3ckpt
from s3ckpt.config import ClientConfig, RetryConfig, TransferConfig
from s3ckpt.errors import S3AccessDeniedError
from s3ckpt.server import Identity, LocalS3Server
from s3ckpt.transport import S3Transport
from tests.conftest import client_config_for

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

RETRY = RetryConfig(max_attempts=5, base_delay_s=0.05, max_delay_s=0.5, deadline_s=20)
SMALL = TransferConfig(chunk_size_MB=5, max_write_concurrency=4, max_read_concurrency=4, read_chunk_size_MB=5)
# The credential process: prints the key pair in creds.json (AWS's credential_process format) and counts runs.
PROCESS = """
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
with open(d / "calls", "a") as f:
    f.write("x")
print((d / "creds.json").read_text())
"""


def _identity(n: int) -> Identity:
    return Identity("rotating", f"rot-key-{n}", f"rot-secret-{n}-0123456789")


def _publish(d: Path, ident: Identity) -> None:
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    creds = {
        "Version": 1,
        "AccessKeyId": ident.access_key,
        "SecretAccessKey": ident.secret_key,
        "Expiration": expires.isoformat(),
    }
    (d / "creds.json").write_text(json.dumps(creds))


@pytest.fixture
def rotating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[LocalS3Server, Path]]:
    """A server of its own with a 'rotating' identity, and a credential_process profile 'rot' serving it."""
    (tmp_path / "proc.py").write_text(PROCESS)
    (tmp_path / "config").write_text(
        f"[profile rot]\ncredential_process = {sys.executable} {tmp_path / 'proc.py'} {tmp_path}\n"
    )
    _publish(tmp_path, _identity(1))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    server = LocalS3Server(identities=(_identity(1),)).start()
    try:
        yield server, tmp_path
    finally:
        server.stop()


def _state(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(3 * 1024 * 1024, generator=torch.Generator().manual_seed(seed))}


def _calls(d: Path) -> int:
    return len((d / "calls").read_text())


@pytest.mark.slow
def test_rotated_credentials_are_picked_up_without_a_restart(rotating: tuple[LocalS3Server, Path]) -> None:
    server, d = rotating
    bucket = server.create_bucket("rotation")
    t = S3Transport.create(
        client=ClientConfig(endpoint_url=server.endpoint_url, region=server.region, profile="rot"),
        retry=RETRY,
        transfer=SMALL,
    )
    s3ckpt.save(_state(1), f"s3://{bucket}/one.ckpt", transport=t)
    assert _calls(d) == 1

    # The key is rotated on the server and in the credential source; the job keeps its old client.
    server.restart(identities=(_identity(2),))
    _publish(d, _identity(2))
    before = t.retrier.stats.attempts
    s3ckpt.save(_state(2), f"s3://{bucket}/two.ckpt", transport=t)
    retries = dict(t.retrier.stats.retries)
    print(f"\nafter rotation: {t.retrier.stats.attempts - before} attempts, retries {retries}, {_calls(d)} runs")
    assert retries == {"InvalidAccessKeyId-refresh": 1}, "one refresh, no access-denied, no storm"
    assert _calls(d) == 2  # the credential process ran once more, for the rebuilt client
    for seed, name in ((1, "one"), (2, "two")):
        loaded = s3ckpt.load(f"s3://{bucket}/{name}.ckpt", transport=t, verify="require")
        assert torch.equal(loaded["w"], _state(seed)["w"])

    # Rotated on the server only: the refreshed credentials are still the old ones, so the refusal is final.
    server.restart(identities=(_identity(3),))
    before = t.retrier.stats.attempts
    start = time.monotonic()
    with pytest.raises(S3AccessDeniedError, match="InvalidAccessKeyId"):
        s3ckpt.save(_state(3), f"s3://{bucket}/three.ckpt", transport=t)
    attempts = t.retrier.stats.attempts - before
    print(f"stale source: refused after {attempts} attempts in {time.monotonic() - start:.2f} s")
    assert attempts <= 2 * SMALL.max_write_concurrency, "at most one refresh retry per request"
    assert time.monotonic() - start < 5


class _SkewedSigner(botocore.auth.S3SigV4Auth):
    """S3's SigV4 signer with a clock 20 minutes behind."""

    skew = datetime.timedelta(minutes=-20)

    def _modify_request_before_signing(self, request: Any) -> None:
        now = datetime.datetime.strptime(request.context["timestamp"], botocore.auth.SIGV4_TIMESTAMP)
        request.context["timestamp"] = (now + self.skew).strftime(botocore.auth.SIGV4_TIMESTAMP)
        super()._modify_request_before_signing(request)


def test_clock_skew_is_named_with_its_fix_and_not_retried(
    s3_server: LocalS3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(botocore.auth.AUTH_TYPE_MAPS, "s3v4-skewed-test", _SkewedSigner)
    t = S3Transport.create(client=client_config_for(s3_server), retry=RETRY, transfer=SMALL)
    t.clients.get().meta.events.register("choose-signer.s3", lambda **_: "s3v4-skewed-test")
    start = time.monotonic()
    with pytest.raises(S3AccessDeniedError) as info:
        s3ckpt.save({"w": torch.ones(4)}, f"s3://{bucket}/skewed.ckpt", transport=t)
    message = str(info.value)
    print(f"\n{message}")
    assert "RequestTimeTooSkewed" in message and "clock" in message and "NTP" in message
    assert t.retrier.stats.attempts == 1 and t.retrier.stats.total_retries == 0
    assert time.monotonic() - start < 5

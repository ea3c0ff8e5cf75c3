"""Unit tests of the retry policy (``s3ckpt.transport.retry``): which errors are retried, the backoff bounds,
the attempt and deadline budgets (with an injected sleep and clock, so nothing really waits), and how the
final error is translated. No server needed."""

from __future__ import annotations

import http.client
import threading
from types import SimpleNamespace
from typing import Any

import botocore.exceptions as bce
import pytest

import s3ckpt.transport.retry as retry_mod
from s3ckpt.config import RetryConfig
from s3ckpt.errors import (
    ConflictError,
    S3AccessDeniedError,
    S3CheckpointError,
    S3NotFoundError,
    S3TransferError,
)
from s3ckpt.transport.retry import (
    Retrier,
    RetryableError,
    RetryStats,
    error_code,
    is_retryable,
    is_throttle,
    translate_error,
)

ENDPOINT = "http://127.0.0.1:9000"


def client_error(code: str | None, status: int, op: str = "PutObject") -> bce.ClientError:
    """A botocore ClientError as the client raises it (``code=None``: a bodiless error, as for HEAD)."""
    error = {"Code": code, "Message": f"{code} message"} if code else {}
    return bce.ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, op)


class FakeClock:
    """A monotonic clock that only moves when slept on (or advanced by a fake request)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Make the retry module read time from a fake clock; pass ``clock.sleep`` to the Retrier."""
    fake = FakeClock()
    monkeypatch.setattr(retry_mod, "time", SimpleNamespace(monotonic=fake.monotonic, sleep=fake.sleep))
    return fake


class Failing:
    """A callable that raises the given errors in turn, then returns ``result``; counts its calls."""

    def __init__(self, *errors: BaseException, result: Any = "ok", clock: FakeClock | None = None, cost_s: float = 0.0):
        self.errors = list(errors)
        self.result = result
        self.calls = 0
        self.raised: list[BaseException] = []
        self.clock = clock
        self.cost_s = cost_s

    def __call__(self) -> Any:
        self.calls += 1
        if self.clock is not None:
            self.clock.now += self.cost_s
        if self.errors:
            err = self.errors.pop(0)
            self.raised.append(err)
            raise err
        return self.result


class AlwaysFailing(Failing):
    """Raises a fresh copy of ``make()`` on every call."""

    def __init__(self, make: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.make = make

    def __call__(self) -> Any:
        self.errors = [self.make()]
        return super().__call__()


# -- classification ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (client_error("SlowDown", 503), "SlowDown"),
        (client_error("NoSuchKey", 404), "NoSuchKey"),
        (client_error(None, 403), "403"),
        (ValueError("x"), ""),
        (bce.EndpointConnectionError(endpoint_url=ENDPOINT), ""),
    ],
)
def test_error_code(exc: BaseException, code: str) -> None:
    """The S3 code of a ClientError, the status for a bodiless one, "" for anything else."""
    assert error_code(exc) == code


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("SlowDown", 503),
        ("SlowDownWrite", 503),
        ("ErrTooManyRequest", 503),
        ("TooManyRequests", 429),
        ("ServiceUnavailable", 503),
        ("InternalError", 500),
        ("RequestTimeout", 400),
        ("BadDigest", 400),
        ("XAmzContentSHA256Mismatch", 400),
        ("IncompleteBody", 400),
        ("OperationAborted", 409),
        (None, 503),
        (None, 500),
        (None, 502),
        (None, 504),
        ("SomethingNew", 503),
    ],
)
def test_retryable_responses(code: str | None, status: int) -> None:
    """Throttling, 5xx, request timeouts and bodies damaged on the wire are retried."""
    assert is_retryable(client_error(code, status))


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("AccessDenied", 403),
        ("InvalidAccessKeyId", 403),
        ("SignatureDoesNotMatch", 403),
        ("ExpiredToken", 400),
        ("NoSuchKey", 404),
        ("NoSuchBucket", 404),
        ("NoSuchUpload", 404),
        ("PreconditionFailed", 412),
        ("InvalidArgument", 400),
        ("EntityTooSmall", 400),
        (None, 403),
        (None, 404),
        # A denial code wins over a retryable status: never retry a refusal.
        ("AccessDenied", 503),
    ],
)
def test_not_retryable_responses(code: str | None, status: int) -> None:
    """Refusals, missing objects, failed preconditions and other 4xx fail at once."""
    assert not is_retryable(client_error(code, status))


@pytest.mark.parametrize(
    "exc",
    [
        bce.EndpointConnectionError(endpoint_url=ENDPOINT),
        bce.ConnectionClosedError(endpoint_url=ENDPOINT),
        bce.ReadTimeoutError(endpoint_url=ENDPOINT),
        bce.ConnectTimeoutError(endpoint_url=ENDPOINT),
        bce.ResponseStreamingError(error="reset"),
        bce.IncompleteReadError(actual_bytes=1, expected_bytes=2),
        ConnectionResetError(104, "Connection reset by peer"),
        BrokenPipeError(32, "Broken pipe"),
        TimeoutError("timed out"),
        http.client.IncompleteRead(b"abc", 10),
        http.client.RemoteDisconnected("closed"),
        RetryableError("short read"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_retryable_transport_failures(exc: BaseException) -> None:
    """Resets, timeouts, truncated bodies and our own short reads are retried."""
    assert is_retryable(exc)


@pytest.mark.parametrize(
    "exc",
    [ValueError("bug"), KeyError("k"), bce.NoCredentialsError(), bce.ParamValidationError(report="bad")],
    ids=lambda e: type(e).__name__,
)
def test_other_errors_not_retried(exc: BaseException) -> None:
    """Programming errors and missing credentials are not retried."""
    assert not is_retryable(exc)


def test_is_throttle() -> None:
    """Any 503 and the SlowDown family are throttling; a 500 is not."""
    assert is_throttle(client_error("SlowDown", 503))
    assert is_throttle(client_error(None, 503))
    assert is_throttle(client_error("TooManyRequests", 429))
    assert not is_throttle(client_error("InternalError", 500))
    assert not is_throttle(ConnectionResetError())


# -- translation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "cls", "builtin", "fragment"),
    [
        (client_error("AccessDenied", 403), S3AccessDeniedError, PermissionError, "lack permission"),
        (client_error("InvalidAccessKeyId", 403), S3AccessDeniedError, PermissionError, "AWS_ACCESS_KEY_ID"),
        (client_error("SignatureDoesNotMatch", 403), S3AccessDeniedError, PermissionError, "secret key is wrong"),
        (client_error(None, 403), S3AccessDeniedError, PermissionError, "refused (403)"),
        (client_error("NoSuchKey", 404), S3NotFoundError, FileNotFoundError, "no such object"),
        (client_error(None, 404), S3NotFoundError, FileNotFoundError, "no such object"),
        (client_error("NoSuchBucket", 404), S3NotFoundError, FileNotFoundError, "bucket 'bkt' does not exist"),
        (client_error("PreconditionFailed", 412), ConflictError, FileExistsError, "another writer"),
        (client_error("SlowDown", 503), S3TransferError, OSError, "SlowDown"),
        (bce.EndpointConnectionError(endpoint_url=ENDPOINT), S3TransferError, OSError, "cannot connect"),
        (bce.NoCredentialsError(), S3AccessDeniedError, PermissionError, "no AWS credentials"),
    ],
)
def test_translate_error(exc: BaseException, cls: type, builtin: type, fragment: str) -> None:
    """Each botocore error becomes the matching s3ckpt error (also the matching builtin), naming the object,
    the endpoint where relevant, and a hint."""
    err = translate_error(exc, "PutObject", "bkt", "run/x.ckpt", ENDPOINT)
    assert isinstance(err, cls) and isinstance(err, builtin) and isinstance(err, S3CheckpointError)
    assert "s3://bkt/run/x.ckpt" in str(err)
    assert fragment in str(err)


def test_translate_error_keeps_our_errors() -> None:
    """An s3ckpt error raised inside an operation passes through untouched."""
    ours = ConflictError("already there")
    assert translate_error(ours, "PutObject", "bkt", "k", ENDPOINT) is ours


# -- backoff ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("base", "cap"), [(0.1, 1.0), (0.02, 0.5), (0.2, 20.0)])
def test_backoff_bounds(base: float, cap: float) -> None:
    """Full jitter: the delay before retry ``n`` lies in ``[0, min(cap, base * 2**n)]`` and uses that whole
    range; huge attempt numbers do not overflow."""
    r = Retrier(RetryConfig(base_delay_s=base, max_delay_s=cap))
    for attempt in [*range(1, 12), 50, 10_000]:
        bound = min(cap, base * 2 ** min(attempt, 30))
        delays = [r.backoff(attempt) for _ in range(300)]
        assert all(0.0 <= d <= bound for d in delays), (attempt, max(delays), bound)
        # 300 uniform draws all below 75% of the bound: probability 0.75**300, i.e. never.
        assert max(delays) > 0.75 * bound


def test_backoff_zero_base() -> None:
    """``base_delay_s=0`` retries without sleeping."""
    r = Retrier(RetryConfig(base_delay_s=0.0))
    assert {r.backoff(n) for n in range(1, 20)} == {0.0}


# -- Retrier.call ----------------------------------------------------------------------------------------------


def test_retries_until_success(clock: FakeClock) -> None:
    """Retryable failures are retried with backoff sleeps; stats count attempts and retries by reason;
    ``on_retry`` sees each error."""
    r = Retrier(RetryConfig(max_attempts=5, base_delay_s=0.1, max_delay_s=1.0), sleep=clock.sleep)
    fn = Failing(client_error("SlowDown", 503), client_error("InternalError", 500), ConnectionResetError())
    seen: list[BaseException] = []

    assert r.call(fn, op="UploadPart", bucket="bkt", key="k", on_retry=seen.append) == "ok"

    assert fn.calls == 4
    assert seen == fn.raised
    assert r.stats.attempts == 4
    assert r.stats.retries == {"SlowDown": 1, "InternalError": 1, "ConnectionResetError": 1}
    assert r.stats.total_retries == 3
    assert len(clock.sleeps) <= 3  # a zero delay is not slept
    for n, delay in enumerate(clock.sleeps, start=1):
        assert 0 < delay <= min(1.0, 0.1 * 2**n)


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (client_error("AccessDenied", 403), S3AccessDeniedError),
        (client_error("SignatureDoesNotMatch", 403), S3AccessDeniedError),
        (client_error("NoSuchKey", 404), S3NotFoundError),
        (client_error("PreconditionFailed", 412), ConflictError),
        (client_error("InvalidArgument", 400), S3TransferError),
    ],
)
def test_non_retryable_fails_after_one_attempt(clock: FakeClock, exc: BaseException, cls: type) -> None:
    """A non-retryable error fails on the first attempt, without sleeping, translated, with the botocore
    error as ``__cause__``."""
    r = Retrier(RetryConfig(max_attempts=10, base_delay_s=0.1), sleep=clock.sleep)
    fn = Failing(exc)

    with pytest.raises(cls) as info:
        r.call(fn, op="PutObject", bucket="bkt", key="k")

    assert fn.calls == 1
    assert clock.sleeps == []
    assert r.stats.attempts == 1 and r.stats.total_retries == 0
    assert info.value.__cause__ is exc
    assert "s3://bkt/k" in str(info.value)


def test_max_attempts_respected(clock: FakeClock) -> None:
    """An error that never clears is tried exactly ``max_attempts`` times, then raised as S3TransferError
    that says so, with the last botocore error as ``__cause__``."""
    r = Retrier(RetryConfig(max_attempts=4, base_delay_s=0.01, deadline_s=3600), sleep=clock.sleep)
    fn = AlwaysFailing(lambda: client_error("SlowDown", 503))

    with pytest.raises(S3TransferError) as info:
        r.call(fn, op="UploadPart", bucket="bkt", key="k")

    assert fn.calls == 4
    assert r.stats.retries == {"SlowDown": 3}
    assert "gave up after 4 attempt(s)" in str(info.value)
    assert info.value.__cause__ is fn.raised[-1]


@pytest.mark.parametrize("deadline_override", [None, 5.0])
def test_deadline_respected(clock: FakeClock, deadline_override: float | None) -> None:
    """With a large attempt budget the deadline bounds the time: no attempt starts and no sleep ends after
    the deadline (``RetryConfig.deadline_s``, or the per-call ``deadline_s``), and the error says it gave
    up."""
    cfg = RetryConfig(max_attempts=100, base_delay_s=0.5, max_delay_s=4.0, deadline_s=20.0)
    deadline = deadline_override if deadline_override is not None else cfg.deadline_s
    r = Retrier(cfg, sleep=clock.sleep)
    starts: list[float] = []

    def request() -> None:
        starts.append(clock.now)
        clock.now += 0.3  # each attempt takes 0.3 s
        raise client_error("SlowDown", 503)

    t0 = clock.now
    with pytest.raises(S3TransferError) as info:
        r.call(request, op="UploadPart", bucket="bkt", key="k", deadline_s=deadline_override)

    assert 1 < len(starts) < 100
    assert all(s - t0 < deadline for s in starts)
    assert clock.now - t0 <= deadline + 0.3  # the last attempt may run into it, never a sleep
    assert "gave up" in str(info.value)
    assert isinstance(info.value.__cause__, bce.ClientError)


def test_short_read_is_retried(clock: FakeClock) -> None:
    """``RetryableError`` (a short read detected by the caller) is retried like a reset."""
    r = Retrier(RetryConfig(base_delay_s=0.0), sleep=clock.sleep)
    fn = Failing(RetryableError("short read"), result=b"data")
    assert r.call(fn, op="GetObject", bucket="bkt", key="k") == b"data"
    assert r.stats.retries == {"RetryableError": 1}


def test_keyboard_interrupt_is_not_retried(clock: FakeClock) -> None:
    """Ctrl-C goes straight through: no retry, no translation."""
    r = Retrier(RetryConfig(), sleep=clock.sleep)
    fn = Failing(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        r.call(fn, op="GetObject", bucket="bkt", key="k")
    assert fn.calls == 1


def test_our_error_raised_as_is(clock: FakeClock) -> None:
    """An s3ckpt error raised by the operation itself comes out unchanged (same object)."""
    r = Retrier(RetryConfig(), sleep=clock.sleep)
    ours = ConflictError("taken")
    with pytest.raises(ConflictError) as info:
        r.call(Failing(ours), op="PutObject", bucket="bkt", key="k")
    assert info.value is ours


def test_endpoint_in_message_without_credentials(clock: FakeClock) -> None:
    """The final error names the endpoint it was given, which never carries credentials."""
    r = Retrier(RetryConfig(max_attempts=2, base_delay_s=0.0), endpoint=ENDPOINT, sleep=clock.sleep)
    with pytest.raises(S3TransferError) as info:
        r.call(AlwaysFailing(lambda: client_error("InternalError", 500)), op="GetObject", bucket="bkt", key="k")
    assert ENDPOINT in str(info.value)


def test_stats_thread_safe() -> None:
    """Counters stay exact under concurrent updates."""
    stats = RetryStats()

    def work() -> None:
        for _ in range(2000):
            stats.record_attempt()
            stats.record_retry("SlowDown")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.attempts == 16_000
    assert stats.retries == {"SlowDown": 16_000}
    assert stats.total_retries == 16_000


def test_cancelled_stops_retrying_at_once() -> None:
    """A part whose sibling already failed the upload gives up after its current attempt, with no sleep."""
    sleeps: list[float] = []
    r = Retrier(RetryConfig(max_attempts=50, base_delay_s=0.1, deadline_s=60), sleep=sleeps.append)
    calls = 0
    doomed = threading.Event()

    def op() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            doomed.set()
        raise client_error("SlowDown", 503)

    with pytest.raises(S3TransferError):
        r.call(op, op="UploadPart", bucket="b", key="k", cancelled=doomed.is_set)
    assert calls == 2
    assert len(sleeps) == 1

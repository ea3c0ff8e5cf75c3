"""The retry rules for faults of the store itself: a store that is down is waited for until the deadline
(not for a fixed number of attempts), refused credentials are refreshed once, a skewed clock is named."""

from __future__ import annotations

from collections.abc import Callable

import botocore.exceptions as bce
import pytest

from s3ckpt.config import RetryConfig
from s3ckpt.errors import S3AccessDeniedError, S3TransferError
from s3ckpt.transport.retry import Retrier, is_store_down
from tests.unit.test_retry import ENDPOINT, Failing, FakeClock, client_error, clock

__all__ = ["clock"]

DOWN = bce.EndpointConnectionError(endpoint_url=ENDPOINT)
CFG = RetryConfig(max_attempts=3, base_delay_s=0.2, max_delay_s=20, deadline_s=60)


def _retrier(c: FakeClock, cfg: RetryConfig = CFG) -> Retrier:
    return Retrier(cfg, endpoint=ENDPOINT, sleep=c.sleep)


def _call(r: Retrier, fn: Callable[[], str], **kwargs: object) -> str:
    return r.call(fn, op="PutObject", bucket="b", key="k", **kwargs)  # type: ignore[arg-type]


def test_store_down_errors() -> None:
    assert is_store_down(DOWN) and is_store_down(bce.ConnectTimeoutError(endpoint_url=ENDPOINT))
    assert is_store_down(ConnectionRefusedError(111, "refused"))
    assert not is_store_down(bce.ReadTimeoutError(endpoint_url=ENDPOINT))
    assert not is_store_down(client_error("SlowDown", 503))


def test_a_store_that_went_down_is_waited_for_until_the_deadline(clock: FakeClock) -> None:
    r = _retrier(clock)
    assert _call(r, Failing()) == "ok"  # the store has answered this process once
    fn = Failing(*[DOWN] * 40)  # far more than max_attempts=3
    assert _call(r, fn) == "ok"
    assert fn.calls == 41
    assert max(clock.sleeps) <= 2.0, "backoff is capped at 2 s while the store is down"
    assert sum(clock.sleeps) < CFG.deadline_s


def test_a_store_down_longer_than_the_deadline_fails_at_the_deadline(clock: FakeClock) -> None:
    r = _retrier(clock)
    _call(r, Failing())
    start = clock.now
    with pytest.raises(S3TransferError, match="cannot connect"):
        _call(r, Failing(*[DOWN] * 1000))
    assert CFG.deadline_s - 2.0 <= clock.now - start <= CFG.deadline_s


def test_a_store_never_reached_fails_after_max_attempts(clock: FakeClock) -> None:
    """A wrong endpoint at start-up fails fast, as before: the deadline rule needs one answer first."""
    fn = Failing(*[DOWN] * 10)
    with pytest.raises(S3TransferError, match="gave up after 3 attempt"):
        _call(_retrier(clock), fn)
    assert fn.calls == 3


@pytest.mark.parametrize("code", ["InvalidAccessKeyId", "ExpiredToken", "SignatureDoesNotMatch"])
def test_refused_credentials_are_refreshed_once(clock: FakeClock, code: str) -> None:
    refreshes: list[int] = []

    def refresh() -> bool:
        refreshes.append(1)
        return True

    r = _retrier(clock)
    assert _call(r, Failing(client_error(code, 403)), refresh_credentials=refresh) == "ok"
    assert len(refreshes) == 1 and r.stats.retries == {f"{code}-refresh": 1}
    assert clock.sleeps == []  # retried at once
    fn = Failing(client_error(code, 403), client_error(code, 403))
    with pytest.raises(S3AccessDeniedError):
        _call(r, fn, refresh_credentials=refresh)
    assert fn.calls == 2 and len(refreshes) == 2, "one refresh per call, then the refusal is final"


def test_static_keys_are_not_refreshed(clock: FakeClock) -> None:
    fn = Failing(client_error("InvalidAccessKeyId", 403))
    with pytest.raises(S3AccessDeniedError):
        _call(_retrier(clock), fn, refresh_credentials=lambda: False)
    assert fn.calls == 1


def test_clock_skew_names_the_fix(clock: FakeClock) -> None:
    fn = Failing(client_error("RequestTimeTooSkewed", 403))
    with pytest.raises(S3AccessDeniedError, match=r"RequestTimeTooSkewed.*clock.*NTP"):
        _call(_retrier(clock), fn, refresh_credentials=lambda: True)
    assert fn.calls == 1

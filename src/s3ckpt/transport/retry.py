"""Retry with exponential backoff and full jitter, and translation of botocore errors into ours.

Every S3 call in the transport goes through :meth:`Retrier.call`. botocore's own retries are switched off
(see ``client.py``) so that this is the only layer: one deadline bounds how long a failing store can hold
the job, and the request rate visibly drops while the store throttles.
"""

from __future__ import annotations

import http.client
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

import botocore.exceptions as bce

from ..config import RetryConfig
from ..errors import (
    ConflictError,
    S3AccessDeniedError,
    S3CheckpointError,
    S3NotFoundError,
    S3TransferError,
)

__all__ = ["Retrier", "RetryableError", "error_code", "is_retryable", "is_store_down", "translate_error"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Error codes worth retrying. SeaweedFS answers throttling with 503 "ErrTooManyRequest"/"TooManyRequests",
# MinIO with "SlowDownRead"/"SlowDownWrite"; AWS with "SlowDown". BadDigest and the SHA-256 mismatch mean
# the body was damaged on the wire: we resend it from its own buffer.
_RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "SlowDownRead",
        "SlowDownWrite",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "ErrTooManyRequest",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "BadDigest",
        "IncompleteBody",
        "XAmzContentSHA256Mismatch",
        "OperationAborted",
    }
)
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_THROTTLE_CODES = frozenset(
    {"SlowDown", "SlowDownRead", "SlowDownWrite", "Throttling", "ThrottlingException", "TooManyRequests"}
)
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "RequestTimeTooSkewed",
        "AllAccessDisabled",
        "AccountProblem",
    }
)
# Refusals that fresh credentials can cure: temporary keys that expired or were rotated out on the server
# while this process still held them. Each call refreshes its credentials once, then retries at once; a
# second refusal is final (wrong keys stay wrong: no retry storm, no access-denied error delayed).
_STALE_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "ExpiredToken", "SignatureDoesNotMatch", "InvalidToken", "TokenRefreshRequired"}
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchUpload"})

# Transport-level failures: resets, timeouts, truncated bodies.
_RETRYABLE_EXC: tuple[type[BaseException], ...] = (
    bce.ConnectionError,  # EndpointConnectionError, ConnectionClosedError, ...
    bce.HTTPClientError,
    bce.ReadTimeoutError,
    bce.ConnectTimeoutError,
    bce.ResponseStreamingError,
    bce.IncompleteReadError,
    ConnectionError,
    TimeoutError,
    http.client.IncompleteRead,
    http.client.RemoteDisconnected,
)


# "The store is down": nothing reached the server (connection refused, no route, connect timeout). A store
# that crashed or is being restarted answers like this for as long as it is down, which can outlast any fixed
# attempt count, and a refused connection costs the server nothing; so once this Retrier has had an answer
# from the store, these errors are retried until the deadline whatever the attempt count, with the backoff
# capped at _DOWN_MAX_DELAY_S so the save resumes within about that long after the store is back. Before the
# first answer they count like any other error: a wrong endpoint fails after max_attempts, not the deadline.
_STORE_DOWN_EXC: tuple[type[BaseException], ...] = (
    bce.EndpointConnectionError,  # includes botocore's ConnectionRefused / NewConnectionError wrappers
    bce.ConnectTimeoutError,
    ConnectionRefusedError,
)
_DOWN_MAX_DELAY_S = 2.0


def is_store_down(exc: BaseException) -> bool:
    """True when the request never reached the server: connection refused, connect timeout, no route."""
    return isinstance(exc, _STORE_DOWN_EXC)


class RetryableError(Exception):
    """Raised inside an operation for a condition that a retry may fix (a short read, say)."""


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ``ClientError`` (or the HTTP status as a string), else ``""``."""
    if isinstance(exc, bce.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or "")
        if code:
            return code
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(status) if status else ""
    return ""


def _status(exc: BaseException) -> int | None:
    if isinstance(exc, bce.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status else None
    return None


def is_retryable(exc: BaseException) -> bool:
    """True for throttling, 5xx, request timeouts and connection-level failures."""
    if isinstance(exc, (RetryableError, *_RETRYABLE_EXC)):
        return True
    if isinstance(exc, bce.ClientError):
        code = error_code(exc)
        if code in _DENIED_CODES or code in _NOT_FOUND_CODES:
            return False
        return code in _RETRYABLE_CODES or _status(exc) in _RETRYABLE_STATUS
    return False


def translate_error(exc: BaseException, op: str, bucket: str, key: str | None, endpoint: str) -> S3CheckpointError:
    """Turn a botocore (or socket) error into the matching s3ckpt error, naming the object and a fix.

    The result carries ``exc`` as ``__cause__`` when raised with ``raise ... from exc``.
    """
    if isinstance(exc, S3CheckpointError):
        return exc
    # Plain formatting, not build_s3_url: an error message must never fail on the name it reports.
    where = f"s3://{bucket}/{key or ''}" if bucket else "S3"
    code = error_code(exc)
    status = _status(exc)
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return S3AccessDeniedError(
            f"{op} {where}: no AWS credentials found. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE, or run on a machine with an instance role"
        )
    if code in _DENIED_CODES or status == 403:
        hint = {
            "InvalidAccessKeyId": "the access key is not known to the server: check AWS_ACCESS_KEY_ID / "
            "AWS_PROFILE and that the endpoint is the right one",
            "SignatureDoesNotMatch": "the secret key is wrong for this access key: check "
            "AWS_SECRET_ACCESS_KEY (and the region)",
            "ExpiredToken": "the session token expired: refresh your credentials",
            # A signature is valid for 15 minutes around the signer's clock: retrying cannot help.
            "RequestTimeTooSkewed": "this machine's clock differs from the server's by more than 15 minutes, "
            "so its request signatures are refused. Sync the clock (NTP: `timedatectl set-ntp true`, chrony "
            "or ntpd; in a container, the host's clock)",
        }.get(
            code,
            "the credentials lack permission for this operation on this bucket/prefix: check the "
            "bucket policy or IAM role",
        )
        return S3AccessDeniedError(f"{op} {where} was refused ({code or status}) by {endpoint}: {hint}")
    if code == "NoSuchBucket":
        return S3NotFoundError(
            f"{op} {where}: bucket {bucket!r} does not exist on {endpoint}; create it or fix the URL"
        )
    if code in _NOT_FOUND_CODES or status == 404:
        return S3NotFoundError(f"{op} {where}: no such object on {endpoint}")
    if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
        return ConflictError(f"{op} {where}: another writer changed this key at the same time ({code or status})")
    if isinstance(exc, bce.EndpointConnectionError):
        return S3TransferError(
            f"{op} {where}: cannot connect to {endpoint}. Check AWS_ENDPOINT_URL / --endpoint-url and that the "
            "server is running"
        )
    detail = code or type(exc).__name__
    return S3TransferError(f"{op} {where} failed on {endpoint}: {detail}: {_short(exc)}")


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "..."


class RetryStats:
    """Thread-safe counters of attempts and retries by reason, for tests, benchmarks and logs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.attempts = 0
        self.retries: Counter[str] = Counter()

    def record_attempt(self) -> None:
        with self._lock:
            self.attempts += 1

    def record_retry(self, reason: str) -> None:
        with self._lock:
            self.retries[reason] += 1

    @property
    def total_retries(self) -> int:
        with self._lock:
            return sum(self.retries.values())


class Retrier:
    """Runs a callable with the :class:`RetryConfig` policy and translates its final error.

    Args:
        config: the policy.
        endpoint: shown in error messages (no credentials).
        sleep: injectable for tests.
    """

    def __init__(
        self,
        config: RetryConfig | None = None,
        *,
        endpoint: str = "S3",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config if config is not None else RetryConfig.from_env()
        self.endpoint = endpoint
        self.stats = RetryStats()
        self._sleep = sleep
        self._rng = random.Random()
        # Set by the first request that gets any answer from the store (see _STORE_DOWN_EXC).
        self.reached_store = False

    def backoff(self, attempt: int, *, store_down: bool = False) -> float:
        """Full-jitter delay before retry number ``attempt`` (1-based); capped lower while the store is down."""
        top = min(self.config.max_delay_s, _DOWN_MAX_DELAY_S) if store_down else self.config.max_delay_s
        cap = min(top, self.config.base_delay_s * (2 ** min(attempt, 30)))
        return self._rng.uniform(0.0, cap) if cap > 0 else 0.0

    def call(
        self,
        fn: Callable[[], T],
        *,
        op: str,
        bucket: str,
        key: str | None = None,
        deadline_s: float | None = None,
        on_retry: Callable[[BaseException], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        refresh_credentials: Callable[[], bool] | None = None,
    ) -> T:
        """Call ``fn`` until it succeeds, fails with a non-retryable error, or the budget is spent.

        Args:
            fn: the operation; it must be safe to repeat (every body is resent from its own buffer).
            op: operation name for logs and errors, e.g. ``"UploadPart"``.
            bucket, key: the object, for messages.
            deadline_s: override of ``RetryConfig.deadline_s`` for this call.
            on_retry: called with the error before each retry (e.g. to rewind a buffer).
            cancelled: checked before each retry; once it returns True the last error is raised at once
                (a sibling part of the same upload already failed, so retrying this one is wasted time).
            refresh_credentials: called once per call on a refusal that fresh credentials may cure
                (InvalidAccessKeyId, ExpiredToken, SignatureDoesNotMatch, ...); if it returns True (new
                credentials may differ) the request is retried at once, and a second such refusal is final.

        Raises:
            S3CheckpointError: the translated final error, with the botocore error as ``__cause__``.
        """
        cfg = self.config
        budget_s = deadline_s if deadline_s is not None else cfg.deadline_s
        deadline = time.monotonic() + budget_s
        attempt = 0
        refreshed = False
        while True:
            attempt += 1
            self.stats.record_attempt()
            try:
                result = fn()
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
                    raise
                code = error_code(exc)
                if refresh_credentials is not None and not refreshed and code in _STALE_CREDENTIAL_CODES:
                    refreshed = True
                    if refresh_credentials():
                        self.stats.record_retry(f"{code}-refresh")
                        log.warning(
                            "%s s3://%s/%s: %s; retrying once with refreshed credentials", op, bucket, key or "", code
                        )
                        if on_retry is not None:
                            on_retry(exc)  # e.g. rewind the part's body
                        continue
                retryable = is_retryable(exc)
                down = retryable and is_store_down(exc)
                if isinstance(exc, bce.ClientError) or (retryable and not down):
                    self.reached_store = True  # an answer, or a connection that broke after it was made
                delay = self.backoff(attempt, store_down=down) if retryable else 0.0
                out_of_time = time.monotonic() + delay >= deadline
                given_up = cancelled is not None and cancelled()
                # A store that is down is waited for until the deadline, however many attempts that takes.
                out_of_attempts = attempt >= cfg.max_attempts and not (down and self.reached_store)
                if not retryable or out_of_attempts or out_of_time or given_up:
                    err = translate_error(exc, op, bucket, key, self.endpoint)
                    if retryable and isinstance(err, S3TransferError):
                        err = S3TransferError(
                            f"{err} (gave up after {attempt} attempt(s); retry budget: "
                            f"{cfg.max_attempts} attempts / {budget_s:g} s, see RetryConfig)"
                        )
                    if err is exc:
                        raise
                    raise err from exc
                reason = error_code(exc) or type(exc).__name__
                self.stats.record_retry(reason)
                log.info("%s s3://%s/%s: %s, retry %d in %.2f s", op, bucket, key or "", reason, attempt, delay)
                if on_retry is not None:
                    on_retry(exc)
                if delay:
                    self._sleep(delay)
            else:
                self.reached_store = True
                return result


def is_throttle(exc: BaseException) -> bool:
    """True for a throttling answer (any 503 or a SlowDown-style code)."""
    return error_code(exc) in _THROTTLE_CODES or _status(exc) == 503

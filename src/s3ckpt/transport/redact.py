"""Keep credentials out of logs, including botocore's own DEBUG wire trace.

s3ckpt itself never logs a credential. botocore, at DEBUG level, logs every request's headers and the SigV4
canonical request, which include ``X-Amz-Security-Token`` (a live session token) when temporary credentials
are in use. boto3's documentation warns about exactly this. A filter on the SDK's loggers replaces the token,
and any secret registered here, before the record reaches a handler.
"""

from __future__ import annotations

import logging
import re
import threading

__all__ = ["REDACTED", "install", "redact", "register_secret"]

REDACTED = "***REDACTED***"
# Header values of the session token, as botocore prints them in dict reprs, header lines and canonical requests.
_TOKEN_RE = re.compile(r"(?i)(x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)([^'\"\s,}]+)")
_SECRET_KV_RE = re.compile(r"(?i)(aws_secret_access_key['\"]?\s*[:=]\s*['\"]?)([^'\"\s,}]+)")
_SDK_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "awscrt")

_lock = threading.Lock()
_secrets: set[str] = set()
_installed: set[str] = set()


def register_secret(value: str | None) -> None:
    """Redact ``value`` wherever it appears in SDK log records (secret keys, tokens). Short values are
    ignored: replacing a 1-3 character string would mangle every log line."""
    if value and len(value) >= 8:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with session tokens and registered secrets replaced by :data:`REDACTED`."""
    text = _TOKEN_RE.sub(lambda m: m.group(1) + REDACTED, text)
    text = _SECRET_KV_RE.sub(lambda m: m.group(1) + REDACTED, text)
    with _lock:
        secrets = list(_secrets)
    for s in secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    return text


class _RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the handler's problem, not ours
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


_FILTER = _RedactFilter()


def install() -> None:
    """Attach the filter to every SDK logger that exists now (filters are per logger, not inherited, so each
    child such as ``botocore.endpoint`` gets its own). Called whenever a client is built."""
    names = [n for n in list(logging.Logger.manager.loggerDict) if n.split(".")[0] in _SDK_LOGGERS]
    names.extend(_SDK_LOGGERS)
    with _lock:
        new = [n for n in names if n not in _installed]
        _installed.update(new)
    for name in new:
        logging.getLogger(name).addFilter(_FILTER)

"""``s3://`` URL parsing, building and validation.

Standard library only: NeMo configs and launch scripts import this to decide whether a path is on S3 before
any third-party package (boto3, torch) is importable, so it must stay dependency-free.

Validation is strict on purpose. S3 itself accepts almost any key, but S3-compatible servers map keys to
file paths and normalise them differently (SeaweedFS collapses ``//`` and rejects ``..`` segments), so a key
that works on AWS could silently alias another checkpoint elsewhere. Refusing such keys before any request
is sent keeps a checkpoint's name meaning the same object on every store.
"""

from __future__ import annotations

import re

__all__ = [
    "S3_PATH_PREFIX",
    "build_s3_url",
    "is_s3_url",
    "join_s3_url",
    "parse_s3_url",
    "validate_bucket_name",
    "validate_key",
]

S3_PATH_PREFIX = "s3://"

# S3 general-purpose bucket naming rules: 3-63 chars, lowercase letters, digits, dots and hyphens,
# starting and ending with a letter or digit.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4_RE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
# S3 caps keys at 1,024 bytes of UTF-8.
MAX_KEY_BYTES = 1024


def is_s3_url(path: object) -> bool:
    """Return True if ``path`` is a string (or path-like) that starts with ``s3://``.

    This is a cheap prefix test, as in NeMo; it does not validate the rest of the URL.
    Use :func:`parse_s3_url` for that.
    """
    return isinstance(path, str) and path.startswith(S3_PATH_PREFIX)


def validate_bucket_name(bucket: str) -> str:
    """Check ``bucket`` against S3's naming rules and return it.

    Raises:
        ValueError: naming the bucket and the rule it breaks.
    """
    if not isinstance(bucket, str) or not bucket:
        raise ValueError(f"S3 bucket name is empty in {bucket!r}; expected s3://<bucket>/<key>")
    if not _BUCKET_RE.match(bucket):
        raise ValueError(
            f"invalid S3 bucket name {bucket!r}: a bucket name is 3-63 characters of lowercase letters, "
            "digits, '.' and '-', starting and ending with a letter or digit"
        )
    if ".." in bucket or _IPV4_RE.match(bucket):
        raise ValueError(f"invalid S3 bucket name {bucket!r}: it must not contain '..' or look like an IP address")
    return bucket


def validate_key(key: str, *, allow_empty: bool = True, url: str | None = None) -> str:
    """Check an object key (or key prefix) and return it.

    Rules: no control characters, no empty path segments (``//``) and no ``.`` or ``..`` segments;
    at most 1,024 bytes of UTF-8. A single trailing ``/`` (a "directory" prefix) is allowed.

    Raises:
        ValueError: naming the key and the rule it breaks.
    """
    where = f" in {url!r}" if url else ""
    if not key:
        if allow_empty:
            return key
        raise ValueError(f"S3 object key is empty{where}; expected s3://<bucket>/<key>")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise ValueError(f"S3 key {key!r}{where} contains a control character; remove it")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(f"S3 key{where} is longer than {MAX_KEY_BYTES} bytes of UTF-8, S3's limit")
    if key.startswith("/"):
        raise ValueError(f"S3 key {key!r}{where} starts with '/': write s3://bucket/key, with one slash")
    segments = key[:-1].split("/") if key.endswith("/") else key.split("/")
    for segment in segments:
        if segment == "":
            raise ValueError(
                f"S3 key {key!r}{where} has an empty path segment ('//'); servers normalise it "
                "differently, so it is refused"
            )
        if segment in (".", ".."):
            raise ValueError(f"S3 key {key!r}{where} has a {segment!r} path segment; use a plain name")
    return key


def parse_s3_url(url: str, *, require_key: bool = False) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)`` after validating both.

    Args:
        url: an ``s3://`` URL. ``s3://bucket`` and ``s3://bucket/`` give an empty key.
        require_key: raise if the key is empty.

    Returns:
        ``(bucket, key)``; the key has no leading slash and keeps a trailing one if given.

    Raises:
        ValueError: for a wrong scheme (``S3://``, ``s3:/``), surrounding whitespace, an invalid bucket
            name, or an invalid key (see :func:`validate_key`).
    """
    if not isinstance(url, str):
        raise ValueError(f"expected an s3:// URL string, got {type(url).__name__}: {url!r}")
    if url != url.strip():
        raise ValueError(f"S3 URL {url!r} has surrounding whitespace; remove it")
    if not url.startswith(S3_PATH_PREFIX):
        if url.lower().startswith(S3_PATH_PREFIX):
            raise ValueError(f"S3 URL {url!r} must start with lowercase 's3://'")
        if url.lower().startswith("s3:"):
            raise ValueError(f"S3 URL {url!r} is malformed: expected 's3://<bucket>/<key>' (two slashes)")
        raise ValueError(f"not an S3 URL: {url!r}; expected 's3://<bucket>/<key>'")
    rest = url[len(S3_PATH_PREFIX) :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"S3 URL {url!r} has no bucket; expected 's3://<bucket>/<key>'")
    try:
        validate_bucket_name(bucket)
    except ValueError as exc:
        raise ValueError(f"{exc} (in {url!r})") from None
    validate_key(key, allow_empty=not require_key, url=url)
    return bucket, key


def build_s3_url(bucket: str, key: str = "") -> str:
    """Build ``s3://bucket/key`` from its parts, validating both.

    Raises:
        ValueError: for an invalid bucket name or key.
    """
    validate_bucket_name(bucket)
    key = key.lstrip("/") if key.startswith("/") and not key.startswith("//") else key
    validate_key(key)
    return f"{S3_PATH_PREFIX}{bucket}/{key}"


def join_s3_url(base: str, *parts: str) -> str:
    """Join path segments onto an ``s3://`` URL with single slashes, validating the result."""
    bucket, key = parse_s3_url(base)
    pieces = [key.rstrip("/")] if key.strip("/") else []
    pieces.extend(p.strip("/") for p in parts if p.strip("/"))
    return build_s3_url(bucket, "/".join(pieces))

"""s3_dirpath_utils: parsing, building and the refusal of ambiguous URLs (no server needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from s3ckpt.s3_dirpath_utils import (
    S3_PATH_PREFIX,
    build_s3_url,
    is_s3_url,
    join_s3_url,
    parse_s3_url,
)


def test_prefix_constant() -> None:
    assert S3_PATH_PREFIX == "s3://"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket/key", ("bucket", "key")),
        ("s3://bucket/a/b/c.ckpt", ("bucket", "a/b/c.ckpt")),
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://bucket/dir/", ("bucket", "dir/")),
        ("s3://my.bucket-1/epoch=3-step=10.ckpt", ("my.bucket-1", "epoch=3-step=10.ckpt")),
        ("s3://bkt/ünïcode/ckpt", ("bkt", "ünïcode/ckpt")),
    ],
)
def test_parse_valid(url: str, expected: tuple[str, str]) -> None:
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("S3://bucket/key", "lowercase"),
        ("s3:/bucket/key", "two slashes"),
        ("s3:bucket/key", "two slashes"),
        ("s3://", "no bucket"),
        ("s3:///key", "no bucket"),
        ("s3://Bucket/key", "invalid S3 bucket name"),
        ("s3://b/key", "invalid S3 bucket name"),
        ("s3://bucket_underscore/key", "invalid S3 bucket name"),
        ("s3://bucket../key", "invalid S3 bucket name"),
        ("s3://192.168.1.1/key", "IP address"),
        ("s3://bucket/a//b", "empty path segment"),
        ("s3://bucket//a", "starts with '/'"),
        ("s3://bucket/a/../b", "'..' path segment"),
        ("s3://bucket/./b", "'.' path segment"),
        ("s3://bucket/a\nb", "control character"),
        ("s3://bucket/a\x00b", "control character"),
        (" s3://bucket/key", "whitespace"),
        ("s3://bucket/key ", "whitespace"),
        ("/local/path", "not an S3 URL"),
        ("http://bucket/key", "not an S3 URL"),
    ],
)
def test_parse_rejects_with_named_rule(url: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_s3_url(url)
    assert fragment in str(info.value)
    assert repr(url)[1:-1][:8] in str(info.value) or url.strip()[:6] in str(info.value)


def test_long_key_rejected() -> None:
    with pytest.raises(ValueError, match="1024 bytes"):
        parse_s3_url("s3://bucket/" + "k" * 1025)


def test_require_key() -> None:
    with pytest.raises(ValueError, match="key is empty"):
        parse_s3_url("s3://bucket/", require_key=True)


def test_is_s3_url() -> None:
    assert is_s3_url("s3://bucket/key")
    assert not is_s3_url("S3://bucket/key")
    assert not is_s3_url("/tmp/x")
    assert not is_s3_url(None)
    assert not is_s3_url(123)


def test_build_and_join_round_trip() -> None:
    assert build_s3_url("bucket", "a/b.ckpt") == "s3://bucket/a/b.ckpt"
    assert build_s3_url("bucket", "") == "s3://bucket/"
    assert parse_s3_url(build_s3_url("bucket", "x/y")) == ("bucket", "x/y")
    assert join_s3_url("s3://bucket/run/", "ckpts", "last.ckpt") == "s3://bucket/run/ckpts/last.ckpt"
    assert join_s3_url("s3://bucket", "a") == "s3://bucket/a"
    with pytest.raises(ValueError):
        build_s3_url("Bad_Bucket", "k")
    with pytest.raises(ValueError):
        join_s3_url("s3://bucket/run", "..", "x")


def test_import_needs_no_third_party_package() -> None:
    """The module must import with only the standard library (NeMo configs import it before torch)."""
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import importlib.util, pathlib\n"
        "spec = importlib.util.spec_from_file_location('s3_dirpath_utils', "
        f"{str(__import__('s3ckpt.s3_dirpath_utils').s3_dirpath_utils.__file__)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "third = sorted(m for m in new if m not in sys.stdlib_module_names and m != 's3_dirpath_utils')\n"
        "print(third)\n"
        "assert not third, third\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

"""Which checkpoint to resume from: NeMo's ``*end`` / ``*last`` rules over a listing, with each candidate checked
before it is chosen. This process alone lists and checks; :func:`s3ckpt.distributed.resolve_resume_path` runs it
on global rank 0 and broadcasts the answer."""

from __future__ import annotations

import json
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from . import checkpoint as ck
from .catalog import GROUP_MARKER_SUFFIX, CheckpointEntry, list_checkpoints
from .errors import CheckpointCorruptedError, CheckpointNotFoundError, ResumeError, S3NotFoundError
from .layout import expected_crc32c
from .s3_dirpath_utils import build_s3_url, parse_s3_url
from .transport import ops
from .transport.context import S3Transport

__all__ = ["VerifyPolicy", "find_resume_checkpoint"]

log = logging.getLogger(__name__)

VerifyPolicy = bool | Literal["head"]
"""How a candidate is checked: True downloads and verifies it, ``"head"`` checks its stored checksum, False
trusts the commit record."""


def _stem(entry: CheckpointEntry) -> str | None:
    """The name without ``.ckpt``, if the entry may be an ``*end``/``*last`` candidate (NeMo's globs)."""
    name = entry.name
    if name.endswith(".ckpt"):
        return name[: -len(".ckpt")]
    return name if entry.kind == "sharded" else None


def _check(t: S3Transport, entry: CheckpointEntry, policy: VerifyPolicy) -> None:
    """Raise :class:`CheckpointCorruptedError` if ``entry`` fails the ``policy`` check (see resolve_resume_path)."""
    if policy is False or entry.kind == "sharded":
        return  # DCP shards carry no s3ckpt checksum; `.metadata` (written last) is their commit record.
    bucket, _ = parse_s3_url(entry.url)
    if entry.kind == "model_parallel":
        _check_group(t, bucket, entry)
    for key in entry.keys if policy is True else ():
        buf, _, _ = ck._download_verified(t, build_s3_url(bucket, key), verify=True, progress=None)
        buf.close()
    if policy == "head" and entry.kind == "file":
        expected_crc32c(t, ops.head(t, bucket, entry.keys[0]))


def _check_group(t: S3Transport, bucket: str, entry: CheckpointEntry) -> None:
    _, logical = parse_s3_url(entry.url)
    try:
        recorded = json.loads(ops.get_bytes(t, bucket, logical + GROUP_MARKER_SUFFIX)).get("files")
    except (ValueError, AttributeError):
        recorded = None
    if not isinstance(recorded, dict):
        return  # a marker not written by commit_model_parallel: its presence is all it says
    changed = sorted(set(recorded) ^ set(entry.keys))
    if not changed:
        infos = head_many(t, bucket, sorted(recorded))
        changed = [
            i.key if i else k
            for k, i in zip(sorted(recorded), infos, strict=True)
            if i is None or (i.size, i.etag) != (recorded[k].get("size"), recorded[k].get("etag"))
        ]
    if changed:
        raise CheckpointCorruptedError(
            f"{entry.url}: rank file(s) {[build_s3_url(bucket, k) for k in changed[:4]]} missing, added or replaced "
            "after the group was committed"
        )


def head_many(t: S3Transport, bucket: str, keys: list[str]) -> list[ops.ObjectInfo | None]:
    """HEAD each key in parallel (``None`` where missing): ``tp * pp`` requests, never per data-parallel rank."""

    def head(key: str) -> ops.ObjectInfo | None:
        try:
            return ops.head(t, bucket, key)
        except S3NotFoundError:
            return None

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(keys)))) as pool:
        return list(pool.map(head, keys))


def find_resume_checkpoint(
    dirpath: str,
    *,
    resume_ignore_no_checkpoint: bool = False,
    resume_past_end: bool = False,
    transport: S3Transport | None = None,
    verify_candidates: VerifyPolicy = "head",
) -> str | None:
    """The checkpoint to resume from under ``dirpath``, found by this process alone (no collective).

    Use :func:`resolve_resume_path` in a multi-process job; the rules and arguments are the same.
    """
    t = ck.resolve_transport(transport)
    entries = list_checkpoints(t, dirpath)
    # list_checkpoints orders newest step first, then newest time.
    ends = [e for e in entries if (_stem(e) or "").endswith("end")]
    lasts = [e for e in entries if (_stem(e) or "").endswith("last")]
    committed_ends = [e for e in ends if e.committed]
    if committed_ends and not resume_past_end:
        raise ResumeError(
            f"Found {committed_ends[0].url} indicating that the last training run has already completed. "
            "Pass resume_past_end=True to resume from it anyway, or use a new checkpoint directory."
        )
    if len(committed_ends) > 1:
        _warn(f"Multiple checkpoints match *end.ckpt: {[e.url for e in committed_ends]}; trying the newest first.")
    skipped: list[str] = []
    for entry in (ends if resume_past_end else []) + lasts:
        if not entry.committed:
            skipped.append(f"{entry.url} ({entry.reason})")
            _warn(f"Skipping checkpoint {entry.url}: not committed ({entry.reason}); trying the next older one.")
            continue
        try:
            _check(t, entry, verify_candidates)
        except CheckpointCorruptedError as exc:
            skipped.append(f"{entry.url} (corrupted)")
            _warn(f"Skipping checkpoint {entry.url}: {exc}; trying the next older one.")
            continue
        log.info("resuming from %s", entry.url)
        return entry.url
    why = f" (skipped: {'; '.join(skipped)})" if skipped else ""
    message = f"There were no usable *last.ckpt or *end.ckpt checkpoints under {dirpath}{why}."
    if resume_ignore_no_checkpoint:
        _warn(message + " Training from scratch (resume_ignore_no_checkpoint=True).")
        return None
    raise CheckpointNotFoundError(
        message + " Cannot resume; pass resume_ignore_no_checkpoint=True to start from scratch instead."
    )


def _warn(message: str) -> None:
    log.warning("%s", message)
    warnings.warn(message, UserWarning, stacklevel=3)

"""Which checkpoint to resume from: NeMo's ``*end`` / ``*last`` rules over a listing, with each candidate checked
before it is chosen. This process alone lists and checks; :func:`s3ckpt.distributed.resolve_resume_path` runs it
on global rank 0 and broadcasts the answer.

Resume never goes back past a committed checkpoint: a ``*last`` checkpoint is written after the top-k checkpoint
of its step (``save_last="link"`` copies it once it has committed), so a crash in between leaves ``last.ckpt`` one
interval behind. When a committed checkpoint of the same run (:func:`newest_of_run`) records a higher step, it is
taken instead, with a warning that says why.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Literal

from . import checkpoint as ck
from .catalog import GROUP_MARKER_SUFFIX, CheckpointEntry, list_checkpoints, parse_step_epoch
from .checkpoint_copy import COPY_OF_META
from .errors import CheckpointCorruptedError, CheckpointNotFoundError, ResumeError, S3NotFoundError
from .layout import expected_crc32c, read_manifest
from .s3_dirpath_utils import build_s3_url, parse_s3_url
from .transport import ops
from .transport.context import S3Transport

__all__ = ["VerifyPolicy", "find_resume_checkpoint", "newest_of_run"]

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
        info = ops.head(t, bucket, entry.keys[0])
        if entry.manifest is not None:  # read by newest_of_run for the step: not fetched twice
            expected_crc32c(t, info, manifest=entry.manifest)
        else:
            expected_crc32c(t, info)


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

    Use :func:`resolve_resume_path` in a multi-process job; the rules and arguments are the same, and a
    ``*last`` candidate gives way to a committed checkpoint of its run with a higher step
    (:func:`newest_of_run`).
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
        if (_stem(entry) or "").endswith("last"):
            # Before checking the candidate: if a newer checkpoint replaces it, checking it was for nothing.
            chosen = newest_of_run(t, entry, entries, verify_candidates=verify_candidates)
            if chosen.url != entry.url:
                log.info("resuming from %s", chosen.url)
                return chosen.url
            entry = chosen  # with the manifest it read, if any: _check does not fetch it again
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


# Names that are resume candidates themselves, by NeMo's globs (*last, *end) or Lightning's (last, last-v1, ...).
_LAST_OR_END_RE = re.compile(r"^last|(?:last|end)(?:-v\d+)?$")


def _parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


def _of_same_run(candidate: CheckpointEntry, other: CheckpointEntry) -> bool:
    """Whether ``other`` is a top-k checkpoint of ``candidate``'s run: beside it (same directory, same
    extension, so not another run's subdirectory nor a foreign ``.pt``), and not a ``*last``/``*end`` one."""
    stem, ext = os.path.splitext(other.name)
    return (
        _parent(other.url) == _parent(candidate.url)
        and ext == os.path.splitext(candidate.name)[1]
        and not _LAST_OR_END_RE.search(stem)
    )


def _with_recorded_step(t: S3Transport, entry: CheckpointEntry) -> CheckpointEntry:
    """``entry`` with the step its manifest records (one GET) when its name has none, e.g. ``last.ckpt``.

    ``save_last="link"``'s copy carries its source's ``global_step`` (and ``copy_of``, whose name has the step
    where the meta has none). A sharded checkpoint has no s3ckpt manifest with a step: it stays unknown.
    """
    if entry.step is not None or entry.kind == "sharded":
        return entry
    bucket, _ = parse_s3_url(entry.url)
    try:
        manifest = read_manifest(t, bucket, entry.keys[0])
    except CheckpointCorruptedError as exc:
        log.warning("cannot read the step of %s: %s", entry.url, exc)  # its check or its load reports it
        return entry
    if manifest is None:
        return entry
    step = manifest.meta.get("global_step", manifest.meta.get("step"))
    if not isinstance(step, int) or isinstance(step, bool):
        source = manifest.meta.get(COPY_OF_META)
        step = parse_step_epoch(str(source).rsplit("/", 1)[-1])[0] if source else None
    return replace(entry, manifest=manifest, step=step)


def newest_of_run(
    t: S3Transport,
    candidate: CheckpointEntry,
    entries: Sequence[CheckpointEntry],
    *,
    verify_candidates: VerifyPolicy = "head",
    warn: Callable[[str], None] | None = None,
) -> CheckpointEntry:
    """``candidate`` (a ``*last`` checkpoint), unless a committed checkpoint of the same run has a higher step.

    Resume never goes back past a committed checkpoint. ``last.ckpt`` is written after the top-k checkpoint
    of its step (``save_last="link"`` copies it once it has committed); a crash in between leaves it one
    interval behind, and resuming from it would redo that interval and save its step again (``-v1``).

    *Of the same run*: in ``candidate``'s directory, with its extension (``.ckpt``), not itself a ``*last`` or
    ``*end`` checkpoint, and committed (a model-parallel group without its marker or a sharded directory
    without ``.metadata`` never counts). Steps come from the names (``epoch=1-step=100.ckpt``); the
    candidate's, where its name has none, from its manifest (one GET, made only when a checkpoint beside it
    has a step to compare with). Where the candidate's step stays unknown (a sharded ``last.ckpt/``, a file
    without a manifest), *higher* means committed later: a trainer writes ``*last`` after the top-k
    checkpoint of the same step, so one listed with a later time was saved after the candidate was last
    written. Without a time either, the candidate is kept: nothing shows it is behind.

    Args:
        t: transport.
        candidate: the ``*last`` entry the rules chose, committed.
        entries: the listing it came from (:func:`~s3ckpt.catalog.list_checkpoints`).
        verify_candidates: how a newer checkpoint is checked before it is taken (as ``find_resume_checkpoint``);
            one that fails is skipped with a warning.
        warn: reports why a newer checkpoint was taken or skipped; default: a log warning and a
            ``UserWarning``.

    Returns:
        The entry to resume from: a newer one of the run, or ``candidate`` (with the manifest it read, if any).
    """
    report = warn or _warn
    beside = [e for e in entries if e.committed and e.step is not None and _of_same_run(candidate, e)]
    if not beside:
        return candidate
    candidate = _with_recorded_step(t, candidate)
    step, stamp = candidate.step, candidate.last_modified
    if step is not None:
        newer = [e for e in beside if (e.step or 0) > step]
        behind = f"step {step}"
    elif stamp is not None:
        newer = [e for e in beside if e.last_modified is not None and e.last_modified > stamp]
        behind = f"no recorded step, last written {stamp:%Y-%m-%d %H:%M:%S} UTC, before it"
    else:
        log.info("%s: no step and no time recorded, so not compared with the checkpoints beside it", candidate.url)
        return candidate
    # Highest step first; the listing's order (newest time first) among equal steps.
    for entry in sorted(newer, key=lambda e: e.step or 0, reverse=True):
        try:
            _check(t, entry, verify_candidates)
        except CheckpointCorruptedError as exc:
            report(f"Not resuming from {entry.url} (step {entry.step}), newer than {candidate.url}: {exc}.")
            continue
        report(
            f"Resuming from {entry.url} (step {entry.step}) instead of {candidate.url} ({behind}): it is a "
            f"committed checkpoint of the same run, saved after {candidate.name} was last written (a crash "
            "between a save and its last-checkpoint copy?); resume never goes back past a committed checkpoint."
        )
        return entry
    return candidate


def _warn(message: str) -> None:
    log.warning("%s", message)
    warnings.warn(message, UserWarning, stacklevel=3)

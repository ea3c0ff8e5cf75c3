"""``s3ckpt rm``, ``prune`` and ``gc``: every deletion is planned first, printed, confirmed, then done.

A checkpoint is deleted commit marker first (group marker, ``.metadata``; for a single file the data object
before its manifest), so an interrupted delete leaves an uncommitted leftover that resume ignores and
``gc`` removes, never a committed checkpoint with pieces missing.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from ..catalog import GROUP_MARKER_SUFFIX, CheckpointEntry, list_checkpoints, uninject_model_parallel_rank
from ..layout import MANIFEST_SUFFIX, manifest_key
from ..s3_dirpath_utils import build_s3_url
from ..transport import ops
from ..transport.ops import PendingUpload
from .context import CommandError, Context, UsageError, age_cutoff, format_duration, s3_url
from .output import PROG, format_time, human_size
from .targets import entry_keys, find_target, list_described, resume_pick

__all__ = ["cmd_gc", "cmd_prune", "cmd_rm"]


@dataclass(frozen=True)
class _Deletion:
    url: str
    keys: list[str]
    size: int
    reason: str


@dataclass
class _Plan:
    op: str
    bucket: str
    deletions: list[_Deletion] = field(default_factory=list)
    uploads: list[PendingUpload] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.deletions or self.uploads)


def _entry_deletion(ctx: Context, bucket: str, entry: CheckpointEntry, reason: str) -> _Deletion:
    return _Deletion(entry.url, entry_keys(ctx.transport, bucket, entry), entry.size, reason)


def _show(ctx: Context, plan: _Plan) -> None:
    out, dry = ctx.out, ctx.dry_run
    prefix = "(dry run) " if dry else ""
    for url, reason in plan.kept:
        out.line(f"{prefix}keep    {url}  ({reason})")
        out.record({"op": plan.op, "action": "keep", "url": url, "reason": reason, "dry_run": dry})
    for d in plan.deletions:
        out.line(f"{prefix}delete  {d.url}  ({human_size(d.size)}, {d.reason})")
        out.record(
            {"op": plan.op, "action": "delete", "url": d.url, "objects": len(d.keys), "size": d.size}
            | {"reason": d.reason, "dry_run": dry}
        )
    for u in plan.uploads:
        url = build_s3_url(plan.bucket, u.key)
        out.line(f"{prefix}abort   {url}  (multipart upload started {format_time(u.initiated)})")
        out.record({"op": plan.op, "action": "abort", "url": url, "upload_id": u.upload_id, "dry_run": dry})


def _execute(ctx: Context, plan: _Plan, what: str) -> int:
    """Print the plan; unless it is a dry run, confirm and carry it out."""
    _show(ctx, plan)
    if plan.empty:
        ctx.out.note(f"nothing to delete {what}")
        return 0
    size = sum(d.size for d in plan.deletions)
    summary = f"{len(plan.deletions)} checkpoint(s)/object group(s), {human_size(size)}"
    if plan.uploads:
        summary += f", and abort {len(plan.uploads)} multipart upload(s)"
    if ctx.dry_run:
        ctx.out.note(f"dry run: would delete {summary}; nothing was changed")
        return 0
    ctx.confirm(f"Delete {summary} {what}?")
    t = ctx.transport
    for d in plan.deletions:
        # The first key is the commit marker (or the data object): gone first, see the module docstring.
        ops.delete_object(t, plan.bucket, d.keys[0])
        if d.keys[1:]:
            ops.delete_objects(t, plan.bucket, d.keys[1:])
    for u in plan.uploads:
        ops.abort_upload(t, plan.bucket, u.key, u.upload_id)
    ctx.out.note(f"deleted {summary}")
    return 0


def _refuse_partial(bucket: str, key: str) -> None:
    """One rank's file or one shard is part of a committed whole: deleting it alone would leave a checkpoint
    that resume still picks (its marker says committed) but that cannot load."""
    whole = uninject_model_parallel_rank(key)
    base = key.rsplit("/", 1)[-1]
    if whole == key and (base == ".metadata" or base.endswith(".distcp")):
        whole = key[: len(key) - len(base)]
    if whole != key:
        raise CommandError(
            f"s3://{bucket}/{key} is one piece of the checkpoint s3://{bucket}/{whole}; remove the whole "
            f"checkpoint instead: {PROG} rm s3://{bucket}/{whole}"
        )


def cmd_rm(ctx: Context, args: argparse.Namespace) -> int:
    """Delete one checkpoint: a file and its manifest, a model-parallel group, or a sharded directory."""
    bucket, key = s3_url(args.url)
    if not key.strip("/"):
        raise UsageError(
            f"refusing to remove the whole bucket {bucket!r}: name a checkpoint (s3://{bucket}/run/x.ckpt)"
        )
    t = ctx.transport
    target = find_target(t, args.url)
    plan = _Plan("rm", bucket)
    if target is not None and target.info is not None:
        _refuse_partial(bucket, target.key)
        plan.deletions.append(_Deletion(target.url, [target.key, manifest_key(target.key)], target.info.size, "rm"))
    elif target is not None and target.entry is not None:
        plan.deletions.append(_entry_deletion(ctx, bucket, target.entry, f"rm {target.entry.kind}"))
    else:
        under = list_checkpoints(t, build_s3_url(bucket, key.rstrip("/") + "/"))
        hint = f"; {len(under)} checkpoint(s) lie under it: remove them one by one, or use prune" if under else ""
        raise CommandError(f"no checkpoint at {args.url}{hint}")
    return _execute(ctx, plan, f"at {args.url}")


def cmd_prune(ctx: Context, args: argparse.Namespace) -> int:
    """Keep the newest ``--keep`` committed checkpoints (and the one resume would load); delete the rest."""
    bucket, key = s3_url(args.url)
    url = build_s3_url(bucket, key if not key or key.endswith("/") else key + "/")
    t = ctx.transport
    entries = list_described(t, url)
    picked = resume_pick(t, url, entries)
    plan = _Plan("prune", bucket)
    committed = [e for e in entries if e.committed]  # newest (step, then time) first
    for i, e in enumerate(committed):
        if i < args.keep:
            plan.kept.append((e.url, f"one of the {args.keep} newest"))
        elif e.url == picked:
            plan.kept.append((e.url, "what a resume would load"))
        else:
            plan.deletions.append(_entry_deletion(ctx, bucket, e, f"older than the {args.keep} newest"))
    cutoff = age_cutoff(args.older_than)
    young = 0
    for e in (e for e in entries if not e.committed):
        if args.include_uncommitted and e.last_modified is not None and e.last_modified < cutoff:
            plan.deletions.append(
                _entry_deletion(ctx, bucket, e, f"incomplete, last written {format_time(e.last_modified)}")
            )
        else:
            young += 1
    if young:
        why = "newer than --older-than" if args.include_uncommitted else "pass --include-uncommitted to prune them"
        ctx.out.note(f"left {young} incomplete checkpoint(s) alone: a save may be in progress ({why})")
    return _execute(ctx, plan, f"under {url}")


def cmd_gc(ctx: Context, args: argparse.Namespace) -> int:
    """Abort stale multipart uploads and delete uncommitted leftovers older than ``--older-than``."""
    bucket, key = s3_url(args.url)
    prefix = key if not key or key.endswith("/") else key + "/"
    url = build_s3_url(bucket, prefix)
    t = ctx.transport
    cutoff = age_cutoff(args.older_than)
    plan = _Plan("gc", bucket)
    objects = {o.key: o for o in ops.list_objects(t, bucket, prefix)}
    if not objects:
        ops.check_bucket(t, bucket)
    plan.uploads = [u for u in ops.list_uploads(t, bucket, prefix) if u.initiated and u.initiated < cutoff]
    entries = list_checkpoints(t, url) if objects else []
    groups = {e.url for e in entries if e.kind == "model_parallel"}
    claimed: set[str] = set()
    for e in entries:
        if not e.committed and e.last_modified is not None and e.last_modified < cutoff:
            d = _entry_deletion(ctx, bucket, e, e.reason)
            plan.deletions.append(d)
            claimed.update(d.keys)
    for k, o in sorted(objects.items()):
        if k in claimed or o.last_modified is None or o.last_modified >= cutoff:
            continue
        if k.endswith(MANIFEST_SUFFIX) and k[: -len(MANIFEST_SUFFIX)] not in objects:
            plan.deletions.append(_Deletion(build_s3_url(bucket, k), [k], o.size, "manifest without its data object"))
        elif k.endswith(GROUP_MARKER_SUFFIX) and build_s3_url(bucket, k[: -len(GROUP_MARKER_SUFFIX)]) not in groups:
            plan.deletions.append(_Deletion(build_s3_url(bucket, k), [k], o.size, "group marker without rank files"))
    return _execute(ctx, plan, f"under {url} (older than {format_duration(args.older_than)})")

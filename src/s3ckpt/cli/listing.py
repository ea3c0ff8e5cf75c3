"""``s3ckpt ls`` and ``s3ckpt verify``.

``verify`` exits 0 when every object matched its recorded checksum, 1 when any did not (or is missing), and
:data:`EXIT_UNVERIFIABLE` (3) when none failed but some could not be checked: no checksum kept by the store,
no s3ckpt manifest, no DCP sidecar (an object another tool wrote without a checksum).
"""

from __future__ import annotations

import argparse
import base64
from dataclasses import dataclass

from ..catalog import CheckpointEntry, list_checkpoints
from ..checkpoint import VerifyResult
from ..checkpoint import verify as verify_object
from ..errors import CheckpointCorruptedError, S3NotFoundError, UnverifiableCheckpointError
from ..s3_dirpath_utils import build_s3_url
from ..transport import ops
from .context import CommandError, Context, s3_url
from .output import format_table, format_time, human_size
from .targets import Target, find_target, list_described, resume_pick

__all__ = ["EXIT_UNVERIFIABLE", "cmd_ls", "cmd_verify"]

EXIT_UNVERIFIABLE = 3
"""``s3ckpt verify``'s exit status when nothing failed but something could not be verified."""


def _size(ctx: Context, n: int) -> str:
    return str(n) if getattr(ctx.args, "bytes", False) else human_size(n)


def _entry_record(entry: CheckpointEntry, resume: bool) -> dict[str, object]:
    return {
        "url": entry.url,
        "name": entry.name,
        "kind": entry.kind,
        "committed": entry.committed,
        "reason": entry.reason,
        "step": entry.step,
        "epoch": entry.epoch,
        "size": entry.size,
        "objects": len(entry.keys),
        "last_modified": entry.last_modified,
        "resume": resume,
        "copy_of": entry.copy_of,
    }


def cmd_ls(ctx: Context, args: argparse.Namespace) -> int:
    """List the checkpoints under a prefix, newest first, marking the one a resume would load."""
    bucket, key = s3_url(args.url)
    prefix = key if not key or key.endswith("/") else key + "/"
    url = build_s3_url(bucket, prefix)
    t = ctx.transport
    entries = list_described(t, url)
    picked = resume_pick(t, url, entries) if entries else None
    if ctx.out.json:
        for e in entries:
            ctx.out.record(_entry_record(e, e.url == picked))
        return 0
    if not entries:
        ctx.out.note(f"no checkpoints under {url}")
        return 0
    rows = []
    for e in entries:
        name = e.url[len(url) :] if e.url.startswith(url) else e.url
        if e.copy_of:  # save_last="link": a server-side copy, a checkpoint of its own
            name += f"  (copy of {e.copy_of.rsplit('/', 1)[-1]})"
        rows.append(
            [
                "*" if e.url == picked else "",
                "ok" if e.committed else "INCOMPLETE",
                e.kind,
                "-" if e.step is None else str(e.step),
                "-" if e.epoch is None else str(e.epoch),
                _size(ctx, e.size),
                format_time(e.last_modified),
                name,
            ]
        )
    for text in format_table(
        ["", "STATUS", "KIND", "STEP", "EPOCH", "SIZE", "MODIFIED", "NAME"], rows, right=(3, 4, 5)
    ):
        ctx.out.result(text)
    total = sum(e.size for e in entries)
    incomplete = [e for e in entries if not e.committed]
    summary = f"{len(entries)} checkpoint(s), {_size(ctx, total)}"
    if incomplete:
        summary += f"; {len(incomplete)} incomplete ({incomplete[0].name}: {incomplete[0].reason})"
    if picked:
        summary += "; * = what a resume would load"
    ctx.out.note(summary)
    return 0


@dataclass
class _Tally:
    ok: int = 0
    bad: int = 0
    incomplete: int = 0
    unverifiable: int = 0


def _verify_keys(
    ctx: Context, bucket: str, url: str, keys: list[str], tally: _Tally, recorded: dict[str, int] | None = None
) -> None:
    """Verify each object; report one OK line or one error line per object."""
    for key in keys:
        obj_url = build_s3_url(bucket, key)
        try:
            result = _verify_one(ctx, bucket, key, (recorded or {}).get(key))
        except UnverifiableCheckpointError as exc:
            tally.unverifiable += 1
            ctx.out.error(str(exc))
            ctx.out.record({"url": obj_url, "checkpoint": url, "ok": None, "unverifiable": True, "error": str(exc)})
            continue
        except (CheckpointCorruptedError, S3NotFoundError) as exc:
            tally.bad += 1
            ctx.out.error(str(exc))
            ctx.out.record({"url": obj_url, "checkpoint": url, "ok": False, "error": str(exc)})
            continue
        tally.ok += 1
        # "crc32c=<hex> (from object)" as before for s3ckpt's own checkpoints; other algorithms alike.
        label = result.algorithm.lower() + ("-composite" if result.checksum_type == "COMPOSITE" else "")
        value = base64.b64decode(result.checksum.partition("-")[0]).hex()
        ctx.out.line(f"OK  {obj_url}  {human_size(result.size)}  {label}={value} (from {result.source})")
        record: dict[str, object] = {
            "url": obj_url,
            "checkpoint": url,
            "ok": True,
            "size": result.size,
            "algorithm": result.algorithm,
            "checksum_type": result.checksum_type,
            "checksum": result.checksum,
            "from": result.origin,
            "source": result.source,
        }
        if result.crc32c is not None:
            record["crc32c"] = f"{result.crc32c:08x}"
        ctx.out.record(record)


def _verify_one(ctx: Context, bucket: str, key: str, recorded: int | None) -> VerifyResult:
    t = ctx.transport
    info = ops.head(t, bucket, key)  # for the progress bar's total
    # A DCP file on a store that keeps no checksum: its CRC32C is in the checkpoint's sidecar manifest.
    dcp = (recorded, "DCP manifest") if recorded is not None else None
    with ctx.out.progress(info.size, f"verify {key.rsplit('/', 1)[-1]}") as progress:
        return verify_object(build_s3_url(bucket, key), transport=t, progress=progress, recorded=dcp)


def _dcp_records(ctx: Context, bucket: str, entry: CheckpointEntry) -> dict[str, int]:
    """key -> CRC32C from a sharded checkpoint's sidecar manifest (written by s3ckpt's DCP writer)."""
    try:
        from ..dcp.layout import MANIFEST_NAME, METADATA_NAME, Manifest
    except ImportError:  # the DCP integration needs torch.distributed; plain verification still works
        return {}
    _, prefix = s3_url(entry.url)
    try:
        data = ops.get_bytes(ctx.transport, bucket, prefix + MANIFEST_NAME)
    except S3NotFoundError:
        return {}
    manifest = Manifest.from_json(data, where=build_s3_url(bucket, prefix + MANIFEST_NAME))
    records = {prefix + rel: rec.crc32c for rel, rec in {**manifest.files, **manifest.extras}.items()}
    records[prefix + METADATA_NAME] = manifest.metadata_crc32c
    return records


def _verify_entry(ctx: Context, bucket: str, entry: CheckpointEntry, tally: _Tally) -> None:
    if not entry.committed:
        tally.incomplete += 1
        ctx.out.note(f"INCOMPLETE  {entry.url}: {entry.reason}")
        ctx.out.record({"url": entry.url, "checkpoint": entry.url, "ok": None, "error": entry.reason})
        return
    recorded: dict[str, int] = {}
    if entry.kind == "sharded":
        try:
            recorded = _dcp_records(ctx, bucket, entry)
        except CheckpointCorruptedError as exc:
            tally.bad += 1
            ctx.out.error(str(exc))
            ctx.out.record({"url": entry.url, "checkpoint": entry.url, "ok": False, "error": str(exc)})
            return
    _verify_keys(ctx, bucket, entry.url, list(entry.keys), tally, recorded)


def cmd_verify(ctx: Context, args: argparse.Namespace) -> int:
    """Check a checkpoint, or every checkpoint under a prefix, against its recorded checksum. Exit 1 on any
    mismatch, 3 (:data:`EXIT_UNVERIFIABLE`) if none failed but some had nothing to check against."""
    t = ctx.transport
    bucket, key = s3_url(args.url)
    target: Target | None = find_target(t, args.url)
    tally = _Tally()
    if target is not None and target.info is not None:
        _verify_keys(ctx, bucket, target.url, [target.key], tally)
    elif target is not None and target.entry is not None:
        if not target.entry.committed:
            raise CommandError(f"{target.entry.url} is not committed: {target.entry.reason}")
        _verify_entry(ctx, bucket, target.entry, tally)
    else:
        prefix = key if not key or key.endswith("/") else key + "/"
        entries = list_checkpoints(t, build_s3_url(bucket, prefix))
        if not entries:
            raise CommandError(f"no checkpoint at {args.url} and none under it")
        for entry in entries:
            _verify_entry(ctx, bucket, entry, tally)
        ctx.out.note(
            f"{tally.ok + tally.bad} object(s) verified: {tally.ok} ok, {tally.bad} failed"
            + (f"; {tally.unverifiable} could not be verified" if tally.unverifiable else "")
            + (f"; {tally.incomplete} incomplete checkpoint(s) skipped" if tally.incomplete else "")
        )
    if tally.bad:
        return 1
    return EXIT_UNVERIFIABLE if tally.unverifiable else 0

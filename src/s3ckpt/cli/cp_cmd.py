"""``s3ckpt cp SRC DST``: S3 to local, local to S3, S3 to S3; one object, or a prefix with ``-r``."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from ..catalog import GROUP_MARKER_SUFFIX
from ..errors import S3NotFoundError
from ..layout import MANIFEST_SUFFIX
from ..s3_dirpath_utils import build_s3_url, is_s3_url
from ..transport import ops
from ..transport.ops import ObjectInfo
from .context import CommandError, Context, UsageError, s3_url
from .output import human_size
from .transfer import Progress, copy_s3_to_s3, download_to_file, drop_stale_manifest, timed, upload_file

__all__ = ["cmd_cp"]


@dataclass(frozen=True)
class _Source:
    """One object to copy: ``rel`` is its path relative to the source root (its name for a single copy)."""

    rel: str
    size: int
    info: ObjectInfo | None = None
    path: Path | None = None
    listed: bool = False
    """Known from a listing only (no checksum or metadata yet)."""

    @property
    def display(self) -> str:
        return build_s3_url(self.info.bucket, self.info.key) if self.info else str(self.path)


def _base(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _wants_manifest(rel: str) -> bool:
    """Whether an object has (as a source) or gets (as a destination) an s3ckpt per-object manifest.

    Data objects do; DCP members, manifests and markers do not: ``.metadata``'s manifest name is the DCP
    sidecar's own name, ``.metadata.s3ckpt.json``, which is copied as it is.
    """
    base = _base(rel)
    return not (
        base == ".metadata" or base.endswith((".distcp", MANIFEST_SUFFIX, GROUP_MARKER_SUFFIX, ".metadata.tmp"))
    )


def _order(rel: str) -> int:
    """Copy data first, commit markers last, so that the copy is never committed before it is complete."""
    base = _base(rel)
    if base == ".metadata" or base.endswith(GROUP_MARKER_SUFFIX):
        return 2
    return 1 if base.endswith(MANIFEST_SUFFIX) else 0


def _select(sources: list[_Source]) -> list[_Source]:
    """Drop stale per-object manifests (a fresh one is written for each copied object) and order the rest."""
    rels = {s.rel for s in sources}
    kept = [
        s
        for s in sources
        if not (
            s.rel.endswith(MANIFEST_SUFFIX)
            and s.rel[: -len(MANIFEST_SUFFIX)] in rels
            and _wants_manifest(s.rel[: -len(MANIFEST_SUFFIX)])
        )
    ]
    return sorted(kept, key=lambda s: (_order(s.rel), s.rel))


def _s3_sources(ctx: Context, url: str, recursive: bool) -> list[_Source]:
    t = ctx.transport
    bucket, key = s3_url(url)
    if key and not key.endswith("/"):
        try:
            info = ops.head(t, bucket, key)
            return [_Source(_base(key), info.size, info=info)]
        except S3NotFoundError:
            ops.check_bucket(t, bucket)  # a missing bucket is named as such
    prefix = key if not key or key.endswith("/") else key + "/"
    listed = list(ops.list_objects(t, bucket, prefix))
    if not listed:
        ops.check_bucket(t, bucket)
        raise CommandError(f"no object at {url} and none under it")
    if not recursive:
        raise CommandError(f"{url} is a prefix with {len(listed)} object(s); pass -r/--recursive to copy all of it")
    return [
        _Source(
            o.key[len(prefix) :], o.size, info=ObjectInfo(bucket, o.key, o.size, o.etag, o.last_modified), listed=True
        )
        for o in listed
    ]


def _local_sources(path_text: str, recursive: bool) -> list[_Source]:
    path = Path(path_text)
    if path.is_file():
        return [_Source(path.name, path.stat().st_size, path=path)]
    if not path.exists():
        raise CommandError(f"no such file or directory: {path_text}")
    if not recursive:
        raise CommandError(f"{path_text} is a directory; pass -r/--recursive to copy all of it")
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return [_Source(p.relative_to(path).as_posix(), p.stat().st_size, path=p) for p in files]


def _destination(dst: str, rel: str, single: bool) -> str:
    """Where ``rel`` goes: into a directory-like destination, or to the destination itself."""
    if is_s3_url(dst):
        bucket, key = s3_url(dst, what="destination")
        into = not key or key.endswith("/") or not single
        return build_s3_url(bucket, (key if not key or key.endswith("/") else key + "/") + rel if into else key)
    into = not single or dst.endswith(os.sep) or Path(dst).is_dir()
    return str(Path(dst) / rel) if into else dst


def cmd_cp(ctx: Context, args: argparse.Namespace) -> int:
    """Copy checkpoints between S3 and local files (or within S3), leaving results that ``verify``."""
    src_s3, dst_s3 = is_s3_url(args.src), is_s3_url(args.dst)
    if not (src_s3 or dst_s3):
        raise UsageError("cp needs at least one s3:// URL (for local copies use cp)")
    if dst_s3:
        s3_url(args.dst, what="destination")
    if args.src.startswith("s3:") and not src_s3:
        s3_url(args.src, what="source")  # a malformed s3 URL, not a local path: say so (exit 2)
    sources = _s3_sources(ctx, args.src, args.recursive) if src_s3 else _local_sources(args.src, args.recursive)
    single = len(sources) == 1 and not args.recursive
    jobs = [(s, _destination(args.dst, s.rel, single)) for s in (sources if single else _select(sources))]
    if any(s.display == d for s, d in jobs):
        raise CommandError(f"{args.src} and {args.dst} are the same object")
    total = 0
    for source, dest in jobs:
        record: dict[str, object] = {"op": "cp", "source": source.display, "destination": dest, "size": source.size}
        if ctx.dry_run:
            ctx.out.line(f"(dry run) copy {source.display} -> {dest} ({human_size(source.size)})")
            ctx.out.record({**record, "dry_run": True})
            continue
        with ctx.out.progress(source.size, _base(source.rel)) as progress:
            method, seconds = _copy_one(ctx, args, source, dest, progress)
        total += source.size
        ctx.out.line(f"copy {source.display} -> {dest} ({human_size(source.size)}, {method}, {seconds:.2f} s)")
        ctx.out.record({**record, "dry_run": False, "method": method, "seconds": round(seconds, 3)})
    if len(jobs) > 1 and not ctx.dry_run:
        ctx.out.note(f"copied {len(jobs)} object(s), {human_size(total)}")
    return 0


def _copy_one(
    ctx: Context, args: argparse.Namespace, source: _Source, dest: str, progress: Progress
) -> tuple[str, float]:
    """Copy one object; returns how (for the report) and the seconds it took."""
    t = ctx.transport
    info = source.info
    if info is not None and source.listed:
        info = ops.head(t, info.bucket, info.key)  # a listing omits the checksum and metadata a copy needs
    if info is not None and not is_s3_url(dest):
        src = info
        how, seconds = timed(
            lambda: download_to_file(
                t, src, Path(dest), verify=not args.no_verify, has_manifest=_wants_manifest(src.key), progress=progress
            )
        )
        return f"download, {how}", seconds
    bucket, key = s3_url(dest, require_key=True, what="destination")
    manifest = _wants_manifest(dest) and not args.no_manifest

    def copy() -> str:
        if info is not None:
            _, how = copy_s3_to_s3(
                t,
                info,
                bucket,
                key,
                manifest=manifest,
                has_manifest=_wants_manifest(info.key),
                stream=args.stream,
                progress=progress,
            )
            return how
        assert source.path is not None
        upload_file(t, source.path, bucket, key, manifest=manifest, progress=progress)
        return "upload"

    method, seconds = timed(copy)
    if _wants_manifest(dest) and args.no_manifest:
        drop_stale_manifest(t, bucket, key)
    return str(method), seconds

"""``s3ckpt inspect``: a face over :func:`s3ckpt.inspection.inspect` (what a checkpoint holds, read from its
pickle alone: a few KiB, not the tensors). This module only parses and prints."""

from __future__ import annotations

import argparse

from ..errors import CheckpointNotFoundError
from ..inspection import CheckpointSummary, NotAZipError, describe, inspect
from .context import CommandError, Context, s3_url
from .output import human_size

__all__ = ["cmd_inspect", "describe"]

_MAX_FILES_SHOWN = 20


def _share(n: int, total: int) -> str:
    return f"{human_size(n)} ({100.0 * n / total if total else 100.0:.1f}%)"


def _transfer_rows(s: CheckpointSummary) -> list[tuple[str, str]]:
    """How a file was saved, from its manifest: uploaded, copied on the store (and from what), zip records."""
    if s.manifest_error is not None:
        return [("manifest", s.manifest_error)]
    if s.bytes_uploaded is None or s.bytes_copied is None:
        return [("manifest", "none (not saved by s3ckpt)")] if s.kind == "file" else []
    rows = [("uploaded", _share(s.bytes_uploaded, s.size)), ("copied", _share(s.bytes_copied, s.size))]
    if s.copy_of is not None:
        rows.append(("copy of", f"{s.copy_of} (a server-side copy)"))
    if s.bytes_copied and s.base is not None:
        rows.append(("base", f"{s.base} (its unchanged records copied on the store)"))
    records = f"{s.zip_records} listed in the manifest" if s.zip_records else "none listed in the manifest"
    rows.append(("zip records", records))
    return rows


def _print(ctx: Context, s: CheckpointSummary) -> None:
    out = ctx.out
    out.result(s.url)
    rows: list[tuple[str, str]] = [("kind", f"{s.format or s.kind}, {human_size(s.size)}")]
    for name, value in (
        ("step", s.step),
        ("epoch", s.epoch),
        ("lightning_version", s.lightning_version),
        ("entries", s.entries),
    ):
        if value is not None:
            rows.append((name, str(value)))
    if s.kind != "sharded" or s.entries is not None:
        dtypes = ", ".join(f"{d} x{n}" for d, n in s.dtypes.items()) or "none"
        rows.append(("tensors", f"{s.tensors}, {human_size(s.tensor_bytes)} ({dtypes})"))
    if s.not_loaded:
        rows.append(("not loaded", ", ".join(f"{k} x{n}" for k, n in s.not_loaded.items())))
    if s.metadata_error is not None:
        rows.append(("metadata", s.metadata_error))
    rows += _transfer_rows(s)
    if s.bytes_fetched or s.kind != "sharded":
        share = 100.0 * s.bytes_fetched / s.size if s.size else 100.0
        requests = f" in {s.requests} request(s)" if s.kind != "sharded" else ""
        rows.append(("fetched", f"{human_size(s.bytes_fetched)} of {human_size(s.size)} ({share:.2f}%){requests}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        out.result(f"  {name:<{width}}  {value}")
    if s.keys:
        out.result("  keys")
        width = min(32, max(len(k) for k in s.keys))
        for key, text in s.keys.items():
            out.result(f"    {key:<{width}}  {text}")
    if s.files:
        out.result(f"  files ({len(s.files)})")
        for name, size in sorted(s.files.items())[:_MAX_FILES_SHOWN]:
            out.result(f"    {name:<32}  {human_size(size)}")
        if len(s.files) > _MAX_FILES_SHOWN:
            out.result(f"    ... and {len(s.files) - _MAX_FILES_SHOWN} more")


def cmd_inspect(ctx: Context, args: argparse.Namespace) -> int:
    """Show what a checkpoint holds without downloading its tensors."""
    s3_url(args.url)  # a malformed URL is a usage error (exit 2)
    try:
        summary = inspect(args.url, transport=ctx.transport)
    except CheckpointNotFoundError:
        raise CommandError(f"no checkpoint at {args.url} (for a directory of checkpoints, use `s3ckpt ls`)") from None
    except NotAZipError as exc:
        raise CommandError(str(exc)) from None
    ctx.out.record(summary.to_dict())
    if not ctx.out.json:
        _print(ctx, summary)
    return 0

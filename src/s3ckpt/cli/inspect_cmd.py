"""``s3ckpt inspect``: what a checkpoint holds, read from its pickle alone (a few KiB, not the tensors)."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from ..catalog import CheckpointEntry
from ..errors import CheckpointCorruptedError
from ..s3_dirpath_utils import build_s3_url
from ..transport import ops
from ..transport.ops import ObjectInfo
from .context import CommandError, Context, s3_url
from .output import human_size
from .safe_pickle import Opaque, PickleSummary, TensorRef, safe_load
from .targets import find_target
from .zipread import NotAZipError, RangeReader, RemoteZip

__all__ = ["cmd_inspect", "describe"]

_MAX_DEPTH = 64
_MAX_FILES_SHOWN = 20


def _tensor_stats(value: Any, seen: set[int] | None = None, depth: int = 0) -> tuple[int, int]:
    """(tensor count, tensor bytes) under ``value``; shared objects are counted once."""
    seen = set() if seen is None else seen
    if id(value) in seen or depth > _MAX_DEPTH:
        return 0, 0
    seen.add(id(value))
    if isinstance(value, TensorRef):
        return 1, value.nbytes
    children: list[Any] = []
    if isinstance(value, dict):
        children = list(value.values())
    elif isinstance(value, list | tuple | set | frozenset):
        children = list(value)
    elif isinstance(value, Opaque):
        children = [*value.args, value.state, *value.items.values(), *value.elements]
    count = size = 0
    for child in children:
        c, s = _tensor_stats(child, seen, depth + 1)
        count, size = count + c, size + s
    return count, size


def describe(value: Any) -> str:
    """One short phrase for a top-level value: ``dict, 12 keys, 10 tensors (4.0 MiB)``, ``int: 3``."""
    if isinstance(value, TensorRef):
        return f"tensor {value.dtype}{list(value.shape)} ({human_size(value.nbytes)})"
    if isinstance(value, bool | int | float) or value is None:
        return f"{type(value).__name__}: {value!r}"
    if isinstance(value, str):
        return f"str: {value[:60]!r}" + ("..." if len(value) > 60 else "")
    if isinstance(value, bytes):
        return f"bytes ({len(value)})"
    count, size = _tensor_stats(value)
    tensors = f", {count} tensor(s) ({human_size(size)})" if count else ""
    if isinstance(value, dict):
        return f"{type(value).__name__}, {len(value)} key(s){tensors}"
    if isinstance(value, list | tuple | set | frozenset):
        return f"{type(value).__name__}, {len(value)} item(s){tensors}"
    if isinstance(value, Opaque):
        return f"{value.qualname} (not loaded){tensors}"
    return type(value).__name__


def _int_field(root: Any, *names: str) -> int | None:
    if isinstance(root, dict):
        for name in names:
            value = root.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _summary_record(summary: PickleSummary) -> dict[str, Any]:
    root = summary.root
    dtypes = Counter(t.dtype for t in summary.tensors)
    record: dict[str, Any] = {
        "type": type(root).__name__ if not isinstance(root, Opaque) else root.qualname,
        "keys": {str(k): describe(v) for k, v in root.items()} if isinstance(root, dict) else {},
        "tensors": len(summary.tensors),
        "dtypes": dict(dtypes.most_common()),
        "tensor_bytes": sum(t.nbytes for t in summary.tensors),
        "storage_bytes": sum(s.nbytes for s in summary.storages.values()),
        "step": _int_field(root, "global_step", "step"),
        "epoch": _int_field(root, "epoch"),
        "not_loaded": dict(summary.refused.most_common()),
    }
    version = root.get("pytorch-lightning_version") if isinstance(root, dict) else None
    if isinstance(version, str):
        record["lightning_version"] = version
    return record


def inspect_object(ctx: Context, info: ObjectInfo) -> dict[str, Any]:
    """Describe one ``torch.save`` object from its central directory and pickle only."""
    url = build_s3_url(info.bucket, info.key)
    reader = RangeReader(ctx.transport, info)
    try:
        archive = RemoteZip(reader)
        member = archive.find("/data.pkl") or archive.find("data.pkl")
        if member is None:
            raise NotAZipError("the zip archive has no data.pkl member")
        data = archive.read(member)
    except NotAZipError as exc:
        raise CommandError(f"{url} is not a zip-format torch.save checkpoint ({exc})") from None
    try:
        summary = safe_load(data)
    except Exception as exc:  # the restricted unpickler only builds stand-ins: any failure means unreadable
        raise CheckpointCorruptedError(f"{url}: {member.name} is not a readable pickle: {exc}") from exc
    record: dict[str, Any] = {"url": url, "kind": "file", "format": "torch.save zip", "size": info.size}
    record.update(_summary_record(summary))
    record["storage_bytes"] = sum(m.size for m in archive.members if "/data/" in m.name) or record["storage_bytes"]
    record.update({"pickle": member.name, "pickle_bytes": member.size})
    record.update({"bytes_fetched": reader.bytes_fetched, "requests": reader.requests})
    return record


def _dcp_summary(root: Any) -> dict[str, Any]:
    """Entries, tensors and dtypes of a DCP ``Metadata`` read as placeholders."""
    entries = root.field("state_dict_metadata") if isinstance(root, Opaque) else None
    if not isinstance(entries, dict):
        raise ValueError("no state_dict_metadata in .metadata")
    dtypes: Counter[str] = Counter()
    tensors = tensor_bytes = other = 0
    for meta in entries.values():
        props = meta.field("properties") if isinstance(meta, Opaque) else None
        size = meta.field("size") if isinstance(meta, Opaque) else None
        if isinstance(props, Opaque) and isinstance(size, tuple):
            state = props.state
            dtype = state[0] if isinstance(state, tuple) and state else props.field("dtype")
            ref = TensorRef(str(dtype).removeprefix("torch."), tuple(int(s) for s in size), None)
            tensors, tensor_bytes = tensors + 1, tensor_bytes + ref.nbytes
            dtypes[ref.dtype] += 1
        else:
            other += 1
    return {
        "entries": len(entries),
        "tensors": tensors,
        "dtypes": dict(dtypes.most_common()),
        "tensor_bytes": tensor_bytes,
        "non_tensor_entries": other,
    }


def inspect_sharded(ctx: Context, entry: CheckpointEntry, bucket: str) -> dict[str, Any]:
    """Describe a ``torch.distributed.checkpoint`` directory: its files, and ``.metadata`` if readable."""
    t = ctx.transport
    _, prefix = s3_url(entry.url)
    files = {o.key[len(prefix) :]: o.size for o in ops.list_objects(t, bucket, prefix)}
    record: dict[str, Any] = {
        "url": entry.url,
        "kind": "sharded",
        "committed": entry.committed,
        "size": sum(files.values()),
        "files": files,
    }
    if ".metadata" in files:
        blob = ops.get_bytes(t, bucket, prefix + ".metadata")
        record["bytes_fetched"] = len(blob)
        try:
            record.update(_dcp_summary(safe_load(blob).root))
        except Exception as exc:  # the restricted unpickler only builds stand-ins: any failure means unreadable
            record["metadata_error"] = f".metadata is not readable: {exc}"
    return record


def _print(ctx: Context, record: dict[str, Any]) -> None:
    out = ctx.out
    out.result(record["url"])
    rows: list[tuple[str, str]] = [("kind", f"{record.get('format', record['kind'])}, {human_size(record['size'])}")]
    for name in ("step", "epoch", "lightning_version", "entries"):
        if record.get(name) is not None:
            rows.append((name, str(record[name])))
    if "tensors" in record:
        dtypes = ", ".join(f"{d} x{n}" for d, n in record["dtypes"].items()) or "none"
        rows.append(("tensors", f"{record['tensors']}, {human_size(record['tensor_bytes'])} ({dtypes})"))
    if record.get("not_loaded"):
        rows.append(("not loaded", ", ".join(f"{k} x{n}" for k, n in record["not_loaded"].items())))
    if "metadata_error" in record:
        rows.append(("metadata", record["metadata_error"]))
    if "bytes_fetched" in record:
        share = 100.0 * record["bytes_fetched"] / record["size"] if record["size"] else 100.0
        requests = f" in {record['requests']} request(s)" if "requests" in record else ""
        rows.append(
            (
                "fetched",
                f"{human_size(record['bytes_fetched'])} of {human_size(record['size'])} ({share:.2f}%){requests}",
            )
        )
    for name, value in rows:
        out.result(f"  {name:<12}{value}")
    if record.get("keys"):
        out.result("  keys")
        width = min(32, max(len(k) for k in record["keys"]))
        for key, text in record["keys"].items():
            out.result(f"    {key:<{width}}  {text}")
    files: dict[str, int] = record.get("files", {})
    if files:
        out.result(f"  files ({len(files)})")
        for name, size in sorted(files.items())[:_MAX_FILES_SHOWN]:
            out.result(f"    {name:<32}  {human_size(size)}")
        if len(files) > _MAX_FILES_SHOWN:
            out.result(f"    ... and {len(files) - _MAX_FILES_SHOWN} more")


def cmd_inspect(ctx: Context, args: argparse.Namespace) -> int:
    """Show what a checkpoint holds without downloading its tensors."""
    target = find_target(ctx.transport, args.url)
    if target is None:
        raise CommandError(f"no checkpoint at {args.url} (for a directory of checkpoints, use `s3ckpt ls`)")
    if target.info is not None:
        record = inspect_object(ctx, target.info)
    elif target.entry is not None and target.entry.kind == "sharded":
        record = inspect_sharded(ctx, target.entry, target.bucket)
    else:
        assert target.entry is not None
        # A model-parallel group: every rank holds the same structure, so rank 0's file describes it.
        first = target.entry.keys[0]
        record = inspect_object(ctx, ops.head(ctx.transport, target.bucket, first))
        record.update({"url": target.entry.url, "kind": "model_parallel", "ranks": list(target.entry.keys)})
        record["committed"] = target.entry.committed
    ctx.out.record(record)
    if not ctx.out.json:
        _print(ctx, record)
    return 0

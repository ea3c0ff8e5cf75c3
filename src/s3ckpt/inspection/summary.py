""":func:`inspect`: what a checkpoint on S3 holds, from its zip directory and pickle alone.

A ``torch.save`` file's pickle is a few KiB at a known place (:mod:`.zipread` finds it with two or three
ranged GETs); :mod:`.safe_pickle` reads it with an allow-list that builds descriptions, never objects, so
nothing in the checkpoint runs. A sharded (DCP) checkpoint is described by its file listing and its
``.metadata``, read the same way. A file's s3ckpt manifest (one small GET) adds how it was saved: the bytes
uploaded, the bytes the store copied (from an incremental save's base, or for a server-side copy), and the
zip records it lists.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..catalog import CheckpointEntry, list_checkpoints
from ..errors import CheckpointCorruptedError, CheckpointNotFoundError, S3NotFoundError
from ..s3_dirpath_utils import build_s3_url, parse_s3_url
from ..transport import ops
from ..transport.context import S3Transport
from ..transport.ops import ObjectInfo
from ..units import human_size
from .provenance import from_manifest
from .safe_pickle import Opaque, PickleSummary, TensorRef, safe_load
from .zipread import NotAZipError, RangeReader, RemoteZip

__all__ = [
    "CheckpointSummary",
    "describe",
    "inspect",
    "summarize_entry",
    "summarize_object",
    "summarize_sharded",
]

_MAX_DEPTH = 64


@dataclass(frozen=True)
class CheckpointSummary:
    """What :func:`inspect` found. Byte counts are bytes; a field that does not apply to ``kind`` is None
    (or empty).

    Attributes:
        url: the checkpoint (a file, a model-parallel group, or a sharded directory).
        kind: ``"file"``, ``"model_parallel"`` (described by rank 0's file) or ``"sharded"`` (DCP).
        size: bytes on S3 (every file, for a sharded checkpoint).
        format: ``"torch.save zip"`` for a file; None for a sharded checkpoint.
        type: the type of the saved object (``"dict"``; a class name if it is not a plain container).
        keys: top-level key -> a short description (``"dict, 12 key(s), 10 tensor(s) (4.0 MiB)"``).
        tensors: how many tensors the pickle (or the DCP metadata) describes.
        dtypes: dtype name -> tensor count, most common first.
        tensor_bytes: the tensors' bytes (shape x itemsize).
        storage_bytes: the bytes of the storage records in the archive.
        step: ``global_step`` (or ``step``) if the checkpoint has an integer one.
        epoch: ``epoch`` if it has an integer one.
        lightning_version: ``pytorch-lightning_version`` of a Lightning checkpoint.
        not_loaded: qualified name -> count of the classes the safe reader refused to build.
        pickle: the pickle member's name in the archive, and ``pickle_bytes`` its size.
        bytes_fetched: what the description cost, in bytes downloaded, and ``requests`` in GETs.
        committed: for a multi-object checkpoint, whether it is committed.
        ranks: the keys of a model-parallel group's files.
        files: a sharded checkpoint's files, name -> size.
        entries: a sharded checkpoint's metadata entries, and ``non_tensor_entries`` the non-tensor ones.
        metadata_error: why a sharded checkpoint's ``.metadata`` could not be read, if it could not.
        bytes_uploaded: from a file's s3ckpt manifest: the bytes the saving client sent; None without a
            manifest that describes the object. A manifest from before incremental saves: ``size``.
        bytes_copied: the bytes the store copied instead (an incremental save's records unchanged since
            ``base``; the whole object for a server-side copy such as ``last.ckpt``); 0 for a plain save.
        base: the checkpoint an incremental save was composed from (its unchanged records copied).
        copy_of: for a server-side copy, the key of its source, as its manifest records it (as ``ls`` shows).
        zip_records: how many zip records the manifest lists (what a later incremental save can copy from);
            0 if it lists none (a save from before incremental saves, a copy).
        manifest_error: why the manifest was not used (unreadable, or it describes other bytes), if so.
    """

    url: str
    kind: str
    size: int
    format: str | None = None
    type: str | None = None
    keys: dict[str, str] = field(default_factory=dict)
    tensors: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    tensor_bytes: int = 0
    storage_bytes: int = 0
    step: int | None = None
    epoch: int | None = None
    lightning_version: str | None = None
    not_loaded: dict[str, int] = field(default_factory=dict)
    pickle: str | None = None
    pickle_bytes: int | None = None
    bytes_fetched: int = 0
    requests: int = 0
    committed: bool | None = None
    ranks: tuple[str, ...] = ()
    files: dict[str, int] = field(default_factory=dict)
    entries: int | None = None
    non_tensor_entries: int | None = None
    metadata_error: str | None = None
    bytes_uploaded: int | None = None
    bytes_copied: int | None = None
    base: str | None = None
    copy_of: str | None = None
    zip_records: int | None = None
    manifest_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields that apply to this kind, as plain JSON values (``s3ckpt --json inspect`` prints it)."""
        out: dict[str, Any] = {"url": self.url, "kind": self.kind, "size": self.size}
        if self.kind == "sharded":
            out.update(committed=self.committed, files=dict(self.files), bytes_fetched=self.bytes_fetched)
            if self.metadata_error is not None:
                out["metadata_error"] = self.metadata_error
            elif self.entries is not None:
                out.update(
                    entries=self.entries,
                    tensors=self.tensors,
                    dtypes=dict(self.dtypes),
                    tensor_bytes=self.tensor_bytes,
                    non_tensor_entries=self.non_tensor_entries,
                )
            return out
        out.update(
            format=self.format,
            type=self.type,
            keys=dict(self.keys),
            tensors=self.tensors,
            dtypes=dict(self.dtypes),
            tensor_bytes=self.tensor_bytes,
            storage_bytes=self.storage_bytes,
            step=self.step,
            epoch=self.epoch,
            not_loaded=dict(self.not_loaded),
        )
        if self.lightning_version is not None:
            out["lightning_version"] = self.lightning_version
        out.update(
            pickle=self.pickle, pickle_bytes=self.pickle_bytes, bytes_fetched=self.bytes_fetched, requests=self.requests
        )
        if self.kind == "model_parallel":
            out.update(ranks=list(self.ranks), committed=self.committed)
        else:
            out.update(
                bytes_uploaded=self.bytes_uploaded,
                bytes_copied=self.bytes_copied,
                base=self.base,
                copy_of=self.copy_of,
                zip_records=self.zip_records,
            )
            if self.manifest_error is not None:
                out["manifest_error"] = self.manifest_error
        return out


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
    """One short phrase for a top-level value: ``dict, 12 key(s), 10 tensor(s) (4.0 MiB)``, ``int: 3``."""
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


def _from_pickle(summary: PickleSummary) -> dict[str, Any]:
    root = summary.root
    version = root.get("pytorch-lightning_version") if isinstance(root, dict) else None
    return {
        "type": type(root).__name__ if not isinstance(root, Opaque) else root.qualname,
        "keys": {str(k): describe(v) for k, v in root.items()} if isinstance(root, dict) else {},
        "tensors": len(summary.tensors),
        "dtypes": dict(Counter(t.dtype for t in summary.tensors).most_common()),
        "tensor_bytes": sum(t.nbytes for t in summary.tensors),
        "storage_bytes": sum(s.nbytes for s in summary.storages.values()),
        "step": _int_field(root, "global_step", "step"),
        "epoch": _int_field(root, "epoch"),
        "lightning_version": version if isinstance(version, str) else None,
        "not_loaded": dict(summary.refused.most_common()),
    }


def summarize_object(t: S3Transport, info: ObjectInfo, *, manifest: bool = True) -> CheckpointSummary:
    """Describe one ``torch.save`` object from its central directory and pickle only, and (``manifest``) from
    its s3ckpt manifest, if it has one, how it was saved.

    Raises:
        NotAZipError: the object is not a zip-format ``torch.save`` file.
        CheckpointCorruptedError: its pickle (or zip structure) is unreadable.
    """
    url = build_s3_url(info.bucket, info.key)
    reader = RangeReader(t, info)
    try:
        archive = RemoteZip(reader)
        member = archive.find("/data.pkl") or archive.find("data.pkl")
        if member is None:
            raise NotAZipError("the zip archive has no data.pkl member")
        data = archive.read(member)
    except NotAZipError as exc:
        raise NotAZipError(f"{url} is not a zip-format torch.save checkpoint ({exc})") from None
    try:
        found = _from_pickle(safe_load(data))
    except Exception as exc:  # the restricted unpickler only builds stand-ins: any failure means unreadable
        raise CheckpointCorruptedError(f"{url}: {member.name} is not a readable pickle: {exc}") from exc
    found["storage_bytes"] = sum(m.size for m in archive.members if "/data/" in m.name) or found["storage_bytes"]
    if manifest:
        found.update(from_manifest(t, info, reader))
    return CheckpointSummary(
        url=url,
        kind="file",
        size=info.size,
        format="torch.save zip",
        pickle=member.name,
        pickle_bytes=member.size,
        bytes_fetched=reader.bytes_fetched,
        requests=reader.requests,
        **found,
    )


def _dcp_fields(root: Any) -> dict[str, Any]:
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


def summarize_sharded(t: S3Transport, entry: CheckpointEntry) -> CheckpointSummary:
    """Describe a ``torch.distributed.checkpoint`` directory: its files, and ``.metadata`` if readable."""
    bucket, prefix = parse_s3_url(entry.url)
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    files = {o.key[len(prefix) :]: o.size for o in ops.list_objects(t, bucket, prefix)}
    extra: dict[str, Any] = {}
    if ".metadata" in files:
        blob = ops.get_bytes(t, bucket, prefix + ".metadata")
        extra.update(bytes_fetched=len(blob), requests=1)
        try:
            extra.update(_dcp_fields(safe_load(blob).root))
        except Exception as exc:  # the restricted unpickler only builds stand-ins: any failure means unreadable
            extra["metadata_error"] = f".metadata is not readable: {exc}"
    return CheckpointSummary(
        url=entry.url, kind="sharded", size=sum(files.values()), committed=entry.committed, files=files, **extra
    )


def _find_entry(t: S3Transport, bucket: str, key: str) -> CheckpointEntry | None:
    """The model-parallel group or sharded directory that ``key`` names, if any."""
    stripped = key.rstrip("/")
    parent = stripped.rsplit("/", 1)[0] + "/" if "/" in stripped else ""
    wanted = build_s3_url(bucket, stripped)
    for entry in list_checkpoints(t, build_s3_url(bucket, parent)):
        if entry.url.rstrip("/") == wanted:
            return entry
    return None


def inspect(url: str, *, transport: S3Transport | None = None) -> CheckpointSummary:
    """Describe the checkpoint at ``url`` without downloading its tensors and without unpickling code.

    Reads a ``torch.save`` file's zip directory and pickle with a few ranged GETs (``bytes_fetched`` says
    how many bytes: typically well under 1% of the file); every class the pickle names is replaced by a
    placeholder, so a malicious checkpoint cannot run anything. ``url`` may also name a model-parallel group
    (described by rank 0's file) or a sharded (DCP) checkpoint directory.

    Args:
        url: ``s3://bucket/key`` of a checkpoint file, a model-parallel group, or a DCP directory.
        transport: client and retry settings; default: built from the environment.

    Returns:
        A :class:`CheckpointSummary` (keys, tensors, dtypes, bytes, step, epoch, bytes fetched, ...).

    Raises:
        CheckpointNotFoundError: nothing at ``url`` (or no such bucket).
        NotAZipError: the object is not a zip-format ``torch.save`` file (a ``ValueError``).
        CheckpointCorruptedError: its pickle is unreadable.
    """
    from ..checkpoint import resolve_transport

    t = resolve_transport(transport)
    bucket, key = parse_s3_url(url)
    if not key:
        ops.check_bucket(t, bucket)
        raise CheckpointNotFoundError(f"{url} names a bucket, not a checkpoint")
    if not key.endswith("/"):
        try:
            return summarize_object(t, ops.head(t, bucket, key))
        except S3NotFoundError:
            pass  # a rank-less model-parallel name or a sharded directory has no object of its own
    entry = _find_entry(t, bucket, key)
    if entry is None:
        ops.check_bucket(t, bucket)
        raise CheckpointNotFoundError(f"no checkpoint at {url}")
    return summarize_entry(t, entry)


def summarize_entry(t: S3Transport, entry: CheckpointEntry) -> CheckpointSummary:
    """Describe a multi-object checkpoint found by :func:`s3ckpt.catalog.list_checkpoints`."""
    if entry.kind == "sharded":
        return summarize_sharded(t, entry)
    bucket, _ = parse_s3_url(entry.url)
    # A model-parallel group: every rank holds the same structure, so rank 0's file describes it (but not
    # how the others were saved: rank 0's manifest alone would misstate the group's transfer, so it is not read).
    first = summarize_object(t, ops.head(t, bucket, entry.keys[0]), manifest=False)
    return dataclasses.replace(
        first, url=entry.url, kind="model_parallel", ranks=tuple(entry.keys), committed=entry.committed
    )

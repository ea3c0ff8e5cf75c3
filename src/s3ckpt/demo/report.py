"""What the demo prints: each event as the workers report it, and the summary at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Run", "narrate", "summary"]


@dataclass
class Run:
    """What one worker process reported."""

    events: list[dict[str, Any]] = field(default_factory=list)
    returncode: int | None = None

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]


def _name(url: str | None) -> str:
    return (url or "").rsplit("/", 1)[-1]


def _transfer(event: dict[str, Any]) -> tuple[int, int]:
    """(bytes uploaded, bytes copied on the store) of a ``saved`` event."""
    copied = int(event.get("bytes_copied") or 0)
    return int(event.get("bytes_uploaded", event["bytes"] - copied)), copied


def narrate(event: dict[str, Any]) -> None:
    kind = event.get("event")
    if kind == "saved":
        print(
            f"  saved    {event['path']}  {event['bytes'] / 1e6:6.1f} MB  upload {event['upload_s']:.2f} s  "
            f"(training stalled {event['stall_s'] * 1000:.0f} ms)",
            flush=True,
        )
        uploaded, copied = _transfer(event)
        if copied:
            print(
                f"           uploaded {uploaded / 1e6:.1f} MB, copied {copied / 1e6:.1f} MB on the store "
                f"from {_name(event.get('base'))}",
                flush=True,
            )
        elif event.get("incremental"):
            # No base (the first save), an unusable one (its manifest lists no records: the worker log says
            # why), or nothing unchanged in runs of 5 MiB or more (S3's smallest part).
            base = event.get("base")
            why = f"nothing unchanged to copy from {_name(base)}" if base else "no usable base to copy from"
            print(f"           uploaded in full: {why}", flush=True)
    elif kind == "removed" and (event.get("cancelled") or event.get("done_at")):
        # Reported once carried out: async, a removal waits for the newer save, and a crash can come first.
        state = "cancelled" if event.get("cancelled") else "deleted"
        print(f"  top-k    {state} {event['path']}", flush=True)
    elif kind == "copied":
        what = "cancelled (its source failed)" if event.get("cancelled") else "server-side copy of"
        print(f"  link     {_name(event['dst'])} = {what} {_name(event['src'])}", flush=True)
    elif kind == "resumed":
        print(f"  resumed  at global_step={event['global_step']} epoch={event['epoch']}", flush=True)
    elif kind == "frozen":
        print(f"  frozen   {len(event['params'])} parameter tensors (all layers but the last)", flush=True)


def _incremental_lines(saves: list[dict[str, Any]]) -> list[str]:
    """One line per save that copied bytes on the store: uploaded, copied and the checkpoint copied from."""
    composed = [e for e in saves if _transfer(e)[1]]
    if not composed:
        return []
    width = max(len(_name(e["path"])) for e in composed)
    lines = [f"  incremental saves        {len(composed)} copied the records unchanged since their base:"]
    for e in composed:
        uploaded, copied = _transfer(e)
        share = 100.0 * copied / e["bytes"] if e["bytes"] else 0.0
        lines.append(
            f"    {_name(e['path']):<{width}}  uploaded {uploaded / 1e6:5.1f} MB  copied {copied / 1e6:5.1f} MB "
            f"({share:.0f}%)  from {_name(e.get('base'))}"
        )
    return lines


def summary(
    first: Run,
    second: Run,
    entries: list[Any],
    resume_url: str | None,
    expected: dict[str, Any] | None,
    load_s: float,
    failures: list[str],
    finetune: Run | None = None,
) -> None:
    runs = [first, second] + ([finetune] if finetune is not None else [])
    saves = [e for r in runs for e in r.of("saved")]
    removed = [e for r in runs for e in r.of("removed")]
    copies = [e for r in runs for e in r.of("copied")]
    made = [c for c in copies if not c.get("cancelled")]
    total = sum(e["bytes"] for e in saves)
    copied = sum(_transfer(e)[1] for e in saves)
    print("\nSummary", flush=True)
    if copied:
        print(
            f"  checkpoints saved        {len(saves)} ({total / 1e6:.1f} MB: {(total - copied) / 1e6:.1f} MB uploaded, "
            f"{copied / 1e6:.1f} MB copied on the store)"
        )
    else:
        print(f"  checkpoints uploaded     {len(saves)} ({total / 1e6:.1f} MB uploaded in total)")
    print(
        f"  last.ckpt copies         {len(made)} server-side ({sum(c['bytes'] for c in made) / 1e6:.1f} MB not "
        f"uploaded again){f', {len(copies) - len(made)} cancelled' if len(copies) > len(made) else ''}"
    )
    for line in _incremental_lines(saves):
        print(line)
    if saves:
        gbps = [e["bytes"] / e["upload_s"] / 1e9 for e in saves if e["upload_s"] > 0]
        stall = [e["stall_s"] for e in saves]
        print(f"  save throughput          {min(gbps):.3f}-{max(gbps):.3f} GB/s (upload in the background)")
        print(f"  training stalled         {sum(stall):.2f} s in total, max {max(stall) * 1000:.0f} ms per save")
    if expected is not None and resume_url:
        size = next((e.size for e in entries if e.url == resume_url), 0)
        rate = f"{size / load_s / 1e9:.3f} GB/s" if load_s > 0 and size else "n/a"
        print(f"  resume checkpoint        {resume_url} (loaded in {load_s:.2f} s, {rate})")
        print(f"  resumed at               global_step={expected['global_step']} epoch={expected['epoch']}")
    for e in removed:
        if e.get("cancelled") or e.get("done_at"):
            what = "kept (its replacement failed)" if e.get("cancelled") else "deleted by top-k"
            print(f"  {what:24s} {e['path']}")
    if failures:
        print("\nFAILED:", flush=True)
        for f in failures:
            print(f"  - {f}", flush=True)
    else:
        print("\nOK: the resumed weights, optimizer state, step and epoch equal the last committed checkpoint.")
        if finetune is not None:
            print("OK: the fine-tuned checkpoints load (checksums verified) with the frozen weights unchanged.")

"""``make bench ARGS=--incremental``: incremental saves (``s3ckpt.save(base=...)``) against plain ones, on a
fine-tuning state and a full-training state of the same bytes.

Every state has three chains of checkpoints, one per method (:data:`benchmarks.incremental.METHODS`): plain
saves, incremental saves without the store's CRC32C (the default) and with it. Checkpoint 0 of every chain is a
plain save (setup, untimed); then, per round, each chain saves the next checkpoint of the state, the
incremental ones with ``base`` = their own previous checkpoint, so from the second round on every base is
itself a composed object. A warm-up round (not with ``--quick``) runs first and is not counted, so every
counted base is composed. The methods alternate, the order rotated every round; beside them a raw PUT of the
object's bytes, and after each composed fine-tuning save the raw replay of its parts (the store's floors). Each
save is followed by a load and a verify of what it wrote; every measurement runs in a fresh process
(:mod:`benchmarks.incremental_worker`). The previous checkpoint of a chain is deleted once the next is
verified, and the volumes are compacted between rounds (untimed). Prints the tables and the targets
(:mod:`benchmarks.incremental`, :mod:`benchmarks.incremental_report`), writes ``results/<name>.json`` and
``.png`` (default name ``incremental``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import report
from .forkserver import ForkServer
from .incremental import (
    FINE,
    FLOORS,
    FULL_LAYOUT,
    INC,
    INC_NO_CRC,
    LABELS,
    METHODS,
    PLAIN,
    QUICK_LAYOUT,
    RAW_COMPOSE,
    RAW_PUT,
    STATES,
    Layout,
    describe,
    incremental_ratios,
    store_checksum_comparison,
    summarize_incremental,
)
from .incremental_report import (
    format_incremental_ratios,
    format_incremental_table,
    format_store_checksum,
    plot_incremental,
)
from .run import _SEQ, BUCKET, Bench, _log, bench_session, failed
from .stats import MiB, fmt_size

__all__ = ["main_incremental", "plan_round"]

PREFIX = "incremental"


def plan_round(methods: Sequence[str], round_index: int) -> list[str]:
    """One round's order: the methods rotated by the round's index, so no method always goes first (the one
    after a compaction, or after a method that left the server busy)."""
    k = round_index % len(methods) if methods else 0
    return list(methods[k:]) + list(methods[:k])


class IncrementalBench:
    """Runs incremental measurements through a fork server of :mod:`benchmarks.incremental_worker`."""

    def __init__(self, bench: Bench, layout: Layout, tensor_bytes: int) -> None:
        self.bench = bench
        self.layout = layout
        self.tensor_bytes = tensor_bytes
        self.forks: dict[str, ForkServer] = {}
        self._client = bench.server.client()

    def close(self) -> None:
        for fork in self.forks.values():
            fork.close()
        self.forks.clear()

    def worker(self, op: str, key: str, **fields: Any) -> dict[str, Any]:
        """One operation in a fresh process; its result (``error`` on failure)."""
        b = self.bench
        seq = f"inc-{next(_SEQ)}"
        env = b.server.env()
        # Explicit either way: the default (off) must not decide which method this is.
        env["S3CKPT_COMPOSE_STORE_CHECKSUM"] = "0" if fields.pop("no_store_crc", False) else "1"
        spec = {
            "op": op,
            "key": key,
            "bucket": BUCKET,
            "layout": self.layout.__dict__,
            "expect_bytes": self.tensor_bytes,
            "endpoint": b.server.endpoint_url,
            "region": b.server.region,
            "server_pid": b.server.pid,
            "out": str(b.workdir / f"{seq}.json"),
            "env": env,
            **fields,
        }
        spec_path = b.workdir / f"{seq}.spec.json"
        spec_path.write_text(json.dumps(spec))
        timeout = 120 + self.tensor_bytes / (10 * MiB)
        error = b._run(
            sys.executable,
            spec_path,
            timeout,
            module="benchmarks.incremental_worker",
            forks=self.forks,
            log_name="forkserver-inc",
        )
        try:
            result: dict[str, Any] = json.loads(Path(spec["out"]).read_text())
        except (OSError, ValueError):
            result = {"error": error or "the worker wrote no result"}
        what = f"{fields.get('state') or ''} {fields.get('method') or ''} {op} {key}".strip()
        if result.get("error"):
            _log(f"[{b.elapsed():6.0f}s] {what}: FAILED {str(result['error']).splitlines()[0][:300]}")
        else:
            extra = ""
            if "bytes_copied" in result:
                extra = f", uploaded {fmt_size(result['bytes_uploaded'])} copied {fmt_size(result['bytes_copied'])}"
            _log(
                f"[{b.elapsed():6.0f}s] {what}: {result['wall_s']:.2f} s, CPU {result['cpu_s']:.2f} s, "
                f"server {result['server_cpu_s'] or 0:.2f} s, sent {fmt_size(result['sent_bytes'])}{extra}"
            )
        return result

    def delete(self, key: str) -> None:
        """Delete a checkpoint and its manifest (untimed, between measurements)."""
        from s3ckpt.layout import manifest_key

        objects = [{"Key": key}, {"Key": manifest_key(key)}]
        self._client.delete_objects(Bucket=BUCKET, Delete={"Objects": objects, "Quiet": True})


def _key(state: str, method: str, step: int) -> str:
    return f"{PREFIX}/{state}/{method}/step={step}.ckpt"


Runs = dict[tuple[str, str, str], list[dict[str, Any]]]


def _run_rounds(
    inc: IncrementalBench, args: argparse.Namespace, phases: dict[str, float], started: float
) -> tuple[Runs, list[Any]]:
    """The seed checkpoints, the warm-up and the counted rounds; the runs by (state, method, op)."""
    from . import bench_server

    chains: dict[tuple[str, str], str] = {}
    for state in STATES:
        for method in METHODS:
            key = _key(state, method, 0)
            seed = inc.worker("save", key, state=state, method=method, step=0)
            if seed.get("error"):
                raise RuntimeError(f"the seed checkpoint {key} failed: {seed['error']}")
            chains[(state, method)] = key
            object_bytes = int(seed["object_bytes"])
    phases["seed"] = time.time() - started - sum(phases.values())
    runs: Runs = {}
    example_plan: list[Any] = []
    rounds = [("warm-up", 1)] if args.warmup else []
    rounds += [(f"round_{r + 1}", r + 2) for r in range(args.runs)]
    for index, (label, step) in enumerate(rounds):
        counted = label != "warm-up"

        def keep(state: str, method: str, op: str, result: dict[str, Any], counted: bool = counted) -> None:
            if counted:
                runs.setdefault((state, method, op), []).append({k: v for k, v in result.items() if k != "plan"})

        for state in STATES:
            entries = [*METHODS, RAW_PUT] if state == FINE else list(METHODS)
            for method in plan_round(entries, index):
                if method == RAW_PUT:
                    res = inc.worker("raw-put", f"{PREFIX}/raw-put", method=method, object_bytes=object_bytes)
                    keep("", RAW_PUT, "save", res)
                    continue
                prev, key = chains[(state, method)], _key(state, method, step)
                saved = inc.worker(
                    "save",
                    key,
                    state=state,
                    method=method,
                    step=step,
                    base_key=None if method == PLAIN else prev,
                    prev_key=prev,
                    no_store_crc=method == INC_NO_CRC,
                )
                keep(state, method, "save", saved)
                if saved.get("error"):
                    continue  # the chain keeps its previous checkpoint: nothing was stored
                if method == INC and state == FINE and saved.get("plan"):
                    example_plan = example_plan or saved["plan"]
                    floor = inc.worker(
                        "raw-compose",
                        f"{PREFIX}/raw-compose",
                        method=RAW_COMPOSE,
                        plan=saved["plan"],
                        base_key=prev,
                        object_bytes=saved["object_bytes"],
                    )
                    keep(FINE, RAW_COMPOSE, "save", floor)
                for op in ("load", "verify"):
                    keep(state, method, op, inc.worker(op, key, state=state, method=method))
                inc.delete(prev)
                chains[(state, method)] = key
        bench_server.vacuum(inc.bench.server)
        phases[label] = time.time() - started - sum(phases.values())
    return runs, example_plan


def main_incremental(args: argparse.Namespace) -> int:
    """Run the incremental benchmark (see the module docstring); 0 when it completed."""
    from . import bench_server

    started = time.time()
    layout = QUICK_LAYOUT if args.quick else FULL_LAYOUT
    states = {state: describe(layout, state) for state in STATES}
    nbytes = states[FINE]["tensor_bytes"]
    _log(
        f"incremental benchmark {args.name!r}: {fmt_size(nbytes)} states ({FINE}: "
        f"{states[FINE]['changed_fraction']:.1%} changing in {states[FINE]['regions']} regions), "
        f"{args.runs} round(s){' after a warm-up' if args.warmup else ''}"
    )
    machine = report.machine_info()
    phases: dict[str, float] = {}
    try:
        with bench_session(args, None, "s3ckpt-bench-incremental-") as (bench, stack):
            inc = IncrementalBench(bench, layout, nbytes)
            stack.callback(inc.close)
            phases["setup"] = time.time() - started
            runs, example_plan = _run_rounds(inc, args, phases, started)
            server_meta = bench_server.server_info(bench.server, tuned=True)
    except Exception as exc:
        return failed(exc)
    records = [summarize_incremental(s, m, op, nbytes, rs) for (s, m, op), rs in runs.items()]
    ratios = incremental_ratios(records)
    checksum = store_checksum_comparison(records)
    machine["load_avg_at_end"] = os.getloadavg()
    doc = {
        **report.results_head(args.name, started, phases, benchmark="incremental"),
        "settings": {
            "runs": args.runs,
            "warm_up_round": args.warmup,
            "quick": args.quick,
            "states": states,
            "methods": {m: LABELS[m] for m in (*METHODS, *FLOORS)},
            "chains": "per state and method, checkpoint N saved with base = the same chain's checkpoint N-1 "
            "(plain: no base); checkpoint 0 a plain save (setup); the previous checkpoint deleted after the next "
            "is verified; volumes compacted between rounds",
            "processes": "each measurement in a fresh process (a child forked by a fork server that has done the "
            "imports" + (", a new interpreter per measurement: --spawn)" if args.spawn else ")"),
            "measurement": "wall: perf_counter around s3ckpt.save / load / verify alone (state built and S3 "
            "connection opened before); CPU: the client process's user+system, all threads (getrusage); server "
            "CPU: the weed process's (/proc/<pid>/stat); sent: bytes written to the client's sockets, request "
            "lines, headers and bodies (socket.send/sendall wrapped); methods alternate, the order rotated every "
            "round; median and min over the rounds",
            "bytes": "tensor bytes of the state; GB = 1e9 bytes; MiB = 2^20",
        },
        "machine": machine,
        "server": server_meta,
        "example_parts": example_plan,
        "records": [r.to_json() for r in records],
        "ratios": [q.to_json() for q in ratios],
        "store_checksum": checksum,
    }
    json_path = args.results_dir / f"{args.name}.json"
    report.write_json(json_path, doc)
    title = (
        f"s3ckpt bench '{args.name}': incremental saves, {fmt_size(nbytes)} states, {args.runs} rounds (median); "
        f"{machine['cores']} cores, {machine['cpu_model']}"
    )
    png_note = plot_incremental(json_path.with_suffix(".png"), records, title)
    print(format_incremental_table(records))
    print()
    print(format_incremental_ratios(ratios))
    print()
    print(format_store_checksum(checksum))
    for state, d in states.items():
        print(
            f"{state}: {d['tensors']} tensors, {fmt_size(d['tensor_bytes'])}, {d['changed_fraction']:.1%} changing "
            f"per checkpoint in {d['regions']} regions; the 5 MiB rule's floor {fmt_size(d['upload_floor_bytes'])}"
        )
    report.print_footer(json_path, png_note, doc, machine)
    return 0

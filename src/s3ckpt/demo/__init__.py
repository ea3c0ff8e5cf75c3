"""``s3ckpt demo``: train, get killed, resume, and check that nothing was lost.

1. Starts the embedded SeaweedFS server, unless an endpoint is given (``--endpoint`` or the usual AWS
   variables, with ``--bucket``).
2. Trains a small Lightning model on the CPU with ``S3CheckpointIO`` (async) and top-k retention on S3.
3. Kills the training process with SIGKILL partway, the way a node dies.
4. Finds the checkpoint to resume from through the rank-0 discovery path, resumes in a new process, and
   checks that the resumed weights, optimizer state, step and epoch equal that committed checkpoint.
5. Fine-tunes the last layer (the rest frozen) in a third process with ``S3CheckpointIO(incremental=True)``:
   each save uploads what changed and has the store copy the rest from the previous checkpoint; checks that
   the newest one loads (checksum verified) with the frozen weights unchanged (``--finetune-steps 0``: skip).
6. Prints a summary (per save: bytes uploaded, and copied on the store) and exits non-zero if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from .report import Run, narrate, summary

__all__ = ["main"]


def _run_worker(
    mode: str, cfg: dict[str, Any], env: dict[str, str], kill_after_saves: int | None, log: Any, timeout: float
) -> Run:
    cmd = [sys.executable, "-m", "s3ckpt.demo.worker", mode, json.dumps(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    run = Run()
    # A watchdog, so a worker that never reports (a bug, a dead store) cannot hang the demo.
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.daemon = True
    watchdog.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.strip()
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        run.events.append(event)
        narrate(event)
        if kill_after_saves is not None and len(run.of("saved")) >= kill_after_saves:
            # Mid-training, with the next async save possibly in flight: the way a node dies.
            time.sleep(0.5)
            proc.send_signal(signal.SIGKILL)
            print(f"  !! killed the training process (pid {proc.pid}) with SIGKILL", flush=True)
            break
    proc.wait()
    watchdog.cancel()
    run.returncode = proc.returncode
    return run


def _compare(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    import torch

    problems = []
    if expected["global_step"] != got["global_step"]:
        problems.append(f"global_step {got['global_step']} != saved {expected['global_step']}")
    if expected["epoch"] != got["epoch"]:
        problems.append(f"epoch {got['epoch']} != saved {expected['epoch']}")
    exp_sd, got_sd = expected["state_dict"], got["state_dict"]
    if exp_sd.keys() != got_sd.keys():
        problems.append("model state keys differ")
    else:
        bad = [k for k in exp_sd if not torch.equal(exp_sd[k], got_sd[k])]
        if bad:
            problems.append(f"weights differ in {bad[:3]}")
    exp_opt = expected["optimizer_states"][0]["state"]
    got_opt = got["optimizer"]["state"]
    for pid, st in exp_opt.items():
        for name, value in st.items():
            other = got_opt.get(pid, {}).get(name)
            if isinstance(value, torch.Tensor) and (other is None or not torch.equal(value, other)):
                problems.append(f"optimizer state {pid}.{name} differs")
                break
    return problems


def _check_finetune(run: Run, transport: Any, log_path: str) -> list[str]:
    """The fine-tuning run ended well, and its newest checkpoint (composed on the store from the ones before)
    loads, checksum verified, with the frozen weights of the checkpoint fine-tuning started from."""
    import torch

    from s3ckpt import checkpoint as ck

    if run.returncode != 0:
        print(Path(log_path).read_text()[-3000:], file=sys.stderr)
        return [f"the fine-tuning run failed (exit {run.returncode}); see {log_path}"]
    saves, started, frozen = run.of("saved"), run.of("resume_path"), run.of("frozen")
    if not saves or not started or not frozen:
        return ["the fine-tuning run saved no checkpoint"]
    before = ck.load(started[0]["path"], weights_only=False, transport=transport)["state_dict"]
    after = ck.load(saves[-1]["path"], weights_only=False, transport=transport)["state_dict"]
    changed = [k for k in frozen[0]["params"] if not torch.equal(before[k], after[k])]
    return [f"frozen weights changed in fine-tuning: {changed[:3]}"] if changed else []


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code (0 when every check passed)."""
    parser = argparse.ArgumentParser(prog="s3ckpt demo", description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", help="S3 endpoint URL (default: start the embedded server)")
    parser.add_argument("--bucket", help="bucket to use (required with --endpoint or AWS credentials)")
    parser.add_argument("--prefix", default=None, help="key prefix for this run (default: demo-<random>)")
    parser.add_argument("--every", type=int, default=20, help="save a checkpoint every N steps")
    parser.add_argument("--kill-after", type=int, default=4, help="SIGKILL after this many committed saves")
    parser.add_argument("--resume-steps", type=int, default=120, help="training steps after the resume")
    parser.add_argument(
        "--finetune-steps", type=int, default=60, help="steps of fine-tuning with incremental saves (0: skip)"
    )
    parser.add_argument("--timeout", type=float, default=600, help="give up (and fail) after this many seconds")
    parser.add_argument("--width", type=int, default=768, help="hidden width of the demo MLP")
    args = parser.parse_args(argv)

    from s3ckpt import checkpoint as ck
    from s3ckpt.catalog import list_checkpoints
    from s3ckpt.config import ClientConfig
    from s3ckpt.distributed import resolve_resume_path
    from s3ckpt.transport import S3Transport

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    server = None
    external = bool(args.endpoint or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ACCESS_KEY_ID"))
    if external and not args.bucket:
        parser.error("--bucket is required when using your own endpoint or AWS credentials")
    if not external:
        from s3ckpt.server import LocalS3Server

        print("Starting the embedded SeaweedFS S3 server on 127.0.0.1 ...", flush=True)
        server = LocalS3Server().start()
        env.update(server.env())
        bucket = args.bucket or "s3ckpt-demo"
        server.create_bucket(bucket)
        print(f"  endpoint {server.endpoint_url}, bucket {bucket}", flush=True)
    else:
        bucket = args.bucket
        if args.endpoint:
            env["AWS_ENDPOINT_URL"] = args.endpoint
    prefix = args.prefix or f"demo-{uuid.uuid4().hex[:8]}"
    dirpath = f"s3://{bucket}/{prefix}"
    failures: list[str] = []
    try:
        transport = S3Transport.create(
            client=ClientConfig.from_env(
                endpoint_url=env.get("AWS_ENDPOINT_URL"),
                access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
            )
        )
        with tempfile.TemporaryDirectory(prefix="s3ckpt-demo-") as tmp:
            # The first run has no step limit: it is killed after --kill-after committed saves, however fast
            # the machine trains, so the kill always lands mid-training.
            cfg = {"dirpath": dirpath, "max_steps": 10**9, "every_n_train_steps": args.every, "width": args.width}
            phases = 4 if args.finetune_steps > 0 else 3
            third: Run | None = None
            log_path = os.path.join(tmp, "worker.log")
            with open(log_path, "w") as log:
                print(
                    f"\n[1/{phases}] Training with async S3 checkpoints to {dirpath} "
                    "(top-k=2, last.ckpt a server-side copy) ...",
                    flush=True,
                )
                first = _run_worker("train", cfg, env, kill_after_saves=args.kill_after, log=log, timeout=args.timeout)
                if first.returncode != -signal.SIGKILL:
                    failures.append(f"the training process was not killed as planned (exit {first.returncode})")

                print(f"\n[2/{phases}] After the crash: what is on S3, and what would resume pick?", flush=True)
                entries = list_checkpoints(transport, dirpath, with_manifests=True)
                for e in entries:
                    mark = "committed" if e.committed else f"UNCOMMITTED ({e.reason})"
                    print(f"  {e.name:32s} {e.size / 1e6:7.1f} MB  step={e.step}  {mark}", flush=True)
                with warnings.catch_warnings(record=True) as notes:
                    warnings.simplefilter("always")
                    resume_url = resolve_resume_path(dirpath, transport=transport)
                print(f"  rank 0 resolved the resume checkpoint: {resume_url}", flush=True)
                for note in notes:  # why it is not last.ckpt, or what it skipped
                    print(f"    {note.message}", flush=True)
                t0 = time.perf_counter()
                expected = ck.load(resume_url, weights_only=False, transport=transport) if resume_url else None
                load_s = time.perf_counter() - t0

                print(f"\n[3/{phases}] Resuming in a new process ...", flush=True)
                cfg["state_out"] = os.path.join(tmp, "resumed.pt")
                cfg["max_steps"] = (expected["global_step"] if expected else 0) + args.resume_steps
                second = _run_worker("resume", cfg, env, kill_after_saves=None, log=log, timeout=args.timeout)
                if second.returncode != 0:
                    failures.append(f"the resumed training failed (exit {second.returncode}); see {log_path}")
                    log.flush()
                    print(Path(log_path).read_text()[-3000:], file=sys.stderr)
                elif expected is None:
                    failures.append("no checkpoint was found to resume from")
                elif not os.path.exists(cfg["state_out"]):
                    failures.append("the resumed process never started training from the checkpoint")
                else:
                    import torch

                    got = torch.load(cfg["state_out"], weights_only=False)
                    failures += _compare(expected, got)
                if phases == 4 and second.returncode == 0:
                    print(
                        "\n[4/4] Fine-tuning the last layer, the rest frozen, with incremental saves "
                        "(S3CheckpointIO(incremental=True)) ...",
                        flush=True,
                    )
                    end = next((e["global_step"] for e in second.of("finished")), cfg["max_steps"])
                    tune = {**cfg, "state_out": None, "finetune": True, "max_steps": end + args.finetune_steps}
                    third = _run_worker("resume", tune, env, kill_after_saves=None, log=log, timeout=args.timeout)
                    log.flush()
                    failures += _check_finetune(third, transport, log_path)
            summary(first, second, entries, resume_url, expected, load_s, failures, third)
    finally:
        if server is not None:
            server.stop()
    return 1 if failures else 0

#!/usr/bin/env python
"""Learning-rate search as the paper does it: short runs from the largest rate to smaller ones,
stopping once validation loss stops improving.

Too high a rate gives an early, irrecoverable loss spike (a run that diverges counts as
infinitely bad); as the rate falls the loss improves, then gets worse again. The search runs
one short run per rate, largest first, and stops after ``--patience`` consecutive rates that are
no better than the best so far (once some run has a finite loss). A run's score is the last
``val_loss`` in its ``SAVE/metrics.jsonl``.

Each run is a Slurm job (a pretraining script submitted with ``sbatch``, with LR, SAVE,
TRAIN_STEPS and WARMUP_STEPS in its environment; ``--sbatch-args`` are passed to every ``sbatch``),
or any command with {lr} and {save} placeholders:

    python slurm/lr_search.py --script slurm/pretrain_s.sbatch --rates 3e-2 1e-2 3e-3 1e-3 3e-4 \\
        --train-steps 5000 --warmup-steps 500 --out runs/lr-search-s \\
        --sbatch-args="--nodes=2 --partition=gpu --time=04:00:00" --job-timeout 43200
    python slurm/lr_search.py --command "deepspeed igpt_ds/pretrain.py --model igpt-tiny \\
        --train-steps 200 --eval-interval 100 --lr {lr} --save {save}" --out runs/lr-tiny
    python slurm/lr_search.py --dry-run ...      # print the runs, submit nothing

The driver polls each job (``scontrol show job``, then ``sacct``) instead of ``sbatch --wait``:
a job that is requeued (preemption, the scripts' own requeue at the time limit) is followed
until it really ends, and a job not finished ``--job-timeout`` seconds after submission (pending
forever on resources the cluster cannot give, or just too slow) is cancelled and the search stops
with the reason. Each run's job id and result are kept in ``SAVE/lr_search_run.json``: a driver
that is itself restarted follows the jobs still running and reuses finished results.

Writes ``OUT/lr_search.json`` (every rate's score and the choice).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Optional, Sequence

PAPER_RATES = (3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)


def final_val_loss(metrics_path: str) -> float:
    """Last ``val_loss`` in a metrics.jsonl; ``inf`` if missing, NaN or the run wrote none."""
    last = math.inf
    if not os.path.exists(metrics_path):
        return last
    with open(metrics_path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a kill
            if rec.get("val_loss") is not None:
                v = float(rec["val_loss"])
                last = v if math.isfinite(v) else math.inf
    return last


def decide(history: Sequence[tuple[float, float]], patience: int = 1,
           min_delta: float = 0.0) -> tuple[bool, Optional[float]]:
    """(stop?, best rate so far) from ``[(rate, val_loss), ...]`` in the order they ran (large to small).

    A rate improves on the best if its loss is lower by more than ``min_delta``. Diverged runs
    (``inf``/NaN) never improve, but do not stop the search until some run has converged: the
    largest rates are expected to blow up. Stop after ``patience`` consecutive non-improving
    rates following the best.
    """
    if patience < 1:
        raise ValueError(f"patience={patience} must be >= 1")
    best_rate, best_loss, since_best = None, math.inf, 0
    for rate, loss in history:
        loss = loss if math.isfinite(loss) else math.inf
        if loss < best_loss - min_delta or (best_rate is None and math.isfinite(loss)):
            best_rate, best_loss, since_best = rate, loss, 0
        elif best_rate is not None:
            since_best += 1
    return (best_rate is not None and since_best >= patience), best_rate


# Slurm job states in which a job may still run (a requeued job passes REQUEUED -> PENDING -> RUNNING).
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "POWER_UP_NODE"}
RUN_RECORD = "lr_search_run.json"


class JobTimeout(RuntimeError):
    pass


def run_command(args, rate: float, save: str) -> list[str]:
    if args.command:
        return shlex.split(args.command.replace("{lr}", f"{rate:g}").replace("{save}", save))
    return ["sbatch", "--parsable", f"--job-name=lr-{rate:g}", *shlex.split(args.sbatch_args or ""), args.script]


def job_state(job: str) -> tuple[Optional[str], str]:
    """(state, reason) of a Slurm job; state None once Slurm no longer knows it."""
    try:
        r = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError("scontrol not found: run the driver where Slurm's commands are (a login node), "
                           "or use --command without Slurm") from None
    if r.returncode == 0:
        state = re.search(r"\bJobState=(\S+)", r.stdout)
        reason = re.search(r"\bReason=(\S+)", r.stdout)
        if state:
            return state.group(1), reason.group(1) if reason else ""
    # Gone from the controller (MinJobAge passed): accounting, where there is any.
    try:
        r = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"], capture_output=True, text=True)
    except FileNotFoundError:
        return None, ""
    lines = [line.split()[0] for line in r.stdout.splitlines() if line.strip()] if r.returncode == 0 else []
    return (lines[-1], "") if lines else (None, "")


def wait_for_job(job: str, timeout: float, poll: float, started: float, log=print) -> str:
    """Poll until the job has ended; its final state ("UNKNOWN" if Slurm forgot it). Requeues are followed."""
    last = None
    while True:
        state, reason = job_state(job)
        if state is None:
            return "UNKNOWN"
        base = state.split("+")[0]  # e.g. "CANCELLED+" / "CANCELLED by 1000" in sacct
        if base != last:
            log(f"  job {job}: {state}" + (f" ({reason})" if reason and reason != "None" else ""))
            last = base
        if base not in ACTIVE_STATES:
            return base
        if timeout and time.time() - started > timeout:
            raise JobTimeout(f"job {job} still {state}" + (f" ({reason})" if reason and reason != "None" else "")
                             + f" {time.time() - started:.0f} s after submission")
        time.sleep(poll)


def submit(cmd: list[str], env: dict) -> str:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}; "
                           f"check the script and --sbatch-args")
    job = r.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
    if not job:
        raise RuntimeError(f"{shlex.join(cmd)} printed no job id: {r.stdout!r} {r.stderr!r}")
    return job


def read_record(save: str) -> dict:
    try:
        with open(os.path.join(save, RUN_RECORD)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def write_record(save: str, record: dict) -> None:
    tmp = os.path.join(save, RUN_RECORD + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(save, RUN_RECORD))


def run_one(args, rate: float, save: str, cmd: list[str], env: dict) -> str:
    """Run (or follow, after a driver restart) one rate's job; its final state."""
    # What makes a result reusable: not the sbatch options (changed to get a stuck job scheduled).
    key = {"lr": rate, "train_steps": args.train_steps, "warmup_steps": args.warmup_steps,
           "run": args.command or args.script}
    record = read_record(save)
    if record.get("key") != key:
        record = {}
    if record.get("done"):
        print(f"lr {rate:g}: finished before (job {record.get('job')}, {record.get('state')}): reusing it")
        return record.get("state", "UNKNOWN")
    if args.command:
        try:
            rc = subprocess.run(cmd, env=env, timeout=args.job_timeout or None).returncode
        except subprocess.TimeoutExpired:
            raise JobTimeout(f"command still running after {args.job_timeout:g} s (killed)") from None
        state = "COMPLETED" if rc == 0 else f"FAILED (exit {rc})"
        write_record(save, {"key": key, "done": True, "state": state})
        return state
    job, started = None, time.time()
    if record.get("job"):
        # The driver was restarted while this job was queued or running: follow it, do not submit twice.
        state, _ = job_state(record["job"])
        if state is not None and state.split("+")[0] in ACTIVE_STATES:
            job, started = record["job"], record.get("submitted", started)
            print(f"lr {rate:g}: following job {job} submitted before the driver restarted ({state})")
    if job is None:
        job = submit(cmd, env)
        started = time.time()
        write_record(save, {"key": key, "job": job, "submitted": started, "done": False})
        print(f"lr {rate:g}: submitted job {job}", flush=True)
    try:
        state = wait_for_job(job, args.job_timeout, args.poll_interval, started)
    except JobTimeout:
        # Cancel it: a job left pending would start later and spend the allocation unattended.
        subprocess.run(["scancel", job], capture_output=True)
        write_record(save, {"key": key, "job": job, "submitted": started, "done": False, "state": "DRIVER_TIMEOUT"})
        raise
    write_record(save, {"key": key, "job": job, "submitted": started, "done": True, "state": state})
    return state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--script", default="slurm/pretrain_s.sbatch",
                     help="pretraining sbatch script, submitted with sbatch (default slurm/pretrain_s.sbatch)")
    how.add_argument("--command", help="run this instead of sbatch; {lr} and {save} are filled in")
    p.add_argument("--rates", type=float, nargs="+", default=list(PAPER_RATES),
                   help=f"rates to try; sorted large to small (default {' '.join(f'{r:g}' for r in PAPER_RATES)})")
    p.add_argument("--train-steps", type=int, default=5000, help="steps per short run (default 5000)")
    p.add_argument("--warmup-steps", type=int, default=500, help="warm-up steps per run (default 500)")
    p.add_argument("--patience", type=int, default=1, help="non-improving rates before stopping (default 1)")
    p.add_argument("--min-delta", type=float, default=0.0, help="improvement smaller than this does not count")
    p.add_argument("--out", default="runs/lr-search", help="one SAVE directory per rate below this")
    p.add_argument("--sbatch-args", default="",
                   help="options for every sbatch in one shell-quoted string, written with '=' (it starts with "
                        "'--'): --sbatch-args=\"--nodes=2 --partition=gpu --time=04:00:00\" (an --export other than "
                        "ALL must list LR,SAVE,TRAIN_STEPS,WARMUP_STEPS)")
    p.add_argument("--job-timeout", type=float, default=86400.0,
                   help="seconds from submission (queue time included) after which a run's job is cancelled and "
                        "the search stops (default 86400; 0 = wait forever)")
    p.add_argument("--poll-interval", type=float, default=30.0, help="seconds between job state checks (default 30)")
    p.add_argument("--dry-run", action="store_true", help="print each run's command and environment only")
    args = p.parse_args(argv)
    if args.command and args.sbatch_args:
        p.error("--sbatch-args goes with --script (sbatch); --command runs without Slurm")
    if args.job_timeout < 0 or args.poll_interval <= 0:
        p.error("--job-timeout must be >= 0 (0 = none) and --poll-interval > 0")
    try:
        shlex.split(args.sbatch_args)
    except ValueError as e:
        p.error(f"--sbatch-args {args.sbatch_args!r}: {e} (quote it as one shell string)")

    history: list[tuple[float, float]] = []
    best, stopped = None, None
    for rate in sorted(set(args.rates), reverse=True):
        save = os.path.join(args.out, f"lr{rate:g}")
        env = dict(os.environ, LR=f"{rate:g}", SAVE=save, TRAIN_STEPS=str(args.train_steps),
                   WARMUP_STEPS=str(args.warmup_steps))
        cmd = run_command(args, rate, save)
        print(f"lr {rate:g}: LR={rate:g} SAVE={save} TRAIN_STEPS={args.train_steps} "
              f"WARMUP_STEPS={args.warmup_steps} {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        os.makedirs(save, exist_ok=True)
        try:
            state = run_one(args, rate, save, cmd, env)
        except (JobTimeout, RuntimeError) as e:
            stopped = f"lr {rate:g}: {e}"
            print(f"{stopped}; the search stops here. A job that cannot start needs other resources "
                  f"(--sbatch-args); a slow one a larger --job-timeout. Rerun the same command to continue "
                  f"(finished rates are reused).", file=sys.stderr)
            break
        loss = final_val_loss(os.path.join(save, "metrics.jsonl"))
        print(f"lr {rate:g}: {state}, final val_loss {loss:.4f}", flush=True)
        history.append((rate, loss))
        stop, best = decide(history, args.patience, args.min_delta)
        if stop:
            break
    if args.dry_run:
        return 0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lr_search.json"), "w") as f:
        json.dump({"runs": [{"lr": r, "val_loss": (v if math.isfinite(v) else None)} for r, v in history],
                   "best_lr": best, "patience": args.patience, "stopped": stopped}, f, indent=2)
    if stopped:
        return 3
    if best is None:
        print("no run converged: try smaller rates", file=sys.stderr)
        return 1
    print(f"best learning rate: {best:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

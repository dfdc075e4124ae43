#!/usr/bin/env python
"""Learning-rate search as the paper does it (§3.4): "sequentially try the learning rates 0.01, 0.003,
0.001, 0.0003, ..., stopping once the final validation loss starts increasing".

Too high a rate gives an early, irrecoverable loss spike (a run that diverges counts as
infinitely bad); as the rate falls the loss improves, then gets worse again. The search runs
one run per rate, largest first (default grid 0.01, 0.003, ..., 1e-5), and stops at the first
rate whose final validation loss is no lower than the previous rate's (``--patience 1``, the
paper's rule; ``--patience N`` tries N rates past the best before stopping). Diverged rates before
the first converged one do not stop it. A run's score is the last ``val_loss`` in its
``SAVE/metrics.jsonl``; a run that diverged (the trainer's exit status 3, whatever it logged
before) scores infinitely bad, and a run that failed otherwise (a crash, bad input, a node
failure, a cancel) stops the search with its state: it says nothing about the rate.

Fine-tuning (§4.5: search the rates again, the best is often ten times lower): ``--metric val_acc``
scores each run by its best ``val_acc`` (the weights early stopping keeps), higher is better, and
stops at the first rate whose accuracy is no higher than the previous rate's. Point it at a
fine-tuning run (``--command "python igpt_ds/finetune.py ... --lr {lr} --save {save}"`` or a
fine-tuning sbatch script) and at lower rates (``--rates 1e-3 3e-4 1e-4 3e-5 1e-5``).

Each run is a Slurm job (a pretraining or fine-tuning script submitted with ``sbatch``, with LR, SAVE,
TRAIN_STEPS and WARMUP_STEPS in its environment; ``--sbatch-args`` are passed to every ``sbatch``),
or any command with {lr} and {save} placeholders:

    python slurm/lr_search.py --script slurm/pretrain_s.sbatch \\
        --train-steps 5000 --warmup-steps 500 --out runs/lr-search-s \\
        --sbatch-args="--nodes=2 --partition=gpu --time=04:00:00" --job-timeout 43200
    python slurm/lr_search.py --command "deepspeed igpt_ds/pretrain.py --model igpt-tiny \\
        --train-steps 200 --eval-interval 100 --lr {lr} --save {save}" --out runs/lr-tiny
    python slurm/lr_search.py --metric val_acc --rates 1e-3 3e-4 1e-4 3e-5 --out runs/lr-ft --command \\
        "python igpt_ds/finetune.py --init runs/igpt-s/export --train-data cifar-10-batches-py \\
         --val-fraction 0.1 --augment cifar --train-epochs 10 --patience 5 --lr {lr} --save {save}"
    python slurm/lr_search.py --dry-run ...      # print the runs, submit nothing

The driver polls each job (``scontrol show job``, then ``sacct``) instead of ``sbatch --wait``:
a job that is requeued (preemption, the scripts' own requeue at the time limit) is followed
until it really ends, and a job not finished ``--job-timeout`` seconds after submission (pending
forever on resources the cluster cannot give, or just too slow) is cancelled and the search stops
with the reason. Each run's job id and result are kept in ``SAVE/lr_search_run.json``: a driver
that is itself restarted follows the jobs still running and reuses finished results.

Writes ``OUT/lr_search.json`` (every rate's score, state and the choice).
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
from typing import Callable, Optional, Sequence

PAPER_RATES = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)  # §3.4: 0.01, 0.003, 0.001, 0.0003, ...
DIVERGED_EXIT = 3  # igpt_ds/train/launch.py: a non-finite loss (TrainingDiverged) exits 3
METRICS = {"val_loss": False, "val_acc": True}  # the score, and whether higher is better


def _values(metrics_path: str, key: str) -> list[float]:
    """Every ``key`` value in a metrics.jsonl, in order (a line cut off by a kill is skipped)."""
    values = []
    if not os.path.exists(metrics_path):
        return values
    with open(metrics_path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get(key) is not None:
                values.append(float(rec[key]))
    return values


def final_val_loss(metrics_path: str) -> float:
    """Last ``val_loss`` in a metrics.jsonl; ``inf`` if missing, NaN or the run wrote none."""
    values = _values(metrics_path, "val_loss")
    return values[-1] if values and math.isfinite(values[-1]) else math.inf


def best_val_acc(metrics_path: str) -> float:
    """Highest ``val_acc`` in a fine-tuning run's metrics.jsonl (what early stopping keeps in SAVE/best);
    ``-inf`` if the run wrote none."""
    values = [v for v in _values(metrics_path, "val_acc") if math.isfinite(v)]
    return max(values) if values else -math.inf


def score(metrics_path: str, metric: str) -> float:
    """A run's score for ``metric`` (see ``METRICS``)."""
    return best_val_acc(metrics_path) if metric == "val_acc" else final_val_loss(metrics_path)


def worst(metric: str) -> float:
    """The score of a diverged run."""
    return -math.inf if METRICS[metric] else math.inf


def decide(history: Sequence[tuple[float, float]], patience: int = 1,
           min_delta: float = 0.0, maximize: bool = False) -> tuple[bool, Optional[float]]:
    """(stop?, best rate so far) from ``[(rate, score), ...]`` in the order they ran (large to small).

    A rate improves on the best if its score is better by more than ``min_delta`` (lower loss, or
    higher accuracy with ``maximize``). Diverged runs (non-finite scores) never improve, but do not
    stop the search until some run has converged: the largest rates are expected to blow up. Stop
    after ``patience`` consecutive non-improving rates following the best; with ``patience`` 1 that
    is the paper's rule, the first rate whose score is no better than the previous rate's.
    """
    if patience < 1:
        raise ValueError(f"patience={patience} must be >= 1")
    best_rate, best_loss, since_best = None, math.inf, 0
    for rate, value in history:
        loss = -value if maximize else value  # lower is better from here on
        loss = loss if math.isfinite(loss) else math.inf
        if loss < best_loss - min_delta or (best_rate is None and math.isfinite(loss)):
            best_rate, best_loss, since_best = rate, loss, 0
        elif best_rate is not None:
            since_best += 1
    return (best_rate is not None and since_best >= patience), best_rate


def search(rates: Sequence[float], run_rate: Callable[[float], float], patience: int = 1,
           min_delta: float = 0.0, maximize: bool = False,
           history: Optional[list] = None) -> tuple[list[tuple[float, float]], Optional[float], bool]:
    """Try ``rates`` from large to small, ``run_rate(rate)`` giving each one's score, until :func:`decide`
    says stop. (history, best rate, stopped by the rule). ``history`` (appended to as rates finish)
    keeps the finished rates when ``run_rate`` raises."""
    history = [] if history is None else history
    best, stop = None, False
    for rate in sorted(set(rates), reverse=True):
        history.append((rate, run_rate(rate)))
        stop, best = decide(history, patience, min_delta, maximize)
        if stop:
            break
    return history, best, stop


# Slurm job states in which a job may still run (a requeued job passes REQUEUED -> PENDING -> RUNNING).
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "POWER_UP_NODE"}
RUN_RECORD = "lr_search_run.json"


class JobTimeout(RuntimeError):
    pass


class RunFailed(RuntimeError):
    """A run ended without completing and without diverging."""


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


def job_exit_code(job: str) -> Optional[int]:
    """Exit status of an ended Slurm job (``ExitCode=3:0`` in scontrol or sacct); None if unknown."""
    for cmd in (["scontrol", "show", "job", "-o", job], ["sacct", "-n", "-X", "-P", "-j", job, "-o", "ExitCode"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            continue
        m = re.search(r"(?:\bExitCode=|^)(\d+):\d+", r.stdout, flags=re.M) if r.returncode == 0 else None
        if m:
            return int(m.group(1))
    return None


def outcome(state: str, exit_code: Optional[int]) -> str:
    """How a run ended, for the search: "completed" (score it), "diverged" (the worst score) or "failed"
    (stop: a crash, bad input, a node failure or a cancel says nothing about the rate)."""
    if state in ("COMPLETED", "UNKNOWN"):  # UNKNOWN: Slurm forgot the job; its metrics tell
        return "completed"
    return "diverged" if exit_code == DIVERGED_EXIT else "failed"


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


def run_one(args, rate: float, save: str, cmd: list[str], env: dict) -> tuple[str, Optional[int]]:
    """Run (or follow, after a driver restart) one rate's job; its final state and exit status. A run that
    failed other than by diverging is not kept as done: the same command run again retries it."""
    # What makes a result reusable: not the sbatch options (changed to get a stuck job scheduled).
    key = {"lr": rate, "train_steps": args.train_steps, "warmup_steps": args.warmup_steps,
           "run": args.command or args.script}
    record = read_record(save)
    if record.get("key") != key:
        record = {}
    if record.get("done"):
        print(f"lr {rate:g}: finished before (job {record.get('job')}, {record.get('state')}): reusing it")
        return record.get("state", "UNKNOWN"), record.get("exit")
    if args.command:
        try:
            rc = subprocess.run(cmd, env=env, timeout=args.job_timeout or None).returncode
        except subprocess.TimeoutExpired:
            raise JobTimeout(f"command still running after {args.job_timeout:g} s (killed)") from None
        state = "COMPLETED" if rc == 0 else f"FAILED (exit {rc})"
        write_record(save, {"key": key, "done": outcome(state, rc) != "failed", "state": state, "exit": rc})
        return state, rc
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
    code = 0 if state == "COMPLETED" else job_exit_code(job)
    write_record(save, {"key": key, "job": job, "submitted": started, "done": outcome(state, code) != "failed",
                        "state": state, "exit": code})
    return state, code


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--script", default="slurm/pretrain_s.sbatch",
                     help="sbatch script of one run, submitted with sbatch (default slurm/pretrain_s.sbatch; with "
                          "--metric val_acc a fine-tuning script of yours)")
    how.add_argument("--command", help="run this instead of sbatch; {lr} and {save} are filled in")
    p.add_argument("--rates", type=float, nargs="+", default=list(PAPER_RATES),
                   help="rates to try; sorted large to small (default the paper's grid, "
                        f"{' '.join(f'{r:g}' for r in PAPER_RATES)}; for fine-tuning start lower, e.g. 1e-3)")
    p.add_argument("--metric", choices=sorted(METRICS), default="val_loss",
                   help="val_loss (pretraining, default): the last val_loss of a run, lower is better; val_acc "
                        "(fine-tuning): its best val_acc, higher is better. The search stops at the first rate "
                        "no better than the previous one")
    p.add_argument("--train-steps", type=int, default=5000,
                   help="TRAIN_STEPS of each run's script (default 5000: a short proxy; the paper's runs are "
                        "full length)")
    p.add_argument("--warmup-steps", type=int, default=500, help="warm-up steps per run (default 500)")
    p.add_argument("--patience", type=int, default=1,
                   help="rates no better than the best before stopping (default 1: the paper's rule, stop at the "
                        "first rate no better than the previous one)")
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
    if args.metric == "val_acc" and not args.command and os.path.basename(args.script).startswith("pretrain_"):
        p.error(f"--metric val_acc scores fine-tuning runs, and {args.script} pretrains (it logs no val_acc): "
                f"pass --command \"python igpt_ds/finetune.py ... --lr {{lr}} --save {{save}}\" or a fine-tuning "
                f"--script")
    maximize = METRICS[args.metric]
    rates = sorted(set(args.rates), reverse=True)

    def prepare(rate: float) -> tuple[str, dict, list[str]]:
        save = os.path.join(args.out, f"lr{rate:g}")
        env = dict(os.environ, LR=f"{rate:g}", SAVE=save, TRAIN_STEPS=str(args.train_steps),
                   WARMUP_STEPS=str(args.warmup_steps))
        cmd = run_command(args, rate, save)
        print(f"lr {rate:g}: LR={rate:g} SAVE={save} TRAIN_STEPS={args.train_steps} "
              f"WARMUP_STEPS={args.warmup_steps} {shlex.join(cmd)}", flush=True)
        return save, env, cmd

    if args.dry_run:
        for rate in rates:
            prepare(rate)
        print(f"(dry run: the search tries these from the largest, scored by {args.metric}, and stops at the first "
              f"rate no better than the previous one)")
        return 0

    states: dict[float, str] = {}

    def run_rate(rate: float) -> float:
        save, env, cmd = prepare(rate)
        os.makedirs(save, exist_ok=True)
        state, code = run_one(args, rate, save, cmd, env)
        states[rate] = state
        how = outcome(state, code)
        if how == "failed":
            raise RunFailed(f"the run ended {state}" + (f" (exit {code})" if code is not None else "")
                            + f", not by divergence (exit {DIVERGED_EXIT}): a crash, bad input, a node failure or a "
                              f"cancel says nothing about the rate. Its log and {save} say why; fix it and rerun "
                              f"the same command (this rate is retried, finished ones are reused)")
        value = worst(args.metric) if how == "diverged" else score(os.path.join(save, "metrics.jsonl"), args.metric)
        print(f"lr {rate:g}: {state}" + (" (diverged)" if how == "diverged" else "")
              + f", {'best val_acc' if maximize else 'final val_loss'} {value:.4f}", flush=True)
        return value

    history: list[tuple[float, float]] = []
    best, stopped, by_rule = None, None, False
    try:
        history, best, by_rule = search(rates, run_rate, args.patience, args.min_delta, maximize, history)
    except RunFailed as e:
        stopped = f"lr {history_next(rates, history):g}: {e}"
        print(f"{stopped}; the search stops here.", file=sys.stderr)
    except (JobTimeout, RuntimeError) as e:
        stopped = f"lr {history_next(rates, history):g}: {e}"
        print(f"{stopped}; the search stops here. A job that cannot start needs other resources "
              f"(--sbatch-args); a slow one a larger --job-timeout. Rerun the same command to continue "
              f"(finished rates are reused).", file=sys.stderr)
    if stopped:
        best = decide(history, args.patience, args.min_delta, maximize)[1]
    note = None
    if best is not None and not stopped and not by_rule and best == rates[-1]:
        note = f"still improving at the smallest rate tried ({best:g}): add smaller --rates"
    elif best is not None and best == rates[0] and len(history) > 1:
        note = f"the largest rate tried ({best:g}) was the best: a larger one may be better still"
    if note:
        print(f"note: {note}", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lr_search.json"), "w") as f:
        json.dump({"metric": args.metric,
                   "runs": [{"lr": r, args.metric: (v if math.isfinite(v) else None), "state": states.get(r)}
                            for r, v in history],
                   "best_lr": best, "patience": args.patience, "stopped": stopped, "note": note}, f, indent=2)
    if stopped:
        return 3
    if best is None:
        print(f"no run converged (each diverged or wrote no {args.metric}: check the runs' validation data): "
              f"try smaller rates", file=sys.stderr)
        return 1
    print(f"best learning rate: {best:g}")
    return 0


def history_next(rates: Sequence[float], history: Sequence[tuple[float, float]]) -> float:
    """The rate after the finished ones: the one that was running when the search stopped."""
    return rates[len(history)] if len(history) < len(rates) else rates[-1]


if __name__ == "__main__":
    sys.exit(main())

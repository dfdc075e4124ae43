#!/usr/bin/env python
"""Learning-rate search as the paper does it: short runs from the largest rate to smaller ones,
stopping once validation loss stops improving.

Too high a rate gives an early, irrecoverable loss spike (a run that diverges counts as
infinitely bad); as the rate falls the loss improves, then gets worse again. The search runs
one short run per rate, largest first, and stops after ``--patience`` consecutive rates that are
no better than the best so far (once some run has a finite loss). A run's score is the last
``val_loss`` in its ``SAVE/metrics.jsonl``.

Each run is a Slurm job (``sbatch --wait`` of a pretraining script, with LR, SAVE, TRAIN_STEPS
and WARMUP_STEPS in its environment), or any command with {lr} and {save} placeholders:

    python slurm/lr_search.py --script slurm/pretrain_s.sbatch --rates 3e-2 1e-2 3e-3 1e-3 3e-4 \\
        --train-steps 5000 --warmup-steps 500 --out runs/lr-search-s
    python slurm/lr_search.py --command "deepspeed igpt_ds/pretrain.py --model igpt-tiny \\
        --train-steps 200 --eval-interval 100 --lr {lr} --save {save}" --out runs/lr-tiny
    python slurm/lr_search.py --dry-run ...      # print the runs, submit nothing

Writes ``OUT/lr_search.json`` (every rate's score and the choice).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
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


def run_command(args, rate: float, save: str) -> list[str]:
    if args.command:
        return shlex.split(args.command.replace("{lr}", f"{rate:g}").replace("{save}", save))
    return ["sbatch", "--wait", f"--job-name=lr-{rate:g}", args.script]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--script", default="slurm/pretrain_s.sbatch",
                     help="pretraining sbatch script, submitted with sbatch --wait (default slurm/pretrain_s.sbatch)")
    how.add_argument("--command", help="run this instead of sbatch; {lr} and {save} are filled in")
    p.add_argument("--rates", type=float, nargs="+", default=list(PAPER_RATES),
                   help=f"rates to try; sorted large to small (default {' '.join(f'{r:g}' for r in PAPER_RATES)})")
    p.add_argument("--train-steps", type=int, default=5000, help="steps per short run (default 5000)")
    p.add_argument("--warmup-steps", type=int, default=500, help="warm-up steps per run (default 500)")
    p.add_argument("--patience", type=int, default=1, help="non-improving rates before stopping (default 1)")
    p.add_argument("--min-delta", type=float, default=0.0, help="improvement smaller than this does not count")
    p.add_argument("--out", default="runs/lr-search", help="one SAVE directory per rate below this")
    p.add_argument("--dry-run", action="store_true", help="print each run's command and environment only")
    args = p.parse_args(argv)

    history: list[tuple[float, float]] = []
    best = None
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
        rc = subprocess.call(cmd, env=env)
        loss = final_val_loss(os.path.join(save, "metrics.jsonl"))
        print(f"lr {rate:g}: exit {rc}, final val_loss {loss:.4f}", flush=True)
        history.append((rate, loss))
        stop, best = decide(history, args.patience, args.min_delta)
        if stop:
            break
    if args.dry_run:
        return 0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lr_search.json"), "w") as f:
        json.dump({"runs": [{"lr": r, "val_loss": (v if math.isfinite(v) else None)} for r, v in history],
                   "best_lr": best, "patience": args.patience}, f, indent=2)
    if best is None:
        print("no run converged: try smaller rates", file=sys.stderr)
        return 1
    print(f"best learning rate: {best:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

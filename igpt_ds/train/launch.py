"""What both entry points do around the loop: process set-up, one clear line for bad input, exit codes.

    exit code 0   the run finished, stopped early, or saved and stopped on SIGTERM/SIGUSR1/--max-minutes
              2   bad flags, config, layout, checkpoint or data (one line: ``error: ...``)
              3   the loss diverged (the message names the last good checkpoint)
"""
from __future__ import annotations

import os
import sys

import torch


def prepare_process() -> None:
    """Before DeepSpeed is imported: its accelerator (third-party warnings: igpt_ds.quiet, installed by the
    entry points)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def run(args, task_cls):
    """``(exit code, trainer or None, last metrics record)`` of one run of ``task_cls(args)``."""
    prepare_process()  # idempotent; the entry points call it first, before importing their task
    # Imported here, not at the top: DS_ACCELERATOR must be set before DeepSpeed is first imported.
    from igpt_ds.train.loop import Trainer, TrainingDiverged

    try:
        trainer = Trainer(args, task_cls(args))
    except (ValueError, FileNotFoundError) as e:  # bad flags, config, layout, checkpoint, data: one clear line
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2, None, {}
    try:
        last = trainer.train()
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3, trainer, {}
    return 0, trainer, last

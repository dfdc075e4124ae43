"""The job's stop signals, remembered from the first moment of the process until the loop can act.

A batch scheduler ends or preempts a job by signalling every process of its step: Slurm sends
SIGTERM on ``scancel``, ``scontrol requeue``, preemption and the time limit, and the sbatch scripts
ask for SIGUSR1 ahead of the limit. Two rules make any of these end in one checkpoint and exit 0:

- The trainer process records the signal (:func:`install`, called by the entry points before
  torch, DeepSpeed or the data are loaded, so a signal during start-up is not lost) and the loop
  stops at the next step boundary, on every rank at the same step (``Trainer._should_stop``).
- DataLoader workers (:func:`worker_init`, their ``worker_init_fn``) do not die of the job's
  signals: they pass them to the trainer that owns them and keep serving batches until it shuts
  them down. A second SIGTERM ends a worker (the trainer's own ``terminate()`` of a stuck worker).

This module imports nothing heavy, so installing it costs nothing at start-up.
"""
from __future__ import annotations

import os
import signal
from typing import Optional, Union

JOB_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: Optional[int] = None


def _record(signum, frame) -> None:
    global _received
    if _received is None:
        _received = signum


def install() -> None:
    """Record SIGTERM/SIGUSR1 in this (trainer) process from now on instead of dying of them (idempotent:
    a signal received before a second call stays recorded)."""
    for sig in JOB_SIGNALS:
        signal.signal(sig, _record)


def received() -> Optional[int]:
    """The first job signal this process received, or None."""
    return _received


def describe(signum: Union[int, str, None]) -> str:
    if isinstance(signum, int):
        try:
            return f"{signal.Signals(signum).name} ({signum})"
        except ValueError:
            return str(signum)
    return str(signum)


def _forward_to_trainer(signum, frame) -> None:
    parent = os.getppid()
    if parent > 1:
        try:
            os.kill(parent, signum)
        except ProcessLookupError:
            pass
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the next SIGTERM is the trainer's shutdown: obey it


def worker_init(worker_id: int = 0) -> None:
    """``worker_init_fn`` of every DataLoader of a training run (runs after torch's own worker handlers)."""
    for sig in JOB_SIGNALS:
        signal.signal(sig, _forward_to_trainer)

"""What the two end-to-end training test files share: the layouts every parity test runs, the DeepSpeed
config they write, the loss tolerance, and ranks started in the background (for signal tests).

``tests/`` is on ``sys.path`` under pytest's default (prepend) import mode, so test files import
this as ``from layouts import ...``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from igpt_ds.testing import free_port

ROOT = Path(__file__).resolve().parents[1]
# Layouts only reorder fp32 sums (DP all-reduces, TP partial products); measured differences ~1e-6.
LOSS_TOL = 1e-4


@dataclass(frozen=True)
class Layout:
    """A DP x TP x PP layout and ZeRO stage, compared with one process at the same global batch."""

    name: str
    nprocs: int
    zero_stage: int
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # Micro-batches per optimizer step and DP rank; None: one (DeepSpeed's default micro-batch).
    micro_batches: Optional[int] = None

    @property
    def data_parallel(self) -> int:
        return self.nprocs // (self.tensor_parallel * self.pipeline_parallel)

    @property
    def flags(self) -> list[str]:
        flags = []
        if self.tensor_parallel > 1:
            flags += ["--tensor-parallel", str(self.tensor_parallel)]
        if self.pipeline_parallel > 1:
            flags += ["--pipeline-parallel", str(self.pipeline_parallel)]
        return flags

    def micro_batch(self, global_batch: int) -> Optional[int]:
        """``train_micro_batch_size_per_gpu`` for ``global_batch``; None leaves it to DeepSpeed."""
        if self.micro_batches is None:
            return None
        micro, rest = divmod(global_batch, self.data_parallel * self.micro_batches)
        assert micro and not rest, f"{self.name}: batch {global_batch} does not split into {self.micro_batches} " \
                                   f"micro-batches on {self.data_parallel} DP ranks"
        return micro


LAYOUTS = [
    Layout("dp2_zero3", 2, zero_stage=3),
    Layout("tp2", 2, zero_stage=1, tensor_parallel=2),
    Layout("pp2", 2, zero_stage=1, pipeline_parallel=2, micro_batches=2),  # 2 micro-batches through 2 stages
    Layout("tp2_dp2", 4, zero_stage=1, tensor_parallel=2),
]
LAYOUT_IDS = [layout.name for layout in LAYOUTS]


def write_ds_config(path: Path, train_batch_size: int, stage: int = 0, micro: Optional[int] = None, **extra) -> str:
    """A DeepSpeed JSON at ``path`` (fp32: no precision block); returns the path as a string."""
    cfg = {"train_batch_size": train_batch_size, "zero_optimization": {"stage": stage}, **extra}
    if micro:
        cfg["train_micro_batch_size_per_gpu"] = micro
    Path(path).write_text(json.dumps(cfg))
    return str(path)


def start_ranks(argv: list[str], nprocs: int, log_dir: Path) -> list[subprocess.Popen]:
    """``python *argv`` as ``nprocs`` ranks in the background (torchrun-style environment), each
    logging to ``log_dir/rank{r}.log``; returns the Popen objects."""
    port = free_port()
    procs = []
    for rank in range(nprocs):
        env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nprocs),
                   OMP_NUM_THREADS="1")
        with open(Path(log_dir) / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=str(ROOT), stdout=log,
                                          stderr=subprocess.STDOUT))
    return procs


def rank_logs(log_dir: Path, nprocs: int) -> str:
    return "".join((Path(log_dir) / f"rank{r}.log").read_text() for r in range(nprocs))


def wait_for(predicate, timeout: float, procs: list[subprocess.Popen]) -> None:
    """Poll ``predicate`` until it holds; fail if a rank exits with an error first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if any(p.poll() not in (None, 0) for p in procs):
            raise AssertionError(f"a rank died early: exit codes {[p.poll() for p in procs]}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def signal_ranks_when(predicate, procs: list[subprocess.Popen], sig: int, timeout: float = 240) -> list[int]:
    """Once ``predicate`` holds, send ``sig`` to every rank (as Slurm signals every task), wait for them and
    return their exit codes. Whatever happens, no rank outlives the call."""
    try:
        wait_for(predicate, timeout, procs)
        for p in procs:
            p.send_signal(sig)
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()

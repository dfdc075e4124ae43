"""Preemption as a batch scheduler delivers it, without one: job signals to any process of the step.

Slurm's ``scontrol requeue``, preemption and the time limit send SIGTERM to every process of a job
step, DataLoader workers included. Each case must end in one checkpoint and exit 0 (or, before
step 1, a clean exit), and ``--load`` must continue the run. igpt-tiny at 8x8 on real shards (so the
loader has worker processes), fp32, one rank.
"""
import os
import signal
import time
from pathlib import Path

import pytest
from layouts import LOSS_TOL, rank_logs, start_ranks, wait_for, write_ds_config
from testdata import tiny_shards

from igpt_ds.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "igpt_ds" / "pretrain.py")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("shards"))


def argv(shards, ds_config, run, steps, *extra):
    return [PRETRAIN, "--resolution", "8", "--no-progress", "--lr", "3e-3", "--warmup-steps", "0", "--no-decay",
            "--train-data", str(shards), "--num-workers", "2", "--deepspeed_config", ds_config,
            "--train-steps", str(steps), "--save", str(run), *extra]


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(c) for c in text.split()]


def catches(pid: int, sig: int) -> bool:
    """Whether ``pid`` has a handler installed for ``sig`` (the SigCgt mask of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path)] if path.is_file() and path.stat().st_size else []


def finish(procs, timeout=240) -> list[int]:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait(timeout=max(1, deadline - time.monotonic()))
    return [p.returncode for p in procs]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the loader's workers")
@pytest.mark.parametrize("target", ["one loader worker", "every process of the step"])
def test_sigterm_to_loader_workers_checkpoints_exits_0_and_resumes(shards, tmp_path, target):
    cfg = write_ds_config(tmp_path / "ds.json", 8)
    run = tmp_path / "run"
    procs = start_ranks(argv(shards, cfg, run, 100000), 1, tmp_path)
    main = procs[0].pid
    try:
        wait_for(lambda: len(logged_steps(run)) >= 2 and len(children(main)) >= 2, 240, procs)
        workers = children(main)
        if target == "one loader worker":
            os.kill(workers[0], signal.SIGTERM)
        else:  # what Slurm does: the same signal to each process of the step at once
            for pid in [main, *workers]:
                os.kill(pid, signal.SIGTERM)
        codes = finish(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = rank_logs(tmp_path, 1)
    assert codes == [0], logs[-3000:]
    assert "DataLoader worker" not in logs and "killed by signal" not in logs, logs[-3000:]
    step = logged_steps(run)[-1]
    assert f"received signal SIGTERM (15): checkpoint saved at step {step}, exiting" in logs, logs[-3000:]
    assert (run / "latest").read_text() == f"global_step{step}"

    # The requeued job: --load continues at the next step with the uninterrupted run's losses.
    before = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    (tmp_path / "resume").mkdir()
    resumed = start_ranks(argv(shards, cfg, run, step + 2, "--load", str(run)), 1, tmp_path / "resume")
    assert finish(resumed) == [0], rank_logs(tmp_path / "resume", 1)[-3000:]
    assert logged_steps(run) == list(range(1, step + 3))
    reference = tmp_path / "reference"
    (tmp_path / "ref_logs").mkdir()
    straight = start_ranks(argv(shards, cfg, reference, step + 2), 1, tmp_path / "ref_logs")
    assert finish(straight) == [0], rank_logs(tmp_path / "ref_logs", 1)[-3000:]
    want = [r["loss"] for r in read_metrics(reference / "metrics.jsonl")]
    got = before + [r["loss"] for r in read_metrics(run / "metrics.jsonl")][step:]
    assert len(got) == len(want) == step + 2
    for i, (a, b) in enumerate(zip(got, want), 1):
        assert abs(a - b) <= LOSS_TOL, f"step {i}: interrupted + resumed {a} vs straight {b}"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc to see the signal handler")
def test_signal_during_start_up_exits_cleanly_and_the_run_resumes(shards, tmp_path):
    cfg = write_ds_config(tmp_path / "ds.json", 8)
    run = tmp_path / "run"
    first = start_ranks(argv(shards, cfg, run, 2, "--save-interval", "2"), 1, tmp_path)
    assert finish(first) == [0], rank_logs(tmp_path, 1)[-3000:]

    # A requeued job that is signalled again while it starts (imports, DeepSpeed, loading the checkpoint).
    (tmp_path / "again").mkdir()
    procs = start_ranks(argv(shards, cfg, run, 4, "--load", str(run)), 1, tmp_path / "again")
    try:
        wait_for(lambda: catches(procs[0].pid, signal.SIGUSR1), 60, procs)  # the entry point's first act
        assert logged_steps(run) == [1, 2]
        os.kill(procs[0].pid, signal.SIGUSR1)
        codes = finish(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = rank_logs(tmp_path / "again", 1)
    assert codes == [0], logs[-3000:]
    assert "received signal SIGUSR1 (10) before step 3: nothing new to save, exiting" in logs, logs[-3000:]
    assert f"--load {run} resumes from {run}/global_step2" in logs, logs[-3000:]
    assert (run / "latest").read_text() == "global_step2" and logged_steps(run) == [1, 2]

    # And the next start resumes as if nothing had happened.
    (tmp_path / "third").mkdir()
    last = start_ranks(argv(shards, cfg, run, 4, "--load", str(run)), 1, tmp_path / "third")
    assert finish(last) == [0], rank_logs(tmp_path / "third", 1)[-3000:]
    assert logged_steps(run) == [1, 2, 3, 4] and (run / "latest").read_text() == "global_step4"

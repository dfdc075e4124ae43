"""The real sbatch scripts on a real one-node Slurm (tests/slurm_cluster.py): preemption by
``scontrol requeue`` resumes at the saved step, a plain ``scancel`` cancels.

igpt-tiny at 8x8 on tiny shards, fp32 on the CPU (DS_ACCELERATOR=cpu), 2 srun ranks; the requeue test
submits slurm/pretrain_s.sbatch as the documented CPU run (``GPUS_PER_NODE=2 sbatch --gpus-per-node=0
--ntasks-per-node=2``), the cancel test and the feature chain use the node's two fake GPUs (gres.conf
``File=`` entries) as on a GPU node (``--gpus-per-node=2``). Where slurmd cannot start (no packages, not root, ...)
every test here skips with the reason; nothing fakes Slurm.
"""
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import slurm_cluster
from layouts import write_ds_config
from testdata import synthetic_images, tiny_shards

from igpt_ds.testing import free_port
from igpt_ds.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RANKS = 2
# Bounds of every wait (s): a 2-core machine shared with other work; a rank starts in ~20-40 s.
START, TRAIN, END = 120, 180, 90
FINISHED = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "GONE")


@pytest.fixture(scope="module")
def cluster():
    try:
        c = slurm_cluster.start(gpus=RANKS)
    except slurm_cluster.SlurmUnavailable as e:
        pytest.skip(f"no private Slurm here: {e}")
    if c.cpus < RANKS:
        c.stop()
        pytest.skip(f"needs {RANKS} CPUs for {RANKS} ranks (nproc says {c.cpus})")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("shards"))


def submit_pretraining(cluster, shards, tmp_path, cpu_run=True, save_interval=5):
    """slurm/pretrain_s.sbatch with igpt-tiny on 2 ranks; returns (job id, SAVE, log). ``cpu_run``: the CPU
    run slurm/README.md documents (``--gpus-per-node=0``, ``GPUS_PER_NODE`` names the ranks per node);
    otherwise on the node's 2 fake GPUs (``--gpus-per-node=2``, as on a GPU node)."""
    save, log = tmp_path / "run", tmp_path / "job.out"
    env = dict(cluster.env, IGPT_ROOT=str(ROOT), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               MODEL="igpt-tiny", RESOLUTION="8", DS_CONFIG=write_ds_config(tmp_path / "ds.json", 8),
               SAVE=str(save), TRAIN_DATA=str(shards), TRAIN_STEPS="100000", WARMUP_STEPS="0",
               SAVE_INTERVAL=str(save_interval), EVAL_INTERVAL="1000000", LR="3e-3",
               MASTER_PORT=str(free_port()))  # the script's 29500 + job id would collide across clusters
    if cpu_run:
        env["GPUS_PER_NODE"] = str(RANKS)
    job = cluster.sbatch(f"--ntasks-per-node={RANKS}", f"--gpus-per-node={0 if cpu_run else RANKS}",
                         "--cpus-per-task=1", f"--output={log}", "--job-name=igpt-tiny-test",
                         str(ROOT / "slurm" / "pretrain_s.sbatch"), "--no-progress", "--no-decay",
                         "--num-workers", "1", env=env, cwd=str(ROOT))
    return job, save, log


WORLD_LINE = f"nodes: {{}} (1 x {RANKS} GPUs, world size {RANKS})"


def steps(save: Path) -> list[int]:
    path = save / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path)] if path.is_file() and path.stat().st_size else []


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def restarts(cluster, job) -> int:
    return int(cluster.job(job).get("Restarts", "0") or 0)


def kill_job(cluster, job):
    """End a job for good, best effort (cleanup must not hide a test's own failure): Requeue=0 first, so
    neither Slurm nor the script can requeue it, then cancel and wait (bounded) until it has ended."""
    cluster.run("scontrol", "update", f"JobId={job}", "Requeue=0", check=False)
    cluster.run("scancel", str(job), check=False)
    deadline = time.monotonic() + END
    while time.monotonic() < deadline and cluster.state(job) not in FINISHED:
        time.sleep(1)


def test_scontrol_requeue_resumes_at_the_saved_step(cluster, shards, tmp_path):
    job, save, log = submit_pretraining(cluster, shards, tmp_path)
    try:
        cluster.wait_state(job, "RUNNING", START)
        cluster.wait(lambda: len(steps(save)) >= 7, START + TRAIN, f"job {job} to log 7 steps\n{text(log)[-3000:]}")
        cluster.run("scontrol", "requeue", str(job))  # what preemption does: SIGTERM to every process
        cluster.wait(lambda: restarts(cluster, job) >= 1, END, f"job {job} to be requeued")
        # Running again means the first run has ended (the node has room for one job); the second run
        # needs far longer than this poll to reach its first step, so these are the first run's.
        cluster.wait_state(job, "RUNNING", END + 60)
        first, latest, first_log = steps(save), text(save / "latest"), text(log)
        cluster.wait(lambda: len(steps(save)) >= len(first) + 3, START + TRAIN,
                     f"the requeued job {job} to train 3 more steps\n{text(log)[-3000:]}")
    finally:
        kill_job(cluster, job)
    out = text(log)
    assert WORLD_LINE.format(cluster.hostname) in out, out[-3000:]
    assert first and first == list(range(1, len(first) + 1)), first
    k = first[-1]
    # the signal checkpoint is the last step of the first run, not the last interval checkpoint
    assert latest == f"global_step{k}", (latest, first, first_log[-3000:])
    assert f"checkpoint saved at step {k}, exiting" in first_log, first_log[-3000:]
    assert "killed by signal" not in first_log and "Traceback" not in first_log, first_log[-3000:]
    assert f"resuming from {save} (latest: global_step{k})" in out, out[-3000:]
    got = steps(save)
    assert got[:len(first)] == first and got[len(first)] == k + 1, got  # starts after the checkpointed step
    assert got == list(range(1, len(got) + 1)), got  # no gap, nothing repeated


def test_scancel_cancels_and_does_not_requeue(cluster, shards, tmp_path):
    job, save, log = submit_pretraining(cluster, shards, tmp_path, cpu_run=False)
    try:
        cluster.wait_state(job, "RUNNING", START)
        cluster.wait(lambda: len(steps(save)) >= 2, START + TRAIN, f"job {job} to log 2 steps\n{text(log)[-3000:]}")
        cluster.run("scancel", str(job))
        state = cluster.wait_state(job, FINISHED + ("PENDING",), END)
        # A requeued job would be back (PENDING, Restarts=1) within cred_expire + a scheduler pass (~15 s).
        deadline = time.monotonic() + 20
        seen = {state}
        while time.monotonic() < deadline and restarts(cluster, job) == 0:
            seen.add(cluster.state(job))
            time.sleep(1)
        again = restarts(cluster, job)
        final = cluster.state(job)
    finally:
        kill_job(cluster, job)
    out = text(log)
    assert WORLD_LINE.format(cluster.hostname) in out, out[-3000:]
    assert again == 0 and not ({"PENDING", "RUNNING"} & (seen | {final})), \
        f"scancel requeued job {job}: states {sorted(seen)}, now {final}, Restarts={again}\n{out[-3000:]}"
    assert final in FINISHED, final
    assert "requeueing job" not in out, out[-3000:]  # the script's own requeue did not run either



@pytest.mark.skipif(not (ROOT / "slurm" / "features_chain.sh").is_file(), reason="slurm/features_chain.sh missing")
def test_feature_chain_produces_the_probe_json(cluster, tmp_path):
    """slurm/features_chain.sh as documented: extraction (2 slices, one per fake GPU) -> merge -> probe,
    five real jobs chained with --dependency=afterok; the merged features and the probe JSON appear."""
    from igpt_ds.checkpoint.consolidated import save_consolidated
    from igpt_ds.config import get_preset
    from igpt_ds.model.transformer import IGPTModel
    from igpt_ds.parallel.weights import full_state_dict

    # A repository root of links: the jobs write logs/, features/ and probes/ there, not into the checkout.
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("igpt_ds", "tools", "slurm"):
        (repo / name).symlink_to(ROOT / name)
    palette = np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)
    cfg = get_preset("igpt-tiny", resolution=8, n_layer=2, d_model=32, n_head=2)
    save_consolidated(tmp_path / "export", cfg, full_state_dict(IGPTModel(cfg, seed=0)), palette=palette)
    for split, n, seed in (("train", 90, 0), ("test", 45, 1)):
        images, labels = synthetic_images(n, seed)
        np.savez(tmp_path / f"{split}.npz", images=images, labels=labels)
    env = dict(cluster.env, IGPT_ROOT=str(repo), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               CHECKPOINT=str(tmp_path / "export"), DATA=str(tmp_path / "train.npz"),
               TEST_DATA=str(tmp_path / "test.npz"), TEST_SPLIT="train", NAME="tiny", PYTHON=sys.executable,
               EXTRACT_SBATCH_ARGS=f"--ntasks-per-node={RANKS} --gpus-per-node={RANKS} --cpus-per-task=1",
               PROBE_SBATCH_ARGS="--cpus-per-task=1",
               EXTRACT_ARGS="--no-progress --num-workers 0 --threads 1 --batch-size 16",
               PROBE_ARGS="--c-grid 0.1,1")
    r = cluster.run("bash", "slurm/features_chain.sh", env=env, cwd=str(repo), timeout=60)
    jobs = [int(j) for j in re.findall(r"-> \S+: job (\d+)", r.stdout)]
    assert len(jobs) == 5, r.stdout + r.stderr
    probe = repo / "probes" / "tiny.json"
    try:
        cluster.wait(lambda: all(cluster.state(j) in FINISHED for j in jobs), 4 * START,
                     "the chain's five jobs to finish\n" + "\n".join(
                         f"{p.name}: {text(p)[-1500:]}" for p in sorted((repo / "logs").glob("*"))))
    finally:
        for j in jobs:
            kill_job(cluster, j)
    logs = "\n".join(f"{p.name}: {text(p)[-1500:]}" for p in sorted((repo / "logs").glob("*")))
    states = [cluster.state(j) for j in jobs]  # records are kept MinJobAge=120 s after the end
    assert states == ["COMPLETED"] * 5, (states, logs)
    assert len(list((repo / "logs").glob("*.out"))) == 5, logs  # each a real job with its own log
    feats = sorted(p.name for p in (repo / "features").iterdir())
    assert "tiny-train.npz" in feats and "tiny-test.npz" in feats, (feats, logs)
    result = json.loads(probe.read_text())
    assert result["best_layer"] in (0, 1, 2), result

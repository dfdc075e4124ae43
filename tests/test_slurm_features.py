"""The feature chain and the LR search against stub Slurm commands (no Slurm here).

The stubs (``sbatch``, ``srun``, ``scontrol``, ``scancel`` on PATH, one Python file) record their
arguments and run the jobs locally with real bash: ``sbatch`` runs a script (or ``--wrap``) at
once and refuses a ``--dependency=afterok`` on a job that did not succeed; ``srun`` starts
``--ntasks`` copies with ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS``. In ``lr`` mode
``sbatch`` only records the submission (and writes the run's metrics) and ``scontrol show job``
plays back the states listed in ``STATE_DIR/<job>.states``.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from testdata import synthetic_images

from igpt_ds.checkpoint.consolidated import save_consolidated
from igpt_ds.config import get_preset
from igpt_ds.evaluate import features as F
from igpt_ds.model.transformer import IGPTModel
from igpt_ds.parallel.weights import full_state_dict

ROOT = Path(__file__).resolve().parents[1]

STUB = r'''
import json, os, subprocess, sys
from pathlib import Path

name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
state = Path(os.environ["STUB_STATE"])
state.mkdir(exist_ok=True)
keep = ("CHECKPOINT", "DATA", "SHARDS", "SPLIT", "OUT", "TRAIN", "TEST", "LAYERS", "LR", "SAVE", "TRAIN_STEPS")
with open(state / "calls.jsonl", "a") as f:
    f.write(json.dumps({"cmd": name, "args": args, "env": {k: os.environ[k] for k in keep if k in os.environ}}) + "\n")

def option(prefix):
    return next((a[len(prefix):] for a in args if a.startswith(prefix)), None)

if name == "sbatch":
    counter = state / "counter"
    job = str(int(counter.read_text()) + 1 if counter.exists() else 1)
    counter.write_text(job)
    if os.environ.get("STUB_MODE") == "lr":
        save = Path(os.environ["SAVE"])
        loss = 2.5 + abs(float(os.environ["LR"]) - 3e-3) * 100
        (save / "metrics.jsonl").write_text(json.dumps({"step": 10, "val_loss": loss}) + "\n")
        states = state / f"{job}.states"
        if not states.exists():
            states.write_text(os.environ.get("STUB_STATES", "RUNNING\nCOMPLETED").replace(",", "\n"))
        print(job)
        sys.exit(0)
    dep = option("--dependency=")
    if dep:
        for d in dep.split(":")[1:]:
            if not (state / f"{d}.ok").exists():
                sys.exit(f"sbatch: dependency {dep}: job {d} did not succeed")
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 1
    wrap = option("--wrap=")
    env = dict(os.environ, SLURM_JOB_ID=job, SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1",
               SLURM_GPUS_PER_NODE=os.environ.get("STUB_GPUS", "2"), SLURM_SUBMIT_DIR=os.getcwd())
    cmd = ["sh", "-c", wrap] if wrap else ["bash", *args[i:]]
    with open(state / f"job{job}.log", "w") as log:
        rc = subprocess.call(cmd, env=env, cwd=option("--chdir=") or os.getcwd(), stdout=log, stderr=subprocess.STDOUT)
    (state / (f"{job}.ok" if rc == 0 else f"{job}.failed")).write_text(str(rc))
    print(job)
elif name == "srun":
    n = int(option("--ntasks="))
    i = 0
    while args[i].startswith("-"):
        i += 1
    procs = [subprocess.Popen(args[i:], env=dict(os.environ, SLURM_PROCID=str(r), SLURM_LOCALID=str(r),
                                                  SLURM_NTASKS=str(n))) for r in range(n)]
    (state / "steps.pids").write_text(" ".join(str(p.pid) for p in procs))
    sys.exit(max(p.wait() for p in procs))
elif name == "scontrol":
    if args[:2] == ["show", "hostnames"]:
        print(args[2])
    elif args[:2] == ["show", "job"]:
        job = args[-1]
        f = state / f"{job}.states"
        if not f.exists():
            sys.exit(f"slurm_load_jobs error: Invalid job id specified")
        states = f.read_text().split()
        if len(states) > 1:
            f.write_text("\n".join(states[1:]))
        reason = "Resources" if states[0] == "PENDING" else "None"
        print(f"JobId={job} JobName=x JobState={states[0]} Reason={reason} Dependency=(null)")
elif name == "scancel":
    sig = option("--signal=")
    if sig:  # without --batch: every task of the job's steps, as Slurm does
        import signal
        for pid in (state / "steps.pids").read_text().split():
            try:
                os.kill(int(pid), getattr(signal, "SIG" + sig))
            except ProcessLookupError:
                pass
    else:
        (state / f"{args[-1]}.states").write_text("CANCELLED")
'''


def make_stubs(tmp_path: Path) -> dict:
    """A bin directory of stub Slurm commands (and ``python`` = this interpreter); the environment to use."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "slurm_stub.py"
    stub.write_text(f"#!{sys.executable}\n{STUB}")
    stub.chmod(0o755)
    for name in ("sbatch", "srun", "scontrol", "scancel"):
        (bin_dir / name).symlink_to(stub)
    (bin_dir / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "IGPT_"))}
    for k in ("DATA", "SHARDS", "OUT", "TRAIN", "TEST", "CHECKPOINT", "SPLIT", "LAYERS", "DRY_RUN"):
        env.pop(k, None)
    env.update(PATH=f"{bin_dir}:{env['PATH']}", STUB_STATE=str(tmp_path / "slurm_state"), OMP_NUM_THREADS="1")
    return env


def calls(env) -> list:
    path = Path(env["STUB_STATE"]) / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sandbox(tmp_path: Path) -> Path:
    """A repository root of links (igpt_ds, tools, slurm): the jobs write features/, probes/, logs/ there."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("igpt_ds", "tools", "slurm"):
        (root / name).symlink_to(ROOT / name)
    return root



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny consolidated export with a palette, and a train/test image set (.npz)."""
    tmp = tmp_path_factory.mktemp("tiny")
    palette = np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)
    cfg = get_preset("igpt-tiny", resolution=8, n_layer=2, d_model=32, n_head=2)
    save_consolidated(tmp / "export", cfg, full_state_dict(IGPTModel(cfg, seed=0)), palette=palette)
    for split, n, seed in (("train", 90, 0), ("test", 45, 1)):
        images, labels = synthetic_images(n, seed)
        np.savez(tmp / f"{split}.npz", images=images, labels=labels)
    return {"tmp": tmp, "palette": palette, "export": tmp / "export"}


def run(cmd, env, cwd, timeout=600):
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return r


TOOL_ARGS = "--no-progress --num-workers 0 --threads 1 --batch-size 16"


def test_chain_shards_and_images_to_probe_json(tiny, tmp_path):
    """features_chain.sh: extract (train from a shard directory, test from an .npz; 2 slices each) ->
    merge -> probe, the dependencies as submitted, and the documented file names."""
    from igpt_ds.data.shards import BuildSettings, build_shards
    from igpt_ds.data.sources import open_source

    root = sandbox(tmp_path)
    build_shards(open_source(str(tiny["tmp"] / "train.npz"), "train"), str(root / "shards" / "tiny"),
                 tiny["palette"], BuildSettings(resolution=8, shard_size=40), progress=False, log=lambda s: None)
    env = make_stubs(tmp_path)
    env.update(CHECKPOINT=str(tiny["export"]), DATA="shards/tiny", TEST_DATA=str(tiny["tmp"] / "test.npz"),
               TEST_SPLIT="train", NAME="tiny", LAYERS="all", EXTRACT_ARGS=TOOL_ARGS, PROBE_ARGS="--c-grid 0.1,1",
               IGPT_ROOT=str(root))
    r = run(["bash", "slurm/features_chain.sh", "--account=lab"], env, root)
    state = Path(env["STUB_STATE"])
    logs = "\n".join(f"{p.name}: {p.read_text()[-2000:]}" for p in sorted(state.glob("job*.log")))
    assert r.returncode == 0, r.stdout + r.stderr + logs
    assert not list(state.glob("*.failed")), logs

    feats = sorted(p.name for p in (root / "features").iterdir() if not p.name.startswith("."))
    assert feats == ["tiny-test.npz", "tiny-test.part00000-of-00002.npz", "tiny-test.part00001-of-00002.npz",
                     "tiny-train.npz", "tiny-train.part00000-of-00002.npz", "tiny-train.part00001-of-00002.npz"]
    # The job's progress marker for common.sh's requeue rule: the last slice a task finished.
    assert "tiny-train.part0000" in (root / "features" / ".tiny-train.progress" / "latest").read_text()
    with F.FeatureFile(root / "features" / "tiny-train.npz") as f:
        assert f.num_rows == 90 and f.layers == [0, 1, 2] and f.meta["merged_from"] == 2
        assert "shards" in f.meta["source"]  # the shard directory was read as shards, not as images
        np.testing.assert_array_equal(f.index(), np.arange(90))
    with F.FeatureFile(root / "features" / "tiny-test.npz") as f:
        assert f.num_rows == 45 and f.meta["source"]["data"] == str(tiny["tmp"] / "test.npz")
    probe = json.loads((root / "probes" / "tiny.json").read_text())
    assert probe["best_layer"] in (0, 1, 2)
    assert (root / "probes" / "tiny.png").is_file()

    # What was submitted: 5 jobs, each depending on the ones it needs; the options for every job.
    subs = [c for c in calls(env) if c["cmd"] == "sbatch"]
    assert len(subs) == 5 and all("--account=lab" in c["args"] and "--parsable" in c["args"] for c in subs)
    ext_train, merge_train, ext_test, merge_test, probe_job = subs
    assert ext_train["args"][-len(TOOL_ARGS.split()) - 1] == "slurm/extract_features.sbatch"
    assert ext_train["env"]["OUT"] == "features/tiny-train.npz" and ext_train["env"]["DATA"] == "shards/tiny"
    assert ext_test["env"]["OUT"] == "features/tiny-test.npz"
    assert "--dependency=afterok:1" in merge_train["args"] and "--dependency=afterok:3" in merge_test["args"]
    assert any(a.startswith("--wrap=") and "merge features/tiny-train.npz" in a for a in merge_train["args"])
    assert "--dependency=afterok:2:4" in probe_job["args"] and "--kill-on-invalid-dep=yes" in probe_job["args"]
    assert probe_job["env"]["TRAIN"] == "features/tiny-train.npz"
    assert probe_job["env"]["TEST"] == "features/tiny-test.npz" and probe_job["env"]["OUT"] == "probes/tiny.json"
    # Each extraction task got its slice and the documented --out (the tool names the slice file).
    srun = [c for c in calls(env) if c["cmd"] == "srun" and "tools/extract_features.py" in c["args"]]
    assert len(srun) == 2
    for c in srun:
        a = c["args"]
        assert a[a.index("--shard-index") + 1] == "{rank}" and a[a.index("--out") + 1].endswith(".npz")
        assert ".part" not in a[a.index("--out") + 1] and ".shard" not in a[a.index("--out") + 1]


def test_chain_dry_run_submits_nothing(tmp_path):
    env = make_stubs(tmp_path)
    env.update(DRY_RUN="1", CHECKPOINT="runs/igpt-s/export", DATA="cifar-10-batches-py", NAME="cifar10",
               EXTRACT_SBATCH_ARGS="--nodes=2", IGPT_ROOT=str(ROOT))
    r = run(["bash", "slurm/features_chain.sh"], env, ROOT)
    assert r.returncode == 0, r.stderr
    assert calls(env) == []
    lines = [line for line in r.stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 5
    assert "OUT=features/cifar10-train.npz" in lines[0] and "--nodes=2 slurm/extract_features.sbatch" in lines[0]
    assert "--dependency=afterok:\\<merge-train\\>:\\<merge-test\\>" in lines[4]


def test_chain_refuses_missing_variables(tmp_path):
    env = make_stubs(tmp_path)
    env.update(IGPT_ROOT=str(ROOT), DATA="x")
    r = run(["bash", "slurm/features_chain.sh"], env, ROOT)
    assert r.returncode != 0 and "CHECKPOINT unset" in r.stderr and calls(env) == []


def test_extraction_shard_directory_and_split_subdirectory_dry_run(tmp_path):
    """DATA=shards/x reads shards (--shards), also DATA/<SPLIT>/dataset.json; other paths are images."""
    (tmp_path / "s" / "test").mkdir(parents=True)
    (tmp_path / "s" / "test" / "dataset.json").write_text("{}")
    env = make_stubs(tmp_path)
    env.update(DRY_RUN="1", IGPT_ROOT=str(ROOT), SLURM_JOB_NODELIST="node01", SLURM_NNODES="1",
               SLURM_GPUS_PER_NODE="2", CHECKPOINT="ckpt")
    for data, split, want in ((str(tmp_path / "s"), "test", f"--shards {tmp_path}/s/test --layers"),
                              ("cifar-10-batches-py", "test", "--data cifar-10-batches-py --split test --layers")):
        r = run(["bash", "slurm/extract_features.sbatch"], {**env, "DATA": data, "SPLIT": split}, ROOT)
        assert r.returncode == 0, r.stderr
        ranks = [line for line in r.stdout.splitlines() if line.startswith("node ")]
        assert len(ranks) == 2 and all(want in line for line in ranks), r.stdout
        assert all("--out features/" in line and f"-{split}.npz" in line for line in ranks)
        assert "merge features/" in r.stdout
    r = run(["bash", "slurm/extract_features.sbatch"], {**env, "DATA": "d", "OUT": "x.h5"}, ROOT)
    assert r.returncode != 0 and "OUT=x.h5" in r.stderr and ".npz" in r.stderr


def test_probe_names_the_missing_merge(tmp_path):
    root = sandbox(tmp_path)
    (root / "features").mkdir()
    (root / "features" / "c-train.part00000-of-00002.npz").write_bytes(b"")
    env = make_stubs(tmp_path)
    env.update(IGPT_ROOT=str(root), SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1",
               TRAIN="features/c-train.npz", TEST="features/c-test.npz")
    r = run(["bash", "slurm/linear_probe.sbatch"], env, root)
    assert r.returncode != 0
    assert "merge them first: python tools/extract_features.py merge features/c-train.npz" in r.stderr


def test_restarted_extraction_keeps_the_finished_slice(tiny, tmp_path):
    """Slice 0 finished before (a job that was stopped): the resubmitted job keeps it, extracts slice 1;
    a slice from other settings, or a damaged one, is extracted again."""
    root = sandbox(tmp_path)
    env = make_stubs(tmp_path)
    out = root / "features" / "t-train.npz"
    tool = [sys.executable, str(ROOT / "tools" / "extract_features.py"), "--checkpoint", str(tiny["export"]),
            "--data", str(tiny["tmp"] / "train.npz"), "--layers", "all", *TOOL_ARGS.split()]
    r = run([*tool, "--shard-index", "0", "--num-shards", "2", "--out", str(out)], env, root)
    assert r.returncode == 0, r.stderr
    part0, part1 = F.part_path(out, 0, 2), F.part_path(out, 1, 2)
    before = os.stat(part0)
    assert not part1.exists()

    job = {**env, "IGPT_ROOT": str(root), "CHECKPOINT": str(tiny["export"]), "DATA": str(tiny["tmp"] / "train.npz"),
           "SPLIT": "train", "OUT": "features/t-train.npz", "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1",
           "SLURM_GPUS_PER_NODE": "2", "SLURM_JOB_ID": "7"}
    r = run(["bash", "slurm/extract_features.sbatch", *TOOL_ARGS.split()], job, root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kept features/t-train.part00000-of-00002.npz" in r.stdout
    after = os.stat(part0)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert part1.is_file()
    assert run([sys.executable, str(ROOT / "tools" / "extract_features.py"), "merge", str(out)], env,
               root).returncode == 0
    with F.FeatureFile(out) as f:
        assert f.num_rows == 90 and f.meta["merged_from"] == 2

    # Other settings (layers) -> extracted again, with the reason.
    r = run([*tool, "--shard-index", "0", "--num-shards", "2", "--out", str(out), "--layers", "1"], env, root)
    assert r.returncode == 0 and "differs in: layers" in r.stdout, r.stdout + r.stderr
    with F.FeatureFile(part0) as f:
        assert f.layers == [1]
    # A damaged file (not a zip) -> extracted again.
    part1.write_bytes(b"garbage")
    r = run([*tool, "--shard-index", "1", "--num-shards", "2", "--out", str(out)], env, root)
    assert r.returncode == 0 and "not a valid feature file" in r.stdout, r.stdout + r.stderr
    with F.FeatureFile(part1) as f:
        assert f.num_rows == 45
    # --overwrite extracts even a matching slice.
    r = run([*tool, "--shard-index", "1", "--num-shards", "2", "--out", str(out), "--overwrite"], env, root)
    assert r.returncode == 0 and "kept" not in r.stdout


def test_time_limit_signal_requeues_the_extraction_and_the_requeued_job_finishes(tiny, tmp_path):
    """SIGUSR1 to the batch shell (the time-limit warning) while the tasks run: every task stops
    without writing, exits 0, the script requeues the job; the requeued run extracts every slice."""
    import time

    images, labels = synthetic_images(6000, 2)
    np.savez(tmp_path / "big.npz", images=images, labels=labels)
    root = sandbox(tmp_path)
    env = make_stubs(tmp_path)
    job = {**env, "IGPT_ROOT": str(root), "CHECKPOINT": str(tiny["export"]), "DATA": str(tmp_path / "big.npz"),
           "OUT": "features/big.npz", "LAYERS": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1",
           "SLURM_GPUS_PER_NODE": "2", "SLURM_JOB_ID": "9"}
    argv = ["bash", "slurm/extract_features.sbatch", "--no-progress", "--num-workers", "0", "--threads", "1",
            "--batch-size", "1"]
    proc = subprocess.Popen(argv, env=job, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids = Path(env["STUB_STATE"]) / "steps.pids"
    deadline = time.time() + 60
    while not pids.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(2)  # the tasks are past Python's start-up (their handlers installed), not yet done
    proc.send_signal(signal.SIGUSR1)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    assert log.count("stopped by SIGUSR1") == 2, log
    assert [c["args"] for c in calls(env) if c["cmd"] == "scontrol" and c["args"][:1] == ["requeue"]] == \
        [["requeue", "9"]], log
    assert [p.name for p in (root / "features").iterdir()] == [".big.progress"], log  # nothing half-written

    pids.unlink()
    r = run(argv, {**job, "SLURM_RESTART_COUNT": "1"}, root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in (root / "features").iterdir() if not p.name.startswith(".")) == \
        ["big.part00000-of-00002.npz", "big.part00001-of-00002.npz"]


def test_signal_stops_extraction_cleanly_and_a_rerun_finishes(tiny, tmp_path, monkeypatch):
    """SIGTERM during extraction: exit 0, no output and no temporary files; the same command then finishes."""
    import importlib.util

    from igpt_ds.parallel import signals

    spec = importlib.util.spec_from_file_location("tool_extract_features_sig", ROOT / "tools" / "extract_features.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    real = F.batch_features

    def signalled_after_first_batch(*a, **k):
        monkeypatch.setattr(signals, "_received", signal.SIGTERM)  # as _record would after a kill
        return real(*a, **k)

    monkeypatch.setattr(F, "batch_features", signalled_after_first_batch)
    out = tmp_path / "f" / "x.npz"
    argv = ["--checkpoint", str(tiny["export"]), "--data", str(tiny["tmp"] / "train.npz"), "--out", str(out),
            "--shard-index", "1", "--num-shards", "2", *TOOL_ARGS.split()]
    assert tool.main(argv) == 0
    assert list((tmp_path / "f").iterdir()) == []
    monkeypatch.setattr(signals, "_received", None)
    monkeypatch.setattr(F, "batch_features", real)
    assert tool.main(argv) == 0
    with F.FeatureFile(F.part_path(out, 1, 2)) as f:
        assert f.num_rows == 45


def test_merge_of_a_single_task_extraction_and_of_mixed_slice_counts(tiny, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tool_extract_features_merge", ROOT / "tools" / "extract_features.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    common = ["--checkpoint", str(tiny["export"]), "--data", str(tiny["tmp"] / "test.npz"), "--layers", "1",
              *TOOL_ARGS.split()]
    whole = tmp_path / "whole.npz"
    assert tool.main([*common, "--out", str(whole)]) == 0
    assert tool.main(["merge", str(whole)]) == 0  # one task wrote OUT itself: nothing to merge
    mixed = tmp_path / "mixed.npz"
    assert tool.main([*common, "--out", str(mixed), "--shard-index", "0", "--num-shards", "2"]) == 0
    assert tool.main([*common, "--out", str(mixed), "--shard-index", "0", "--num-shards", "3"]) == 0
    assert tool.main(["merge", str(mixed)]) == 2
    assert not mixed.exists()


# ----------------------------------------------------------------------------- lr search

def lr_search(env, *argv, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "slurm" / "lr_search.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_lr_search_forwards_sbatch_args_and_follows_a_requeued_job(tmp_path):
    env = make_stubs(tmp_path)
    # Job 1 is requeued once (preemption) before it completes; the driver waits for the real end.
    env.update(STUB_MODE="lr", STUB_STATES="PENDING,RUNNING,REQUEUED,PENDING,RUNNING,COMPLETED")
    out = tmp_path / "search"
    argv = ["--script", "slurm/pretrain_s.sbatch", "--rates", "1e-2", "3e-3", "1e-3", "--out", str(out),
            "--sbatch-args=--partition=debug --gres=gpu:2 --time=00:30:00", "--poll-interval", "0.01",
            "--job-timeout", "60", "--train-steps", "50"]
    r = lr_search(env, *argv)
    assert r.returncode == 0, r.stdout + r.stderr
    subs = [c for c in calls(env) if c["cmd"] == "sbatch"]
    assert len(subs) == 3
    for c, lr in zip(subs, ("0.01", "0.003", "0.001")):
        assert c["args"] == ["--parsable", f"--job-name=lr-{lr}", "--partition=debug", "--gres=gpu:2",
                             "--time=00:30:00", "slurm/pretrain_s.sbatch"]
        assert c["env"]["LR"] == lr and c["env"]["TRAIN_STEPS"] == "50"
    assert "job 1: REQUEUED" in r.stdout and "--wait" not in json.dumps(subs)
    result = json.loads((out / "lr_search.json").read_text())
    assert result["best_lr"] == 3e-3 and result["stopped"] is None
    # The driver restarted: finished runs are reused, nothing is submitted again.
    r = lr_search(env, *argv)
    assert r.returncode == 0 and "reusing" in r.stdout, r.stdout + r.stderr
    assert len([c for c in calls(env) if c["cmd"] == "sbatch"]) == 3


def test_lr_search_times_out_a_job_that_never_starts(tmp_path):
    env = make_stubs(tmp_path)
    env.update(STUB_MODE="lr", STUB_STATES="PENDING")  # unschedulable: pending forever
    out = tmp_path / "search"
    r = lr_search(env, "--script", "slurm/pretrain_s.sbatch", "--rates", "1e-2", "3e-3", "--out", str(out),
                  "--sbatch-args=--gres=gpu:99", "--poll-interval", "0.05", "--job-timeout", "1", timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "job 1 still PENDING (Resources)" in r.stderr and "--job-timeout" in r.stderr
    assert [c["args"] for c in calls(env) if c["cmd"] == "scancel"] == [["1"]]  # not left in the queue
    assert len([c for c in calls(env) if c["cmd"] == "sbatch"]) == 1  # the search stopped there
    result = json.loads((out / "lr_search.json").read_text())
    assert result["runs"] == [] and "PENDING" in result["stopped"]


def test_lr_search_command_timeout(tmp_path):
    r = lr_search(dict(os.environ), "--command", f"{sys.executable} -c 'import time; time.sleep(30)'",
                  "--rates", "1e-2", "--out", str(tmp_path / "s"), "--job-timeout", "1", timeout=60)
    assert r.returncode == 3 and "still running after 1 s" in r.stderr, r.stdout + r.stderr

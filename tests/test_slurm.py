"""slurm/: syntax and shellcheck of every script, the dry run's ranks, the lr-search decision."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from igpt_ds.parallel.layout import ParallelLayout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(ROOT, "slurm")
SCRIPTS = sorted(f for f in os.listdir(SLURM) if f.endswith((".sh", ".sbatch")))
sys.path.insert(0, SLURM)
import hostlist  # noqa: E402
import lr_search  # noqa: E402


def dry_run(script, env=None, args=()):
    """Run a script with DRY_RUN=1 and fake Slurm variables, no Slurm installed (PATH without scontrol)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    e.update(DRY_RUN="1", IGPT_ROOT=ROOT, SLURM_JOB_NODELIST="node[01-02]", SLURM_NNODES="2",
             SLURM_GPUS_PER_NODE="8", SLURM_JOB_ID="4242", TRAIN_DATA="shards/train-{000..015}.tar",
             SAVE="/nonexistent/run", PATH="/usr/bin:/bin")
    e.update(env or {})
    return subprocess.run(["bash", os.path.join(SLURM, script), *args], env=e, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_every_script_present():
    assert {"common.sh", "task.sh", "pretrain_s.sbatch", "pretrain_m.sbatch", "pretrain_l.sbatch",
            "pretrain_xl.sbatch", "extract_features.sbatch", "linear_probe.sbatch"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", os.path.join(SLURM, script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (apt-get install -y shellcheck)")
def test_shellcheck():
    r = subprocess.run(["shellcheck", "-x", *[os.path.join("slurm", s) for s in SCRIPTS]],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


RANK_LINE = re.compile(r"^node (\S+) rank (\d+) local_rank (\d+) dp=(\d+) tp=(\d+) pp=(\d+): (.*)$")


def test_dry_run_two_nodes_tp2_pp2():
    r = dry_run("pretrain_m.sbatch", {"TP": "2", "PP": "2"}, ["--eval-batches", "4"])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "nodes: node01 node02 (2 x 8 GPUs, world size 16)" in out
    assert "master: node01:" in out
    layout = ParallelLayout(16, 2, 2)
    rows = [RANK_LINE.match(line) for line in out.splitlines() if line.startswith("node ")]
    assert len(rows) == 16 and all(rows)
    ranks = []
    for m in rows:
        node, rank, local, dp, tp, pp, cmd = m.groups()
        rank, local = int(rank), int(local)
        ranks.append(rank)
        assert node == f"node0{rank // 8 + 1}" and local == rank % 8
        assert (int(dp), int(tp), int(pp)) == layout.coords(rank)
        env = dict(kv.split("=", 1) for kv in cmd.split()[:5])
        assert env == {"RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": "16",
                       "MASTER_ADDR": "node01", "MASTER_PORT": env["MASTER_PORT"]}
        assert "igpt_ds/pretrain.py --model igpt-m" in cmd
        assert "--tensor-parallel 2 --pipeline-parallel 2" in cmd
        assert "--deepspeed_config ds_configs/zero1_pipe_bf16.json" in cmd  # PP > 1: ZeRO-0/1 config
        assert "--eval-batches 4" in cmd and "--load" not in cmd
    assert ranks == list(range(16))
    assert "--ntasks=16" in out and "--ntasks-per-node=8" in out
    assert "scontrol requeue 4242" in out


def test_dry_run_resumes_from_latest(tmp_path):
    (tmp_path / "latest").write_text("global_step100")
    r = dry_run("pretrain_xl.sbatch", {"SAVE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert f"--load {tmp_path}" in r.stdout and "resuming from" in r.stdout
    assert "--tensor-parallel 8" in r.stdout and "--activation-checkpointing" in r.stdout


def test_dry_run_deepspeed_launcher_hostfile():
    r = dry_run("pretrain_s.sbatch", {"LAUNCHER": "deepspeed", "SLURM_JOB_NODELIST": "gpu[7,9]"})
    assert r.returncode == 0, r.stderr
    assert "gpu7 slots=8" in r.stdout and "gpu9 slots=8" in r.stdout
    assert re.search(r"\+ deepspeed --hostfile \S+ --num_nodes 2 --num_gpus 8 --master_addr gpu7 "
                     r"--master_port \d+ igpt_ds/pretrain.py", r.stdout)


@pytest.mark.parametrize("env, message", [
    ({"TP": "3"}, "world size 16 is not divisible by TP x PP = 3 x 1 = 3"),
    ({"TP": "16", "SLURM_GPUS_PER_NODE": "8", "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_NNODES": "4"},
     "TP=16 is larger than a node"),
    ({"PP": "2", "DS_CONFIG": "CONFIG"}, "ZeRO stage 3 cannot be combined with pipeline parallelism"),
])
def test_dry_run_refuses_bad_layouts(env, message, tmp_path):
    if env.get("DS_CONFIG") == "CONFIG":
        cfg = tmp_path / "z3.json"
        cfg.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
        env = {**env, "DS_CONFIG": str(cfg)}
    r = dry_run("pretrain_m.sbatch", env)
    assert r.returncode != 0 and message in r.stderr, r.stdout + r.stderr


def test_dry_run_feature_extraction_shards():
    r = dry_run("extract_features.sbatch", {"CHECKPOINT": "ckpt", "DATA": "shards/cifar10", "SPLIT": "test",
                                             "OUT": "feats/c10-test.npz"})
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("node ")]
    assert len(lines) == 16
    for i, line in enumerate(lines):
        assert f"--shard-index {i} --num-shards 16" in line
        assert f"--out feats/c10-test.shard{i}-of-16.npz" in line
        assert f"CUDA_VISIBLE_DEVICES={i % 8}" in line
        assert "--split test --layers all" in line


def test_dry_run_probe():
    r = dry_run("linear_probe.sbatch", {"SLURM_JOB_NODELIST": "node01", "SLURM_NNODES": "1",
                                        "TRAIN": "a.npz", "TEST": "b.npz", "OUT": "p.json"})
    assert r.returncode == 0, r.stderr
    assert "tools/linear_probe.py --train a.npz --test b.npz --out p.json" in r.stdout


def test_outside_slurm_without_dry_run_says_how():
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", os.path.join(SLURM, "pretrain_s.sbatch")], env={**e, "IGPT_ROOT": ROOT},
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DRY_RUN=1" in r.stderr


def test_hostlist_expansion():
    assert hostlist.expand("node[01-02]") == ["node01", "node02"]
    assert hostlist.expand("a[8-10],b,c[1,3]") == ["a8", "a9", "a10", "b", "c1", "c3"]
    assert hostlist.expand("n[098-101]") == ["n098", "n099", "n100", "n101"]
    assert hostlist.expand("gpu-a1") == ["gpu-a1"]


# ----------------------------------------------------------------------------- lr search

INF = float("inf")


@pytest.mark.parametrize("history, patience, expected", [
    ([], 1, (False, None)),
    ([(3e-2, INF)], 1, (False, None)),                                # diverged: keep going down
    ([(3e-2, INF), (1e-2, INF), (3e-3, 2.5)], 1, (False, 3e-3)),
    ([(1e-2, 2.6), (3e-3, 2.5)], 1, (False, 3e-3)),                   # still improving
    ([(1e-2, 2.6), (3e-3, 2.5), (1e-3, 2.55)], 1, (True, 3e-3)),     # worse: stop, keep the best
    ([(1e-2, 2.6), (3e-3, 2.5), (1e-3, 2.55)], 2, (False, 3e-3)),    # patience 2 tries one more
    ([(1e-2, 2.6), (3e-3, 2.5), (1e-3, 2.55), (3e-4, 2.7)], 2, (True, 3e-3)),
    ([(1e-2, 2.6), (3e-3, 2.5), (1e-3, 2.5)], 1, (True, 3e-3)),      # equal is not better
    ([(1e-2, 2.5), (3e-3, float("nan"))], 1, (True, 1e-2)),          # a late spike counts as worse
])
def test_lr_search_decision(history, patience, expected):
    assert lr_search.decide(history, patience) == expected


def test_lr_search_min_delta():
    assert lr_search.decide([(1e-2, 2.50), (3e-3, 2.499)], 1, min_delta=0.01) == (True, 1e-2)


def test_lr_search_reads_last_val_loss(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 1, "loss": 6.0}\n{"step": 100, "loss": 3.0, "val_loss": 3.1}\n'
                 '{"step": 200, "loss": 2.9, "val_loss": 2.95}\n{"step": 201, "lo')
    assert lr_search.final_val_loss(str(m)) == 2.95
    assert lr_search.final_val_loss(str(tmp_path / "missing.jsonl")) == INF


def test_lr_search_end_to_end_with_fake_runs(tmp_path):
    """A fake trainer whose loss is best at 3e-3: the driver stops after 1e-3 and picks 3e-3."""
    fake = tmp_path / "fake_train.py"
    fake.write_text(
        "import json, math, sys\n"
        "lr, save = float(sys.argv[1]), sys.argv[2]\n"
        "loss = float('nan') if lr > 0.02 else 2.5 + abs(math.log10(lr / 3e-3))\n"
        "open(save + '/metrics.jsonl', 'w').write(json.dumps({'step': 10, 'val_loss': loss}) + '\\n')\n")
    out = tmp_path / "search"
    r = subprocess.run([sys.executable, os.path.join(SLURM, "lr_search.py"), "--command",
                        f"{sys.executable} {fake} {{lr}} {{save}}", "--out", str(out),
                        "--rates", "3e-2", "1e-2", "3e-3", "1e-3", "3e-4", "1e-4"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((out / "lr_search.json").read_text())
    assert result["best_lr"] == 3e-3
    assert [run["lr"] for run in result["runs"]] == [3e-2, 1e-2, 3e-3, 1e-3]
    assert result["runs"][0]["val_loss"] is None

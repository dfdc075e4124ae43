"""slurm/: syntax and shellcheck of every script, the dry run's ranks, bad input, the requeue rule
(real bash, real signals, stub Slurm commands), the lr-search decision."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

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
    # the planner's top XL layout (tests/test_plan.py): TP 8, no activation checkpointing
    assert "--tensor-parallel 8" in r.stdout and "--activation-checkpointing" not in r.stdout


def test_dry_run_deepspeed_launcher_hostfile():
    r = dry_run("pretrain_s.sbatch", {"LAUNCHER": "deepspeed", "SLURM_JOB_NODELIST": "gpu[7,9]"})
    assert r.returncode == 0, r.stderr
    assert "gpu7 slots=8" in r.stdout and "gpu9 slots=8" in r.stdout
    assert re.search(r"\+ deepspeed --hostfile \S+ --num_nodes 2 --num_gpus 8 --master_addr gpu7 "
                     r"--master_port \d+ igpt_ds/pretrain.py", r.stdout)


@pytest.mark.parametrize("env, message", [
    ({"TP": "3"}, "world size 16 is not divisible by TP x PP = 3 x 1 = 3"),
    ({"TP": "16", "SLURM_GPUS_PER_NODE": "8", "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_NNODES": "4"},
     "TP=16 is larger than a node (GPUS_PER_NODE=8): tensor parallelism needs NVLink inside a node; set TP <= 8"),
    # one node: 16 does not divide 8 either, but the message must be about TP, not the node count
    ({"TP": "16", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1"}, "TP=16 is larger than a node (GPUS_PER_NODE=8)"),
    ({"PP": "2", "DS_CONFIG": "CONFIG"}, "ZeRO stage 3 cannot be combined with pipeline parallelism"),
    # sbatch --gpus-per-node=0 (a CPU run) without GPUS_PER_NODE: world size 0 before
    ({"SLURM_GPUS_PER_NODE": "0"}, "SLURM_GPUS_PER_NODE (sbatch --gpus-per-node) gives 0 GPUs per node, "
                                   "so no rank could start: set GPUS_PER_NODE=<ranks per node>"),
    ({"GPUS_PER_NODE": "none"}, "GPUS_PER_NODE gives none GPUs per node"),
    ({"MODEL": "igpt-tiny"}, "DS_CONFIG is unset and MODEL=igpt-tiny has no preset config ds_configs/igpt-tiny.json: "
                             "set DS_CONFIG=ds_configs/<name>.json"),
    ({"DS_CONFIG": "ds_configs/nope.json"}, "DS_CONFIG=ds_configs/nope.json not found"),
    ({"SAVE": "runs/x-{task}"}, "SAVE=runs/x-{task} has {task} but this is no array job"),
])
def test_dry_run_refuses_bad_input(env, message, tmp_path):
    if env.get("DS_CONFIG") == "CONFIG":
        cfg = tmp_path / "z3.json"
        cfg.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
        env = {**env, "DS_CONFIG": str(cfg)}
    r = dry_run("pretrain_m.sbatch", env)
    assert r.returncode != 0 and message in r.stderr, r.stdout + r.stderr
    # one line that names the variable and the fix, and nothing launched
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert "srun" not in r.stdout and not RANK_LINE.search(r.stdout)


def test_array_tasks_get_their_own_save(tmp_path):
    (tmp_path / "run-3").mkdir()
    (tmp_path / "run-3" / "latest").write_text("global_step7")
    for save, expected in [(f"{tmp_path}/run", f"{tmp_path}/run-3"), (f"{tmp_path}/run/", f"{tmp_path}/run-3"),
                           (f"{tmp_path}/run-{{task}}/ckpt", f"{tmp_path}/run-3/ckpt")]:
        r = dry_run("pretrain_s.sbatch", {"SAVE": save, "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_JOB_ID": "4240",
                                          "SLURM_JOB_NODELIST": "node01", "SLURM_NNODES": "1"})
        assert r.returncode == 0, r.stderr
        assert f"array task 3 of job 4240: SAVE={expected}" in r.stdout
        rows = [line for line in r.stdout.splitlines() if RANK_LINE.match(line)]
        assert len(rows) == 8 and all(f"--save {expected} " in row for row in rows)
        # resume looks in the task's own SAVE
        assert all((f"--load {expected}" in row) == expected.endswith("run-3") for row in rows)
    r = dry_run("pretrain_s.sbatch", {"SAVE": f"{tmp_path}/run", "SLURM_JOB_NODELIST": "node01", "SLURM_NNODES": "1"})
    assert f"--save {tmp_path}/run " in r.stdout and "array task" not in r.stdout


def test_dry_run_feature_extraction_shards():
    r = dry_run("extract_features.sbatch", {"CHECKPOINT": "ckpt", "DATA": "shards/cifar10", "SPLIT": "test",
                                             "OUT": "feats/c10-test.npz"})
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("node ")]
    assert len(lines) == 16
    for i, line in enumerate(lines):
        assert f"--shard-index {i} --num-shards 16" in line
        # every task names OUT itself; the tool adds its slice's .partNNNNN-of-NNNNN (issue 19)
        assert "--out feats/c10-test.npz" in line and ".shard" not in line
        assert f"CUDA_VISIBLE_DEVICES={i % 8}" in line
        assert "--split test --layers auto" in line


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


# ----------------------------------------------------------------------------- signals and requeue
#
# The batch script for real: bash runs slurm/pretrain_s.sbatch with stub scontrol/scancel/srun on
# PATH. srun starts a fake trainer that waits for SIGUSR1/SIGTERM, then "saves" (writes SAVE/latest
# when FAKE_SAVE_TAG is set) and exits FAKE_RC; scancel delivers its signal to that trainer. The test
# sends the batch shell the signal Slurm would send, and reads which Slurm commands the script ran.

STUBS = {
    "scontrol": """#!/bin/bash
echo "scontrol $*" >>"$STUB_DIR/log"
case "$1" in
  show)
    if [[ "$2" == hostnames ]]; then echo node01; exit 0; fi
    echo "JobId=$SLURM_JOB_ID JobName=igpt-s JobState=RUNNING Reason=None Requeue=1 Restarts=0" \\
      "RunTime=00:00:01 TimeLimit=${STUB_TIME_LIMIT:-2-00:00:00} TimeMin=N/A" \\
      "PreemptEligibleTime=2026-12-01T10:00:00 PreemptTime=${STUB_PREEMPT_TIME:-None} SuspendTime=None" ;;
  requeue) exit "${STUB_REQUEUE_RC:-0}" ;;
esac
""",
    "scancel": """#!/bin/bash
echo "scancel $*" >>"$STUB_DIR/log"
sig=KILL
for a in "$@"; do case "$a" in --signal=*) sig="${a#--signal=}" ;; esac; done
kill -s "$sig" "$(cat "$STUB_DIR/trainer.pid")"
""",
    "srun": """#!/bin/bash
echo "srun $*" >>"$STUB_DIR/log"
exec bash "$STUB_DIR/trainer.sh"
""",
    "trainer.sh": """echo $$ >"$STUB_DIR/trainer.pid"
got=""
trap 'got=1' USR1 TERM
: >"$STUB_DIR/started"
while [[ -z "$got" ]]; do sleep 0.05; done
echo "trainer: signalled" >>"$STUB_DIR/log"
if [[ -n "${FAKE_SAVE_TAG:-}" ]]; then echo "$FAKE_SAVE_TAG" >"$SAVE/latest"; fi
exit "${FAKE_RC:-0}"
""",
}


@pytest.fixture
def job(tmp_path):
    """run(signal, **env) -> (exit status, stdout + stderr, log lines): one job, signalled once started."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    save = tmp_path / "run"

    def run(sig, delay=0.0, timeout=30, **env):
        for f in ("log", "started", "trainer.pid"):
            (stubs / f).unlink(missing_ok=True)
        e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
        e.update(IGPT_ROOT=ROOT, STUB_DIR=str(stubs), PATH=f"{stubs}:/usr/bin:/bin", SLURM_JOB_ID="77",
                 SLURM_JOB_NODELIST="node01", SLURM_NNODES="1", SLURM_GPUS_PER_NODE="2",
                 TRAIN_DATA="shards/train-000.tar", SAVE=str(save))
        e.update(env)
        p = subprocess.Popen(["bash", os.path.join(SLURM, "pretrain_s.sbatch")], env=e, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.time() + timeout
            while not (stubs / "started").exists():
                assert p.poll() is None and time.time() < deadline, p.communicate()[0]
                time.sleep(0.05)
            time.sleep(delay)
            p.send_signal(sig)
            out, _ = p.communicate(timeout=timeout)
        finally:
            if p.poll() is None:
                p.kill()
        log = (stubs / "log").read_text().splitlines()
        return p.returncode, out, log

    run.save = save
    return run


@pytest.mark.parametrize("env, variable", [
    ({"SLURM_GPUS_PER_NODE": "0"}, "GPUS_PER_NODE"),
    ({"TP": "4"}, "TP=4"),
    ({"MODEL": "igpt-tiny"}, "DS_CONFIG"),
])
def test_bad_input_in_a_real_job_launches_nothing(env, variable, tmp_path):
    """Not a dry run: the batch script with stub Slurm commands stops before srun, in one line."""
    for name, text in STUBS.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    e.update(IGPT_ROOT=ROOT, STUB_DIR=str(tmp_path), PATH=f"{tmp_path}:/usr/bin:/bin", SLURM_JOB_ID="77",
             SLURM_JOB_NODELIST="node01", SLURM_NNODES="1", SLURM_GPUS_PER_NODE="2",
             TRAIN_DATA="shards/train-000.tar", SAVE=str(tmp_path / "run"))
    e.update(env)
    r = subprocess.run(["bash", os.path.join(SLURM, "pretrain_s.sbatch")], env=e, cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and variable in r.stderr, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    log = (tmp_path / "log").read_text() if (tmp_path / "log").exists() else ""
    assert "srun" not in log and not (tmp_path / "run").exists()


def requeued(log):
    return "scontrol requeue 77" in log


def test_usr1_near_the_time_limit_requeues(job):
    """#SBATCH --signal=B:USR1@300 (or scancel --signal=USR1 --batch): save, then requeue."""
    rc, out, log = job(signal.SIGUSR1, FAKE_SAVE_TAG="global_step100")
    assert rc == 0, out
    assert "scancel --signal=USR1 77" in log and "trainer: signalled" in log  # forwarded to the steps
    assert requeued(log) and log.index("trainer: signalled") < log.index("scontrol requeue 77")
    assert "caught SIGUSR1 (the time-limit warning" in out and "requeueing job 77" in out
    assert not (job.save / "requeues_without_progress").exists()


def test_sigterm_of_a_preemption_requeues(job):
    rc, out, log = job(signal.SIGTERM, FAKE_SAVE_TAG="global_step100", STUB_PREEMPT_TIME="2026-12-01T11:30:00")
    assert rc == 0, out
    assert "SIGTERM of a preemption (PreemptTime=2026-12-01T11:30:00)" in out
    assert "trainer: signalled" in log and requeued(log)


def test_plain_scancel_cancels(job):
    """scancel JOB (and scontrol requeue, the end of the time limit): SIGTERM without PreemptTime.
    The trainer saves; the script never requeues (Slurm itself requeues a scontrol requeue)."""
    rc, out, log = job(signal.SIGTERM, FAKE_SAVE_TAG="global_step100")
    assert rc == 0, out
    assert "trainer: signalled" in log and not requeued(log)
    assert "SIGTERM without a preemption" in out and "not requeueing: SIGTERM means stop" in out


def test_usr2_saves_and_stops(job):
    rc, out, log = job(signal.SIGUSR2, FAKE_SAVE_TAG="global_step100")
    assert rc == 0 and "trainer: signalled" in log and not requeued(log), out
    assert "not requeueing: SIGUSR2 means stop" in out


def test_failed_trainer_is_not_requeued(job):
    rc, out, log = job(signal.SIGUSR1, FAKE_RC="3")
    assert rc == 3 and not requeued(log), out
    assert "not requeueing: the trainer exited with 3" in out


def test_requeue_off(job):
    rc, out, log = job(signal.SIGUSR1, FAKE_SAVE_TAG="global_step100", REQUEUE="0")
    assert rc == 0 and not requeued(log) and "not requeueing: REQUEUE=0" in out, out


def test_failed_requeue_is_an_error(job):
    rc, out, log = job(signal.SIGUSR1, FAKE_SAVE_TAG="global_step100", STUB_REQUEUE_RC="1")
    assert rc == 1 and requeued(log) and "scontrol requeue 77 failed" in out, out


def test_restarts_without_progress_stop_at_the_cap(job):
    """Each restart is signalled before it saves anything new: requeued twice, then stopped with the reason."""
    job.save.mkdir()
    (job.save / "latest").write_text("global_step100")
    results = [job(signal.SIGUSR1, REQUEUE_MAX_NO_PROGRESS="2", SLURM_RESTART_COUNT=str(i)) for i in range(3)]
    assert [requeued(log) for _, _, log in results] == [True, True, False]
    assert [rc for rc, _, _ in results] == [0, 0, 1]
    assert "restarts without a new one: 1 of 2" in results[0][1]
    out = results[2][1]
    assert ("not requeueing: 3 restarts in a row without a new checkpoint "
            f"({job.save}/latest: global_step100), more than REQUEUE_MAX_NO_PROGRESS=2") in out
    assert not (job.save / "requeues_without_progress").exists()  # a resubmission starts afresh
    # progress resets the count
    job(signal.SIGUSR1, REQUEUE_MAX_NO_PROGRESS="2")
    assert (job.save / "requeues_without_progress").read_text().strip() == "1"
    rc, out, log = job(signal.SIGUSR1, REQUEUE_MAX_NO_PROGRESS="2", FAKE_SAVE_TAG="global_step200")
    assert rc == 0 and requeued(log) and "restarts without a new one: 0 of 2" in out
    assert not (job.save / "requeues_without_progress").exists()


def test_short_time_limit_defers_the_warning(job):
    """--time=00:00:10 with the 300 s lead: Slurm's USR1 comes at once; the script holds it until a
    fifth of the limit (2 s) before the end, so the trainer trains first."""
    t0 = time.time()
    rc, out, log = job(signal.SIGUSR1, FAKE_SAVE_TAG="global_step5", STUB_TIME_LIMIT="00:00:10")
    elapsed = time.time() - t0
    assert rc == 0 and requeued(log), out
    assert "the time-limit warning is passed on 2 s before the end" in out
    assert "a 300 s lead leaves no time to train; passing it on in" in out
    assert elapsed >= 6, (elapsed, out)  # held until ~8 s, not forwarded at once


def test_signal_lead_and_time_limit_parsing():
    script = f"""source {SLURM}/common.sh
for t in 2-00:00:00 05:00 1-02:03:04 00:05:00 10 UNLIMITED ""; do printf '%s ' "[$(igpt_seconds "$t")]"; done
echo
for l in "" 600 1500 3600 172800; do printf '%s ' "$(igpt_signal_lead "$l")"; done
echo
SIGNAL_LEAD=120 igpt_signal_lead 3600
"""
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["[172800]", "[300]", "[93784]", "[300]", "[600]", "[]", "[]"], r.stderr
    assert lines[1].split() == ["300", "120", "300", "300", "300"]
    assert lines[2] == "120"


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


def test_lr_search_default_grid_is_the_papers():
    """§3.4: "0.01, 0.003, 0.001, 0.0003, ...", from large to small."""
    assert lr_search.PAPER_RATES[:4] == (1e-2, 3e-3, 1e-3, 3e-4)
    assert list(lr_search.PAPER_RATES) == sorted(lr_search.PAPER_RATES, reverse=True)
    assert all(0.29 < b / a < 0.34 for a, b in zip(lr_search.PAPER_RATES, lr_search.PAPER_RATES[1:]))


@pytest.mark.parametrize("history, expected", [
    ([(1e-3, -INF)], (False, None)),                                    # no val_acc yet: keep going down
    ([(1e-3, 0.80), (3e-4, 0.85)], (False, 3e-4)),                       # still rising
    ([(1e-3, 0.80), (3e-4, 0.85), (1e-4, 0.84)], (True, 3e-4)),          # fell: stop, keep the best
    ([(1e-3, 0.80), (3e-4, 0.85), (1e-4, 0.85)], (True, 3e-4)),          # equal is not better
    ([(1e-3, float("nan")), (3e-4, 0.6), (1e-4, 0.7)], (False, 1e-4)),
])
def test_lr_search_decision_on_accuracy(history, expected):
    assert lr_search.decide(history, 1, maximize=True) == expected


@pytest.mark.parametrize("metric, planted, tried, best", [
    # pretraining: 1e-2 spikes, the loss falls to 1e-3 and rises at 3e-4; 1e-4 (lower still) is never run
    ("val_loss", {1e-2: INF, 3e-3: 2.6, 1e-3: 2.5, 3e-4: 2.55, 1e-4: 2.4}, [1e-2, 3e-3, 1e-3, 3e-4], 1e-3),
    # fine-tuning: accuracy rises to 1e-4 and falls at 3e-5; 1e-5 is never run
    ("val_acc", {1e-3: -INF, 3e-4: 0.80, 1e-4: 0.85, 3e-5: 0.84, 1e-5: 0.90}, [1e-3, 3e-4, 1e-4, 3e-5], 1e-4),
    # improving all the way down: every rate runs, the smallest wins
    ("val_loss", {1e-2: 2.9, 3e-3: 2.7, 1e-3: 2.6}, [1e-2, 3e-3, 1e-3], 1e-3),
])
def test_lr_search_stops_where_the_paper_does(metric, planted, tried, best):
    """Planted per-rate results through the search loop (no runs): the rates it tries and its choice."""
    ran = []

    def run_rate(rate):
        ran.append(rate)
        return planted[rate]

    history, chosen, _ = lr_search.search(list(planted)[::-1], run_rate, maximize=lr_search.METRICS[metric])
    assert ran == tried and [r for r, _ in history] == tried and chosen == best


FAKE_FINETUNE = (
    "import json, math, sys\n"
    "lr, save = float(sys.argv[1]), sys.argv[2]\n"
    "acc = 0.9 - 0.1 * abs(math.log10(lr / 1e-4))\n"
    "with open(save + '/metrics.jsonl', 'w') as f:\n"
    "    for step, a in ((10, acc - 0.05), (20, acc), (30, acc - 0.02)):\n"  # early stopping keeps the best
    "        f.write(json.dumps({'step': step, 'clf_loss': 1.0, 'val_acc': a}) + '\\n')\n")


def test_lr_search_fine_tuning_on_validation_accuracy(tmp_path):
    fake = tmp_path / "fake_finetune.py"
    fake.write_text(FAKE_FINETUNE)
    out = tmp_path / "search"
    r = subprocess.run([sys.executable, os.path.join(SLURM, "lr_search.py"), "--metric", "val_acc",
                        "--command", f"{sys.executable} {fake} {{lr}} {{save}}", "--out", str(out),
                        "--rates", "1e-3", "3e-4", "1e-4", "3e-5", "1e-5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((out / "lr_search.json").read_text())
    assert result["metric"] == "val_acc" and result["best_lr"] == 1e-4
    assert [run["lr"] for run in result["runs"]] == [1e-3, 3e-4, 1e-4, 3e-5]
    assert result["runs"][2]["val_acc"] == pytest.approx(0.9)  # the best evaluation, not the last
    assert "best learning rate: 0.0001" in r.stdout


def test_lr_search_diverged_run_is_worst_and_a_failed_one_stops(tmp_path):
    """Exit 3 (the trainer's divergence) scores worst whatever it logged before the spike; any other
    failure stops the search, and the same command run again retries that rate."""
    fake = tmp_path / "fake_train.py"
    fake.write_text(
        "import json, os, sys\n"
        "lr, save = float(sys.argv[1]), sys.argv[2]\n"
        "loss = {0.01: 2.0, 0.003: 2.5, 0.001: 2.6}[lr]\n"
        "open(save + '/metrics.jsonl', 'w').write(json.dumps({'step': 10, 'val_loss': loss}) + '\\n')\n"
        "if lr == 0.01: sys.exit(3)\n"  # spiked after a good-looking evaluation
        "if lr == 0.003 and os.environ.get('FAIL'): sys.exit(1)\n")
    out = tmp_path / "search"
    argv = [sys.executable, os.path.join(SLURM, "lr_search.py"), "--command",
            f"{sys.executable} {fake} {{lr}} {{save}}", "--out", str(out), "--rates", "1e-2", "3e-3", "1e-3"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, "FAIL": "1"})
    assert r.returncode == 3 and "not by divergence" in r.stderr, r.stdout + r.stderr
    result = json.loads((out / "lr_search.json").read_text())
    assert result["runs"] == [{"lr": 1e-2, "val_loss": None, "state": "FAILED (exit 3)"}]
    assert result["stopped"].startswith("lr 0.003: the run ended FAILED (exit 1)")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "lr 0.01: finished before" in r.stdout and "lr 0.003: finished before" not in r.stdout
    result = json.loads((out / "lr_search.json").read_text())
    assert result["best_lr"] == 3e-3 and [run["val_loss"] for run in result["runs"]] == [None, 2.5, 2.6]


def test_lr_search_dry_run_submits_the_paper_grid():
    r = subprocess.run([sys.executable, os.path.join(SLURM, "lr_search.py"), "--dry-run",
                        "--script", "slurm/pretrain_xl.sbatch", "--sbatch-args=--nodes=8", "--out", "runs/lrx"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("lr ")]
    assert [line.split(":")[0] for line in lines] == [f"lr {x:g}" for x in lr_search.PAPER_RATES]
    assert lines[0] == ("lr 0.01: LR=0.01 SAVE=runs/lrx/lr0.01 TRAIN_STEPS=5000 WARMUP_STEPS=500 "
                        "sbatch --parsable --job-name=lr-0.01 --nodes=8 slurm/pretrain_xl.sbatch")
    assert not os.path.exists(os.path.join(ROOT, "runs", "lrx"))
    # accuracy scores fine-tuning runs: a pretraining script is refused with the way out
    r = subprocess.run([sys.executable, os.path.join(SLURM, "lr_search.py"), "--dry-run", "--metric", "val_acc"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "logs no val_acc" in r.stderr and "finetune.py" in r.stderr


@pytest.mark.parametrize("script, env, steps, lr", [
    ("pretrain_s.sbatch", {}, 1000000, "3e-3"),
    ("pretrain_s.sbatch", {"OBJECTIVE": "bert"}, 1000000, "1e-2"),  # Table 5: BERT iGPT-S 0.01
    ("pretrain_m.sbatch", {"OBJECTIVE": "bert"}, 1000000, "3e-3"),
    ("pretrain_l.sbatch", {"OBJECTIVE": "bert"}, 1000000, "1e-3"),
    ("pretrain_l.sbatch", {}, 1000000, "1e-3"),
    ("pretrain_xl.sbatch", {}, 2000000, "3e-4"),
    ("pretrain_s.sbatch", {"OBJECTIVE": "bert", "LR": "5e-4", "TRAIN_STEPS": "5000"}, 5000, "5e-4"),  # overrides
])
def test_presets_default_to_the_papers_steps_and_rates(script, env, steps, lr):
    r = dry_run(script, env)
    assert r.returncode == 0, r.stderr
    rows = [f"{line} " for line in r.stdout.splitlines() if RANK_LINE.match(line)]
    assert rows and all(f" --train-steps {steps} " in row and f" --lr {lr} " in row for row in rows), rows[0]
    assert all(f" --objective {env.get('OBJECTIVE', 'ar')} " in row for row in rows)


def test_train_epochs_replaces_the_default_steps():
    r = dry_run("pretrain_s.sbatch", args=["--train-epochs", "2"])
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if RANK_LINE.match(line)]
    assert rows and all("--train-epochs 2" in row and "--train-steps" not in row for row in rows)


@pytest.mark.parametrize("scontrol, sacct, code", [
    ("JobId=7 JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0 DerivedExitCode=0:0", "", 3),
    ("JobId=7 JobState=FAILED Reason=NonZeroExitCode DerivedExitCode=1:0 ExitCode=1:0", "", 1),
    ("", "3:0\n", 3),                      # gone from the controller: accounting
    ("", "", None),
])
def test_lr_search_reads_a_jobs_exit_status(monkeypatch, scontrol, sacct, code):
    def run(cmd, **_):
        out = scontrol if cmd[0] == "scontrol" else sacct
        return subprocess.CompletedProcess(cmd, 0 if out else 1, out, "")

    monkeypatch.setattr(lr_search.subprocess, "run", run)
    assert lr_search.job_exit_code("7") == code
    state = "FAILED"
    assert lr_search.outcome(state, code) == ("diverged" if code == 3 else "failed")
    assert lr_search.outcome("COMPLETED", None) == lr_search.outcome("UNKNOWN", None) == "completed"

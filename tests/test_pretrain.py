"""`igpt_ds/pretrain.py` as users run it: real processes on gloo, checked against one process.

Every run is igpt-tiny at 8x8 (64 tokens) on synthetic striped images, fp32, global batch 8.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from layouts import LAYOUT_IDS, LAYOUTS, LOSS_TOL, rank_logs, signal_ranks_when, start_ranks, wait_for, write_ds_config

from igpt_ds.testing import launch
from igpt_ds.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "igpt_ds" / "pretrain.py")
COMMON = ["--resolution", "8", "--no-progress", "--lr", "3e-3", "--num-workers", "0"]
BATCH = 8


def ds_config(tmp_path, name, stage, micro=None, **extra):
    return write_ds_config(tmp_path / name, BATCH, stage, micro, **{"gradient_clipping": 1.0, **extra})


def pretrain(nprocs, args, timeout=600):
    results = launch([PRETRAIN, *COMMON, *args], nprocs, timeout=timeout, cwd=str(ROOT),
                     env={"DS_ACCELERATOR": "cpu"})
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} exited {r.returncode}:\n{r.stderr[-4000:]}"
    return results


def losses(run_dir):
    return [r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    pretrain(1, ["--train-steps", "10", "--deepspeed_config", ds_config(tmp, "ref.json", 0),
                 "--save", str(tmp / "run")])
    curve = losses(tmp / "run")
    assert len(curve) == 10
    return curve


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_layout_matches_single_process(reference, tmp_path, layout):
    cfg = ds_config(tmp_path, f"{layout.name}.json", layout.zero_stage, layout.micro_batch(BATCH))
    pretrain(layout.nprocs, ["--train-steps", "10", "--deepspeed_config", cfg, "--save", str(tmp_path / "run"),
                             *layout.flags])
    curve = losses(tmp_path / "run")
    assert len(curve) == len(reference)
    for step, (a, b) in enumerate(zip(curve, reference), 1):
        assert abs(a - b) <= LOSS_TOL, f"{layout.name} step {step}: {a} vs single-process {b}"
    meta = json.loads((tmp_path / "run" / "global_step10" / "igpt_meta.json").read_text())
    assert meta["world_size"] == layout.nprocs and meta["step"] == 10


def test_resume_continues_the_same_run(tmp_path):
    cfg = ds_config(tmp_path, "z3.json", 3)
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain(2, ["--train-steps", "8", "--deepspeed_config", cfg, "--save", str(straight)])
    pretrain(2, ["--train-steps", "8", "--deepspeed_config", cfg, "--save", str(split), "--save-interval", "4",
                 "--warmup-steps", "0"])
    # The second half alone: stop at 4 (by deleting the later checkpoint), then resume from it.
    (split / "latest").write_text("global_step4")
    first_half = losses(split)[:4]
    (split / "metrics.jsonl").write_text("")
    pretrain(2, ["--train-steps", "8", "--deepspeed_config", cfg, "--save", str(split), "--load", str(split)])
    resumed = first_half + losses(split)
    reference = losses(straight)
    assert len(resumed) == len(reference) == 8
    for step, (a, b) in enumerate(zip(resumed, reference), 1):
        assert abs(a - b) <= LOSS_TOL, f"step {step}: resumed {a} vs straight {b}"
    state = json.loads((split / "global_step8" / "igpt_meta.json").read_text())
    assert state["step"] == 8


def _start(nprocs, args, log_dir):
    """Launch ranks in the background (for signal tests); returns the Popen objects."""
    return start_ranks([PRETRAIN, *COMMON, *args], nprocs, log_dir)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_a_loadable_checkpoint_and_exits_cleanly(tmp_path, sig):
    run = tmp_path / "run"
    cfg = ds_config(tmp_path, "z1.json", 1)
    procs = _start(2, ["--train-steps", "100000", "--deepspeed_config", cfg, "--save", str(run)], tmp_path)
    codes = signal_ranks_when(lambda: (run / "metrics.jsonl").is_file() and len(losses(run)) >= 2, procs, sig)
    logs = rank_logs(tmp_path, 2)
    assert codes == [0, 0], logs[-3000:]
    assert "checkpoint saved" in logs
    tag = (run / "latest").read_text().strip()
    step = json.loads((run / tag / "igpt_meta.json").read_text())["step"]
    assert step >= 2 and tag == f"global_step{step}"
    pretrain(2, ["--train-steps", str(step + 1), "--deepspeed_config", cfg, "--save", str(run), "--load", str(run)])
    assert json.loads((run / f"global_step{step + 1}" / "igpt_meta.json").read_text())["step"] == step + 1


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    run = tmp_path / "run"
    cfg = ds_config(tmp_path, "z3.json", 3)
    # Save every step so that saving is most of the run's time; kill -9 at an arbitrary moment.
    procs = _start(2, ["--train-steps", "100000", "--save-interval", "1", "--deepspeed_config", cfg,
                       "--save", str(run)], tmp_path)
    try:
        wait_for(lambda: (run / "latest").is_file() and (run / "latest").read_text().strip() != "global_step1",
                 240, procs)
        time.sleep(0.37)
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            p.kill()
    tag = (run / "latest").read_text().strip()
    # A newer, half-written checkpoint directory may exist; `latest` must name a complete one.
    step = int(tag.removeprefix("global_step"))
    partial = run / f"global_step{step + 1}"
    partial.mkdir(exist_ok=True)
    (partial / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"truncated")
    pretrain(2, ["--train-steps", str(step + 1), "--deepspeed_config", cfg, "--save", str(tmp_path / "next"),
                 "--load", str(run)])
    meta = json.loads((tmp_path / "next" / f"global_step{step + 1}" / "igpt_meta.json").read_text())
    assert meta["step"] == step + 1


def run_fail(nprocs, args):
    results = launch([PRETRAIN, *COMMON, *args], nprocs, timeout=300, cwd=str(ROOT), env={"DS_ACCELERATOR": "cpu"})
    assert all(r.returncode != 0 for r in results), [r.returncode for r in results]
    return results[0].stderr


@pytest.mark.parametrize("nprocs, flags, stage, message", [
    (2, ["--pipeline-parallel", "2"], 3, "ZeRO stage 3 cannot be combined with --pipeline-parallel 2"),
    (3, ["--tensor-parallel", "2"], 0, "world size 3 is not divisible by TP x PP = 2 x 1 = 2"),
    (3, ["--tensor-parallel", "3"], 0, "tensor-parallel size 3 does not divide n_head=4"),
])
def test_refused_layouts(tmp_path, nprocs, flags, stage, message):
    err = run_fail(nprocs, ["--train-steps", "2", "--deepspeed_config", ds_config(tmp_path, "c.json", stage), *flags])
    assert message in err, err[-2000:]


def test_bad_inputs_give_clear_errors_and_no_output(tmp_path):
    good = ds_config(tmp_path, "ok.json", 0)
    cases = [
        (["--deepspeed_config", str(tmp_path / "nope.json")], "no such file"),
        (["--deepspeed_config", ds_config(tmp_path, "opt.json", 0, optimizer={"type": "Adam"})],
         "remove the 'optimizer' block"),
        (["--deepspeed_config", ds_config(tmp_path, "b.json", 0, train_micro_batch_size_per_gpu=3)],
         "does not split over data-parallel size"),
        (["--deepspeed_config", good, "--load", str(tmp_path / "empty")], "no checkpoint there"),
        (["--deepspeed_config", good, "--train-data", str(tmp_path / "missing-shards")], "missing-shards"),
    ]
    for flags, message in cases:
        out = tmp_path / "out"
        err = run_fail(1, ["--train-steps", "2", "--save", str(out), *flags])
        assert message in err, (flags, err[-2000:])
        assert not out.exists() or not any(out.iterdir()), f"{flags} left output behind"


def test_checkpoint_of_another_model_is_refused(tmp_path):
    cfg = ds_config(tmp_path, "c.json", 0)
    pretrain(1, ["--train-steps", "1", "--deepspeed_config", cfg, "--save", str(tmp_path / "run")])
    err = run_fail(1, ["--train-steps", "2", "--deepspeed_config", cfg, "--load", str(tmp_path / "run"),
                       "--objective", "bert"])
    assert "checkpoint does not match this run's model" in err and "objective" in err


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path):
    cfg = ds_config(tmp_path, "c.json", 0)
    run = tmp_path / "run"
    driver = (
        "import sys, math\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from igpt_ds import pretrain\n"
        "from igpt_ds.train import loop\n"
        "orig = loop.Trainer._train_step\n"
        "def step(self, it):\n"
        "    record, wait = orig(self, it)\n"
        "    return {**record, 'loss': math.nan if self.step >= 3 else record['loss']}, wait\n"
        "loop.Trainer._train_step = step\n"
        "sys.exit(pretrain.main(sys.argv[1:]))\n"
    )
    out = subprocess.run([sys.executable, "-c", driver, *COMMON, "--train-steps", "10", "--save-interval", "2",
                          "--deepspeed_config", cfg, "--save", str(run)], capture_output=True, text=True,
                         env=dict(os.environ, DS_ACCELERATOR="cpu"), timeout=300, cwd=str(ROOT))
    assert out.returncode == 3, out.stderr[-3000:]
    assert "loss became nan at step 4" in out.stderr and "global_step2" in out.stderr
    assert (run / "latest").read_text() == "global_step2"
    assert not (run / "global_step4").exists()

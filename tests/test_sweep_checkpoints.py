"""tools/sweep_checkpoints.py (the paper's Fig. 3): a real tiny pretraining run with 3 checkpoints swept through
features -> probe, a restart that keeps them, the val_loss bookkeeping, bad input, and fixed BERT validation masks."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from testdata import synthetic_images

from igpt_ds.evaluate import sweep as S
from igpt_ds.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "tools" / "sweep_checkpoints.py"
FAST_EXTRACT = "--num-workers 0 --threads 1 --no-progress --batch-size 128"
PNG = b"\x89PNG\r\n\x1a\n"


def load_tool():
    spec = importlib.util.spec_from_file_location("tool_sweep_checkpoints", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """igpt-tiny at 8x8, 3 steps on shards of labelled colour images: a checkpoint and a val_loss at every step."""
    from igpt_ds.data.shards import BuildSettings, build_shards
    from igpt_ds.data.sources import open_source

    root = tmp_path_factory.mktemp("sweep")
    images, labels = synthetic_images(240, 0)
    np.savez(root / "images.npz", images=images, labels=labels)
    palette = np.random.default_rng(1).uniform(-1, 1, (512, 3)).astype(np.float32)
    np.save(root / "palette.npy", palette)
    for split in ("train", "val"):
        build_shards(open_source(root / "images.npz", split, val_fraction=0.25), str(root / "shards" / split), palette,
                     BuildSettings(resolution=8, shard_size=1000, prefix=split), progress=False)
    (root / "ds.json").write_text(json.dumps({"train_batch_size": 16, "zero_optimization": {"stage": 0}}))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    shards = root / "shards"
    r = subprocess.run([sys.executable, "igpt_ds/pretrain.py", "--resolution", "8", "--no-progress",
                        "--num-workers", "0", "--train-data", str(shards / "train"), "--val-data", str(shards / "val"),
                        "--palette", str(root / "palette.npy"), "--deepspeed_config", str(root / "ds.json"),
                        "--train-steps", "3", "--warmup-steps", "1", "--save-interval", "1", "--eval-interval", "1",
                        "--save", str(root / "tiny")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def swept(run):
    """The sweep as a user runs it (a subprocess), and what it printed."""
    out = run / "out"
    r = subprocess.run([sys.executable, str(SWEEP), str(run / "tiny"), "--data", str(run / "images.npz"),
                        "--val-fraction", "0.25", "--out", str(out), "--extract-args", FAST_EXTRACT, "--no-progress"],
                       cwd=ROOT, env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return out, r.stdout


def test_every_checkpoint_probed_against_its_validation_loss(run, swept):
    out, stdout = swept
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["format"] == S.FORMAT and doc["complete"] and doc["pending"] == 0
    assert doc["settings"]["test_split"] == "val" and doc["settings"]["val_fraction"] == 0.25
    points = doc["points"]
    assert [p["step"] for p in points] == [1, 2, 3] and {p["run"] for p in points} == {"tiny"}
    logged = {r["step"]: r["val_loss"] for r in read_metrics(str(run / "tiny" / "metrics.jsonl")) if "val_loss" in r}
    for p in points:
        assert p["val_loss"] == pytest.approx(logged[p["step"]], rel=1e-12) and "val_loss_reason" not in p
        assert p["checkpoint"] == str((run / "tiny" / f"global_step{p['step']}").resolve())
        probe = json.loads(Path(p["probe"]).read_text())
        assert p["best_layer"] == probe["best_layer"] and p["best_test_accuracy"] == probe["best_test_accuracy"]
        assert sorted(p["layers"], key=int) == ["0", "1", "2", "3", "4"]  # igpt-tiny: embedding + 4 blocks
        assert {l: v["test_accuracy"] for l, v in p["layers"].items()} == \
               {l: v["test_accuracy"] for l, v in probe["layers"].items()}
        assert p["num_train"] == 180 and p["num_test"] == 60  # the --val-fraction 0.25 split of 240 images
        assert p["best_test_accuracy"] > p["chance"] + 0.3  # colour classes: far above chance
        assert probe["features"]["checkpoint"] == p["checkpoint"]  # the features came from that very checkpoint
        assert p["features"] is None and not (Path(p["probe"]).parent / "features").exists()  # deleted after probing
        assert p["status"] == "probed" and f"tiny step {p['step']}: best layer" in stdout
        log = (Path(p["probe"]).parent / "log.txt").read_text()
        assert log.count(f"--layers all --out {Path(p['probe']).parent}") == 2 and FAST_EXTRACT in log  # passed on
    assert doc["left_off_loss_plot"] == []
    for name in ("probe_vs_val_loss", "depth_curves"):
        png = Path(doc["plots"][name])
        assert png.parent == out and png.read_bytes()[:8] == PNG and png.stat().st_size > 10000


def test_rerun_keeps_finished_checkpoints_and_refuses_other_settings(run, swept, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(swept[0], out)  # copy2: modification times kept, so the probes stay newer than the checkpoints
    before = {p: p.stat().st_mtime_ns for p in out.glob("tiny/global_step*/probe.json")}
    assert len(before) == 3
    argv = [str(run / "tiny"), "--data", str(run / "images.npz"), "--val-fraction", "0.25", "--out", str(out),
            "--extract-args", FAST_EXTRACT, "--no-progress"]
    tool = load_tool()
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("kept tiny step") == 3 and "0 probed, 3 kept" in printed
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing probed again
    doc = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in doc["points"]] == ["kept"] * 3 and doc["complete"]
    # --every 2 counts back from the newest: steps 3 and 1, both already probed.
    assert tool.main([*argv, "--every", "2"]) == 0
    assert [p["step"] for p in json.loads((out / "sweep.json").read_text())["points"]] == [1, 3]
    assert "0 probed, 2 kept" in capsys.readouterr().out
    # Other settings into the same --out: refused before any work, sweep.json untouched.
    kept = (out / "sweep.json").read_bytes()
    assert tool.main([*argv, "--layers", "2"]) == 2
    err = capsys.readouterr().err
    assert "was made with other settings (differs in: layers)" in err and "--redo" in err
    assert (out / "sweep.json").read_bytes() == kept


def test_finished_needs_same_settings_and_a_probe_newer_than_the_checkpoint(tmp_path):
    ckpt, work = tmp_path / "run" / "global_step5", tmp_path / "out" / "run" / "global_step5"
    ckpt.mkdir(parents=True)
    (ckpt / "igpt_meta.json").write_text("{}")
    work.mkdir(parents=True)
    settings = {"layers": "all", "checkpoint": str(ckpt)}
    assert S.finished(work, settings, [ckpt]) == (False, "")  # nothing there yet
    (work / "settings.json").write_text(json.dumps(settings))
    (work / "probe.json").write_text(json.dumps({"best_layer": 1, "best_test_accuracy": 0.5, "layers": {"1": {}}}))
    t = ckpt.stat().st_mtime
    os.utime(work / "probe.json", (t + 10, t + 10))
    assert S.finished(work, settings, [ckpt]) == (True, "")
    keep, why = S.finished(work, dict(settings, layers="2"), [ckpt])
    assert not keep and "differs in: layers" in why
    os.utime(ckpt / "igpt_meta.json", (t + 20, t + 20))  # the checkpoint rewritten after its probe
    keep, why = S.finished(work, settings, [ckpt])
    assert not keep and f"older than {ckpt}" in why
    (work / "probe.json").write_text("{not json")
    os.utime(work / "probe.json", (t + 30, t + 30))
    keep, why = S.finished(work, settings, [ckpt])
    assert not keep and "cannot be kept" in why


def test_val_loss_only_from_the_record_of_that_step(tmp_path):
    records = [{"step": 1, "loss": 6.0}, {"step": 2, "loss": 5.5, "val_loss": 5.4, "val_bits_per_dim": 2.6},
               {"step": 3, "loss": 5.2}, {"step": 2, "loss": 5.45, "val_loss": 5.3, "val_bits_per_dim": 2.55}]
    at2 = S.val_loss_at(records, 2, tmp_path)
    assert at2 == {"val_loss": 5.3, "val_bits_per_dim": 2.55, "train_loss": 5.45}  # resumed run: the last record
    at3 = S.val_loss_at(records, 3, tmp_path)
    assert at3["val_loss"] is None and at3["train_loss"] == 5.2
    assert "no val_loss at step 3" in at3["val_loss_reason"] and "validated at steps 2" in at3["val_loss_reason"]
    assert "--eval-interval that divides --save-interval" in at3["val_loss_reason"]
    none = S.val_loss_at([{"step": 3, "loss": 5.2}], 3, tmp_path)
    assert "holds no val_loss at all" in none["val_loss_reason"] and "--val-data" in none["val_loss_reason"]
    assert "does not exist" in S.val_loss_at(None, 3, tmp_path)["val_loss_reason"]
    # The loss plot leaves a point without val_loss off; with none at all it draws nothing.
    layers = {"0": {"test_accuracy": 0.4}, "1": {"test_accuracy": 0.6}}
    points = [{"run": "a", "step": s, "val_loss": v, "best_test_accuracy": acc, "best_layer": 1, "layers": layers}
              for s, v, acc in ((100, 3.0, 0.5), (200, 2.8, 0.6), (400, None, 0.7))]
    png = tmp_path / "loss.png"
    assert S.plot_probe_vs_loss(points, png) == str(png) and png.read_bytes()[:8] == PNG
    assert S.plot_probe_vs_loss(points[2:], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    assert S.plot_depth_curves(points, tmp_path / "depth.png") and (tmp_path / "depth.png").read_bytes()[:8] == PNG


def test_checkpoint_discovery_and_every(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20, 30, 40, 50):
        (run / f"global_step{step}").mkdir(parents=True)
        if step != 20:
            (run / f"global_step{step}" / "igpt_meta.json").write_text("{}")
    (run / "latest").write_text("global_step40")
    found, skipped = S.find_checkpoints(run)
    assert [s for s, _ in found] == [10, 30, 40]
    assert {Path(s["checkpoint"]).name: s["reason"][:20] for s in skipped} == \
           {"global_step20": "no igpt_meta.json: n", "global_step50": "newer than 'latest' "}
    assert [s for s, _ in S.select_every(found, 2)] == [10, 40]  # counted back from the newest
    assert S.select_every(found, 5) == found[-1:]
    with pytest.raises(S.SweepError, match="--every 0: must be >= 1"):
        S.select_every(found, 0)
    assert S.format_step(65536) == "66K" and S.format_step(1_000_000) == "1M" and S.format_step(1500) == "1.5K"


def test_bad_input_is_refused_before_any_work(run, tmp_path, capsys):
    tool = load_tool()
    out = tmp_path / "never"
    data = ["--data", str(run / "images.npz"), "--val-fraction", "0.25", "--out", str(out)]

    def refused(argv, *messages):
        assert tool.main(argv) == 2
        err = capsys.readouterr().err
        for message in messages:
            assert message in err, err
        assert not out.exists()

    (tmp_path / "empty").mkdir()
    refused([str(tmp_path / "empty"), *data], f"RUN_DIR {tmp_path / 'empty'}: no complete global_stepN checkpoint",
            "--save directory of igpt_ds/pretrain.py")
    refused([str(run / "tiny" / "global_step2"), *data], "is one checkpoint, not a run directory: give its parent")
    refused([str(run / "tiny"), "--data", str(tmp_path / "missing"), "--out", str(out)],
            f"--data {tmp_path / 'missing'} does not exist")
    refused([str(run / "tiny"), "--data", str(run / "images.npz"), "--out", str(out)],
            "--test-split test", "--val-fraction")  # an .npz has no test split
    refused([str(run / "tiny"), *data, "--layers", "7"], "--layers 7", "n_layer=4")
    refused([str(run / "tiny"), str(run / "tiny"), *data], "two RUN_DIRs are both named 'tiny'", "--labels")
    for argv, message in (([*data, "--every", "0"], "--every 0: must be >= 1"),
                          ([*data, "--extract-args", "--out x.npz"], "--extract-args sets --out"),
                          ([*data, "--probe-args", "--tra a.npz"], "--probe-args sets --train")):
        with pytest.raises(SystemExit) as e:
            tool.main([str(run / "tiny"), *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_a_failing_stage_names_its_log_and_keeps_what_is_done(run, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(run / "tiny"), "--data", str(run / "images.npz"), "--val-fraction", "0.25", "--out", str(out),
            "--extract-args", f"{FAST_EXTRACT} --dtype-out float64", "--no-progress"]
    assert load_tool().main(argv) == 2  # the features tool's own usage error (exit 2), passed on
    err = capsys.readouterr().err
    log = out / "tiny" / "global_step1" / "log.txt"
    assert "tiny step 1: extract_features.py failed (exit 2)" in err and str(log) in err and "float64" in err
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["points"] == [] and not doc["complete"] and doc["pending"] == 3
    assert not (out / "tiny" / "global_step1" / "probe.json").exists()


def test_bert_validation_masks_do_not_depend_on_the_step(monkeypatch):
    """Every evaluation of a BERT run scores the same images under the same masks, so val_loss is
    comparable across checkpoints (the x axis of the sweep); training masks do change with the step."""
    import torch
    import torch.distributed as dist

    from igpt_ds.train import pretrain_task
    from igpt_ds.train.args import PretrainArgs
    from igpt_ds.train.loop import Trainer

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    seen = []

    def recording_loss(model, tokens, mask=None):
        seen.append((tokens.clone(), mask.clone()))
        return types.SimpleNamespace(loss=torch.tensor(1.0))

    monkeypatch.setattr(pretrain_task, "compute_loss", recording_loss)
    args = PretrainArgs(objective="bert", resolution=8, val_data=("synthetic",), eval_batches=3)
    task = pretrain_task.PretrainTask(args)

    def loop_at(step):
        loop = types.SimpleNamespace(step=step, device=torch.device("cpu"), pipelined=False, reads_data=True,
                                     engine=types.SimpleNamespace(eval=lambda: None, train=lambda: None),
                                     ds=types.SimpleNamespace(micro_batch_size=4),
                                     layout=types.SimpleNamespace(data_parallel=1),
                                     state=types.SimpleNamespace(dp_rank=0, dp_group=None))
        loop.eval_batches = types.MethodType(Trainer.eval_batches, loop)
        return loop

    task.setup(loop_at(0))
    evaluations = []
    for step in (5, 4000):
        seen.clear()
        assert task.evaluate(loop_at(step))["val_loss"] == 1.0
        evaluations.append(list(seen))
    first, later = evaluations
    assert len(first) == len(later) == 3
    for (tok_a, mask_a), (tok_b, mask_b) in zip(first, later):
        assert torch.equal(tok_a, tok_b) and torch.equal(mask_a, mask_b) and mask_a.any()
    assert not torch.equal(first[0][1], first[1][1])  # a different mask per validation batch
    # Control: the same code path's training masks do depend on the step (so the check above can fail).
    batch = {"tokens": first[0][0]}
    seen.clear()
    task.loss(loop_at(5), batch, 0)
    task.loss(loop_at(6), batch, 0)
    assert not torch.equal(seen[0][1], seen[1][1])

"""`igpt_ds/finetune.py` as users run it: learning a planted signal, layouts vs one process, early
stopping, resume, SIGTERM/SIGUSR1 and --max-minutes (a checkpoint, exit 0, an exact resume), the
evaluation tool and bad input.

A 2-layer, 64-wide iGPT at 8x8 (random init, exported as a consolidated checkpoint) and 256 8x8
images in 4 classes: class c has a bright 4x4 block in quadrant c over dim noise. fp32, batch 16.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from layouts import LAYOUT_IDS, LAYOUTS, LOSS_TOL, rank_logs, signal_ranks_when, start_ranks, write_ds_config

from igpt_ds.testing import launch
from igpt_ds.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = str(ROOT / "igpt_ds" / "finetune.py")
EVALUATE = str(ROOT / "tools" / "evaluate_classifier.py")
COMMON = ["--no-progress", "--num-workers", "0", "--val-fraction", "0.25"]
ENV = {"DS_ACCELERATOR": "cpu"}
BATCH = 16


def planted_images(n=256, side=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    images = rng.integers(0, 128, (n, side, side, 3), dtype=np.uint8)
    h = side // 2
    for i, c in enumerate(labels):
        r, q = divmod(int(c), 2)
        images[i, r * h:(r + 1) * h, q * h:(q + 1) * h] = 230
    return images, labels


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from igpt_ds.checkpoint.consolidated import save_consolidated
    from igpt_ds.config import get_preset
    from igpt_ds.model.transformer import IGPTModel

    root = tmp_path_factory.mktemp("ft")
    cfg = get_preset("igpt-tiny", resolution=8, n_layer=2, d_model=64, n_head=4)
    palette = np.random.default_rng(1).uniform(-1, 1, (512, 3)).astype(np.float32)
    save_consolidated(root / "init", cfg, IGPTModel(cfg, seed=0).state_dict(), palette=palette)
    images, labels = planted_images()
    np.savez(root / "d.npz", images=images, labels=labels, label_names=np.array(["tl", "tr", "bl", "br"]))
    return root


def ds_config(path, stage=0, micro=None):
    return write_ds_config(path, BATCH, stage, micro)


def finetune_argv(setup, args):
    return [FINETUNE, "--init", str(setup / "init"), "--train-data", str(setup / "d.npz"), *COMMON, *args]


def finetune(nprocs, setup, args, timeout=600):
    results = launch(finetune_argv(setup, args), nprocs, timeout=timeout, cwd=str(ROOT), env=ENV)
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} exited {r.returncode}:\n{r.stderr[-4000:]}"
    return results


def test_learns_a_planted_signal_then_evaluates_and_resumes(setup, tmp_path):
    run = tmp_path / "run"
    cfg = ds_config(tmp_path / "ds.json")
    out = finetune(1, setup, ["--deepspeed_config", cfg, "--lr", "3e-3", "--train-steps", "60", "--eval-interval",
                              "20", "--save", str(run)])
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "val_acc" in r]
    assert [r["step"] for r in evals] == [20, 40, 60]
    best = max(r["val_acc"] for r in evals)
    assert best >= 0.9, evals  # chance is 0.25
    assert "best val acc" in out[0].stdout
    info = json.loads((run / "best" / "config.json").read_text())["classifier"]
    assert info["val_accuracy"] == best and info["num_classes"] == 4 and info["label_names"] == ["tl", "tr", "bl", "br"]
    assert os.readlink(run / "best") == f"exports/step{info['step']}"
    from safetensors.torch import load_file

    weights = load_file(str(run / "best" / "model.safetensors"))
    assert weights["clf.weight"].shape == (4, 64) and weights["clf.bias"].shape == (4,)
    assert weights["clf.weight"].abs().sum() > 0  # trained away from its zero init

    # The evaluation tool on the same held-out images reproduces the validation accuracy.
    ev = subprocess.run([sys.executable, EVALUATE, "--checkpoint", str(run / "best"), "--data", str(setup / "d.npz"),
                         "--split", "val", "--val-fraction", "0.25", "--out", str(tmp_path / "eval"),
                         "--num-workers", "0"], capture_output=True, text=True, cwd=str(ROOT),
                        env={**os.environ, **ENV})
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "confusion_matrix.json").read_text())
    assert report["accuracy"] == pytest.approx(best) and report["num_images"] == 64
    assert np.array(report["confusion_matrix"]).sum() == 64
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 1000

    # Resume: continues at step 61 with the best so far.
    finetune(1, setup, ["--deepspeed_config", cfg, "--lr", "3e-3", "--train-steps", "62", "--eval-interval", "20",
                        "--save", str(run), "--load", str(run)])
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps[-2:] == [61, 62] and (run / "latest").read_text() == "global_step62"
    last = read_metrics(run / "metrics.jsonl")[-1]
    assert last["best_val_acc"] == best


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    finetune(1, setup, ["--deepspeed_config", ds_config(tmp / "ds.json"), "--lr", "3e-3", "--train-steps", "4",
                        "--eval-interval", "2", "--save", str(tmp / "run"), "--augment", "cifar"])
    return tmp / "run"


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_layout_matches_single_process(setup, reference, tmp_path, layout):
    run = tmp_path / "run"
    cfg = ds_config(tmp_path / "ds.json", layout.zero_stage, layout.micro_batch(BATCH))
    finetune(layout.nprocs, setup, ["--deepspeed_config", cfg, "--lr", "3e-3", "--train-steps", "4",
                                    "--eval-interval", "2", "--save", str(run), "--augment", "cifar", *layout.flags])
    ref, got = read_metrics(reference / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert len(got) == len(ref) == 4
    for a, b in zip(got, ref):
        for key in ("gen_loss", "clf_loss"):
            assert abs(a[key] - b[key]) <= LOSS_TOL, f"{layout.name} step {a['step']} {key}: {a[key]} vs {b[key]}"
        assert a.get("val_acc") == b.get("val_acc")
    # The best export is layout-independent: the same full weights, class head included.
    from safetensors.torch import load_file

    ours = load_file(str(run / "best" / "model.safetensors"))
    theirs = load_file(str(reference / "best" / "model.safetensors"))
    assert set(ours) == set(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=1e-3, msg=key)


def test_early_stopping_keeps_the_best_checkpoint(setup, tmp_path):
    run = tmp_path / "run"
    # Scripted validation accuracies: best at the 2nd evaluation, then 2 worse ones -> stop (patience 2).
    driver = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from igpt_ds import finetune\n"
        "from igpt_ds.train import classify_task\n"
        "accs = iter([0.3, 0.6, 0.5, 0.55, 0.9, 0.9])\n"
        "heads = {}\n"
        "def evaluate(self, loop):\n"
        "    heads[loop.step] = loop.engine.module.clf.weight.detach().clone()\n"
        "    torch.save(heads, sys.argv[1])\n"
        "    return {'val_acc': next(accs)}\n"
        "classify_task.ClassifyTask.evaluate = evaluate\n"
        "sys.exit(finetune.main(sys.argv[2:]))\n"
    )
    out = subprocess.run([sys.executable, "-c", driver, str(tmp_path / "heads.pt"), "--init", str(setup / "init"),
                          "--train-data", str(setup / "d.npz"), *COMMON, "--train-steps", "20", "--eval-interval", "1",
                          "--patience", "2", "--lr", "3e-3", "--deepspeed_config", ds_config(tmp_path / "ds.json"),
                          "--save", str(run)], capture_output=True, text=True, cwd=str(ROOT),
                         env={**os.environ, **ENV}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "early stop at step 4" in out.stdout
    assert os.readlink(run / "best") == "exports/step2" and os.listdir(run / "exports") == ["step2"]
    info = json.loads((run / "best" / "config.json").read_text())["classifier"]
    assert info["step"] == 2 and info["val_accuracy"] == 0.6
    from safetensors.torch import load_file

    heads = torch.load(tmp_path / "heads.pt")
    saved = load_file(str(run / "best" / "model.safetensors"))["clf.weight"]
    torch.testing.assert_close(saved, heads[2])  # the weights of step 2, not the last ones
    assert not torch.equal(saved, heads[4])
    assert (run / "latest").read_text() == "global_step4"  # resume point of the stopped run
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")][-1] == 4


@pytest.mark.parametrize("random_init", [False, True])
def test_random_init_keeps_the_architecture_but_not_the_weights(setup, tmp_path, random_init):
    """--random-init (the from-scratch baseline) trains --init's architecture from the fresh init of
    --seed; without it the run starts from --init's weights. One step at lr 1e-7 moves no weight by
    more than ~1e-7 (Adam's step is about lr), so the best export shows where the run started."""
    from safetensors.torch import load_file

    from igpt_ds.config import get_preset
    from igpt_ds.model.transformer import IGPTModel

    run = tmp_path / "run"
    finetune(1, setup, ["--deepspeed_config", ds_config(tmp_path / "ds.json"), "--lr", "1e-7", "--train-steps", "1",
                        "--eval-interval", "1", "--seed", "1", "--save", str(run)] + (["--random-init"] * random_init))
    saved = load_file(str(run / "best" / "model.safetensors"))
    pretrained = load_file(str(setup / "init" / "model.safetensors"))
    cfg = get_preset("igpt-tiny", resolution=8, n_layer=2, d_model=64, n_head=4)
    fresh = IGPTModel(cfg, seed=1).state_dict()
    start, other = (fresh, pretrained) if random_init else (pretrained, fresh)
    assert set(pretrained) <= set(saved)
    for key in pretrained:
        torch.testing.assert_close(saved[key], start[key], atol=1e-6, rtol=0, msg=key)
    assert not torch.allclose(saved["embed.wte.weight"], other["embed.wte.weight"], atol=1e-3)
    meta = json.loads((run / "global_step1" / "igpt_meta.json").read_text())
    assert meta["finetune"]["random_init"] is random_init


def test_bad_inputs_give_clear_errors(setup, tmp_path, capsys):
    from igpt_ds import finetune
    from igpt_ds.checkpoint.consolidated import save_consolidated
    from igpt_ds.config import get_preset
    from igpt_ds.model.transformer import IGPTModel

    cfg = ds_config(tmp_path / "ds.json")
    # A checkpoint whose weights are of another architecture than its config says.
    small = get_preset("igpt-tiny", resolution=8, n_layer=2, d_model=64, n_head=4)
    other = small.replace(d_model=32)
    save_consolidated(tmp_path / "wrong", small, IGPTModel(other, seed=0).state_dict())
    images, labels = planted_images(64)
    np.savez(tmp_path / "unlabeled.npz", images=images)
    np.savez(tmp_path / "bad_label.npz", images=images, labels=labels, label_names=np.array(list("abc")))
    init, data = str(setup / "init"), str(setup / "d.npz")
    cases = [
        (["--init", str(tmp_path / "wrong"), "--train-data", data], "has shape"),
        (["--init", str(tmp_path), "--train-data", data], "is not a model directory"),
        (["--init", init, "--train-data", data, "--num-classes", "3"], "names 4 classes but --num-classes is 3"),
        (["--init", init, "--train-data", data, "--num-classes", "5"], "names 4 classes but --num-classes is 5"),
        (["--init", init, "--train-data", str(tmp_path / "bad_label.npz")], "label 3 is out of range for 3 classes"),
        (["--init", init, "--train-data", str(tmp_path / "unlabeled.npz")], "have no label"),
    ]
    for flags, message in cases:
        out = tmp_path / "out"
        code = finetune.main([*flags, *COMMON, "--train-steps", "2", "--deepspeed_config", cfg, "--save", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (flags, err[-2000:])
        assert not out.exists(), f"{flags} left output behind"
    with pytest.raises(SystemExit):  # argparse: the baseline needs an architecture to start from
        finetune.parse_args(["--random-init", "--load", str(tmp_path / "out"), "--train-data", data])
    assert "--random-init needs --init CHECKPOINT" in capsys.readouterr().err


# ---- interruption: a signal or --max-minutes saves a checkpoint and exits 0; --load resumes it exactly ----

# Constant rate (no warm-up, no decay) and no evaluation before a run's last step, so the total step
# count changes nothing before the end; --augment cifar: the resumed data position includes augmentation.
RESUMABLE = ["--lr", "3e-3", "--augment", "cifar", "--eval-interval", "100000"]
LOSSES = ("loss", "gen_loss", "clf_loss")


def assert_resumes_like_an_uninterrupted_run(setup, tmp_path, run, cfg):
    """`run` stopped with a checkpoint at its last logged step N: `--load` continues it to N + 2, and
    every step's losses equal those of one uninterrupted run to N + 2. Returns N."""
    step = read_metrics(run / "metrics.jsonl")[-1]["step"]
    assert (run / "latest").read_text().strip() == f"global_step{step}"
    assert json.loads((run / f"global_step{step}" / "igpt_meta.json").read_text())["step"] == step
    end = str(step + 2)
    finetune(2, setup, ["--deepspeed_config", cfg, *RESUMABLE, "--train-steps", end, "--save", str(run),
                        "--load", str(run)])
    finetune(2, setup, ["--deepspeed_config", cfg, *RESUMABLE, "--train-steps", end,
                        "--save", str(tmp_path / "straight")])
    got, ref = read_metrics(run / "metrics.jsonl"), read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, step + 3))
    for a, b in zip(got, ref):
        part = "resumed" if a["step"] > step else "before the stop"
        for key in LOSSES:
            assert abs(a[key] - b[key]) <= LOSS_TOL, \
                f"step {a['step']} ({part}) {key}: interrupted run {a[key]} vs uninterrupted {b[key]}"
    assert (run / "latest").read_text().strip() == f"global_step{step + 2}"
    return step


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=lambda sig: sig.name)
def test_signal_saves_a_checkpoint_exits_cleanly_and_resumes_exactly(setup, tmp_path, sig):
    run = tmp_path / "run"
    cfg = ds_config(tmp_path / "ds.json", 1)
    argv = finetune_argv(setup, ["--deepspeed_config", cfg, *RESUMABLE, "--train-steps", "100000", "--save", str(run)])
    procs = start_ranks(argv, 2, tmp_path)
    codes = signal_ranks_when(lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run / "metrics.jsonl"))
                              >= 2, procs, sig)
    logs = rank_logs(tmp_path, 2)
    assert codes == [0, 0], f"exit codes {codes} after {sig.name}:\n{logs[-3000:]}"
    step = assert_resumes_like_an_uninterrupted_run(setup, tmp_path, run, cfg)
    assert step >= 2 and f"checkpoint saved at step {step}, exiting" in logs, logs[-3000:]


def test_max_minutes_saves_a_checkpoint_exits_cleanly_and_resumes_exactly(setup, tmp_path):
    run = tmp_path / "run"
    cfg = ds_config(tmp_path / "ds.json", 1)
    out = finetune(2, setup, ["--deepspeed_config", cfg, *RESUMABLE, "--train-steps", "100000",
                              "--max-minutes", "0.05", "--save", str(run)], timeout=300)
    said = out[0].stdout + out[0].stderr
    step = read_metrics(run / "metrics.jsonl")[-1]["step"]
    assert f"--max-minutes 0.05 reached: checkpoint saved at step {step}, exiting" in said, said[-3000:]
    assert assert_resumes_like_an_uninterrupted_run(setup, tmp_path, run, cfg) == step


# ---------------------------------------------------------------------------------------------
# BERT evaluation: the modal vote over masks, ties broken at random (paper Sec. 4.6)
# ---------------------------------------------------------------------------------------------

def _one_hot_logits(classes, num_classes=4, sure=0.9):
    """Logits [b, C] whose argmax is classes[i] for image i (log-probabilities, sure on that class)."""
    p = torch.full((len(classes), num_classes), (1 - sure) / (num_classes - 1))
    p[torch.arange(len(classes)), torch.as_tensor(classes)] = sure
    return p.log()


def test_modal_vote_breaks_ties_at_random_and_never_overrules_a_majority():
    from igpt_ds.evaluate.classifier import modal_prediction

    # Image 0: a 2-2 tie between classes 1 and 3 (class 0 got one vote, class 2 none); the more
    # confident logits of class 3 must not decide it. Image 1: class 2 has 3 of 5 votes.
    votes = [[1, 2], [3, 2], [1, 2], [3, 0], [0, 1]]
    logits = [_one_hot_logits(v) for v in votes]
    logits[1][0] = _one_hot_logits([3], sure=0.999)[0]
    picks = [modal_prediction(logits, seed=s, batch_index=b) for s in range(20) for b in (0, 1)]
    tie = {int(p[0]) for p in picks}
    assert tie == {1, 3}  # each tied class wins for some seeds, the others never
    assert all(int(p[1]) == 2 for p in picks)  # a clear majority always wins
    # Reproducible: the same (seed, batch) always breaks the tie the same way.
    assert all(torch.equal(modal_prediction(logits, 5, 1), modal_prediction(logits, 5, 1)) for _ in range(3))
    # A tie is broken evenly: two masks voting (0, 1) on every image of a batch of 8, 100 seeds
    # (800 draws, 400 expected each; 5 standard deviations = 71).
    picks = torch.stack([modal_prediction([_one_hot_logits([0] * 8), _one_hot_logits([1] * 8)], seed=s)
                         for s in range(100)])
    assert set(picks.unique().tolist()) == {0, 1} and abs(int((picks == 0).sum()) - 400) < 71


def test_bert_predict_votes_over_the_evaluation_masks_with_the_run_seed():
    from igpt_ds.config import get_preset
    from igpt_ds.evaluate.classifier import bert_eval_masks, predict

    cfg = get_preset("igpt-tiny", resolution=8, objective="bert")
    tokens = torch.zeros(6, cfg.seq_len, dtype=torch.long)
    seen = []

    def classify(t, mask):  # mask 0 votes class 0, mask 1 class 2, on every image: all tied
        seen.append(mask)
        return None, _one_hot_logits([0 if len(seen) % 2 else 2] * len(t))

    preds = []
    for s in range(10):
        preds.append(predict(classify, tokens, cfg, 2, seed=s, batch_index=3))
        want = bert_eval_masks(tokens.shape, cfg.bert_mask_prob, 2, seed=s, batch_index=3)
        assert all(torch.equal(m, w) for m, w in zip(seen[-2:], want))  # the masks of (seed, batch)
    assert {int(c) for p in preds for c in p} == {0, 2}  # each tied class, never another
    assert torch.equal(predict(classify, tokens, cfg, 2, seed=4, batch_index=3), preds[4])


def test_shards_give_their_palette_when_init_has_none(tmp_path):
    # --init without a palette, no --palette: the shards' dataset.json gives it to SAVE/palette.npy and the export.
    from testdata import tiny_shards

    from igpt_ds.checkpoint.consolidated import save_consolidated
    from igpt_ds.config import get_preset
    from igpt_ds.data.shards import read_manifest
    from igpt_ds.model.transformer import IGPTModel
    from igpt_ds.palette import load_palette

    cfg = get_preset("igpt-tiny", resolution=8, n_layer=2, d_model=64, n_head=4)
    save_consolidated(tmp_path / "init", cfg, IGPTModel(cfg, seed=0).state_dict())
    shards = tiny_shards(tmp_path)
    run = tmp_path / "run"
    results = launch([FINETUNE, "--init", str(tmp_path / "init"), "--train-data", str(shards), "--val-data",
                      str(shards), "--augment", "none", "--no-progress", "--num-workers", "0", "--train-steps", "2",
                      "--eval-interval", "2", "--deepspeed_config", ds_config(tmp_path / "ds.json"), "--save",
                      str(run)], 1, timeout=300, cwd=str(ROOT), env=ENV)
    assert results[0].returncode == 0, results[0].stderr[-4000:]
    palette = read_manifest(shards).palette
    assert load_palette(run / "palette.npy").tobytes() == palette.tobytes()
    assert load_palette(run / "best" / "palette.npy").tobytes() == palette.tobytes()

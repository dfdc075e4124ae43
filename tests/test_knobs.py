"""The paper's architecture knobs (issue #17): --variant, --norm, --activation, --bias, --bert-mask-prob, --dropout.

Model-level checks run in this process; the command-line ones pretrain igpt-tiny at 8x8 on synthetic images
(fp32, batch 8, one process), as tests/test_pretrain.py does.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from layouts import write_ds_config

import igpt_ds
from igpt_ds.checkpoint.run import check_compatible
from igpt_ds.config import SOS_TOKEN, ModelConfig, get_preset
from igpt_ds.data.synthetic import SyntheticLoader
from igpt_ds.model.losses import compute_loss
from igpt_ds.model.transformer import IGPTModel
from igpt_ds.parallel.layout import ParallelLayout
from igpt_ds.testing import launch
from igpt_ds.train.args import FinetuneArgs, PretrainArgs, parse
from igpt_ds.train.classify_task import ClassifyTask
from igpt_ds.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "igpt_ds" / "pretrain.py")
COMMON = ["--resolution", "8", "--no-progress", "--lr", "3e-3", "--num-workers", "0", "--seed", "0"]
BATCH = 8
HF_TOL = 1e-4  # tests/test_hf_interop.py's bound (fp32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def tiny(**overrides) -> ModelConfig:
    return get_preset("igpt-tiny", resolution=8, n_layer=2, **overrides)


def tokens(batch=4, seed=1):
    return torch.randint(0, 512, (batch, 64), generator=torch.Generator().manual_seed(seed))


def randomized(model: IGPTModel, seed=0) -> IGPTModel:
    """Random non-zero weights everywhere (the zero head would hide every difference)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model


# ---- flags -------------------------------------------------------------------------------------

def test_variant_and_explicit_knobs_make_the_config():
    assert parse(PretrainArgs, []).model_overrides() == {"norm": "layernorm", "activation": "gelu", "bias": True,
                                                         "dropout": 0.0}
    args = parse(PretrainArgs, ["--variant", "openai", "--bias", "--objective", "bert", "--bert-mask-prob", "0.3",
                                "--dropout", "0.1"])
    assert args.model_overrides() == {"norm": "rmsnorm", "activation": "quick_gelu", "bias": True,
                                      "bert_mask_prob": 0.3, "dropout": 0.1}
    assert parse(PretrainArgs, ["--norm", "rmsnorm", "--no-bias"]).model_overrides()["bias"] is False
    # The default ("paper") variant is the presets as they are.
    assert get_preset("igpt-s", **parse(PretrainArgs, []).model_overrides()) == get_preset("igpt-s")
    # Fine-tuning sets only what was given.
    assert parse(FinetuneArgs, ["--train-data", "d", "--init", "ck"]).model_overrides() == {}


@pytest.mark.parametrize("cls, argv, message", [
    (PretrainArgs, ["--objective", "bert", "--bert-mask-prob", "1"], "--bert-mask-prob 1.0 must lie strictly between"),
    (PretrainArgs, ["--objective", "bert", "--bert-mask-prob", "0"], "--bert-mask-prob 0.0 must lie strictly between"),
    (PretrainArgs, ["--bert-mask-prob", "0.2"], "--bert-mask-prob is for --objective bert"),
    (PretrainArgs, ["--dropout", "1"], "--dropout 1.0 must lie in [0, 1)"),
    (PretrainArgs, ["--dropout", "-0.1"], "--dropout -0.1 must lie in [0, 1)"),
    (PretrainArgs, ["--variant", "gpt2"], "argument --variant: invalid choice: 'gpt2'"),
    (FinetuneArgs, ["--train-data", "d", "--init", "ck", "--dropout", "1.5"], "--dropout 1.5 must lie in [0, 1)"),
])
def test_bad_knobs_exit_2(cls, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(cls, argv, prog="x.py")
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_finetune_knobs_check_the_checkpoint_and_dropout_may_differ():
    cfg = tiny(objective="bert")

    def knobs(argv, resuming=False):
        return ClassifyTask(parse(FinetuneArgs, ["--train-data", "d", "--init", "ck", *argv]))._knobs(cfg, resuming)

    assert knobs([]) == cfg
    assert knobs(["--variant", "paper", "--bert-mask-prob", "0.15", "--dropout", "0.1"]) == cfg.replace(dropout=0.1)
    with pytest.raises(ValueError, match=r"--init ck: the flags contradict the checkpoint's model \(norm: checkpoint "
                                         r"'layernorm' vs flags 'rmsnorm', activation: .*bias: checkpoint True vs "
                                         r"flags False\).*only --dropout may differ"):
        knobs(["--variant", "openai"])
    with pytest.raises(ValueError, match="bert_mask_prob: checkpoint 0.15 vs flags 0.3"):
        knobs(["--bert-mask-prob", "0.3"])
    # A resume keeps the run's dropout: another value is refused, the same one (or none) is fine.
    with pytest.raises(ValueError, match="dropout: checkpoint 0.0 vs flags 0.1"):
        knobs(["--dropout", "0.1"], resuming=True)
    assert knobs(["--dropout", "0"], resuming=True) == cfg


def test_resume_refuses_other_knobs():
    saved = tiny(dropout=0.1)
    meta = {"model": saved.to_dict()}
    check_compatible(meta, saved.replace(activation_checkpointing=True), "ck")
    for change in (dict(dropout=0.0), dict(norm="rmsnorm"), dict(bias=False), dict(activation="quick_gelu"),
                   dict(bert_mask_prob=0.2)):
        with pytest.raises(ValueError, match=f"{next(iter(change))}: checkpoint .*--dropout as the run"):
            check_compatible(meta, saved.replace(**change), "ck")
    # Checkpoints written before the field existed read as dropout 0.
    old = {k: v for k, v in tiny().to_dict().items() if k != "dropout"}
    assert ModelConfig.from_dict(old).dropout == 0.0


def test_dropout_with_tensor_or_pipeline_parallelism_is_refused():
    cfg = tiny(dropout=0.1)
    ParallelLayout(world_size=2, tensor_parallel=1, pipeline_parallel=1).validate(cfg)  # data parallel: fine
    for tp, pp in ((2, 1), (1, 2)):
        with pytest.raises(ValueError, match=r"dropout=0.1 is not supported with tensor or pipeline parallelism"):
            ParallelLayout(world_size=2, tensor_parallel=tp, pipeline_parallel=pp).validate(cfg)
    ParallelLayout(world_size=2, tensor_parallel=2, pipeline_parallel=1).validate(tiny())


# ---- the model -----------------------------------------------------------------------------------

def test_dropout_zero_draws_nothing_and_changes_nothing():
    torch.manual_seed(0)
    plain = randomized(IGPTModel(tiny())).train()
    zero = IGPTModel(tiny(dropout=0.0)).train()
    zero.load_state_dict(plain.state_dict())
    x = tokens()
    state = torch.get_rng_state()
    a, b = plain(x), zero(x)
    assert torch.equal(torch.get_rng_state(), state)  # no generator was touched
    assert torch.equal(a, b)


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_dropout_changes_training_not_evaluation(objective):
    model = randomized(IGPTModel(tiny(objective=objective, dropout=0.2)))
    plain = IGPTModel(tiny(objective=objective)).eval()
    plain.load_state_dict(model.state_dict())
    x = tokens()
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) < 0.15) if objective == "bert" else None
    with torch.no_grad():
        want = plain(x, mask)
        assert torch.equal(model.eval()(x, mask), want)
        model.train()
        torch.manual_seed(3)
        first = model(x, mask)
        torch.manual_seed(3)
        assert torch.equal(model(x, mask), first)  # the masks come from the default generator
        assert not torch.allclose(first, want, atol=1e-3)
        assert not torch.allclose(model(x, mask), first, atol=1e-3)  # a fresh draw


def test_dropout_with_activation_checkpointing_gives_the_same_gradients():
    model = randomized(IGPTModel(tiny(dropout=0.2))).train()
    ckpt = IGPTModel(tiny(dropout=0.2, activation_checkpointing=True)).train()
    ckpt.load_state_dict(model.state_dict())
    x, grads = tokens(), []
    for m in (model, ckpt):
        torch.manual_seed(5)
        compute_loss(m, x).loss.backward()
        grads.append({k: p.grad for k, p in m.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=1e-6, msg=k)


# ---- the command line: pretraining, export, losses -------------------------------------------------

def pretrain(tmp_path, name, steps, *flags):
    run = tmp_path / name
    cfg = write_ds_config(tmp_path / f"{name}.json", BATCH, 0, None, gradient_clipping=1.0)
    results = launch([PRETRAIN, *COMMON, "--train-steps", str(steps), "--deepspeed_config", cfg, "--save", str(run),
                      *flags], 1, timeout=600, cwd=str(ROOT), env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert results[0].returncode == 0, results[0].stderr[-4000:]
    return run


def metrics(run):
    return read_metrics(os.path.join(run, "metrics.jsonl"))


def test_variant_openai_pretrains_and_exports_to_hf_with_matching_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    run = pretrain(tmp_path, "openai", 3, "--variant", "openai")
    meta = json.loads((run / "global_step3" / "igpt_meta.json").read_text())
    assert {k: meta["model"][k] for k in ("norm", "activation", "bias", "dropout")} == {
        "norm": "rmsnorm", "activation": "quick_gelu", "bias": False, "dropout": 0.0}
    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), str(run), str(out),
                           "--to", "hf"], cwd=str(ROOT), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["activation_function"] == "quick_gelu"
    ref = transformers.ImageGPTForCausalImageModeling.from_pretrained(out).eval()
    ours, cfg, _ = igpt_ds.load_pretrained(run)
    assert (cfg.norm, cfg.activation, cfg.bias) == ("rmsnorm", "quick_gelu", False)
    x = tokens(3)
    with torch.no_grad():
        mine = ours(x)
        theirs = ref(torch.cat([torch.full((3, 1), SOS_TOKEN), x[:, :-1]], dim=1)).logits
    assert mine.abs().max() > 1e-3  # trained: the zero-initialised head moved
    diff = float((mine - theirs).abs().max())
    print(f"HF logit max |difference|: {diff:.2e}")
    assert diff <= HF_TOL


def test_dropout_zero_gives_todays_losses_and_dropout_changes_training_not_evaluation(tmp_path):
    today = [r["loss"] for r in metrics(pretrain(tmp_path, "today", 4))]
    zero = [r["loss"] for r in metrics(pretrain(tmp_path, "zero", 4, "--dropout", "0"))]
    assert zero == today  # bit-identical, not merely close
    run = pretrain(tmp_path, "drop", 4, "--dropout", "0.2", "--val-data", "synthetic", "--eval-interval", "4",
                   "--eval-batches", "2")
    records = metrics(run)
    dropped = [r["loss"] for r in records if "loss" in r]
    assert dropped[0] == today[0]  # the zero head: ln 512 whatever the dropout
    assert all(abs(a - b) > 1e-6 for a, b in zip(dropped[1:], today[1:])), (dropped, today)
    val = next(r["val_loss"] for r in records if "val_loss" in r)
    # The same final weights, without dropout, on the same validation batches (pretrain_task's loader).
    model, cfg, _ = igpt_ds.load_pretrained(run)
    assert cfg.dropout == 0.2
    plain = IGPTModel(cfg.replace(dropout=0.0)).eval()
    plain.load_state_dict(model.state_dict())
    loader = SyntheticLoader(batch_size=BATCH, dp_rank=0, dp_world_size=1, resolution=8, seed=10 ** 6)
    with torch.no_grad():
        losses = [float(compute_loss(plain, b["tokens"]).loss) for b, _ in zip(loader, range(2))]
    print(f"val loss: trainer {val!r}, dropout-free eval {sum(losses) / 2!r}")
    assert abs(val - sum(losses) / 2) <= 1e-6


# ---- fine-tuning: --dropout over a pretrained init; the architecture knobs only check it -------------

def test_finetune_adds_dropout_to_a_pretrained_init_and_refuses_other_knobs(tmp_path, capsys):
    import numpy as np

    from igpt_ds import finetune
    from igpt_ds.checkpoint.consolidated import save_consolidated

    cfg = get_preset("igpt-tiny", resolution=8, n_layer=2, d_model=64, n_head=4)
    palette = np.random.default_rng(1).uniform(-1, 1, (512, 3)).astype(np.float32)
    save_consolidated(tmp_path / "init", cfg, IGPTModel(cfg, seed=0).state_dict(), palette=palette)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8),
             labels=np.arange(64) % 4, label_names=np.array(list("abcd")))
    ds = write_ds_config(tmp_path / "ds.json", 16, 0, None)
    base = ["--init", str(tmp_path / "init"), "--train-data", str(tmp_path / "d.npz"), "--no-progress",
            "--num-workers", "0", "--val-fraction", "0.25", "--train-steps", "2", "--deepspeed_config", ds]
    out = tmp_path / "refused"
    assert finetune.main([*base, "--variant", "openai", "--dropout", "0.1", "--save", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the flags contradict the checkpoint's model (norm: checkpoint 'layernorm' vs flags 'rmsnorm'" in err, err
    assert not out.exists()
    run = tmp_path / "run"
    results = launch([str(ROOT / "igpt_ds" / "finetune.py"), *base, "--variant", "paper", "--dropout", "0.1",
                      "--save", str(run)], 1, timeout=600, cwd=str(ROOT),
                     env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert results[0].returncode == 0, results[0].stderr[-4000:]
    meta = json.loads((run / "global_step2" / "igpt_meta.json").read_text())
    assert meta["model"] == cfg.replace(dropout=0.1).to_dict()
    assert json.loads((run / "best" / "config.json").read_text())["model"]["dropout"] == 0.1

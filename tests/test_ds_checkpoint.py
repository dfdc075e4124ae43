"""DeepSpeed checkpoints of any layout -> consolidated -> other layouts, through the user's tools."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import igpt_ds
from igpt_ds.testing import launch, run_ranks

ROOT = Path(__file__).resolve().parents[1]
CONVERT = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
ENV = {"DS_ACCELERATOR": "cpu"}
TOL = 1e-5  # fp32; a TP=2 forward reorders sums


def convert(*args, ok=True):
    import os

    out = subprocess.run([*CONVERT, *map(str, args)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, **ENV), cwd=str(ROOT))
    assert (out.returncode == 0) == ok, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def tp2_zero3_run(tmp_path_factory):
    """igpt-tiny (8x8) trained 2 steps with TP=2 x DP=2 under ZeRO-3."""
    tmp = tmp_path_factory.mktemp("tp2z3")
    cfg = tmp / "z3.json"
    cfg.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 3}}))
    run = tmp / "run"
    results = launch([str(ROOT / "igpt_ds" / "pretrain.py"), "--resolution", "8", "--train-steps", "2",
                      "--tensor-parallel", "2", "--deepspeed_config", str(cfg), "--save", str(run),
                      "--no-progress", "--num-workers", "0"], 4, timeout=600, env=ENV, cwd=str(ROOT))
    assert all(r.returncode == 0 for r in results), results[0].stderr[-3000:]
    return run


def _tp_logits(rank, world, run, tokens):
    """Logits of the checkpoint in its own layout (TP=2 x DP=2, ZeRO-3), gathered over TP."""
    from igpt_ds.checkpoint.reshard import _engine_for, find_checkpoint

    root, tag, meta = find_checkpoint(run)
    _, _, _, engine, _ = _engine_for(meta, meta["tensor_parallel"], meta["pipeline_parallel"])
    engine.load_checkpoint(str(root), tag=tag)
    engine.eval()
    with torch.no_grad():
        return engine(tokens).float()


def test_tp2_zero3_checkpoint_consolidates_to_the_same_model(tp2_zero3_run, tmp_path):
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    reference = run_ranks(_tp_logits, 4, str(tp2_zero3_run), tokens, env=ENV)
    for logits in reference[1:]:
        assert torch.equal(logits, reference[0])
    out = tmp_path / "export"
    convert(tp2_zero3_run, out, "--to", "consolidated")
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "igpt-ds-consolidated" and meta["model"]["resolution"] == 8
    model, cfg, palette = igpt_ds.load_pretrained(out)
    with torch.no_grad():
        logits = model(tokens)
    assert logits.abs().max() > 0  # the head has trained away from zero
    torch.testing.assert_close(logits, reference[0], rtol=0, atol=TOL)
    # load_pretrained reads the DeepSpeed directory directly, too (consolidating on the way)
    direct, _, _ = igpt_ds.load_pretrained(tp2_zero3_run)
    with torch.no_grad():
        assert torch.equal(direct(tokens), logits)


def test_reshard_to_pp2_and_back_and_resume(tp2_zero3_run, tmp_path):
    export, pp2, back = tmp_path / "export", tmp_path / "pp2", tmp_path / "back"
    convert(tp2_zero3_run, export, "--to", "consolidated")
    out = convert(export, pp2, "--to", "deepspeed", "--pipeline-parallel", "2")
    assert "optimizer (Adam moments) restarts" in out.stdout
    meta = json.loads((pp2 / (pp2 / "latest").read_text() / "igpt_meta.json").read_text())
    assert meta["pipeline_parallel"] == 2 and meta["optimizer_restarted"] and meta["step"] == 2
    convert(pp2, back, "--to", "consolidated")
    a, b = load_file(str(export / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # A run continues on the new layout from the converted checkpoint.
    cfg = tmp_path / "pipe.json"
    cfg.write_text(json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4,
                               "zero_optimization": {"stage": 1}}))
    results = launch([str(ROOT / "igpt_ds" / "pretrain.py"), "--resolution", "8", "--train-steps", "3",
                      "--pipeline-parallel", "2", "--deepspeed_config", str(cfg), "--load", str(pp2),
                      "--save", str(tmp_path / "cont"), "--no-progress", "--num-workers", "0"], 2,
                     timeout=600, env=ENV, cwd=str(ROOT))
    assert all(r.returncode == 0 for r in results), results[0].stderr[-3000:]
    assert "Adam state restarts at step 2" in results[0].stdout
    assert (tmp_path / "cont" / "latest").read_text() == "global_step3"


def test_impossible_reshard_is_refused_without_output(tp2_zero3_run, tmp_path):
    export = tmp_path / "export"
    convert(tp2_zero3_run, export, "--to", "consolidated")
    out = convert(export, tmp_path / "bad", "--to", "deepspeed", "--tensor-parallel", "3", ok=False)
    assert "tensor-parallel size 3 does not divide n_head=4" in out.stderr
    assert not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary leftovers


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_to_fp32_agrees_with_our_export(tmp_path, stage):
    """DeepSpeed's own consolidation (``zero_to_fp32``) of our DP2 ZeRO-2/3 checkpoints gives our export's
    fp32 weights, under the same names, bit for bit (fp32 run: module weights = the optimizer's masters)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from igpt_ds.checkpoint.formats import read_checkpoint

    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": stage}}))
    run = tmp_path / "run"
    results = launch([str(ROOT / "igpt_ds" / "pretrain.py"), "--resolution", "8", "--train-steps", "2",
                      "--deepspeed_config", str(cfg), "--save", str(run), "--no-progress", "--num-workers", "0"],
                     2, timeout=600, env=ENV, cwd=str(ROOT))
    assert all(r.returncode == 0 for r in results), results[0].stderr[-3000:]
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(run), tag="global_step2")
    _, ours, _, _ = read_checkpoint(run)
    assert set(ours) == set(theirs)
    for name, value in ours.items():
        assert torch.equal(value, theirs[name].float()), name

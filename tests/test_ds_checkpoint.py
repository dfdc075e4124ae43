"""DeepSpeed checkpoints of any layout -> consolidated -> other layouts, through the user's tools.

The file reader (igpt_ds.checkpoint.deepspeed_files: one process, no engine) is checked against
DeepSpeed itself reading the same files into engines of the checkpoint's own layout
(igpt_ds.checkpoint.engine_reader), exactly; resharding against the uninterrupted run's losses.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from layouts import LOSS_TOL
from safetensors.torch import load_file

import igpt_ds
from igpt_ds.testing import launch, run_ranks
from igpt_ds.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONVERT = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]
PRETRAIN = str(ROOT / "igpt_ds" / "pretrain.py")
ENV = {"DS_ACCELERATOR": "cpu"}
TOL = 1e-5  # fp32; a TP=2 forward reorders sums
KINDS = ("module", "master", "exp_avg", "exp_avg_sq")

# name -> (ranks, DeepSpeed config, flags): the layouts the file reader must read exactly
RUNS = {
    "dp2_zero3": (2, {"zero_optimization": {"stage": 3}}, []),
    "tp2": (2, {"zero_optimization": {"stage": 1}}, ["--tensor-parallel", "2"]),
    "pp2": (2, {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 2}, ["--pipeline-parallel", "2"]),
    "tp2_dp2_zero3": (4, {"zero_optimization": {"stage": 3}}, ["--tensor-parallel", "2"]),
    "tp2_pp2": (4, {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 4},
                ["--tensor-parallel", "2", "--pipeline-parallel", "2"]),
    "dp2_zero1_bf16": (2, {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}, []),
    "dp2_zero2": (2, {"zero_optimization": {"stage": 2}}, []),
}


def convert(*args, ok=True):
    out = subprocess.run([*CONVERT, *map(str, args)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, **ENV), cwd=str(ROOT))
    assert (out.returncode == 0) == ok, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def pretrain(nprocs, args):
    results = launch([PRETRAIN, "--resolution", "8", "--no-progress", "--num-workers", "0", *args], nprocs,
                     timeout=600, env=ENV, cwd=str(ROOT))
    assert all(r.returncode == 0 for r in results), results[0].stdout[-2000:] + results[0].stderr[-3000:]
    return results


def ds_json(path: Path, cfg: dict) -> str:
    path.write_text(json.dumps({"train_batch_size": 8, **cfg}))
    return str(path)


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))}


class Runs:
    """Training runs of igpt-tiny (8x8, synthetic data, global batch 8), trained on first use."""

    def __init__(self, tmp: Path):
        self.tmp, self.done = tmp, {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.done:
            nprocs, cfg, flags = RUNS.get(name, RUNS["dp2_zero3"])
            run = self.tmp / name
            # dp2_zero3 runs 4 steps with a checkpoint at 2: the uninterrupted run resharding is judged against
            steps = ["--train-steps", "4", "--save-interval", "2"] if name == "dp2_zero3" else ["--train-steps", "2"]
            pretrain(nprocs, [*steps, *flags, "--deepspeed_config", ds_json(self.tmp / f"{name}.json", cfg),
                              "--save", str(run)])
            self.done[name] = run
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("runs"))


def tag(run: Path, step: int = 2) -> Path:
    return run / f"global_step{step}"


# ---- reading ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dp2_zero3", "tp2", "pp2", "tp2_dp2_zero3", "tp2_pp2", "dp2_zero1_bf16"])
def test_one_process_reader_equals_deepspeed_engines(runs, name):
    """Every kind of every tensor, read from the files in this process, equals what DeepSpeed's own
    engines of the checkpoint's layout hold after loading it: masters and moments bit for bit, module
    weights as the 16-bit values for bf16."""
    from igpt_ds.checkpoint.deepspeed_files import DeepSpeedCheckpoint
    from igpt_ds.checkpoint.engine_reader import read_with_engines

    path = tag(runs[name])
    reference = read_with_engines(path, KINDS)
    ckpt = DeepSpeedCheckpoint(path)
    assert set(ckpt.names()) == set(reference["module"]) and len(ckpt.names()) > 20
    bf16 = name.endswith("bf16")
    for kind in KINDS:
        for n in ckpt.names():
            ours = ckpt.tensor(n, kind)
            assert ours.dtype == (torch.bfloat16 if bf16 and kind == "module" else torch.float32), (kind, n)
            assert torch.equal(ours.float(), reference[kind][n]), (kind, n)
    if bf16:  # the two copies differ: the masters are not the bf16 values
        assert any(not torch.equal(ckpt.tensor(n, "master"), ckpt.tensor(n, "module").float()) for n in ckpt.names())
    assert ckpt.adam_step() == 2


def test_export_weights_master_and_module(runs, tmp_path):
    run = runs["dp2_zero1_bf16"]
    from igpt_ds.checkpoint.deepspeed_files import DeepSpeedCheckpoint

    ckpt = DeepSpeedCheckpoint(run)
    for weights in ("master", "module"):
        out = tmp_path / weights
        printed = convert(run, out, "--to", "consolidated", "--weights", weights).stdout
        assert re.search(r"peak RSS \d+ MB", printed), printed
        meta = json.loads((out / "config.json").read_text())
        assert meta["weights"] == weights and meta["trained_precision"] == "bf16" and meta["step"] == 2
        exported = load_file(str(out / "model.safetensors"))
        assert list(exported) == ckpt.names()
        for n, t in exported.items():
            assert t.dtype == torch.float32 and torch.equal(t, ckpt.tensor(n, weights).float()), n
    model, _, _ = igpt_ds.load_pretrained(run)  # the DeepSpeed directory itself, masters by default
    assert torch.equal(model.state_dict()["blocks.0.mlp.fc.weight"], ckpt.tensor("blocks.0.mlp.fc.weight"))


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_to_fp32_agrees_with_our_export(runs, tmp_path, stage):
    """DeepSpeed's own consolidation (``zero_to_fp32``) of our DP2 ZeRO-2/3 checkpoints gives our export's
    fp32 weights, under the same names, bit for bit."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = runs["dp2_zero2" if stage == 2 else "dp2_zero3"]
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(run), tag="global_step2")
    convert(tag(run), tmp_path / "export", "--to", "consolidated")
    ours = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert set(ours) == set(theirs)
    for name, value in ours.items():
        assert torch.equal(value, theirs[name].float()), name


def test_tp2_dp2_zero3_checkpoint_consolidates_to_the_same_model(runs, tmp_path):
    """The export's forward equals the checkpoint's own TP=2 x DP=2 ZeRO-3 engines' forward."""
    run = runs["tp2_dp2_zero3"]
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    reference = run_ranks(_tp_logits, 4, str(run), tokens, env=ENV)
    out = tmp_path / "export"
    convert(run, out, "--to", "consolidated")
    model, cfg, palette = igpt_ds.load_pretrained(out)
    with torch.no_grad():
        logits = model(tokens)
    assert logits.abs().max() > 0  # the head has trained away from zero
    torch.testing.assert_close(logits, reference[0], rtol=0, atol=TOL)


def _tp_logits(rank, world, run, tokens):
    from igpt_ds.checkpoint.deepspeed_files import locate
    from igpt_ds.checkpoint.engine_reader import engine_for

    root, tag_name, meta = locate(run)
    _, _, engine = engine_for(meta)
    engine.load_checkpoint(str(root), tag=tag_name)
    engine.eval()
    with torch.no_grad():
        return engine(tokens).float()


# ---- memory ----------------------------------------------------------------------------------------

WIDE = dict(n_layer=4, d_model=1024, n_head=8, resolution=8)  # 51M parameters, 204 MB in fp32


def _write_wide(rank, world, out, cfg_file):
    """A checkpoint of the WIDE model at step 0, written the way the training loop writes them."""
    from igpt_ds.checkpoint.run import checkpoint_meta, write_checkpoint
    from igpt_ds.config import ModelConfig
    from igpt_ds.parallel import layout as parallel
    from igpt_ds.train.engine import WarmupCosine, build_engine, build_model, load_ds_config

    cfg = ModelConfig(**WIDE)
    state = parallel.initialize(1, 1, model=cfg, backend="gloo")
    parallel.init_deepspeed_comm()
    ds = load_ds_config(cfg_file, world)
    engine, _ = build_engine(build_model(cfg, state, ds, seed=0), state, ds, lr=1e-3, schedule=WarmupCosine(0, 1))
    write_checkpoint(engine, out, 0, checkpoint_meta(cfg, ds, state.layout, None), {"rng": None, "loader": None})
    return 0


def test_export_memory_does_not_grow_with_world_size(tmp_path):
    """Consolidating the same 204 MB model from a 1-rank ZeRO-0 and a 4-rank ZeRO-3 checkpoint costs the
    same peak RSS (within 20%), and the reading adds at most 3x the largest parameter plus 32 MB, under
    a third of the model's fp32 size. The old engine path held the whole model in every rank."""
    from igpt_ds.config import ModelConfig
    from igpt_ds.model.transformer import IGPTModel

    with torch.device("meta"):
        shapes = {n: p.shape for n, p in IGPTModel(ModelConfig(**WIDE)).named_parameters()}
    model_mb = sum(s.numel() for s in shapes.values()) * 4 / 2**20
    largest_mb = max(s.numel() for s in shapes.values()) * 4 / 2**20
    peaks, over, exports = {}, {}, {}
    for world, stage in ((1, 0), (4, 3)):
        cfg = ds_json(tmp_path / f"z{stage}.json", {"zero_optimization": {"stage": stage}})
        ckpt = tmp_path / f"world{world}"
        run_ranks(_write_wide, world, str(ckpt), cfg, env=ENV, timeout=600)
        printed = convert(ckpt, tmp_path / f"export{world}", "--to", "consolidated").stdout
        m = re.search(r"peak RSS (\d+) MB \(([+-]\d+) MB over", printed)
        assert m, printed
        peaks[world], over[world] = int(m.group(1)), int(m.group(2))
        exports[world] = load_file(str(tmp_path / f"export{world}" / "model.safetensors"))
    print(f"peak RSS {peaks} MB, growth over the start {over} MB; model {model_mb:.0f} MB, largest {largest_mb:.0f} MB")
    assert abs(peaks[4] - peaks[1]) <= 0.2 * peaks[1], (peaks, over)
    for world in peaks:
        assert over[world] <= 3 * largest_mb + 32 and over[world] < model_mb / 3, (world, over, model_mb, largest_mb)
    for name, t in exports[1].items():  # the same init at every ZeRO stage and world size
        assert torch.equal(t, exports[4][name]), name


# ---- resharding ------------------------------------------------------------------------------------

def test_reshard_keeps_adam_and_continues_the_run_exactly(runs, tmp_path):
    """DP2-ZeRO3 -> TP2 -> DP2xPP2 -> DP2-ZeRO3, each resumed for steps 3-4: the losses are the
    uninterrupted run's (Adam's moments, its step, the schedule and the data position carried)."""
    source = runs["dp2_zero3"]
    expected = losses(source)
    chain = [  # (name, ranks, flags, DeepSpeed config, convert flags)
        ("tp2", 2, ["--tensor-parallel", "2"], {"zero_optimization": {"stage": 1}}, ["--tensor-parallel", "2"]),
        ("dp2_pp2", 4, ["--pipeline-parallel", "2"],
         {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 2},
         ["--pipeline-parallel", "2", "--data-parallel", "2"]),
        ("dp2_zero3", 2, [], {"zero_optimization": {"stage": 3}}, ["--data-parallel", "2"]),
    ]
    previous = tag(source)
    for name, nprocs, flags, cfg, convert_flags in chain:
        cfg_file = ds_json(tmp_path / f"{name}.json", cfg)
        converted = tmp_path / f"to_{name}"
        printed = convert(previous, converted, "--to", "deepspeed", *convert_flags, "--deepspeed_config", cfg_file)
        assert "Adam state carried, data position carried" in printed.stdout, printed.stdout
        meta = json.loads((tag(converted) / "igpt_meta.json").read_text())
        assert not meta["optimizer_restarted"] and meta["data_position"] == "carried" and meta["step"] == 2
        resumed = tmp_path / f"resumed_{name}"
        out = pretrain(nprocs, ["--train-steps", "4", *flags, "--deepspeed_config", cfg_file, "--load",
                                str(converted), "--save", str(resumed)])
        assert "Adam state restarts" not in out[0].stdout
        got = losses(resumed)
        assert sorted(got) == [3, 4], got
        for step in (3, 4):
            assert abs(got[step] - expected[step]) <= LOSS_TOL, (name, step, got[step], expected[step])
        previous = converted


def test_reshard_from_an_export_restarts_adam(runs, tmp_path):
    """A consolidated export holds no optimizer state: the checkpoint says so and the resumed run says so."""
    export, pp2, back = tmp_path / "export", tmp_path / "pp2", tmp_path / "back"
    convert(tag(runs["dp2_zero3"]), export, "--to", "consolidated")
    out = convert(export, pp2, "--to", "deepspeed", "--pipeline-parallel", "2")
    assert "Adam restarts" in out.stdout
    meta = json.loads((tag(pp2) / "igpt_meta.json").read_text())
    assert meta["pipeline_parallel"] == 2 and meta["optimizer_restarted"] and meta["step"] == 2
    convert(pp2, back, "--to", "consolidated")
    a, b = load_file(str(export / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    cfg = ds_json(tmp_path / "pipe.json", {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1}})
    results = pretrain(2, ["--train-steps", "3", "--pipeline-parallel", "2", "--deepspeed_config", cfg,
                           "--load", str(pp2), "--save", str(tmp_path / "cont")])
    assert "Adam state restarts at step 2" in results[0].stdout
    assert (tmp_path / "cont" / "latest").read_text() == "global_step3"


# ---- bad input -------------------------------------------------------------------------------------

def _untouched(tmp_path, keep):
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)  # no output, no temporary leftovers


def test_impossible_reshard_is_refused_without_output(runs, tmp_path):
    out = convert(runs["tp2"], tmp_path / "bad", "--to", "deepspeed", "--tensor-parallel", "3", ok=False)
    assert "tensor-parallel size 3 does not divide n_head=4" in out.stderr
    _untouched(tmp_path, [])


def test_broken_checkpoints_are_named_and_nothing_is_written(runs, tmp_path):
    broken = tmp_path / "run"
    shutil.copytree(runs["tp2"], broken)
    step = tag(broken)
    # a missing rank file
    optim = step / "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    optim.rename(tmp_path / "aside.pt")
    out = convert(broken, tmp_path / "out", "--to", "consolidated", ok=False)
    assert f"{optim}: missing" in out.stderr, out.stderr
    (tmp_path / "aside.pt").rename(optim)
    # a truncated tensor file
    data = optim.read_bytes()
    optim.write_bytes(data[: len(data) // 2])
    out = convert(broken, tmp_path / "out", "--to", "consolidated", ok=False)
    assert str(optim) in out.stderr and "truncated" in out.stderr, out.stderr
    optim.write_bytes(data)
    # 'latest' naming a tag that is not there
    (broken / "latest").write_text("global_step7")
    out = convert(broken, tmp_path / "out", "--to", "deepspeed", "--tensor-parallel", "2", ok=False)
    assert "names 'global_step7'" in out.stderr and str(broken / "global_step7") in out.stderr, out.stderr
    _untouched(tmp_path, ["run"])
    (broken / "latest").write_text("global_step2")
    convert(broken, tmp_path / "out", "--to", "consolidated")  # repaired, it converts


def test_data_position_carries_only_where_the_loader_can_continue_it():
    from igpt_ds.checkpoint.reshard import carried_loader_state
    from igpt_ds.data.synthetic import SyntheticLoader

    shards = {"version": 1, "epoch": 3, "batch": 17, "dp_rank": 1, "seed": 0, "batch_size": 4, "dp_world_size": 2,
              "num_workers": 2, "drop_last": True, "shuffle": True, "num_samples": 5000}
    assert carried_loader_state(shards, 2, 4, dp_rank=0) == {**shards, "dp_rank": 0}
    assert carried_loader_state(shards, 1, 8, dp_rank=0) is None  # the epoch plan depends on the DP size
    assert carried_loader_state(shards, 2, 2, dp_rank=0) is None  # and on the micro-batch
    assert carried_loader_state(None, 2, 4, dp_rank=0) is None
    # the synthetic stream: DP 2 x micro 4 after 3 steps continues as DP 1 x micro 8 at the same sample
    a = SyntheticLoader(batch_size=4, dp_rank=0, dp_world_size=2, resolution=8)
    it = iter(a)
    for _ in range(3):
        next(it)
    b = SyntheticLoader(batch_size=8, dp_rank=0, dp_world_size=1, resolution=8)
    b.load_state_dict(carried_loader_state(a.state_dict(), 1, 8, dp_rank=0))
    assert next(iter(b))["keys"][0] == "synthetic-24"
    with pytest.raises(ValueError, match="not a multiple"):
        SyntheticLoader(batch_size=16, dp_rank=0, dp_world_size=1, resolution=8).load_state_dict(a.state_dict())

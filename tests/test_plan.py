"""The planner: exact parameter counts, DeepSpeed's model-state figures, measured memory, the CLI."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest

from igpt_ds.config import PRESETS, get_preset
from igpt_ds.parallel.layout import ParallelLayout
from igpt_ds.planning.plan import (
    PlanInput,
    gib,
    largest_layer_parameters,
    model_state_bytes,
    plan,
    search,
    stage_parameters,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(*args):
    """tools/plan.py's main() in this process (torch is already imported: fast); one test runs it for real."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_tool", os.path.join(ROOT, "tools", "plan.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = tool.main(list(args))
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_matches_config(name):
    cfg = get_preset(name)
    assert sum(stage_parameters(cfg)) == cfg.num_parameters()
    assert sum(stage_parameters(cfg, 1, 4 if cfg.n_layer >= 4 else 1)) == cfg.num_parameters()


@pytest.mark.parametrize("overrides", [{}, {"objective": "bert"}, {"bias": False, "norm": "rmsnorm"}])
def test_parameter_counts_match_the_real_model(overrides):
    from deepspeed.runtime.zero.stage3 import model_to_params

    from igpt_ds.model.transformer import IGPTModel

    cfg = get_preset("igpt-tiny", **overrides)
    model = IGPTModel(cfg)
    assert plan(PlanInput(cfg)).total_parameters == sum(p.numel() for p in model.parameters())
    total, largest = model_to_params(model)  # DeepSpeed's own walk of the module tree
    assert total == sum(stage_parameters(cfg)) and largest == largest_layer_parameters(cfg)


def test_tensor_parallel_shard_matches_the_model_layers():
    """Per-TP-rank count from the sharding rules: column/row weights split, norms/positions/row biases not."""
    cfg = get_preset("igpt-s")
    d, L, T = cfg.d_model, cfg.n_layer, cfg.seq_len
    replicated = L * (4 * d + d + d) + 2 * d + T * d + d  # norms, row-parallel biases, ln_f, positions, SOS
    split = cfg.num_parameters() - replicated
    for tp in (2, 4, 8):
        assert sum(stage_parameters(cfg, tp)) == replicated + split // tp


@pytest.mark.parametrize("gpus_per_node, nodes", [(1, 1), (8, 1), (8, 4)])
@pytest.mark.parametrize("name", ["igpt-tiny", "igpt-m", "igpt-xl"])
def test_model_states_equal_deepspeed_estimators(name, gpus_per_node, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = get_preset(name)
    P, largest, N = cfg.num_parameters(), largest_layer_parameters(cfg), gpus_per_node * nodes
    # no offload: the GPU figure (the second value), as DeepSpeed's tables print it
    _, ds2 = estimate_zero2_model_states_mem_needs(P, gpus_per_node, nodes, cpu_offload=False)
    _, ds3, ds_layer = estimate_zero3_model_states_mem_needs(P, largest, gpus_per_node, nodes, cpu_offload=False,
                                                              cpu_offload_params=False)
    z2 = sum(model_state_bytes(P, N, 2, "bf16").values())
    z3 = sum(model_state_bytes(P, N, 3, "bf16", largest).values())
    z1 = sum(model_state_bytes(P, N, 1, "fp16").values())
    assert abs(z2 - ds2) <= 1 and abs(z3 - ds3) <= 1 and ds_layer == 4 * largest
    # ZeRO-1 = ZeRO-2 with the 16-bit gradients unsharded (DeepSpeed has no ZeRO-1 estimator)
    assert abs(z1 - (ds2 + 2 * P - 2 * P // N)) <= 1
    # the same through the planner at DP = N, TP = PP = 1
    for zero, ds in ((2, ds2), (3, ds3)):
        p = plan(PlanInput(cfg, precision="bf16", zero_stage=zero, layout=ParallelLayout(N, 1, 1),
                           gpu_memory_gib=1000))
        assert abs(p.model_states - ds) <= 2


def test_all_live_estimator_prints_the_same_figures():
    """``..._all_live`` walks a real model and prints; its no-offload row is our figure in GB."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live

    from igpt_ds.model.transformer import IGPTModel

    cfg = get_preset("igpt-tiny")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        estimate_zero3_model_states_mem_needs_all_live(IGPTModel(cfg), num_gpus_per_node=4)
    row = [line for line in buf.getvalue().splitlines() if "offload_param=none, offload_optimizer=none" in line][0]
    ds_gpu_gb = float(row.split("|")[1].strip().rstrip("GB"))
    ours = sum(model_state_bytes(cfg.num_parameters(), 4, 3, "bf16", largest_layer_parameters(cfg)).values())
    assert ds_gpu_gb == pytest.approx(ours / 2 ** 30, abs=0.005)


def test_fp32_states_and_zero_sharding():
    P = 1000
    assert model_state_bytes(P, 4, 0, "fp32") == {"weights": 4000, "gradients": 4000, "optimizer": 8000}
    assert model_state_bytes(P, 4, 1, "fp32") == {"weights": 4000, "gradients": 4000, "optimizer": 2000}
    assert model_state_bytes(P, 4, 2, "fp32") == {"weights": 4000, "gradients": 1000, "optimizer": 2000}
    assert sum(model_state_bytes(P, 1, 0, "bf16").values()) == 20 * P


# Measured vs predicted: igpt-tiny, fp32, micro-batch 2, MR 32^2 (activations dominate), CPU.
# Bound (BENCHMARKS.md, "Planner accuracy"): 10% with the fused attention kernels (torch's default on CPU
# and GPU), 15% with the math path.
@pytest.mark.parametrize("attention, checkpointing, bound", [
    ("flash", False, 0.10), ("flash", True, 0.10), ("math", False, 0.15)])
def test_prediction_matches_measured_peak(attention, checkpointing, bound):
    from igpt_ds.planning.memory import measure_train_step

    cfg = get_preset("igpt-tiny")
    measured = measure_train_step(cfg, micro_batch=2, activation_checkpointing=checkpointing, attention=attention)
    p = plan(PlanInput(cfg, micro_batch=2, precision="fp32", activation_checkpointing=checkpointing,
                       attention=attention, gpu_memory_gib=80))
    assert measured["weights"] == p.weights
    assert 0 <= measured["optimizer"] - p.optimizer <= 4 * 64  # + torch Adam's scalar 'step' per tensor
    error = p.total / measured["peak"] - 1
    assert abs(error) <= bound, f"predicted {p.total} vs measured {measured['peak']}: {error:+.1%}"


def test_xl_at_64_trains_on_8_x_80gb():
    xl = get_preset("igpt-xl")
    assert xl.seq_len == 64 * 64
    fitting = search(PlanInput(xl, micro_batch=8, precision="bf16", gpu_memory_gib=80), gpus=8)
    assert fitting, "no layout of iGPT-XL fits 8 x 80 GB"
    z3 = plan(PlanInput(xl, micro_batch=8, precision="bf16", zero_stage=3, layout=ParallelLayout(8, 1, 1),
                        activation_checkpointing=True, gpu_memory_gib=80))
    assert z3.fits and gib(z3.total) < 35
    assert any("18 B x P / N" in line for line in z3.lines)
    # without ZeRO or model parallelism it cannot fit: 20 B x 6.8B params alone is 127 GiB
    assert not plan(PlanInput(xl, precision="bf16", zero_stage=0, layout=ParallelLayout(8, 1, 1),
                              activation_checkpointing=True)).fits


def test_pipeline_in_flight_microbatches_keep_activations():
    cfg = get_preset("igpt-m")
    one = plan(PlanInput(cfg, micro_batch=4, zero_stage=1, layout=ParallelLayout(1, 1, 1)))
    four = plan(PlanInput(cfg, micro_batch=4, zero_stage=1, layout=ParallelLayout(4, 1, 4)))
    assert four.stage == 0 and four.in_flight_micro_batches == 4
    assert four.activations_no_checkpointing == pytest.approx(one.activations_no_checkpointing, rel=0.05)
    assert four.model_states < one.model_states / 3


def test_cli_prints_arithmetic_for_xl():
    r = subprocess.run([sys.executable, "tools/plan.py", "--model", "igpt-xl", "--micro-batch", "8",
                        "--precision", "bf16", "--zero", "3", "--dp", "8", "--tp", "1", "--pp", "1",
                        "--activation-checkpointing", "--gpu-memory", "80"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "FITS" in r.stdout and "6,812,906,496 parameters" in r.stdout and "18 B x P / N" in r.stdout


def test_cli_json_is_well_formed():
    r = run_tool("--model", "igpt-xl", "--micro-batch", "8", "--gpus", "8", "--gpu-memory", "80", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["count"] >= 1 and out["fitting"][0]["fits"] and out["ranking"]
    best = out["fitting"][0]
    assert best["dp"] * best["tp"] * best["pp"] == 8 and best["total_parameters"] == 6812906496
    assert best["bytes"]["total"] == best["bytes"]["model_states"] + best["bytes"]["activations"]
    r = run_tool("--layers", "2", "--width", "64", "--heads", "2", "--dp", "1", "--zero", "0", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["n_layer"] == 2


@pytest.mark.parametrize("args, message", [
    (["--gpus", "8", "--tp", "3", "--zero", "1"], "world size 8 is not divisible by TP x PP = 3 x 1"),
    (["--gpus", "8", "--dp", "3", "--zero", "1"], "does not match --gpus 8"),
    (["--gpus", "16", "--tp", "16", "--zero", "1"], "TP=16 is larger than a node (8 GPUs"),
    (["--gpus", "8", "--pp", "2", "--zero", "3"], "ZeRO stage 3 cannot be combined with pipeline"),
    (["--gpus", "8", "--gpu-memory", "16", "--micro-batch", "8"], "nothing fits on 8 x 16 GiB"),
    (["--micro-batch", "8"], "give a layout"),
])
def test_cli_bad_input_says_why_and_what_fits(args, message):
    r = run_tool("--model", "igpt-xl", *args)
    assert r.returncode != 0
    text = r.stdout + r.stderr
    assert message in text
    if "--gpus" in args and "give a layout" not in message:
        assert "fit" in text.split(message, 1)[1]  # a suggestion follows the reason


def test_cli_nothing_fits_names_a_gpu_count_that_does():
    r = run_tool("--model", "igpt-xl", "--gpus", "8", "--gpu-memory", "16", "--micro-batch", "8")
    assert "fits on 16 GPUs" in r.stdout


# ----------------------------------------------------------------------------- step-time estimate and presets


def sbatch_defaults(script):
    """The layout a preset sbatch script runs by default: its #SBATCH sizes and exported variable defaults."""
    text = open(os.path.join(ROOT, "slurm", script)).read()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.M))
    env = dict(re.findall(r'^export (\w+)="\$\{\w+:-([^}]*)\}"', text, flags=re.M))
    return sbatch, env


def ds_config(model, pp=1):
    """The DeepSpeed config slurm/common.sh picks for MODEL at PP=1 (igpt_default_ds_config)."""
    assert pp == 1, "the presets' own configs serve PP=1; PP>1 uses zero1_pipe_*.json"
    with open(os.path.join(ROOT, "ds_configs", f"{model}.json")) as f:
        return json.load(f)


def precision_of(cfg):
    return "bf16" if cfg.get("bf16", {}).get("enabled") else "fp16" if cfg.get("fp16", {}).get("enabled") else "fp32"


def test_planner_top_xl_layout_is_the_xl_sbatch_layout():
    """tools/plan.py's fastest layout for igpt-xl on 64 x 80 GB is what slurm/pretrain_xl.sbatch runs."""
    sbatch, env = sbatch_defaults("pretrain_xl.sbatch")
    gpus = int(sbatch["nodes"]) * int(sbatch["gpus-per-node"])
    cfg = ds_config(env["MODEL"], int(env["PP"]))
    r = run_tool("--model", env["MODEL"], "--gpus", str(gpus), "--gpus-per-node", sbatch["gpus-per-node"],
                 "--gpu-memory", "80", "--precision", precision_of(cfg), "--json", "--top", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["global_batch"] == cfg["train_batch_size"]  # the planner plans the config's batch
    top = out["fitting"][0]
    tp, pp = int(env["TP"]), int(env["PP"])
    ran = {"dp": gpus // (tp * pp), "tp": tp, "pp": pp, "zero_stage": cfg["zero_optimization"]["stage"],
           "micro_batch": cfg["train_micro_batch_size_per_gpu"],
           "activation_checkpointing": env["ACTIVATION_CHECKPOINTING"] == "1"}
    assert {k: top[k] for k in ran} == ran, out["fitting"]
    assert top["accumulation"] * top["micro_batch"] * top["dp"] == cfg["train_batch_size"]
    assert top["estimate"]["step_seconds"] < out["fitting"][1]["estimate"]["step_seconds"] + 1e-6
    # bf16 ZeRO-1/2 (and pipelines) accumulate in bf16 unless told otherwise (gpu-readiness.md item 8)
    if precision_of(cfg) != "fp32" and (cfg["zero_optimization"]["stage"] in (1, 2) or int(env["PP"]) > 1):
        assert cfg.get("data_types", {}).get("grad_accum_dtype") == "fp32"


def test_igpt_l_preset_micro_batch_is_the_largest_that_fits_80gb_at_zero1():
    cfg = ds_config("igpt-l")
    micro, stage = cfg["train_micro_batch_size_per_gpu"], cfg["zero_optimization"]["stage"]
    assert stage == 1 and precision_of(cfg) == "bf16"
    assert cfg["data_types"]["grad_accum_dtype"] == "fp32"
    one_gpu = dict(precision="bf16", zero_stage=1, gpu_memory_gib=80, fp32_grad_accum=True)
    assert plan(PlanInput(get_preset("igpt-l"), micro_batch=micro, **one_gpu)).fits
    assert not plan(PlanInput(get_preset("igpt-l"), micro_batch=2 * micro, **one_gpu)).fits
    # and it is what the planner proposes for one 80 GB GPU
    r = run_tool("--model", "igpt-l", "--gpus", "1", "--gpu-memory", "80", "--json")
    top = json.loads(r.stdout)["fitting"][0]
    assert (top["zero_stage"], top["micro_batch"], top["activation_checkpointing"]) == (stage, micro, False)
    # the L sbatch splits the same batch with this micro-batch, ZeRO-1 at TP 1
    sbatch, env = sbatch_defaults("pretrain_l.sbatch")
    dp = int(sbatch["nodes"]) * int(sbatch["gpus-per-node"]) // (int(env["TP"]) * int(env["PP"]))
    assert cfg["train_batch_size"] % (micro * dp) == 0 and env["ACTIVATION_CHECKPOINTING"] == "0"


def xl_plan(zero=1, dp=8, tp=8, pp=1, ckpt=False, gpus_per_node=8, micro=1, global_batch=64, **kw):
    return plan(PlanInput(get_preset("igpt-xl"), micro_batch=micro, precision="bf16", zero_stage=zero,
                          layout=ParallelLayout(dp * tp * pp, tp, pp), activation_checkpointing=ckpt,
                          gpus_per_node=gpus_per_node, global_batch=global_batch, gpu_memory_gib=1000, **kw))


def test_step_estimate_parts_behave():
    from igpt_ds.planning.plan import StepModel, estimate_step, groups_span_nodes

    hw = StepModel()
    z1, z3 = estimate_step(xl_plan(zero=1), hw), estimate_step(xl_plan(zero=3), hw)
    assert z3.dp_comm > z1.dp_comm > 0 and z3.compute == z1.compute and z3.tp_comm == z1.tp_comm
    # ZeRO-3 gathers once more per micro-step for the recompute: 4 transfers instead of 3
    z3c = estimate_step(xl_plan(zero=3, ckpt=True), hw)
    assert z3c.dp_comm == pytest.approx(z3.dp_comm * 4 / 3) and z3c.recompute == pytest.approx(z3c.compute / 3)
    # ZeRO-2 reduce-scatters every micro-step, ZeRO-1 once per step
    one_step, eight_steps = (estimate_step(xl_plan(zero=2, micro=m), hw) for m in (8, 1))  # accumulation 1, 8
    assert eight_steps.dp_comm > one_step.dp_comm
    # the same DP traffic over InfiniBand (4 GPUs per node: a DP group of TP 8 x DP 8 spans nodes either way,
    # so compare DP 4 x TP 2 inside one 8-GPU node with the same layout on 2-GPU nodes)
    inside = xl_plan(dp=4, tp=2, gpus_per_node=8, global_batch=None)
    across = xl_plan(dp=4, tp=2, gpus_per_node=2, global_batch=None)
    assert groups_span_nodes(inside.request.layout, 8) == {"tp": False, "dp": False, "pp": False}
    assert groups_span_nodes(across.request.layout, 2) == {"tp": False, "dp": True, "pp": False}
    a, b = estimate_step(inside, hw), estimate_step(across, hw)
    assert b.dp_comm / a.dp_comm == pytest.approx(hw.intra_node_gbps / hw.inter_node_gbps)
    assert a.tp_comm == b.tp_comm > 0
    # TP and PP cost nothing when absent; the bubble shrinks with more micro-batches per step
    assert estimate_step(xl_plan(dp=64, tp=1), hw).tp_comm == 0
    few, many = (estimate_step(xl_plan(dp=4, tp=8, pp=2, micro=m), hw) for m in (16, 1))
    assert few.bubble > many.bubble > 0 and few.pp_comm == pytest.approx(many.pp_comm)
    # bf16 ZeRO-1 with fp32 accumulation is DeepSpeed's BF16_Optimizer: all-reduce + all-gather, 1.5x
    bf16_opt = estimate_step(xl_plan(zero=1, fp32_grad_accum=True), hw)
    assert bf16_opt.dp_comm == pytest.approx(1.5 * z1.dp_comm, rel=1e-6)
    # compute scales inversely with the stated MFU
    assert estimate_step(xl_plan(), StepModel(mfu=0.2)).compute == pytest.approx(2 * z1.compute)


def test_fp32_accumulation_memory_of_bf16_zero1():
    """BF16_Optimizer keeps a full fp32 gradient buffer beside the bf16 gradients; ZeRO-2 is unchanged."""
    P, N = 1000, 8
    assert model_state_bytes(P, N, 1, "bf16", fp32_grad_accum=True) == {
        "weights": 2 * P, "gradients": 6 * P, "optimizer": 12 * P // N}
    assert model_state_bytes(P, N, 2, "bf16", fp32_grad_accum=True) == model_state_bytes(P, N, 2, "bf16")
    with pytest.raises(ValueError, match="ZeRO-0 bf16 with fp32 gradient accumulation"):
        plan(PlanInput(get_preset("igpt-tiny"), zero_stage=0, fp32_grad_accum=True))


def test_cli_prints_the_estimate_for_each_layout():
    r = run_tool("--model", "igpt-l", "--gpus", "8", "--top", "3")
    assert r.returncode == 0, r.stderr
    assert "ESTIMATES" in r.stdout and "tok/s/GPU" in r.stdout and "not overlapped: step =" in r.stdout
    r = run_tool("--model", "igpt-l", "--gpus", "8", "--json", "--top", "3")
    for p in json.loads(r.stdout)["fitting"]:
        est = p["estimate"]
        parts = est["seconds"]
        assert est["estimated"] and est["step_seconds"] == pytest.approx(
            parts["compute"] + parts["recompute"] + parts["comm"] + parts["bubble"])
        assert parts["comm"] == pytest.approx(parts["tp_comm"] + parts["pp_comm"] + parts["dp_comm"])
        assert est["tokens_per_second_per_gpu"] == pytest.approx(
            p["global_batch"] * p["seq_len"] / est["step_seconds"] / p["gpus"])


@pytest.mark.parametrize("args, message", [
    (["--mfu", "0"], "MFU 0.0 must lie in (0, 1]"),
    (["--mfu", "1.5"], "MFU 1.5 must lie in (0, 1]"),
    (["--inter-node-gbps", "-1"], "inter-node bandwidth -1.0 GB/s must be > 0"),
    (["--intra-node-gbps", "0"], "intra-node bandwidth 0.0 GB/s must be > 0"),
    (["--peak-tflops", "-5"], "peak -5.0 TFLOP/s must be > 0"),
    (["--global-batch", "100"], "global batch 100 does not split"),
    (["--gpu-kind", "V100 SXM2"], "no bf16 peak known for V100 SXM2"),
])
def test_cli_bad_estimate_input_says_why(args, message):
    r = run_tool("--model", "igpt-l", *(["--dp", "8", "--zero", "1"] if "--global-batch" in args else ["--gpus", "8"]),
                 *args)
    assert r.returncode == 2 and message in r.stderr, r.stdout + r.stderr

#!/usr/bin/env python
"""Plan GPU memory and speed before you queue: does a model, micro-batch and DP x TP x PP layout fit, and how fast?

Per GPU (the heaviest pipeline stage): parameters, gradients, optimizer states (DeepSpeed's
accounting for ZeRO 0-3), activations with and without activation checkpointing, and whether
the total fits in the GPU's memory after a reserve for the CUDA context (2 GiB), 1 GiB per NCCL
communicator and allocator fragmentation (10%). Layouts that fit are ranked by an ESTIMATED step
time: compute at a stated MFU (--mfu) of the GPU's peak, plus TP / PP / ZeRO communication at
stated NVLink and InfiniBand bandwidths, plus the pipeline bubble. The formulas are in the
docstrings of igpt_ds/planning/plan.py and igpt_ds/planning/costs.py.

Check one layout (DP x TP x PP = number of GPUs):
    python tools/plan.py --model igpt-xl --micro-batch 8 --precision bf16 --zero 3 \\
        --dp 8 --tp 1 --pp 1 --activation-checkpointing --gpu-memory 80

List the layouts that fit on some GPUs, fastest first (without --micro-batch each layout gets the
power of two that fits and estimates fastest; the global batch is the preset config's):
    python tools/plan.py --model igpt-xl --precision bf16 --gpus 64 --gpu-memory 80
    python tools/plan.py --model igpt-l --gpus 1 --mfu 0.35 --inter-node-gbps 25

Check the prediction against one real training step (fp32, one device; cuda on a GPU):
    python tools/plan.py --model igpt-tiny --micro-batch 2 --precision fp32 --measure cpu

A custom size, machine-readable:
    python tools/plan.py --layers 12 --width 768 --heads 12 --resolution 32 --gpus 4 --gpu-memory 24 --json

Memory is in GiB (2^30 bytes): an "80 GB" A100/H100 has about 80 GiB (nvidia-smi's MiB / 1024).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from igpt_ds import quiet  # noqa: E402

quiet.install(sys.argv)  # before torch: third-party notices nobody can act on stay quiet (--verbose)

from igpt_ds.config import PRESETS, ModelConfig, get_preset  # noqa: E402
from igpt_ds.parallel.layout import ParallelLayout  # noqa: E402
from igpt_ds.planning.costs import DEFAULT_MFU, INTER_NODE_GBPS, INTRA_NODE_GBPS  # noqa: E402
from igpt_ds.planning.plan import (  # noqa: E402
    MICRO_BATCHES,
    PEAK_TFLOPS,
    RANKING_RULE,
    PlanInput,
    StepModel,
    estimate_step,
    gib,
    plan,
    search,
    what_would_fit,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help=quiet.HELP)
    m = p.add_argument_group("model")
    m.add_argument("--model", default="igpt-s", choices=sorted(PRESETS),
                   help="preset (default igpt-s); --layers/--width/--heads override it")
    m.add_argument("--layers", type=int, help="custom number of blocks")
    m.add_argument("--width", type=int, help="custom d_model")
    m.add_argument("--heads", type=int, help="custom number of attention heads")
    m.add_argument("--resolution", type=int, help="model resolution side; sequence length = side^2 "
                   "(default: the preset's, XL 64, others 32)")
    m.add_argument("--objective", choices=["ar", "bert"], default="ar")
    t = p.add_argument_group("training")
    t.add_argument("--micro-batch", type=int, default=None,
                   help="images per GPU per micro-step (default: with --gpus, the power of two per layout that "
                        "fits and estimates fastest; with a layout, 1)")
    t.add_argument("--global-batch", type=int, default=None,
                   help="images per optimizer step (default: train_batch_size of ds_configs/<model>.json for a "
                        "preset; accumulation = global / (micro-batch x DP))")
    t.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="bf16")
    t.add_argument("--grad-accum-dtype", choices=["fp32", "model"], default=None,
                   help="gradient accumulation dtype (DeepSpeed data_types.grad_accum_dtype): fp32 as the presets, "
                        "or the model's dtype. Default fp32, except a given 16-bit ZeRO-0 layout (DeepSpeed "
                        "refuses fp32 accumulation there); a --gpus listing then leaves 16-bit ZeRO-0 out")
    t.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=None,
                   help="ZeRO stage (needed with --dp/--tp/--pp; searched with --gpus)")
    t.add_argument("--activation-checkpointing", action="store_true",
                   help="plan with per-block activation checkpointing (with --dp/--tp/--pp)")
    t.add_argument("--attention", choices=["flash", "math"], default="flash",
                   help="flash: fused SDPA kernels, no s x s scores (default); math: unfused fallback")
    t.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches per optimizer step (pipeline in-flight count; default: >= PP)")
    h = p.add_argument_group("hardware and layout")
    h.add_argument("--gpu-memory", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    h.add_argument("--gpus-per-node", type=int, default=8, help="TP must fit in one node (default 8)")
    h.add_argument("--gpus", type=int, help="number of GPUs: without --dp/--tp/--pp, list the layouts that fit")
    h.add_argument("--dp", type=int, help="data-parallel size")
    h.add_argument("--tp", type=int, help="tensor-parallel size")
    h.add_argument("--pp", type=int, help="pipeline-parallel size")
    s = p.add_argument_group("step-time estimate (stated assumptions, not measurements)")
    s.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                   help=f"model-FLOP utilisation the compute runs at, in (0, 1] (default {DEFAULT_MFU:g})")
    s.add_argument("--gpu-kind", default="H100 SXM", choices=sorted(PEAK_TFLOPS),
                   help="GPU whose datasheet peak is used (default 'H100 SXM': bf16 989 TFLOP/s)")
    s.add_argument("--peak-tflops", type=float, default=None,
                   help="dense peak TFLOP/s at --precision (default: --gpu-kind's)")
    s.add_argument("--intra-node-gbps", type=float, default=INTRA_NODE_GBPS,
                   help=f"NVLink bus bandwidth per GPU, GB/s (default {INTRA_NODE_GBPS:g}: 80%% of H100's 450 "
                        "each way)")
    s.add_argument("--inter-node-gbps", type=float, default=INTER_NODE_GBPS,
                   help=f"InfiniBand bus bandwidth per GPU, GB/s (default {INTER_NODE_GBPS:g}: 80%% of 400 Gb/s)")
    p.add_argument("--measure", metavar="DEVICE", choices=["cpu", "cuda"],
                   help="also run one real training step (TP=1, fp32, Adam) on this device and compare the "
                        "measured peak with the prediction")
    p.add_argument("--top", type=int, default=10, help="how many fitting layouts to list (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def model_from_args(args) -> ModelConfig:
    overrides = {"objective": args.objective}
    if args.resolution:
        overrides["resolution"] = args.resolution
    custom = {"n_layer": args.layers, "d_model": args.width, "n_head": args.heads}
    if any(v is not None for v in custom.values()):
        base = get_preset(args.model)
        overrides.update({k: v for k, v in custom.items() if v is not None})
        overrides["name"] = "custom"
        return base.replace(**overrides).validate()
    return get_preset(args.model, **overrides).validate()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        if args.json:
            print(json.dumps({"error": str(e)}))
        else:
            print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    cfg = model_from_args(args)
    layout_given = any(v is not None for v in (args.dp, args.tp, args.pp))
    if not layout_given and args.gpus is None and not args.measure:
        raise ValueError("give a layout (--dp --tp --pp, with --zero) or --gpus N to list the layouts that fit")
    if args.gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node {args.gpus_per_node} must be >= 1")
    hardware = StepModel(mfu=args.mfu, peak_tflops=args.peak_tflops, gpu_kind=args.gpu_kind,
                         intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps).validate()
    global_batch, args.global_batch_source = global_batch_of(args, cfg)
    base = PlanInput(model=cfg, micro_batch=args.micro_batch or 1, precision=args.precision,
                     zero_stage=args.zero or 0, gpu_memory_gib=args.gpu_memory, gpus_per_node=args.gpus_per_node,
                     attention=args.attention, grad_accum=args.grad_accum, global_batch=global_batch,
                     fp32_grad_accum=fp32_grad_accum(args, layout_given),
                     activation_checkpointing=args.activation_checkpointing)
    if args.measure:
        return measure(args, base)
    if layout_given:
        return check_layout(args, base, hardware)
    return list_layouts(args, base, hardware)


def fp32_grad_accum(args, layout_given: bool) -> bool:
    """--grad-accum-dtype, default fp32 (the presets'), but the model's dtype for a given 16-bit ZeRO-0 layout."""
    if args.grad_accum_dtype is not None:
        return args.grad_accum_dtype == "fp32"
    return not (layout_given and (args.zero or 0) == 0 and args.precision != "fp32")


def global_batch_of(args, cfg: ModelConfig) -> tuple:
    """(global batch, where it came from): --global-batch, else the preset's DeepSpeed config, else None."""
    if args.global_batch is not None:
        if args.global_batch < 1:
            raise ValueError(f"--global-batch {args.global_batch} must be >= 1")
        return args.global_batch, "--global-batch"
    path = os.path.join("ds_configs", f"{cfg.name}.json")
    if args.measure or args.grad_accum is not None or not os.path.isfile(os.path.join(ROOT, path)):
        return None, None
    with open(os.path.join(ROOT, path)) as f:
        batch = json.load(f).get("train_batch_size")
    return (batch, path) if isinstance(batch, int) else (None, None)


def check_layout(args, base: PlanInput, hardware: StepModel) -> int:
    tp, pp = args.tp or 1, args.pp or 1
    if args.dp is None and args.gpus is not None:
        world = args.gpus  # DP derived: GPUs / (TP x PP), refused below if it does not divide
    else:
        world = (args.dp or 1) * tp * pp
        if args.gpus is not None and args.gpus != world:
            raise ValueError(f"DP x TP x PP = {args.dp} x {tp} x {pp} = {world} does not match --gpus {args.gpus}: "
                             f"the layout must use every GPU (DP = GPUs / (TP x PP))" + _fitting_hint(base, args.gpus))
    if args.zero is None:
        raise ValueError("--zero is required with --dp/--tp/--pp (0, 1, 2 or 3; PP > 1 allows 0 or 1)")
    req = dataclasses.replace(base, layout=ParallelLayout(world, tp, pp))
    try:
        result = plan(req)
    except ValueError as e:
        raise ValueError(f"{e}{_fitting_hint(base, world)}") from None
    result.estimate = estimate_step(result, hardware)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print("\n".join(result.lines + result.estimate.lines))
        if not result.fits:
            print(what_would_fit(base, world))
    return 0 if result.fits else 1


def _fitting_hint(base: PlanInput, gpus: int) -> str:
    fits = search(base, gpus) if gpus > 0 else []
    if not fits:
        return ""
    return f". On {gpus} GPUs these fit: " + "; ".join(p.describe() for p in fits[:3])


def measure(args, base: PlanInput) -> int:
    """Predicted vs measured peak of one training step on one device (the planner-accuracy check)."""
    from igpt_ds.planning.memory import measure_train_step

    if base.precision != "fp32":
        raise ValueError("--measure runs an fp32 step (plain torch Adam): add --precision fp32")
    predicted = plan(dataclasses.replace(base, layout=ParallelLayout(1, 1, 1), zero_stage=0))
    measured = measure_train_step(base.model, base.micro_batch, base.activation_checkpointing, device=args.measure,
                                  attention=base.attention)
    error = predicted.total / measured["peak"] - 1
    result = {"device": args.measure, "model": base.model.name, "micro_batch": base.micro_batch,
              "activation_checkpointing": base.activation_checkpointing, "attention": base.attention,
              "predicted_bytes": predicted.total, "measured_peak_bytes": measured["peak"],
              "measured": measured, "relative_error": error}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        mib = 2 ** 20
        print(f"{base.model.name} micro-batch {base.micro_batch} fp32 {base.attention} attention"
              f"{' +ckpt' if base.activation_checkpointing else ''} on {args.measure}: predicted "
              f"{predicted.total / mib:.2f} MiB, measured peak {measured['peak'] / mib:.2f} MiB, error {error:+.1%}")
    return 0


def list_layouts(args, base: PlanInput, hardware: StepModel) -> int:
    if args.gpus < 1:
        raise ValueError(f"--gpus {args.gpus} must be >= 1")
    micro_batches = MICRO_BATCHES if args.micro_batch is None else None
    plans = search(base, args.gpus, hardware=hardware, micro_batches=micro_batches)
    assumptions = {"mfu": hardware.mfu, "peak_tflops": hardware.peak_flops(base.precision) / 1e12,
                   "gpu_kind": hardware.gpu_kind if hardware.peak_tflops is None else None,
                   "intra_node_gbps": hardware.intra_node_gbps, "inter_node_gbps": hardware.inter_node_gbps,
                   "gpus_per_node": base.gpus_per_node}
    if args.json:
        print(json.dumps({"gpus": args.gpus, "gpu_memory_gib": args.gpu_memory, "ranking": RANKING_RULE,
                          "global_batch": base.global_batch, "global_batch_source": args.global_batch_source,
                          "micro_batch_searched": micro_batches is not None, "estimate_assumptions": assumptions,
                          "fitting": [p.to_dict() for p in plans[:args.top]],
                          "count": len(plans),
                          "message": None if plans else what_would_fit(base, args.gpus)}, indent=2))
        return 0 if plans else 1
    cfg = base.model
    micro = "micro-batch searched (powers of two)" if micro_batches else f"micro-batch {base.micro_batch}"
    batch = (f"global batch {base.global_batch} ({args.global_batch_source})" if base.global_batch
             else "no global batch (accumulation = PP; ranked per sample)")
    print(f"{cfg.name}: {cfg.num_parameters():,} parameters, seq {cfg.seq_len}, {micro}, {batch}, "
          f"{base.precision}, {args.gpus} x {args.gpu_memory:g} GiB")
    if not plans:
        print(what_would_fit(base, args.gpus))
        return 1
    print(f"step times are ESTIMATES: compute at MFU {hardware.mfu:g} of {assumptions['peak_tflops']:g} TFLOP/s, "
          f"NVLink {hardware.intra_node_gbps:g} GB/s, InfiniBand {hardware.inter_node_gbps:g} GB/s per GPU, "
          f"{base.gpus_per_node} GPUs per node")
    if base.fp32_grad_accum and base.precision != "fp32":
        print("gradients accumulate in fp32 (as the presets): 16-bit ZeRO-0 is left out, DeepSpeed refuses it "
              "(--grad-accum-dtype model includes it)")
    print(f"{len(plans)} layouts fit; best first ({RANKING_RULE}):")
    print(f"  {'layout':<52} {'accum':>5} {'total':>6} {'free':>6} GiB | {'step s':>6} {'compute':>7} "
          f"{'comm':>6} {'bubble':>6} {'tok/s/GPU':>9}")
    for p in plans[:args.top]:
        e = p.estimate
        print(f"  {p.describe():<52} {p.request.accumulation:5d} {gib(p.total):6.2f} {gib(p.headroom):6.2f}     | "
              f"{e.total:6.3f} {e.compute + e.recompute:7.3f} {e.comm:6.3f} {e.bubble:6.3f} "
              f"{e.tokens_per_second_per_gpu:9,.0f}")
    print("\narithmetic of the best:")
    print("\n".join("  " + line for line in plans[0].lines + plans[0].estimate.lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

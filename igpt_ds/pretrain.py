#!/usr/bin/env python
"""Pretrain iGPT with DeepSpeed: AR or BERT, any DP x TP x PP layout, ZeRO-0..3, fp32/fp16/bf16.

    deepspeed igpt_ds/pretrain.py --model igpt-s --objective ar \\
        --train-data shards/train --val-data shards/val \\
        --deepspeed_config ds_configs/zero3_bf16.json --tensor-parallel 2 --pipeline-parallel 1 \\
        --train-steps 1000000 --lr 3e-3 --save runs/igpt-s --save-interval 5000

Also runs under torchrun/srun (RANK/WORLD_SIZE/MASTER_ADDR or SLURM_* variables) and as a plain
one-process `python igpt_ds/pretrain.py ...`. Batch size and precision come from the DeepSpeed
config only. SIGTERM/SIGUSR1 save a checkpoint and exit 0; --load resumes from the newest one.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the package importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from igpt_ds.config import PRESETS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="pretrain.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", default="igpt-tiny", choices=sorted(PRESETS), help="size preset (default igpt-tiny)")
    m.add_argument("--objective", default="ar", choices=["ar", "bert"], help="autoregressive or BERT (default ar)")
    m.add_argument("--resolution", type=int, help="model resolution side (default: the preset's)")
    m.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    d = p.add_argument_group("data")
    d.add_argument("--train-data", nargs="+", default=["synthetic"], metavar="SHARDS",
                   help="shard directory with dataset.json (tools/build_shards.py), brace pattern of .tar files, "
                        "or a list of them; 'synthetic' for generated striped images (default)")
    d.add_argument("--val-data", nargs="+", metavar="SHARDS", help="validation shards (same forms)")
    d.add_argument("--palette", help="palette.npy the shards must have been built with (checked by hash)")
    d.add_argument("--num-workers", type=int, default=2, help="data loader workers per rank (default 2)")
    d.add_argument("--shuffle-buffer", type=int, default=2000, help="samples in the shuffle buffer (default 2000)")
    par = p.add_argument_group("parallelism and DeepSpeed")
    par.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                     default="ds_configs/zero0_fp32.json",
                     help="DeepSpeed JSON: batch size, precision, ZeRO stage (default ds_configs/zero0_fp32.json)")
    par.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # accepted for familiarity
    par.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed launcher
    par.add_argument("--tensor-parallel", type=int, default=1, help="TP size (divides heads and 512)")
    par.add_argument("--pipeline-parallel", type=int, default=1, help="PP stages (ZeRO-0/1 only)")
    o = p.add_argument_group("optimization")
    o.add_argument("--train-steps", type=int, help="optimizer steps")
    o.add_argument("--train-epochs", type=float, help="epochs of the training shards (instead of --train-steps)")
    o.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: one epoch, as the paper)")
    o.add_argument("--warmup-epochs", type=float, default=1.0, help="warm-up in epochs when --warmup-steps is unset")
    o.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate (paper: S/M 3e-3, L 1e-3)")
    o.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr (paper: 0)")
    o.add_argument("--no-decay", action="store_true", help="constant rate after warm-up (no cosine)")
    o.add_argument("--adam-eps", type=float, default=1e-8)
    o.add_argument("--seed", type=int, default=0, help="seed for init, data order and masks")
    c = p.add_argument_group("checkpoints and logging")
    c.add_argument("--save", help="checkpoint and metrics directory")
    c.add_argument("--save-interval", type=int, default=0, help="save every N steps (and always at the end)")
    c.add_argument("--load", help="resume from the newest checkpoint in this directory")
    c.add_argument("--eval-interval", type=int, default=0, help="validate every N steps (and at the end)")
    c.add_argument("--eval-batches", type=int, help="validation batches per evaluation (default: all)")
    c.add_argument("--log-interval", type=int, default=1, help="write metrics every N steps")
    c.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s for MFU (default: looked up by name)")
    c.add_argument("--max-minutes", type=float, help="wall-clock budget: save a checkpoint and stop when it is "
                   "spent (the schedule is not shortened)")
    c.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p.parse_args(argv)


def quiet_third_party_warnings() -> None:
    """DeepSpeed calls torch collectives that torch 2.13 deprecates, once per call: keep logs readable."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"The pynvml package is deprecated", category=FutureWarning)


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_third_party_warnings()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    from igpt_ds.train.loop import Trainer, TrainArgs, TrainingDiverged

    targs = TrainArgs(
        model=args.model, objective=args.objective, resolution=args.resolution,
        activation_checkpointing=args.activation_checkpointing, train_data=tuple(args.train_data),
        val_data=tuple(args.val_data) if args.val_data else None, palette=args.palette,
        deepspeed_config=args.deepspeed_config, tensor_parallel=args.tensor_parallel,
        pipeline_parallel=args.pipeline_parallel, train_steps=args.train_steps, train_epochs=args.train_epochs,
        warmup_steps=args.warmup_steps, warmup_epochs=args.warmup_epochs, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, no_decay=args.no_decay, adam_eps=args.adam_eps, save=args.save,
        save_interval=args.save_interval, load=args.load, seed=args.seed, eval_interval=args.eval_interval,
        eval_batches=args.eval_batches, log_interval=args.log_interval, num_workers=args.num_workers,
        shuffle_buffer=args.shuffle_buffer, peak_tflops=args.peak_tflops, max_minutes=args.max_minutes,
        progress=not args.no_progress)
    try:
        trainer = Trainer(targs)
    except (ValueError, FileNotFoundError) as e:  # bad flags, config, layout, data: one clear line
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        last = trainer.train()
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    if trainer.is_rank0 and last:
        val = f", val {last['val_loss']:.4f}" if "val_loss" in last else ""
        print(f"done: step {trainer.step}, loss {last['loss']:.4f} nats/token ({last['bits_per_dim']:.3f} bits/dim)"
              f"{val}, {last['tokens_per_s']:,.0f} tokens/s", flush=True)
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())

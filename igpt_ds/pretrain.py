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

import os
import sys

if __package__ in (None, ""):  # run as a script: make the package importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from igpt_ds import quiet  # noqa: E402
from igpt_ds.parallel import signals  # noqa: E402
from igpt_ds.train.args import PretrainArgs, parse  # noqa: E402


def parse_args(argv=None) -> PretrainArgs:
    return parse(PretrainArgs, argv, prog="pretrain.py", description=__doc__)


def main(argv=None) -> int:
    signals.install()  # first: a job signal during start-up is remembered, not fatal
    quiet.install(sys.argv if argv is None else argv)  # before torch: third-party notices off
    args = parse_args(argv)
    from igpt_ds.train.launch import prepare_process, run  # after the flags: --help needs no torch

    prepare_process()  # before DeepSpeed's first import
    from igpt_ds.train.pretrain_task import PretrainTask

    code, trainer, last = run(args, PretrainTask)
    if code == 0 and trainer.is_rank0 and last:
        val = f", val {last['val_loss']:.4f}" if "val_loss" in last else ""
        print(f"done: step {trainer.step}, loss {last['loss']:.4f} nats/token ({last['bits_per_dim']:.3f} bits/dim)"
              f"{val}, {last['tokens_per_s']:,.0f} tokens/s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

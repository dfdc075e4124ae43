#!/usr/bin/env python
"""Fine-tune a pretrained iGPT as a classifier: L_GEN + L_CLF, augmentation, early stopping.

    deepspeed igpt_ds/finetune.py --init runs/igpt-s/export \\
        --train-data cifar-10-batches-py --val-fraction 0.04 --augment cifar \\
        --deepspeed_config ds_configs/zero1_fp32.json --tensor-parallel 2 \\
        --lr 3e-4 --train-epochs 10 --eval-interval 500 --patience 5 --save runs/cifar10-ft

The model config (and palette) come from --init: a consolidated export, a Hugging Face ImageGPT
directory or a DeepSpeed checkpoint dir of any layout. A zero-initialised class head reads the
mean-pooled final norm; the objective is --gen-weight x L_GEN + L_CLF. Adam as pretraining (batch
and precision from the DeepSpeed config), linear warm-up then a CONSTANT rate (no cosine); the
paper's best rate is often 10x lower than pretraining's. Images are augmented, then quantized on
the fly. With --val-data (or --val-fraction) the run evaluates every --eval-interval steps (default
one epoch), keeps the best export in SAVE/best and stops after --patience evaluations without
improvement. Test accuracy and a confusion matrix: tools/evaluate_classifier.py --checkpoint SAVE/best.
The from-scratch baseline is the same command with --random-init (same architecture, fresh weights).

Runs under `deepspeed`, torchrun/srun (RANK/WORLD_SIZE/... variables) or as one plain process.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: make the package importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from igpt_ds import quiet  # noqa: E402
from igpt_ds.parallel import signals  # noqa: E402
from igpt_ds.train.args import FinetuneArgs, parse  # noqa: E402


def parse_args(argv=None) -> FinetuneArgs:
    return parse(FinetuneArgs, argv, prog="finetune.py", description=__doc__)


def main(argv=None) -> int:
    signals.install()  # first: a job signal during start-up is remembered, not fatal
    quiet.install(sys.argv if argv is None else argv)  # before torch: third-party notices off
    args = parse_args(argv)
    from igpt_ds.train.launch import prepare_process, run  # after the flags: --help needs no torch

    prepare_process()  # before DeepSpeed's first import
    from igpt_ds.train.classify_task import ClassifyTask

    code, trainer, last = run(args, ClassifyTask)
    if code == 0 and trainer.is_rank0 and last:
        task = trainer.task
        best = f", best val acc {task.best_acc:.4f} at step {task.best_step}" if task.best_acc >= 0 else ""
        where = f" -> {args.save}/best" if args.save and task.best_acc >= 0 else ""
        print(f"done: step {trainer.step}, loss {last['loss']:.4f} (gen {last['gen_loss']:.4f}, clf "
              f"{last['clf_loss']:.4f}), train acc {last['train_acc']:.4f}{best}{where}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

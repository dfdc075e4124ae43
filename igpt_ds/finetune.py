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

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the package importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="finetune.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--init", metavar="CHECKPOINT",
                   help="pretrained model: consolidated export, HF ImageGPT dir or DeepSpeed checkpoint dir "
                        "(its config decides the architecture)")
    m.add_argument("--random-init", action="store_true",
                   help="take only the architecture and palette from --init and train from random (OpenAI-init) "
                        "weights: the from-scratch baseline a fine-tuning run is compared with")
    m.add_argument("--num-classes", type=int, help="classes (default: from the data; an error if it contradicts it)")
    m.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    d = p.add_argument_group("data")
    d.add_argument("--train-data", required=True, metavar="PATH",
                   help="labelled images: cifar-10-batches-py, cifar-100-python, stl10_binary, an .npz or an "
                        "ImageNet-style folder; or a shard directory (already quantized: --augment none)")
    d.add_argument("--val-data", metavar="PATH",
                   help="validation images or shards (default: the --val-fraction hold-out of --train-data)")
    d.add_argument("--split", default="train", help="split of --train-data (default train)")
    d.add_argument("--val-split", default=None,
                   help="split of --val-data (default: 'val', the hold-out, when --val-fraction is set, else 'test')")
    d.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of the train split for validation (paper: 0.04 on ImageNet)")
    d.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split")
    d.add_argument("--palette", help="palette.npy (needed when --init carries none; checked against it otherwise)")
    d.add_argument("--augment", default="none", choices=["cifar", "random-resized-crop", "none"],
                   help="training augmentation before quantization: cifar = 4-px reflection pad, random crop, "
                        "horizontal flip; random-resized-crop = ImageNet-style (default none)")
    d.add_argument("--num-workers", type=int, default=2, help="loader processes per rank (default 2)")
    par = p.add_argument_group("parallelism and DeepSpeed")
    par.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                     default="ds_configs/zero0_fp32.json",
                     help="DeepSpeed JSON: batch size, precision, ZeRO stage (default ds_configs/zero0_fp32.json)")
    par.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    par.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    par.add_argument("--tensor-parallel", type=int, default=1, help="TP size (divides heads and 512)")
    par.add_argument("--pipeline-parallel", type=int, default=1, help="PP stages (ZeRO-0/1 only)")
    o = p.add_argument_group("optimization")
    o.add_argument("--lr", type=float, default=3e-4, help="Adam rate after warm-up, held constant (default 3e-4)")
    o.add_argument("--train-steps", type=int, help="optimizer steps (upper bound when early stopping)")
    o.add_argument("--train-epochs", type=float, help="epochs of the training data (instead of --train-steps)")
    o.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    o.add_argument("--gen-weight", type=float, default=1.0, help="weight of L_GEN; 0 switches it off (default 1)")
    o.add_argument("--bert-masks", type=int, default=5,
                   help="BERT models: masks per image at evaluation, modal prediction (default 5)")
    o.add_argument("--seed", type=int, default=0, help="seed for data order, augmentation and masks")
    c = p.add_argument_group("evaluation, early stopping, checkpoints")
    c.add_argument("--eval-interval", type=int, default=0, help="validate every N steps (default: every epoch)")
    c.add_argument("--patience", type=int, default=0,
                   help="stop after this many evaluations without a better validation accuracy (0: never)")
    c.add_argument("--save", help="output directory: best export in SAVE/best, resumable checkpoint, metrics.jsonl")
    c.add_argument("--load", help="resume a fine-tuning run from its --save directory")
    c.add_argument("--log-interval", type=int, default=1, help="write metrics every N steps")
    c.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    if not args.init and not args.load:
        p.error("give --init CHECKPOINT (or --load SAVE_DIR to resume)")
    if args.random_init and not args.init:
        p.error("--random-init needs --init CHECKPOINT (it gives the architecture and palette)")
    if args.val_split is None:
        args.val_split = "val" if args.val_fraction and not args.val_data else "test"
    if args.val_fraction and not args.val_data:
        args.val_data = args.train_data
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from igpt_ds.pretrain import quiet_third_party_warnings

    quiet_third_party_warnings()
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from igpt_ds.train.classify import FinetuneArgs, Finetuner

    fargs = FinetuneArgs(
        init=args.init, random_init=args.random_init, train_data=args.train_data, val_data=args.val_data,
        split=args.split, val_split=args.val_split, val_fraction=args.val_fraction, split_seed=args.split_seed,
        palette=args.palette, num_classes=args.num_classes, deepspeed_config=args.deepspeed_config,
        tensor_parallel=args.tensor_parallel, pipeline_parallel=args.pipeline_parallel, lr=args.lr,
        train_steps=args.train_steps, train_epochs=args.train_epochs, warmup_steps=args.warmup_steps,
        gen_weight=args.gen_weight,
        patience=args.patience, eval_interval=args.eval_interval, save=args.save, load=args.load, seed=args.seed,
        augment=args.augment, bert_masks=args.bert_masks, activation_checkpointing=args.activation_checkpointing,
        num_workers=args.num_workers, log_interval=args.log_interval, progress=not args.no_progress)
    try:
        tuner = Finetuner(fargs)
    except (ValueError, FileNotFoundError) as e:  # bad flags, checkpoint, data, layout: one clear line
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        last = tuner.train()
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    if tuner.is_rank0 and last:
        best = f", best val acc {tuner.best_acc:.4f} at step {tuner.best_step}" if tuner.best_acc >= 0 else ""
        where = f" -> {args.save}/best" if args.save and tuner.best_acc >= 0 else ""
        print(f"done: step {tuner.step}, loss {last['loss']:.4f} (gen {last['gen_loss']:.4f}, clf "
              f"{last['clf_loss']:.4f}), train acc {last['train_acc']:.4f}{best}{where}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

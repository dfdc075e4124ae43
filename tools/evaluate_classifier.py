#!/usr/bin/env python
"""Test accuracy and a confusion matrix of a fine-tuned iGPT classifier.

    python tools/evaluate_classifier.py --checkpoint runs/cifar10-ft/best \\
        --data cifar-10-batches-py --split test --out runs/cifar10-ft/test

--checkpoint is the consolidated export a fine-tuning run keeps as SAVE/best (igpt_ds/finetune.py);
its palette quantizes the images (centre crop resized to the model resolution, no augmentation).
--data is any image source (CIFAR-10/100, STL-10, .npz, image folder; --val-fraction/--split val
for a held-out part of train) or a shard directory built with the same palette. BERT models are
evaluated with --bert-masks masks per image and the modal prediction. Writes
OUT/confusion_matrix.json (accuracy, counts [true][predicted], label names) and
OUT/confusion_matrix.png, and prints the accuracy. One plain process (CPU or one GPU).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from igpt_ds import quiet  # noqa: E402

quiet.install(sys.argv)  # before torch: third-party notices nobody can act on stay quiet (--verbose)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help=quiet.HELP)
    p.add_argument("--checkpoint", required=True, help="fine-tuned export: SAVE/best of igpt_ds/finetune.py")
    p.add_argument("--data", required=True, help="labelled images (or shards) to evaluate on")
    p.add_argument("--split", default="test", help="split of --data (default test)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="with --split val: the held-out fraction of train")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--out", required=True, help="directory for confusion_matrix.json and confusion_matrix.png")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bert-masks", type=int, default=5, help="BERT models: masks per image, modal prediction")
    p.add_argument("--seed", type=int, default=0, help="seed of the BERT evaluation masks")
    p.add_argument("--num-workers", type=int, default=2, help="loader processes (default 2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from igpt_ds.data.manifest import is_shard_dir
    from igpt_ds.evaluate.classifier import evaluate_export, load_classifier, write_report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, cfg, palette, info = load_classifier(args.checkpoint, device=device)
        if is_shard_dir(args.data):
            from igpt_ds.data.tokens import build_loader
            from igpt_ds.palette import palette_sha256

            loader = build_loader(args.data, batch_size=args.batch_size, dp_rank=0, dp_world_size=1,
                                  num_workers=args.num_workers, shuffle=False, epochs=1, drop_last=False,
                                  expected_resolution=cfg.resolution,
                                  expected_palette_sha256=None if palette is None else palette_sha256(palette))
        else:
            if palette is None:
                raise ValueError(f"{args.checkpoint} carries no palette.npy; it is needed to quantize {args.data}")
            from igpt_ds.data.images import ImageLoader
            from igpt_ds.data.sources import open_source

            source = open_source(args.data, args.split, val_fraction=args.val_fraction, split_seed=args.split_seed)
            loader = ImageLoader(source, palette, cfg.resolution, batch_size=args.batch_size, dp_rank=0,
                                 dp_world_size=1, shuffle=False, drop_last=False, num_workers=args.num_workers,
                                 epochs=1)
        result = evaluate_export(model, cfg, loader, bert_masks=args.bert_masks, seed=args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    names = info.get("label_names") or [str(i) for i in range(model.num_classes)]
    title = f"{os.path.basename(os.path.normpath(args.data))} {args.split}: accuracy {result['accuracy']:.4f}"
    write_report(result, names, args.out, title)
    print(f"accuracy {result['accuracy']:.4f} on {result['num_images']} images "
          f"(fine-tuned to step {info.get('step')}, val accuracy {info.get('val_accuracy')}); "
          f"confusion matrix in {args.out}/confusion_matrix.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

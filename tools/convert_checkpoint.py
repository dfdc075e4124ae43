#!/usr/bin/env python
"""Convert a model between checkpoint formats; the source format is detected from SRC.

Formats:
  consolidated  iGPT-DS's layout-independent export: config.json + model.safetensors (+ palette.npy)
  hf            a Hugging Face ImageGPT directory (config.json + model.safetensors, or
                pytorch_model.bin read with weights_only=True); the palette goes to / comes from
                preprocessor_config.json "clusters". Needs norm=rmsnorm and an AR model.

Examples:
  python tools/convert_checkpoint.py openai-imagegpt-small/ igpt-s-export/ --to consolidated
  python tools/convert_checkpoint.py runs/tiny/export/ tiny-hf/ --to hf --dtype bf16

DST must not exist (or be empty). Nothing is written when anything fails: the output is built
in a temporary directory beside DST and renamed into place at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
TARGETS = ["consolidated", "hf"]  # formats with a writer in igpt_ds.pretrained.FORMATS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="source directory (format detected)")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist or be empty)")
    p.add_argument("--to", required=True, choices=TARGETS, help="output format")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="dtype of the written weights (default fp32)")
    args = p.parse_args(argv)

    import torch

    from igpt_ds.pretrained import read_checkpoint, write_checkpoint

    try:
        config, state_dict, palette, fmt = read_checkpoint(args.src)
        out = write_checkpoint(args.dst, args.to, config, state_dict, palette=palette,
                               dtype=getattr(torch, DTYPES[args.dtype]))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(v.numel() for v in state_dict.values())
    print(f"{args.src} ({fmt.name}) -> {out} ({args.to}, {args.dtype}): {config.n_layer} layers x "
          f"{config.d_model}, {n / 1e6:.2f}M parameters, palette {'included' if palette is not None else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

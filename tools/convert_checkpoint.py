#!/usr/bin/env python
"""Convert a model between checkpoint formats; the source format is detected from SRC.

Formats:
  consolidated  iGPT-DS's layout-independent export: config.json + model.safetensors (+ palette.npy)
  hf            a Hugging Face ImageGPT directory (config.json + model.safetensors, or
                pytorch_model.bin read with weights_only=True); the palette goes to / comes from
                preprocessor_config.json "clusters". Needs norm=rmsnorm and an AR model.
  deepspeed     a checkpoint directory of igpt_ds/pretrain.py --save DIR, any DP x TP x PP layout and
                ZeRO stage (read by re-creating its ranks on this host's CPU). As a target it is
                resharding: --tensor-parallel/--pipeline-parallel/--data-parallel pick the new layout;
                the weights and the step carry over, Adam's moments restart (stated in its metadata).

Examples:
  python tools/convert_checkpoint.py openai-imagegpt-small/ igpt-s-export/ --to consolidated
  python tools/convert_checkpoint.py runs/tiny/export/ tiny-hf/ --to hf --dtype bf16
  python tools/convert_checkpoint.py runs/igpt-s/ igpt-s-export/ --to consolidated
  python tools/convert_checkpoint.py igpt-s-export/ runs/igpt-s-tp2/ --to deepspeed --tensor-parallel 2 \
      --deepspeed_config ds_configs/zero3_bf16.json

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
TARGETS = ["consolidated", "hf", "deepspeed"]  # formats with a writer in igpt_ds.checkpoint.formats.FORMATS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="source directory (format detected)")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist or be empty)")
    p.add_argument("--to", required=True, choices=TARGETS, help="output format")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="dtype of the written weights (default fp32)")
    p.add_argument("--tensor-parallel", type=int, default=1, help="--to deepspeed: TP size of the new layout")
    p.add_argument("--pipeline-parallel", type=int, default=1, help="--to deepspeed: PP stages of the new layout")
    p.add_argument("--data-parallel", type=int, default=1, help="--to deepspeed: DP size of the new layout")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   help="--to deepspeed: the DeepSpeed config the resumed run will use "
                        "(default ds_configs/zero0_fp32.json, zero1_pipe_fp32.json for PP > 1)")
    args = p.parse_args(argv)
    if args.to != "deepspeed" and (args.tensor_parallel, args.pipeline_parallel, args.data_parallel) != (1, 1, 1):
        p.error("--tensor-parallel/--pipeline-parallel/--data-parallel apply to --to deepspeed only")

    import torch

    from igpt_ds.checkpoint.formats import read_checkpoint, write_checkpoint

    try:
        config, state_dict, palette, fmt = read_checkpoint(args.src)
        options = {}
        if args.to in ("deepspeed", "consolidated"):
            from igpt_ds.checkpoint.formats import training_step

            options = dict(step=training_step(args.src), source=os.path.abspath(args.src))
        if args.to == "deepspeed":
            options.update(tensor_parallel=args.tensor_parallel, pipeline_parallel=args.pipeline_parallel,
                           data_parallel=args.data_parallel, ds_config=args.deepspeed_config)
        out = write_checkpoint(args.dst, args.to, config, state_dict, palette=palette,
                               dtype=getattr(torch, DTYPES[args.dtype]), **options)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(v.numel() for v in state_dict.values())
    print(f"{args.src} ({fmt.name}) -> {out} ({args.to}, {args.dtype}): {config.n_layer} layers x "
          f"{config.d_model}, {n / 1e6:.2f}M parameters, palette {'included' if palette is not None else 'none'}")
    if args.to == "deepspeed":
        print(f"layout DP {args.data_parallel} x TP {args.tensor_parallel} x PP {args.pipeline_parallel}: weights and "
              f"step carried over; the optimizer (Adam moments) restarts when a run resumes with --load {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

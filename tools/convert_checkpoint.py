#!/usr/bin/env python
"""Convert a model between checkpoint formats; the source format is detected from SRC.

Formats:
  consolidated  iGPT-DS's layout-independent export: config.json + model.safetensors (+ palette.npy)
  hf            a Hugging Face ImageGPT directory (config.json + model.safetensors, or
                pytorch_model.bin read with weights_only=True); the palette goes to / comes from
                preprocessor_config.json "clusters". Needs norm=rmsnorm and an AR model.
  deepspeed     a checkpoint directory of igpt_ds/pretrain.py --save DIR (or one global_stepN in it), any
                DP x TP x PP layout, ZeRO stage and precision. As a source its files are read in this
                process, tensor by tensor, with no engine and no ranks: memory stays at about 3x the
                largest parameter (fp32) above the process's own, whatever the model or world size;
                --weights picks the fp32 masters (default) or the 16-bit copy the forward used.
                As a target it is resharding: --tensor-parallel/--pipeline-parallel/--data-parallel and
                --deepspeed_config pick the new layout, whose ranks start on this host's CPU and each
                pull only their own shard. From a DeepSpeed source, Adam's moments, its step, the
                schedule and the data position (where the new layout allows) carry over, so --load
                continues the run exactly; from other formats Adam restarts (stated in the metadata).

Examples:
  python tools/convert_checkpoint.py openai-imagegpt-small/ igpt-s-export/ --to consolidated
  python tools/convert_checkpoint.py runs/tiny/export/ tiny-hf/ --to hf --dtype bf16
  python tools/convert_checkpoint.py runs/igpt-s/ igpt-s-export/ --to consolidated
  python tools/convert_checkpoint.py igpt-s-export/ runs/igpt-s-tp2/ --to deepspeed --tensor-parallel 2 \
      --deepspeed_config ds_configs/zero3_bf16.json

DST must not exist (or be empty). Nothing is written when anything fails: the output is built
in a temporary directory beside DST and renamed into place at the end. The last line reports the
wall time and peak memory (this process, and the largest rank for --to deepspeed).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from igpt_ds import quiet  # noqa: E402

quiet.install(sys.argv)  # before torch: third-party notices nobody can act on stay quiet (--verbose)

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
TARGETS = ["consolidated", "hf", "deepspeed"]  # formats with a writer in igpt_ds.checkpoint.formats.FORMATS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help=quiet.HELP)
    p.add_argument("src", metavar="SRC", help="source directory (format detected)")
    p.add_argument("dst", metavar="DST", help="output directory (must not exist or be empty)")
    p.add_argument("--to", required=True, choices=TARGETS, help="output format")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="dtype of the written weights (default fp32)")
    p.add_argument("--weights", choices=["master", "module"], default="master",
                   help="DeepSpeed sources: the fp32 master weights the optimizer holds (default) or the "
                        "'module' copy the forward used (16-bit for bf16/fp16 runs); recorded in config.json")
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

    from igpt_ds.checkpoint import reshard
    from igpt_ds.checkpoint.formats import read_checkpoint, training_step, write_checkpoint

    started, rss_before = time.monotonic(), _rss_mb()
    dtype = getattr(torch, DTYPES[args.dtype])
    layout = dict(tensor_parallel=args.tensor_parallel, pipeline_parallel=args.pipeline_parallel,
                  data_parallel=args.data_parallel, ds_config=args.deepspeed_config)
    try:
        from_deepspeed = reshard.is_deepspeed_checkpoint(args.src) or _names_a_deepspeed_run(args.src)
        if args.weights != "master" and not from_deepspeed:
            raise ValueError(f"--weights {args.weights}: {args.src} is not a DeepSpeed checkpoint; only those hold "
                             f"two copies of the weights")
        source = os.path.abspath(args.src)
        if from_deepspeed and args.to == "consolidated":
            out, n = reshard.export_deepspeed(args.src, args.dst, weights=args.weights, dtype=dtype, source=source)
            what = f"{n / 1e6:.2f}M parameters, {args.weights} weights"
        elif from_deepspeed and args.to == "deepspeed":
            if args.weights != "master":
                raise ValueError("--weights module: resharding always carries the fp32 masters (the 16-bit copy "
                                 "is derived from them)")
            out, report = reshard.reshard_deepspeed(args.src, args.dst, source=source, **layout)
            what = f"Adam state {report['optimizer']}, data position {report['data_position']}"
        else:
            config, state_dict, palette, fmt = read_checkpoint(args.src, weights=args.weights)
            options = {}
            if args.to in ("deepspeed", "consolidated"):
                options = dict(step=training_step(args.src), source=source)
            if args.to == "deepspeed":
                options.update(layout)
            out = write_checkpoint(args.dst, args.to, config, state_dict, palette=palette, dtype=dtype, **options)
            n = sum(v.numel() for v in state_dict.values())
            what = f"{config.n_layer} layers x {config.d_model}, {n / 1e6:.2f}M parameters, palette " \
                   f"{'included' if palette is not None else 'none'}"
            if args.to == "deepspeed":
                what += "; no optimizer state in the source: Adam restarts when a run resumes with --load"
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.src} -> {out} ({args.to}, {args.dtype}): {what}")
    if args.to == "deepspeed":
        print(f"layout DP {args.data_parallel} x TP {args.tensor_parallel} x PP {args.pipeline_parallel}")
    from igpt_ds.train.metrics import peak_rss_bytes

    peak = peak_rss_bytes() / 2**20
    line = f"time {time.monotonic() - started:.1f} s; peak RSS {peak:.0f} MB ({peak - rss_before:+.0f} MB over the " \
           f"{rss_before:.0f} MB before reading)"
    if from_deepspeed and args.to == "deepspeed":
        line += f"; largest rank {report['largest_rank_peak_rss_mb']:.0f} MB"
    print(line)
    return 0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _names_a_deepspeed_run(path: str) -> bool:
    """A directory whose 'latest' names a tag: a DeepSpeed run even when that tag is missing (the reader
    then says so, instead of 'unknown format')."""
    return os.path.isfile(os.path.join(path, "latest"))


if __name__ == "__main__":
    sys.exit(main())

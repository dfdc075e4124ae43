#!/usr/bin/env python
"""Benchmarks, one sub-command per target; results are printed and written to BENCHMARKS.md.

    python tools/benchmark.py data --data cifar-10-batches-py
    python tools/benchmark.py checkpoint --model igpt-s igpt-m --world 2 --zero-stage 3
    python tools/benchmark.py probe --data cifar-10-batches-py
    python tools/benchmark.py model --model igpt-tiny --resolution 32 --deepspeed_config ds_configs/zero0_fp32.json
    deepspeed --num_gpus 8 tools/benchmark.py model --model igpt-l --deepspeed_config ds_configs/zero3_bf16.json

model: train-step throughput of a preset and layout through the real trainer (tokens/s, TFLOP/s
per device, MFU, peak memory; median after warm-up). On CPU it also trains Hugging Face's
ImageGPTForCausalImageModeling of the same size on the same batches and prints the ratio. With
--compile the trainer runs a second time with its blocks compiled (torch.compile, igpt_ds/model/compile.py),
in the same process after the eager run: both rows, the compiling first step and the graph breaks.

checkpoint: exporting a DeepSpeed checkpoint (written at DP --world under --zero-stage on CPU, after
one real step) to a consolidated file: the one-process file reader against the old path that
re-created the checkpoint's ranks as engines; time and peak RSS of each, and the projected host RAM
for iGPT-XL at 64 ranks under each.

data: our quantizer against Hugging Face's ImageGPTImageProcessor on the same images and palette
(tokens must be identical), and the shard loader's samples/s with 2 workers, next to the
samples/s one H100 consumes training igpt-l at MR 32^2.

probe: the SGD linear probe (tools/linear_probe.py --solver sgd) on a synthetic ImageNet-like
float16 feature file: training rows/s, features/s per layer and peak RSS with L layers in one pass
against L one-layer runs; with --data, test accuracy beside the L-BFGS probe on real CIFAR images
through a tiny random-weights iGPT.

images: the on-the-fly path (igpt_ds/data/image_shards.py): image shards stored at 2x the crop side,
cropped and quantized in loader workers; samples/s per worker beside what one H100 consumes per preset.

decode: images/s of tools/extract_features.py's image-folder path (JPEG decode + centre-crop resize
in --num-workers DataLoader workers, then quantize) for each worker count, on a folder of real
images saved as 256x256 JPEGs, next to the images/s one H100 extracts features at for each preset:
how many --num-workers keep a GPU fed.
"""
import argparse
import datetime
import math
import os
import platform
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout
from igpt_ds import quiet  # noqa: E402

quiet.install(sys.argv)  # before torch: third-party notices nobody can act on stay quiet (--verbose)

import numpy as np  # noqa: E402

from igpt_ds.checkpoint.atomic import atomic_write  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores (torch uses {torch.get_num_threads()} threads){gpu}"


def versions() -> str:
    import torch
    import transformers
    import webdataset

    return (f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"transformers {transformers.__version__}, webdataset {webdataset.__version__}")


def write_section(path: str, target: str, text: str) -> None:
    """Replace (or append) the section of ``target`` in the markdown file ``path``."""
    begin, end = f"<!-- benchmark:{target}:begin -->", f"<!-- benchmark:{target}:end -->"
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n\nWritten by `tools/benchmark.py`.\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n"
    atomic_write(path, new)


def run_data(args) -> str:
    from igpt_ds.data.sources import open_source, sample_pixels
    from igpt_ds.palette import fit_palette, load_palette
    from igpt_ds.planning.bench_data import compare_quantizers, gpu_consumption, load_images, loader_throughput

    source = open_source(args.data, args.split)
    images = load_images(source, args.images, args.resolution)
    labels = np.array([source[i][1] for i in range(len(images))])
    if args.palette:
        palette, palette_note = load_palette(args.palette), args.palette
    else:
        palette = fit_palette(sample_pixels(source, 100_000, seed=0), 512, seed=0, iters=10)
        palette_note = "512-colour k-means fitted on 100,000 pixels of the source (seed 0, 10 iterations)"
    print(f"{len(images)} images of {source.name} at {args.resolution}x{args.resolution}; palette: {palette_note}")
    q = compare_quantizers(images, palette, device=args.device, cpu_threads=args.threads or None)
    print(f"quantize: ours {q['ours_images_per_s']:,.0f} images/s, HF {q['hf_images_per_s']:,.0f} images/s, "
          f"speed-up {q['speedup']:.1f}x, {q['identical_tokens']:,} tokens identical")
    io = loader_throughput(images, labels, palette, batch_size=args.batch_size, num_workers=args.workers,
                           min_samples=args.loader_samples)
    print(f"loader: {io['samples_per_s']:,.0f} samples/s ({io['num_workers']} workers, batch {io['batch_size']}, "
          f"{io['samples']:,} samples in {io['epochs']} epochs)")
    gpu = gpu_consumption("igpt-l", mfu=0.5)
    print(f"one H100 training igpt-l at MR 32^2 (50% MFU) consumes {gpu['samples_per_s']:.1f} samples/s; "
          f"the loader is {io['samples_per_s'] / gpu['samples_per_s']:,.0f}x that")
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    return f"""## data: quantization and loader

- Date: {datetime.date.today().isoformat()}
- Machine: {machine()}
- Versions: {versions()}
- Command: `{cmd}`
- Quantizers timed in 5 interleaved rounds (ours, then HF, on the same fifth of the images)
- Images: {len(images)} of `{source.name}` at {args.resolution}x{args.resolution}; palette: {palette_note}
- Load average when it finished (other jobs share the machine): {os.getloadavg()[0]:.1f}

| measurement | result |
|---|---|
| `igpt_ds.palette.quantize` ({args.device or 'auto'} device, {args.threads or 'default'} torch thread(s)) | {q['ours_images_per_s']:,.0f} images/s |
| HF `ImageGPTImageProcessorPil` (same images, same palette, `do_resize=False`) | {q['hf_images_per_s']:,.0f} images/s |
| speed-up | **{q['speedup']:.1f}x** (tokens identical: {q['identical_tokens']:,} of {q['identical_tokens']:,}) |
| loader, {io['num_workers']} workers, batch {io['batch_size']}, 1 DP rank | **{io['samples_per_s']:,.0f} samples/s** ({io['samples']:,} samples, {io['epochs']} epochs, worker start-up included) |

What one H100 consumes, igpt-l at MR 32² (`get_preset('igpt-l').train_flops_per_token()`, 6N + 12·L·d·T):
{gpu['flops_per_token'] / 1e9:.2f} GFLOP/token × {gpu['seq_len']} tokens = {gpu['flops_per_sample'] / 1e12:.2f} TFLOP per sample;
989 TFLOP/s bf16 dense peak × 50% MFU = 494.5 TFLOP/s, so **{gpu['samples_per_s']:.1f} samples/s per GPU**.
The measured loader rate is {io['samples_per_s'] / gpu['samples_per_s']:,.0f}× that with 2 CPU workers (each DP rank runs its own
loader, so the margin holds per GPU at any DP size).
"""


def run_model(args) -> str:
    import torch

    from igpt_ds.planning.bench_model import hugging_face, ours

    r = ours(args.model, args.resolution, args.deepspeed_config, args.steps, args.warmup, args.tensor_parallel,
             args.pipeline_parallel, args.activation_checkpointing, args.peak_tflops)
    c = ours(args.model, args.resolution, args.deepspeed_config, args.steps, args.warmup, args.tensor_parallel,
             args.pipeline_parallel, args.activation_checkpointing, args.peak_tflops, compile=True) \
        if args.compile else None
    if not r["is_rank0"]:
        return ""
    cfg, ds, layout = r["config"], r["ds"], r["layout"]
    shape = (f"{cfg.name} ({cfg.num_parameters() / 1e6:.1f}M), MR {cfg.resolution}^2 = {cfg.seq_len} tokens, "
             f"global batch {ds.train_batch_size} (micro {ds.micro_batch_size} x accumulation "
             f"{ds.gradient_accumulation_steps}), {ds.precision}, ZeRO-{ds.zero_stage}, "
             f"DP {layout.data_parallel} x TP {layout.tensor_parallel} x PP {layout.pipeline_parallel}"
             f"{', activation checkpointing' if args.activation_checkpointing else ''}")

    def mfu(run: dict) -> str:
        return f"{100 * run['mfu']:.1f}%" if run["mfu"] is not None else \
            "n/a (no peak FLOP/s known for this device; --peak-tflops)"

    def row(label: str, run: dict) -> str:
        return (f"| {label} | {run['step_time_s']:.3f} | {run['tokens_per_s']:,.0f} | {run['tflops']:.3f} | "
                f"{mfu(run)} | {run['peak_mem_gb']:.2f} |")

    print(f"{shape}\nours: {r['tokens_per_s']:,.0f} tokens/s, {r['step_time_s']:.3f} s/step, "
          f"{r['tflops']:.3f} TFLOP/s per device, MFU {mfu(r)}, peak memory {r['peak_mem_gb']:.2f} GiB")
    rows = [row("iGPT-DS `Trainer` (DeepSpeed engine)", r)]
    compile_line = ""
    if c is not None:
        rows.append(row("iGPT-DS `Trainer` `--compile` (blocks through torch.compile)", c))
        compile_line = (f"\n`--compile` over eager in the same run: **{r['step_time_s'] / c['step_time_s']:.2f}x** "
                        f"(its first step, which compiles: {c['first_step_s']:.1f} s; graph breaks: "
                        f"{c['graph_breaks']}).\n")
        if not torch.cuda.is_available():  # on GPUs the loop resets the peak at the start of each run
            compile_line += ("Peak memory on CPU is the process's peak RSS: the `--compile` row's includes the "
                             "eager run before it.\n")
        print(f"ours --compile: {c['tokens_per_s']:,.0f} tokens/s, {c['step_time_s']:.3f} s/step "
              f"({r['step_time_s'] / c['step_time_s']:.2f}x eager); first step {c['first_step_s']:.1f} s, "
              f"{c['graph_breaks']} graph breaks")
    ratio_line = ""
    if not torch.cuda.is_available() and layout.world_size == 1 and not args.no_reference:
        if ds.precision != "fp32" or ds.gradient_accumulation_steps != 1:
            raise SystemExit("the Hugging Face comparison needs an fp32 config without gradient accumulation")
        h = hugging_face(cfg, ds.micro_batch_size, args.steps, args.warmup)
        ratio = h["step_time_s"] / r["step_time_s"]
        flops = cfg.train_flops_per_token() * h["tokens_per_s"] / 1e12
        print(f"Hugging Face ImageGPTForCausalImageModeling, same size and batches: {h['tokens_per_s']:,.0f} "
              f"tokens/s, {h['step_time_s']:.3f} s/step -> ours is {ratio:.2f}x faster")
        rows.append(f"| HF `ImageGPTForCausalImageModeling` + torch Adam | {h['step_time_s']:.3f} | "
                    f"{h['tokens_per_s']:,.0f} | {flops:.3f} | | |")
        ratio_line = (f"\nSpeed-up of ours over Hugging Face in the same run: **{ratio:.2f}x** "
                      f"(target: >= 2x at 1024 tokens).\n")
        if c is not None:
            ratio_line += (f"With `--compile`: **{h['step_time_s'] / c['step_time_s']:.2f}x** Hugging Face "
                           f"(goal: 3x).\n")
            print(f"ours --compile is {h['step_time_s'] / c['step_time_s']:.2f}x faster than Hugging Face")
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    return f"""## model: train-step throughput ({cfg.name}, MR {cfg.resolution}^2, {ds.precision}, {platform.machine()})

- Date: {datetime.date.today().isoformat()}
- Machine: {machine()}
- Versions: {versions()}, deepspeed {__import__('deepspeed').__version__}
- Command: `{cmd}`
- Setup: {shape}; synthetic token images; median of {r['steps']} timed steps after {args.warmup} warm-up steps
- FLOPs per token: 6N + 12·L·d·T = {cfg.train_flops_per_token() / 1e6:,.1f} MFLOP (no recompute counted)
- Load average when it finished (other jobs share the machine): {os.getloadavg()[0]:.1f}

| implementation | s/step | tokens/s | TFLOP/s per device | MFU | peak memory (GiB) |
|---|---|---|---|---|---|
{chr(10).join(rows)}
{ratio_line}{compile_line}"""


def run_checkpoint(args) -> str:
    import tempfile
    from pathlib import Path

    from igpt_ds.config import get_preset
    from igpt_ds.planning import bench_checkpoint as bench

    rows, bases = [], []
    with tempfile.TemporaryDirectory(prefix="igpt-bench-ckpt-", dir=args.scratch) as tmp:
        for preset in args.model:
            ckpt = Path(tmp) / preset
            print(f"writing a DP {args.world} ZeRO-{args.zero_stage} checkpoint of {preset} ...", flush=True)
            cfg = bench.write_benchmark_checkpoint(preset, args.resolution, args.world, args.zero_stage, ckpt)
            size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**30
            new = bench.measure_new(ckpt, Path(tmp) / f"{preset}-new")
            old = bench.measure_old(ckpt, Path(tmp) / f"{preset}-old")
            n = cfg.num_parameters()
            model_mb = 4 * n / 2**20
            bases.append((max(old["rank_peak_rss_mb"]) / model_mb, new["baseline_mb"]))
            line = (f"{preset}: {n / 1e6:.0f}M parameters ({model_mb:,.0f} MB fp32), checkpoint {size:.2f} GiB | "
                    f"new {new['convert_s']:.1f} s, peak RSS {new['peak_rss_mb']:,} MB "
                    f"({new['over_baseline_mb']:+,} MB over its {new['baseline_mb']} MB start) | "
                    f"old {old['convert_s']:.1f} s, host peak {old['host_peak_rss_mb']:,.0f} MB "
                    f"(ranks {', '.join(f'{x:,.0f}' for x in old['rank_peak_rss_mb'])} MB)")
            print(line, flush=True)
            rows.append(f"| {preset} | {n / 1e6:.0f}M | {size:.2f} | {new['convert_s']:.1f} | {new['peak_rss_mb']:,} "
                        f"({new['over_baseline_mb']:+,}) | {old['convert_s']:.1f} | {old['host_peak_rss_mb']:,.0f} |")
    per_rank = min(b for b, _ in bases)
    process_base = max(b for _, b in bases)
    xl = get_preset("igpt-xl")
    proj = bench.project(xl, 64, process_base)
    largest = bench.largest_param(xl) * 4 / 2**20
    print(f"iGPT-XL at 64 ranks, projected: old {proj['old_gb']:,.0f} GB, new {proj['new_gb']:.1f} GB")
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    return f"""## checkpoint: export of a DeepSpeed checkpoint, one-process reader vs the old engine ranks

- Date: {datetime.date.today().isoformat()}
- Machine: {machine()}
- Versions: {versions()}, deepspeed {__import__('deepspeed').__version__}
- Command: `{cmd}`
- Setup: each preset at MR {args.resolution}^2, written by {args.world} CPU ranks under ZeRO-{args.zero_stage}
  (fp32) after one optimizer step, exported to a consolidated fp32 `model.safetensors` by each path in a
  fresh process. New: `tools/convert_checkpoint.py` (its printed time and peak RSS; in brackets the
  growth over its RSS before reading). Old: `engine_reader.read_with_engines` ({args.world} engine
  ranks) + the same export; host peak = the ranks' peak RSS summed + the parent's.
- Load average when it finished (other jobs share the machine): {os.getloadavg()[0]:.1f}

| model | parameters | checkpoint (GiB) | new: s | new: peak RSS MB (growth) | old: s | old: host peak RSS MB |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Projected host RAM to export **iGPT-XL** ({xl.num_parameters() / 1e9:.2f}B parameters) from a 64-rank
checkpoint: old path at least 64 ranks x the full fp32 model that each gathers (4 B/parameter) =
**{proj['old_gb']:,.0f} GB** (a lower bound: the ranks measured above peaked at {per_rank:.1f}x or more
of the fp32 model each); new path its process's {process_base:,.0f} MB + 3 x the largest fp32 tensor
({largest:,.0f} MB) = **{proj['new_gb']:.1f} GB**, independent of the world size.
"""


def run_decode(args) -> str:
    import tempfile

    import torch

    from igpt_ds.data.sources import open_source, sample_pixels
    from igpt_ds.palette import fit_palette, load_palette
    from igpt_ds.planning.bench_data import decode_throughput, extraction_consumption, write_jpeg_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    source = open_source(args.data, args.split)
    if args.palette:
        palette, palette_note = load_palette(args.palette), args.palette
    else:
        palette = fit_palette(sample_pixels(source, 100_000, seed=0), 512, seed=0, iters=10)
        palette_note = "512-colour k-means fitted on 100,000 pixels of the source (seed 0, 10 iterations)"
    rows, folders = [], []
    with tempfile.TemporaryDirectory(prefix="igpt-bench-decode-", dir=args.scratch) as tmp:
        for side in args.side:
            folder = os.path.join(tmp, f"jpeg{side}")
            n = write_jpeg_folder(source, folder, args.images, side, args.quality)
            kib = sum(e.stat().st_size for d in os.scandir(folder) for e in os.scandir(d.path)) / n / 1024
            folders.append((side, folder, kib))
            print(f"{n} images of {source.name} as {side}x{side} JPEG (quality {args.quality}, {kib:.1f} KiB "
                  f"each); palette: {palette_note}", flush=True)
        configs = [(f, r, w, q) for f in folders for r in args.resolution for w in args.workers for q in (False, True)]
        best: dict = {}
        # Rounds interleave the configurations and each keeps its best round: other jobs on a
        # shared machine only ever slow a round down.
        for round_ in range(args.rounds):
            for (side, folder, _), r, w, q in configs:
                m = decode_throughput(folder, palette, r, w, batch_size=args.batch_size, quantize_too=q, device="cpu")
                if (side, r, w, q) not in best or m["images_per_s"] > best[side, r, w, q]["images_per_s"]:
                    best[side, r, w, q] = m
                print(f"round {round_ + 1}/{args.rounds}: {side}x{side} JPEG -> MR {r}^2, {w} workers, "
                      f"{'decode+resize+quantize' if q else 'decode+resize'}: {m['images_per_s']:,.0f} images/s, "
                      f"{m['cpu_ms_per_image']:.2f} CPU ms/image (first batch after {m['startup_s']:.2f} s)",
                      flush=True)
    for side, _, kib in folders:
        for r in args.resolution:
            for w in args.workers:
                d, q = best[side, r, w, False], best[side, r, w, True]
                rows.append(f"| {side}² ({kib:.0f} KiB) | {r}² | {w} | {d['images_per_s']:,.0f} | "
                            f"{d['cpu_ms_per_image']:.2f} | {q['images_per_s']:,.0f} | {d['startup_s']:.2f} |")

    def rate(r: dict) -> str:
        return f"{r['images_per_s']:,.0f}" if r["images_per_s"] >= 10 else f"{r['images_per_s']:.1f}"

    # Decoders one GPU needs: its images/s x the costliest measured CPU time per image (the largest
    # JPEGs, resized to the measured resolution nearest the preset's), decode+resize only.
    largest_side = max(args.side)

    def decoders(r: dict) -> int:
        nearest = min(args.resolution, key=lambda res: abs(res - r["resolution"]))
        cpu_ms = max(best[largest_side, nearest, w, False]["cpu_ms_per_image"] for w in args.workers)
        return max(1, math.ceil(r["images_per_s"] * cpu_ms / 1000))

    gpu_rows, needed = [], []
    for preset in args.presets:
        bf16 = extraction_consumption(preset, "bf16", args.mfu)
        fp32 = extraction_consumption(preset, "fp32", args.mfu)
        bert = extraction_consumption(preset, "bf16", args.mfu, passes=5)
        needed += [decoders(fp32), decoders(bf16), decoders(bert)]
        gpu_rows.append(f"| {preset} | {bf16['resolution']}² | {bf16['flops_per_image'] / 1e9:,.0f} | "
                        f"{rate(fp32)} ({decoders(fp32)}) | {rate(bf16)} ({decoders(bf16)}) | "
                        f"{rate(bert)} ({decoders(bert)}) |")
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    peak32 = extraction_consumption("igpt-s", "fp32")["peak_flops"]
    peak16 = extraction_consumption("igpt-s", "bf16")["peak_flops"]
    return f"""## Feature extraction decoders

`tools/benchmark.py decode`: the image-folder data path of `tools/extract_features.py --data`, per
`--num-workers`, next to what one GPU consumes.

- Date: {datetime.date.today().isoformat()}
- Machine: {machine()}
- Versions: {versions()}
- Command: `{cmd}`
- Images: {n} of `{source.name}` upscaled (bicubic) to each side below and saved as JPEG quality
  {args.quality} in an ImageNet-layout folder; batch {args.batch_size}; palette: {palette_note}
- images/s: the steady rate of one pass over the folder, timed from the first batch (best of {args.rounds}
  interleaved rounds); CPU ms/image: CPU time of the process and its workers over the pass, per
  image, which other jobs on the machine do not change (1000 / it = images/s one core decodes)
- decode+resize: `igpt_ds.evaluate.features.image_loader` (PIL decode + centre-crop resize in the
  workers), the CPU's whole share when `quantize` runs on the GPU; + quantize: `source_batches` with
  `quantize` on the CPU in the main process ({torch.get_num_threads()} torch threads)
- Load average when it finished (other jobs share the machine): {os.getloadavg()[0]:.1f}

| JPEG side (mean size) | MR | --num-workers | decode+resize (images/s) | CPU ms/image | + quantize on CPU (images/s) | first batch after (s) |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Wall-clock rates grow with workers only while cores are free (here {os.cpu_count()} cores, load
{os.getloadavg()[0]:.1f} at the end, and the main process needs one too); size decoders from CPU ms/image.

What one H100 extracts (images/s) at an assumed {100 * args.mfu:.0f}% MFU: forward FLOPs per image =
(6N + 12·L·d·T) / 3 × T tokens through every block (`extraction_consumption` in
`igpt_ds/planning/bench_data.py`); peaks {peak32 / 1e12:.0f} TFLOP/s fp32 (`--dtype fp32`, the default; PyTorch
uses no TF32) and {peak16 / 1e12:.0f} TFLOP/s bf16 (`--dtype bf16`); BERT: 5 forward passes per image (`--bert-masks 5`).
In brackets: the decoding workers that keep up, images/s × the highest CPU ms/image measured above
for {largest_side}² JPEGs at the nearest MR, / 1000, rounded up (real photographs cost more to decode than
these smooth upscaled images; ImageNet's average image is about 400x350).

| preset | MR | GFLOP/image | fp32 (workers) | bf16 (workers) | bf16, BERT 5 masks (workers) |
|---|---|---|---|---|---|
{chr(10).join(gpu_rows)}

The most any row needs is {max(needed)} worker(s). `tools/extract_features.py --num-workers` defaults to
min(8, the CPU cores the process may use): that, with headroom for real photographs, and within a
Slurm task's `--cpus-per-task=8` (`slurm/extract_features.sbatch`) when 8 GPUs share a node.
"""


def run_probe(args) -> str:
    from igpt_ds.planning import bench_probe

    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    return bench_probe.report(args, machine(), versions(), cmd)


def run_images(args) -> str:
    from igpt_ds.data.sources import open_source, sample_pixels
    from igpt_ds.palette import fit_palette, load_palette
    from igpt_ds.planning.bench_data import gpu_consumption, image_shard_throughput

    source = open_source(args.data, args.split)
    n = len(source) if args.images <= 0 else min(args.images, len(source))
    images = np.stack([source[i][0] for i in range(n)])
    if args.palette:
        palette, palette_note = load_palette(args.palette), args.palette
    else:
        palette = fit_palette(sample_pixels(source, 100_000, seed=0), 512, seed=0, iters=10)
        palette_note = "512-colour k-means fitted on 100,000 pixels of the source (seed 0, 10 iterations)"
    rows, runs = [], {}
    for resolution in args.resolutions:
        for workers in args.workers:
            r = image_shard_throughput(images, palette, resolution, num_workers=workers, batch_size=args.batch_size,
                                       min_samples=args.loader_samples)
            runs[resolution] = runs.get(resolution) or r  # the first (fewest workers) row is the per-worker figure
            print(f"image shards, crop {resolution} from a stored side of {r['store_side']}, {workers} worker(s): "
                  f"{r['samples_per_s']:,.0f} samples/s ({r['per_worker']:,.0f} per worker; start-up "
                  f"{r['startup_s']:.1f} s)")
            rows.append(f"| {resolution}² from {r['store_side']} | {workers} | **{r['samples_per_s']:,.0f}** | "
                        f"{r['per_worker']:,.0f} | {r['samples']:,} in {r['epochs']} epoch(s) | {r['startup_s']:.1f} s |")
    gpu_rows = []
    for preset in args.presets:
        g = gpu_consumption(preset, mfu=0.5)
        res = int(g["seq_len"] ** 0.5)
        per_worker = runs.get(res, {}).get("per_worker")
        need = f"{g['samples_per_s'] / per_worker:.2f}" if per_worker else "not measured at this resolution"
        gpu_rows.append(f"| {preset} | {res}² | {g['flops_per_sample'] / 1e12:.2f} | {g['samples_per_s']:,.1f} | {need} |")
        print(f"one H100 at 50% MFU trains {preset} ({res}^2) on {g['samples_per_s']:,.1f} samples/s; "
              f"workers needed per GPU: {need}")
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    nl = "\n"
    return f"""## images: the on-the-fly image-shard path (crop + quantize in loader workers)

- Date: {datetime.date.today().isoformat()}
- Machine: {machine()}
- Versions: {versions()}
- Command: `{cmd}`
- Images: {n} of `{source.name}`, upscaled (bicubic) to the stored side (2x the crop) as PNG image shards
  (`igpt_ds.data.image_shards.build_image_shards`); each sample is decoded, given the paper's random-resized
  crop and quantized with {palette_note} in a loader worker (`build_loader`, batch {args.batch_size}, 1 DP rank)
- Rates are steady (timed from the first batch, shuffle buffer off so no work precedes it); worker start-up
  is listed apart. Each worker quantizes one crop per call (`quantize`, 1 torch thread)
- Load average when it finished (other jobs share the machine): {os.getloadavg()[0]:.1f}. On a machine of few
  cores the trainer process and other jobs compete with the workers: the 1-worker row is the per-worker figure

| crop from stored side | workers | samples/s | per worker | samples read | start-up |
|---|---|---|---|---|---|
{nl.join(rows)}

What one H100 consumes (`igpt_ds.planning.bench_data.gpu_consumption`: train FLOPs per token × tokens,
989 TFLOP/s bf16 dense × 50% MFU), and the loader workers (CPU cores) per GPU that rate needs at the
per-worker rate above:

| preset | resolution | TFLOP per sample | samples/s per GPU | workers per GPU |
|---|---|---|---|---|
{nl.join(gpu_rows)}
"""


TARGETS = {"data": run_data, "model": run_model, "checkpoint": run_checkpoint, "decode": run_decode,
           "probe": run_probe, "images": run_images}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help=quiet.HELP)
    parser.add_argument("--markdown", default=os.path.join(REPO, "BENCHMARKS.md"),
                        help="file whose section for the target is replaced (default: BENCHMARKS.md)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the markdown file alone")
    sub = parser.add_subparsers(dest="target", required=True)
    data = sub.add_parser("data", help="quantizer vs HF ImageGPTImageProcessor; loader samples/s")
    data.add_argument("--data", required=True, help="image source, e.g. cifar-10-batches-py/")
    data.add_argument("--split", default="train")
    data.add_argument("--images", type=int, default=0, help="images to use (default: 0 = all)")
    data.add_argument("--resolution", type=int, default=32)
    data.add_argument("--palette", help="palette.npy (default: fit one on the source)")
    data.add_argument("--device", default=None, help="where our quantizer runs (default: cuda if available)")
    data.add_argument("--threads", type=int, default=1, help="torch threads for our quantizer on CPU "
                      "(default: 1, quantize's default; 0 = torch's setting)")
    data.add_argument("--workers", type=int, default=2, help="loader workers (default: 2)")
    data.add_argument("--batch-size", type=int, default=64)
    data.add_argument("--loader-samples", type=int, default=50_000, help="samples to read, in whole epochs")
    img = sub.add_parser("images", help="on-the-fly image shards: crop+quantize samples/s per worker vs one H100")
    img.add_argument("--data", required=True, help="image source, e.g. cifar-10-batches-py/")
    img.add_argument("--split", default="train")
    img.add_argument("--images", type=int, default=2000, help="images to store (default 2000; 0 = all)")
    img.add_argument("--resolutions", type=int, nargs="+", default=[32, 64],
                     help="crop sides, each stored at twice the side (default: 32 64)")
    img.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader worker counts (default: 1 2)")
    img.add_argument("--presets", nargs="+", default=["igpt-s", "igpt-m", "igpt-l", "igpt-xl"])
    img.add_argument("--palette", help="palette.npy (default: fit one on the source)")
    img.add_argument("--batch-size", type=int, default=64)
    img.add_argument("--loader-samples", type=int, default=4000, help="samples to read, in whole epochs")
    model = sub.add_parser("model", help="train-step tokens/s, TFLOP/s, MFU, memory (+ HF ratio on CPU)")
    model.add_argument("--model", default="igpt-tiny", help="preset (default igpt-tiny)")
    model.add_argument("--resolution", type=int, default=32, help="model resolution side (default 32)")
    model.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                       default=os.path.join(REPO, "ds_configs", "zero0_fp32.json"),
                       help="batch size, precision, ZeRO stage (default ds_configs/zero0_fp32.json)")
    model.add_argument("--tensor-parallel", type=int, default=1)
    model.add_argument("--pipeline-parallel", type=int, default=1)
    model.add_argument("--activation-checkpointing", action="store_true")
    model.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    model.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    model.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: looked up by name)")
    model.add_argument("--no-reference", action="store_true", help="skip the Hugging Face comparison on CPU")
    model.add_argument("--compile", action="store_true",
                       help="also run the trainer with --compile (blocks through torch.compile) after the eager run")
    model.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed launcher
    ckpt = sub.add_parser("checkpoint", help="export time and peak RSS: one-process reader vs the old engine ranks")
    ckpt.add_argument("--model", nargs="+", default=["igpt-s", "igpt-m"], help="presets (default igpt-s igpt-m)")
    ckpt.add_argument("--resolution", type=int, default=8,
                      help="model resolution side (default 8: the step that writes Adam's state stays short)")
    ckpt.add_argument("--world", type=int, default=2, help="ranks (DP) that write the checkpoint (default 2)")
    ckpt.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3], help="ZeRO stage (default 3)")
    ckpt.add_argument("--scratch", default=None, help="directory for the checkpoints (default: the system temp)")
    dec = sub.add_parser("decode", help="image-folder decode+resize(+quantize) images/s per --num-workers, "
                         "next to what one GPU extracts")
    dec.add_argument("--data", required=True, help="image source to make the JPEGs from, e.g. cifar-10-batches-py/")
    dec.add_argument("--split", default="train")
    dec.add_argument("--images", type=int, default=0, help="images to use (default: 0 = all)")
    dec.add_argument("--side", type=int, nargs="+", default=[256],
                     help="JPEG sides in pixels (default 256: ImageNet-like; its images average ~400x350)")
    dec.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    dec.add_argument("--resolution", type=int, nargs="+", default=[32, 64],
                     help="model resolutions to resize to (default 32 64: igpt-s/m/l and igpt-xl)")
    dec.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts (default 0 1 2)")
    dec.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64, the extractor's)")
    dec.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each row keeps its best (default 3)")
    dec.add_argument("--palette", help="palette.npy (default: fit one on the source)")
    dec.add_argument("--threads", type=int, default=0, help="torch threads of the main process (default: torch's)")
    dec.add_argument("--presets", nargs="+", default=["igpt-s", "igpt-m", "igpt-l", "igpt-xl"],
                     help="presets whose GPU consumption is listed (default: all four)")
    dec.add_argument("--mfu", type=float, default=0.5, help="assumed model FLOP utilisation (default 0.5)")
    dec.add_argument("--scratch", default=None, help="directory for the JPEG folder (default: the system temp)")
    probe = sub.add_parser("probe", help="SGD linear probe: features/s per layer and peak RSS, L layers at once vs "
                           "one at a time; accuracy beside L-BFGS")
    probe.add_argument("--rows", type=int, default=200_000, help="training rows (default 200000)")
    probe.add_argument("--test-rows", type=int, default=10_000, help="test rows (default 10000)")
    probe.add_argument("--width", type=int, default=1536, help="features per layer (default 1536: iGPT-L)")
    probe.add_argument("--layers", type=int, default=4, help="layers in the file (default 4)")
    probe.add_argument("--classes", type=int, default=1000, help="classes (default 1000: ImageNet)")
    probe.add_argument("--iterations", type=int, default=40, help="steps per fit (default 40)")
    probe.add_argument("--batch-size", type=int, default=256, help="mini-batch (default 256, the probe's)")
    probe.add_argument("--memory-budget", type=float, default=1024, help="MB (default 1024, the probe's)")
    probe.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    probe.add_argument("--data", help="CIFAR folder for the accuracy comparison with L-BFGS (default: none)")
    probe.add_argument("--images", type=int, default=0, help="images of --data to use (default 0 = all)")
    probe.add_argument("--scratch", default=None, help="directory for the feature files (default: the system temp)")
    args = parser.parse_args(argv)
    text = TARGETS[args.target](args)
    if not text:  # ranks other than 0
        return
    if not args.no_write:
        write_section(args.markdown, args.target, text)
        print(f"wrote the {args.target} section of {args.markdown}")


if __name__ == "__main__":
    main()

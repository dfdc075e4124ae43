#!/usr/bin/env python
"""Benchmarks, one sub-command per target; results are printed and written to BENCHMARKS.md.

    python tools/benchmark.py data --data cifar-10-batches-py

data: our quantizer against Hugging Face's ImageGPTImageProcessor on the same images and palette
(tokens must be identical), and the shard loader's samples/s with 2 workers, next to the
samples/s one H100 consumes training igpt-l at MR 32^2.
"""
import argparse
import datetime
import os
import platform
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout

import numpy as np  # noqa: E402


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
    with open(path + ".tmp", "w") as f:
        f.write(new)
    os.replace(path + ".tmp", path)


def run_data(args) -> str:
    from igpt_ds.data_benchmark import compare_quantizers, gpu_consumption, load_images, loader_throughput
    from igpt_ds.palette import fit_palette, load_palette
    from igpt_ds.sources import open_source, sample_pixels

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


TARGETS = {"data": run_data}  # the model target joins here


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args = parser.parse_args(argv)
    text = TARGETS[args.target](args)
    if not args.no_write:
        write_section(args.markdown, args.target, text)
        print(f"wrote the {args.target} section of {args.markdown}")


if __name__ == "__main__":
    main()

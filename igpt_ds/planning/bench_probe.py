"""Measurements behind ``tools/benchmark.py probe``: the SGD linear probe's throughput, memory and accuracy.

- Throughput and memory: a synthetic ImageNet-like feature file (``rows`` x ``width`` float16 per
  layer, ``classes`` labels from a planted linear map, written in chunks), probed by
  ``tools/linear_probe.py --solver sgd --iterations N`` in a fresh process per run: all L layers
  in ONE pass against each layer ALONE (L runs). Each run's JSON gives its training rows/s and
  peak RSS (VmHWM); features/s per layer = training rows x layers / training seconds.
- Accuracy: :func:`cifar_tiny_features` (real CIFAR-10 images through a tiny random-weights iGPT),
  probed by both solvers with their own searches.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from igpt_ds.evaluate.feature_files import FeatureWriter

REPO = Path(__file__).resolve().parents[2]


def write_synthetic(path: Path, rows: int, width: int, layers: int, classes: int, seed: int = 0,
                    chunk: int = 8192) -> Path:
    """A feature file of ``layers`` float16 layers; labels = argmax of a fixed linear map of layer 0 + noise."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(width, classes)).astype(np.float32) / np.sqrt(width)
    arrays = {f"layer{l}": ((rows, width), np.float16) for l in range(layers)} | {"labels": ((rows,), np.int64)}
    with FeatureWriter(path, arrays) as writer:
        for s in range(0, rows, chunk):
            n = min(chunk, rows - s)
            x = rng.standard_normal((n, width), dtype=np.float32)
            values = {"layer0": x.astype(np.float16),
                      "labels": (x @ w + rng.standard_normal((n, classes), dtype=np.float32)).argmax(1)}
            for l in range(1, layers):  # deeper layers: the signal plus more noise each
                values[f"layer{l}"] = (x + l * rng.standard_normal((n, width), dtype=np.float32)).astype(np.float16)
            writer.write(s, values)
        return writer.finish({"kind": "synthetic", "rows": rows, "width": width, "classes": classes})


def run_probe(train: Path, test: Path, out: Path, layers: str, extra: list[str]) -> dict:
    """``tools/linear_probe.py`` in a fresh process (its own peak RSS); returns its JSON plus wall seconds."""
    t0 = time.perf_counter()
    cmd = [sys.executable, str(REPO / "tools" / "linear_probe.py"), "--train", str(train), "--test", str(test),
           "--out", str(out), "--layers", layers, "--quiet", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def training_rate(result: dict) -> tuple[float, float, int]:
    """(training rows, training seconds, layers) summed over the run's passes."""
    passes = result["passes"].values()
    return sum(p["rows"] for p in passes), sum(p["seconds"] for p in passes), len(result["layers"])


def cifar_tiny_features(data: str, out: Path, resolution: int = 16, n_layer: int = 2, d_model: int = 64,
                        colours: int = 64, train_fraction: float = 0.5, images: Optional[int] = None,
                        seed: int = 0) -> tuple[Path, Path]:
    """Features of real CIFAR images through a tiny random-weights iGPT: ``out/train.npz``, ``out/test.npz``.

    A ``colours``-colour palette is fitted on the images; every layer 0..n_layer is pooled as
    ``tools/extract_features.py`` pools; the images are split ``train_fraction`` / rest at random.
    """
    import torch

    from igpt_ds.config import get_preset
    from igpt_ds.data.shards import resize_view
    from igpt_ds.data.sources import open_source, sample_pixels
    from igpt_ds.evaluate.features import pooled_features
    from igpt_ds.model.transformer import IGPTModel
    from igpt_ds.palette import fit_palette, quantize

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    source = open_source(str(data), "train")
    count = min(images or len(source), len(source))
    palette = fit_palette(sample_pixels(source, min(200, count), per_image=64), colours, iters=10, seed=seed)
    cfg = get_preset("igpt-tiny", resolution=resolution, n_layer=n_layer, d_model=d_model, n_head=2,
                     vocab_size=colours)
    model = IGPTModel(cfg, seed=seed).eval()
    layers = list(range(n_layer + 1))
    feats: dict = {l: [] for l in layers}
    labels = []
    with torch.no_grad():
        for s in range(0, count, 128):
            batch = [source[i] for i in range(s, min(s + 128, count))]
            labels += [lab for _, lab in batch]
            tokens = quantize(torch.from_numpy(np.stack([resize_view(im, resolution) for im, _ in batch])), palette)
            for l, f in pooled_features(model, tokens, layers).items():
                feats[l].append(f.numpy())
    feats = {l: np.concatenate(v) for l, v in feats.items()}
    labels = np.asarray(labels)
    perm = np.random.default_rng(seed).permutation(count)
    cut = int(train_fraction * count)
    paths = []
    for name, idx in (("train", perm[:cut]), ("test", perm[cut:])):
        arrays = {f"layer{l}": ((len(idx), d_model), np.float32) for l in layers} | {"labels": ((len(idx),), np.int64)}
        with FeatureWriter(out / f"{name}.npz", arrays) as w:
            w.write(0, {f"layer{l}": x[idx] for l, x in feats.items()} | {"labels": labels[idx]})
            paths.append(w.finish({"kind": "model", "model": cfg.to_dict(), "source": {"data": str(data)}}))
    return paths[0], paths[1]


def report(args, machine: str, versions: str, command: str) -> str:
    """Run the measurements of ``tools/benchmark.py probe`` and return its BENCHMARKS.md section."""
    import datetime
    import tempfile

    layers = args.layers
    sgd = ["--solver", "sgd", "--iterations", str(args.iterations), "--batch-size", str(args.batch_size),
           "--memory-budget", str(args.memory_budget), "--device", args.device]
    rows = []
    with tempfile.TemporaryDirectory(prefix="igpt-bench-probe-", dir=args.scratch) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        train = write_synthetic(tmp / "train.npz", args.rows, args.width, layers, args.classes)
        test = write_synthetic(tmp / "test.npz", args.test_rows, args.width, layers, args.classes, seed=1)
        size_gb = train.stat().st_size / 1e9
        print(f"synthetic features: {args.rows} x {args.width} float16 x {layers} layers ({size_gb:.2f} GB) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        runs = {"together": [run_probe(train, test, tmp / "all.json", f"0-{layers - 1}", sgd)]}
        runs["alone"] = [run_probe(train, test, tmp / f"one{l}.json", str(l), sgd) for l in range(layers)]
        for name, results in runs.items():
            n_rows = sum(training_rate(r)[0] for r in results)
            seconds = sum(training_rate(r)[1] for r in results)
            feature_rows = sum(training_rate(r)[0] * training_rate(r)[2] for r in results)
            wall = sum(r["wall_seconds"] for r in results)
            peak = max(r["peak_rss_bytes"] for r in results) / 2**20
            label = f"{layers} layers in one pass" if name == "together" else f"{layers} runs of one layer"
            print(f"{label}: {n_rows / seconds:,.0f} rows/s, {feature_rows / seconds:,.0f} features/s per layer, "
                  f"wall {wall:.0f} s, peak RSS {peak:,.0f} MB", flush=True)
            rows.append(f"| {label} | {len(results)} | {n_rows:,} | {seconds:.1f} | {n_rows / seconds:,.0f} | "
                        f"{feature_rows / seconds:,.0f} | {wall:.0f} | {peak:,.0f} |")
        acc_rows = []
        if args.data:
            feats = tmp / "cifar"
            cifar_tiny_features(args.data, feats, images=args.images or None)
            tr, te = feats / "train.npz", feats / "test.npz"
            for solver, extra in (("lbfgs", []), ("sgd", ["--solver", "sgd", "--holdout", "0.1", "--epochs", "30",
                                                            "--batch-size", "128", "--device", args.device])):
                extra = extra + (["--holdout", "0.1"] if solver == "lbfgs" else [])
                r = run_probe(tr, te, tmp / f"cifar_{solver}.json", "all", extra)
                per = [100 * r["layers"][l]["test_accuracy"] for l in sorted(r["layers"], key=int)]
                knob = ", ".join(f"{l}: {'C' if solver == 'lbfgs' else 'lr'} "
                                 f"{r['layers'][l]['C' if solver == 'lbfgs' else 'lr']:g}"
                                 for l in sorted(r["layers"], key=int))
                print(f"CIFAR {solver}: per layer {[f'{a:.1f}' for a in per]}, best layer {r['best_layer']} "
                      f"{100 * r['best_test_accuracy']:.1f}%", flush=True)
                acc_rows.append(f"| {solver} | {' / '.join(f'{a:.1f}' for a in per)} | {sum(per) / len(per):.1f} | "
                                f"{r['best_layer']} | {100 * r['best_test_accuracy']:.1f} | {knob} | "
                                f"{r['wall_seconds']:.0f} |")
            n_train, n_test = r["num_train"], r["num_test"]
    accuracy = ""
    if acc_rows:
        accuracy = f"""
Accuracy on real images, both solvers with their own searches (L-BFGS: C grid 1e-3..1e2; SGD: the
default rate grid, 30 epochs of batch 128), held-out 10% for the choice in both: features of
`{args.data}` ({n_train} train / {n_test} test images, a random half each) through a tiny
random-weights iGPT (16², 2 layers, d 64, 64-colour palette; `cifar_tiny_features`). Features this
weak (random weights) make single layers noisy, and the best layer is picked on the 10% held out
(a standard error of ~3 points there), so the two protocols can pick different layers; the test
`tests/test_sgd_probe.py` also checks the two solvers at the same L2 objective (SGD weight decay
1/(C·N)), where they agree per layer.

| solver | test accuracy per layer 0 / 1 / 2 (%) | mean (%) | best layer | its test accuracy (%) | chosen | wall (s) |
|---|---|---|---|---|---|---|
{chr(10).join(acc_rows)}
"""
    return f"""## probe: the SGD linear probe (ImageNet protocol), throughput and memory

- Date: {datetime.date.today().isoformat()}
- Machine: {machine}
- Versions: {versions}
- Command: `{command}`
- Data: a synthetic feature file of {args.rows:,} rows x {args.width} float16 per layer, {layers} layers
  ({size_gb:.2f} GB), {args.classes} classes (planted linear labels); test file {args.test_rows:,} rows
- Probe: `tools/linear_probe.py --solver sgd --iterations {args.iterations} --batch-size {args.batch_size}
  --memory-budget {args.memory_budget:g} --device {args.device}`, 6 rates (the default grid): per fit
  {args.iterations} steps of rate search + {args.iterations} final steps, plus the statistics pass and
  the held-out/test scoring; each run a fresh process (its own peak RSS, VmHWM)
- rows/s: training rows (both fits) per second of training; features/s per layer: that x the layers
  each pass trains (an L-layer pass trains L x 6 heads per row)

| mode | runs | training rows | training s | rows/s | features/s per layer | wall s (all runs) | peak RSS (MB) |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

On this CPU the heads' matmuls dominate (6 rates x {args.classes} classes x {args.width} per row and
layer), so one pass over L layers costs about what L one-layer runs cost in compute; what one
pass saves is the reading: L+1 layers of ImageNet are read once instead of L+1 times, and the
statistics pass once. Peak RSS follows --memory-budget, not the file size: torch (~300 MB), the
heads (weights, momentum and gradients: 3 x rates x width x classes x 4 bytes per layer) and the
larger of the shuffle buffer (<= the budget) and the statistics pass (a float64 chunk of up to
half the budget plus its centred copy, ~1.5 x the budget): here the statistics pass sets the peak.
{accuracy}"""

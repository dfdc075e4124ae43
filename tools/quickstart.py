#!/usr/bin/env python
"""The whole iGPT pipeline on real images, one command: palette -> shards -> DeepSpeed pretraining
-> export -> per-layer features -> linear probes (beside raw-pixel and random-weight baselines)
-> completions of real images. Every stage is one of the project's own commands, printed before
it runs, so the same steps scale to a cluster by changing flags and configs, not code.

    python tools/quickstart.py                       # embedded CIFAR-10 sample, igpt-tiny, CPU, ~13 min
    python tools/quickstart.py --tiny                # a smoke run of every stage on 1017 images (about 2 min)
    python tools/quickstart.py --data ~/cifar-10-batches-py --model igpt-s --resolution 32 \\
        --deepspeed-config ds_configs/igpt-s.json --steps 100000 --launcher "deepspeed --num_gpus 8"

Outputs, all under --out (default runs/quickstart): palette.npy, shards/{train,val}/,
checkpoints/ (DeepSpeed, resumable), training.png, export/ (consolidated), features/*.npz,
probe.json + probe.png, samples.png, summary.json.

The pretrained features are probed layer by layer (the best layer chosen by held-out accuracy on
training features) and as all blocks concatenated (layers 1..n, as the paper concatenates layers for
its best probes). The claim stands on the concatenation, a fixed choice: choosing between it and the
best layer on a few hundred held-out training images only adds noise (BENCHMARKS.md, issue 18). The
summary gives both against raw pixels, with the standard error of each gap and whether it exceeds two.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from igpt_ds import quiet  # noqa: E402

quiet.install(sys.argv)  # before torch: third-party notices nobody can act on stay quiet (--verbose)

from igpt_ds.checkpoint.atomic import atomic_write  # noqa: E402

# The main job's embedded data: all 5085 images of the shared CIFAR-10 sample (five batch files; a
# held-out fifth is the probes' test set). 1017 images are too few for pretraining to beat raw pixels
# (BENCHMARKS.md, issue 18). --tiny runs on the first batch file alone.
DEFAULT_DATA = os.path.join(REPO, "data", "cifar10-5k")
TINY_DATA = os.path.join(REPO, "data", "cifar10-sample")
# L-BFGS probes on a few thousand rows: one BLAS thread is 3-4x faster than two on 2 cores, and one
# count everywhere makes them reproducible across machines (fits that stop at max_iter depend on the
# threads' summation order). Set for the probe stages only.
PROBE_THREADS = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def run(cmd: list[str], log: list, env: dict) -> None:
    """Run one stage's command (printed first), failing the quickstart with its output if it fails."""
    shown = " ".join(shlex.quote(c) for c in cmd)
    print(f"\n$ {shown}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO)
    log.append({"command": shown, "seconds": round(time.perf_counter() - start, 1)})
    if proc.returncode != 0:
        raise SystemExit(f"error: this stage failed (exit {proc.returncode}): {shown}")


def check_data(path: str, split: str) -> int:
    """Fail early, saying what was expected, when --data is missing or unreadable."""
    from igpt_ds.data.sources import open_source

    if not os.path.exists(path):
        raise SystemExit(f"error: --data {path} does not exist. Expected an image source: a CIFAR-10 "
                         f"'cifar-10-batches-py' directory (data_batch_1..5), CIFAR-100 'cifar-100-python', "
                         f"STL-10 'stl10_binary', an image folder, or an .npz with 'images'")
    try:
        return len(open_source(path, split))
    except ValueError as e:
        raise SystemExit(f"error: --data {path}: {e}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help=quiet.HELP)
    p.add_argument("--data", help="image source (default: the embedded CIFAR-10 sample, data/cifar10-5k; "
                                  "data/cifar10-sample with --tiny)")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "quickstart"), help="run directory")
    p.add_argument("--model", default="igpt-tiny", help="preset (default igpt-tiny)")
    p.add_argument("--objective", default="ar", choices=["ar", "bert"])
    p.add_argument("--resolution", type=int,
                   help="model resolution side (default 16: 4x fewer tokens than CIFAR's 32, for a CPU; 8 with --tiny)")
    p.add_argument("--steps", type=int, default=800,
                   help="pretraining optimizer steps (default 800: 6.3 epochs of the 4068 training images of the "
                        "embedded sample, about 9 minutes on 2 CPU cores)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3, the paper's for S)")
    p.add_argument("--deepspeed-config", default=os.path.join(REPO, "ds_configs", "quickstart.json"),
                   help="DeepSpeed config: batch size, precision, ZeRO (default ds_configs/quickstart.json)")
    p.add_argument("--launcher", default="", help="prefix for the pretraining command, e.g. 'deepspeed --num_gpus 8' "
                   "(default: plain python, one process)")
    p.add_argument("--pretrain-args", default="",
                   help="extra flags for igpt_ds/pretrain.py, e.g. '--tensor-parallel 2'")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="held-out fraction of the train split: pretraining validation and the probes' test set")
    p.add_argument("--completions", type=int, default=4, help="completions per image in samples.png")
    p.add_argument("--tiny", action="store_true", help="smoke mode: a few steps and small stages (for CI)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    args.resolution = args.resolution or (8 if args.tiny else 16)
    args.data = args.data or (TINY_DATA if args.tiny else DEFAULT_DATA)
    n_images = check_data(args.data, "train")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    py, log = sys.executable, []
    steps = 4 if args.tiny else args.steps
    palette, shards, ckpt = f"{out}/palette.npy", f"{out}/shards", f"{out}/checkpoints"
    export, feats = f"{out}/export", f"{out}/features"
    split = ["--val-fraction", str(args.val_fraction), "--split-seed", str(args.seed)]
    print(f"iGPT-DS quickstart: {n_images} training images from {args.data} -> {out}")
    t0 = time.perf_counter()

    run([py, "tools/make_palette.py", "--data", args.data, "--out", palette, "--seed", str(args.seed),
         "--resolution", str(args.resolution), "--sample-pixels", "20000" if args.tiny else "200000",
         "--iters", "5" if args.tiny else "20"], log, env)
    if not os.path.isfile(f"{shards}/train/dataset.json"):
        run([py, "tools/build_shards.py", "--data", args.data, "--split", "train", "--palette", palette,
             "--resolution", str(args.resolution), "--val-fraction", str(args.val_fraction), "--seed", str(args.seed),
             "--out", shards, "--no-progress"], log, env)
    pretrain = [*shlex.split(args.launcher)] if args.launcher else [py]
    run([*pretrain, "igpt_ds/pretrain.py", "--model", args.model, "--objective", args.objective,
         "--resolution", str(args.resolution), "--train-data", f"{shards}/train", "--val-data", f"{shards}/val",
         "--palette", palette, "--deepspeed_config", args.deepspeed_config, "--train-steps", str(steps),
         "--lr", str(args.lr), "--warmup-steps", str(max(1, steps // 10)), "--save", ckpt,
         "--save-interval", str(max(1, steps // 2)), "--eval-interval", str(max(1, steps // 4)),
         "--log-interval", "1" if args.tiny else "10", "--num-workers", "1", "--seed", str(args.seed),
         *(["--load", ckpt] if os.path.isfile(f"{ckpt}/latest") else []), *shlex.split(args.pretrain_args)],
        log, env)
    run([py, "tools/plot_training.py", f"{ckpt}/metrics.jsonl", "--out", f"{out}/training.png"], log, env)
    if os.path.isdir(export):
        import shutil

        shutil.rmtree(export)  # the export follows the newest checkpoint
    run([py, "tools/convert_checkpoint.py", ckpt, export, "--to", "consolidated"], log, env)

    extract = [py, "tools/extract_features.py", "--data", args.data, "--layers", "all", "--batch-size", "64",
               "--seed", str(args.seed), *split]
    for name, how in (("model", ["--checkpoint", export]), ("raw", ["--raw-pixels", "--checkpoint", export]),
                      ("random", ["--random-init", "--checkpoint", export])):
        for part in ("train", "val"):
            run([*extract, *how, "--split", part, "--out", f"{feats}/{name}_{part}.npz"], log, env)
    probe_env = dict(env, **PROBE_THREADS)
    for name in ("raw", "random"):
        run([py, "tools/linear_probe.py", "--train", f"{feats}/{name}_train.npz", "--test", f"{feats}/{name}_val.npz",
             "--out", f"{feats}/{name}_probe.json", "--name", name, "--save-predictions",
             f"{feats}/{name}_predictions.npz", "--quiet"], log, probe_env)
    n_layer = exported_n_layer(export)
    run([py, "tools/linear_probe.py", "--train", f"{feats}/model_train.npz", "--test", f"{feats}/model_val.npz",
         "--out", f"{out}/probe.json", "--plot", f"{out}/probe.png", "--name", f"{args.model} (pretrained)",
         *(["--concat-layers", f"1-{n_layer}"] if n_layer > 1 else []),
         "--save-predictions", f"{feats}/model_predictions.npz",
         "--baseline", f"raw pixels={feats}/raw_probe.json", "--baseline", f"random weights={feats}/random_probe.json",
         "--quiet"], log, probe_env)
    run([py, "tools/sample.py", "--checkpoint", export, "--data", args.data, "--split", "train",
         "--num-images", "2" if args.tiny else "6", "--completions", str(2 if args.tiny else args.completions),
         "--out", f"{out}/samples.png", "--seed", str(args.seed)], log, env)

    summary = summarize(out, args, log, time.perf_counter() - t0)
    print(f"\nDone in {summary['seconds'] / 60:.1f} min. {summary['text']}")
    return 0


def summarize(out: str, args, log: list, seconds: float) -> dict:
    from igpt_ds.train.metrics import read_metrics

    records = read_metrics(f"{out}/checkpoints/metrics.jsonl")
    val = [r for r in records if r.get("val_loss") is not None]
    probe = json.load(open(f"{out}/probe.json"))
    raw = json.load(open(f"{out}/features/raw_probe.json"))
    rand = json.load(open(f"{out}/features/random_probe.json"))
    chosen = pretrained_probe(probe)
    # The binomial standard error of a test accuracy: how far apart two probes must be to mean anything.
    n_test = probe["num_test"]
    stderr = math.sqrt(chosen["best_test_accuracy"] * (1 - chosen["best_test_accuracy"]) / n_test)
    concat = probe.get("concat")
    model_correct, raw_correct = per_image_correct(f"{out}/features/model_predictions.npz",
                                                   f"{out}/features/raw_predictions.npz", f"layer{raw['best_layer']}")
    layer_key = f"layer{probe['best_layer']}"
    gap = compare_to_raw(chosen, raw, correct=(model_correct["concat" if concat else layer_key], raw_correct))
    layer_gap = (compare_to_raw(best_layer_probe(probe), raw, correct=(model_correct[layer_key], raw_correct))
                 if concat else gap)
    outputs = {"palette": "palette.npy", "shards": "shards/", "checkpoints": "checkpoints/",
               "training curves": "training.png", "export": "export/", "features": "features/",
               "probe": "probe.json", "probe plot": "probe.png", "samples": "samples.png"}
    text = (f"Pretraining: {records[-1]['step']} steps, train loss {records[-1]['loss']:.3f} nats/token"
            + (f", validation {val[-1]['val_loss']:.3f} nats/token ({val[-1]['val_bits_per_dim']:.3f} bits/dim)"
               if val else "")
            + f".\nLinear probe ({n_test} held-out images, standard error about {100 * stderr:.1f} points): "
              f"best layer {probe['best_layer']} {100 * probe['best_test_accuracy']:.1f}%"
            + (f" | layers {_span(concat['layers'])} concatenated {100 * concat['test_accuracy']:.1f}%"
               if concat else "")
            + f" | raw pixels "
              f"{100 * raw['best_test_accuracy']:.1f}% | random weights {100 * rand['best_test_accuracy']:.1f}%"
              f"\n{chosen['label'].capitalize()}: {gap['text']}"
            + (f"\nBest single layer alone: {layer_gap['text']}" if concat else "")
            + f"\nOutputs in {out}: "
            + ", ".join(f"{k} {v}" for k, v in outputs.items()))
    summary = {"seconds": round(seconds, 1), "data": os.path.abspath(args.data), "model": args.model,
               "resolution": args.resolution, "steps": records[-1]["step"], "final_loss": records[-1]["loss"],
               "val_loss": val[-1]["val_loss"] if val else None, "probe_best_layer": probe["best_layer"],
               "best_layer_accuracy": probe["best_test_accuracy"],
               "concat_layers": concat["layers"] if concat else None,
               "concat_accuracy": concat["test_accuracy"] if concat else None,
               "probe_features": chosen["label"], "probe_accuracy": chosen["best_test_accuracy"],
               "probe_test_images": n_test,
               "probe_standard_error": stderr, "raw_pixel_accuracy": raw["best_test_accuracy"],
               "random_weights_accuracy": rand["best_test_accuracy"], "gap_vs_raw_pixels": gap["gap"],
               "gap_standard_error": gap["standard_error"], "gap_significant": gap["significant"],
               "gap_standard_error_independent": gap["independent_standard_error"],
               "best_layer_gap_vs_raw_pixels": layer_gap["gap"],
               "best_layer_gap_standard_error": layer_gap["standard_error"],
               "best_layer_gap_significant": layer_gap["significant"],
               "outputs": outputs, "stages": log,
               "text": text}
    atomic_write(f"{out}/summary.json", json.dumps(summary, indent=2))
    return summary


def _span(layers: list) -> str:
    layers = sorted(int(l) for l in layers)
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}-{layers[-1]}" if contiguous and len(layers) > 2 else ",".join(map(str, layers))


def pretrained_probe(probe: dict) -> dict:
    """The pretrained features the claim stands on: the blocks concatenated when the probe has them
    (the quickstart always asks for them), else the best single layer. A fixed rule: no accuracy,
    held-out or test, chooses between the two."""
    concat = probe.get("concat")
    if concat:
        return {"label": f"layers {_span(concat['layers'])} concatenated",
                "best_test_accuracy": concat["test_accuracy"], "num_test": probe["num_test"]}
    return best_layer_probe(probe)


def best_layer_probe(probe: dict) -> dict:
    return {"label": f"best layer {probe['best_layer']}",
            "best_test_accuracy": probe["best_test_accuracy"], "num_test": probe["num_test"]}


def exported_n_layer(export: str) -> int:
    from igpt_ds.checkpoint.consolidated import read_consolidated_config

    return int(read_consolidated_config(export)["model"]["n_layer"])


def compare_to_raw(probe: dict, raw: dict, z: float = 2.0, correct=None) -> dict:
    """The claim the quickstart exists to show: do the pretrained features beat raw pixels, beyond noise?

    ``probe``: :func:`pretrained_probe`'s choice (or a probe.json: its best layer).
    ``gap`` = its test accuracy - raw-pixel accuracy (fractions).
    ``correct``: optional (a, b), boolean per test image: the pretrained probe's and the raw-pixel
    probe's right answers ON THE SAME IMAGES. Then the standard error of the gap is the paired one,
    std(a - b) / sqrt(n) (ddof 1; the normal form of McNemar's test), which is what a difference of
    two accuracies on one test set has. Without it, independent binomials, sqrt(p(1-p)/n + r(1-r)/m):
    larger, since the two probes' errors on the same images correlate. Both are returned.
    ``significant``: gap >= ``z`` standard errors (the paired one when given).
    """
    p, n = float(probe["best_test_accuracy"]), int(probe["num_test"])
    r, m = float(raw["best_test_accuracy"]), int(raw["num_test"])
    gap = p - r
    independent = math.sqrt(p * (1 - p) / n + r * (1 - r) / m)
    se, how = independent, ""
    if correct is not None:
        import numpy as np

        a, b = (np.asarray(c, dtype=np.float64) for c in correct)
        if len(a) != n or len(b) != m or abs(a.mean() - p) > 1e-9 or abs(b.mean() - r) > 1e-9:
            raise ValueError(f"the per-image results ({len(a)}, {len(b)} images, accuracies {a.mean():.4f}, "
                             f"{b.mean():.4f}) are not those of the two probes ({n}, {m} images, {p:.4f}, {r:.4f})")
        se = float(np.std(a - b, ddof=1) / math.sqrt(n))
        how = f" (paired, the same {n} images; {100 * independent:.1f} as independent binomials)"
    significant = bool(gap >= z * se)
    verdict = (f"significant: above {z:g} standard errors" if significant else
               f"not significant: {z:g} standard errors would be {100 * z * se:.1f} points"
               + (" (the pretrained features do not beat raw pixels here)" if gap <= 0 else ""))
    text = f"vs raw pixels {100 * gap:+.1f} points, standard error of the gap {100 * se:.1f} points{how}: {verdict}."
    return {"gap": gap, "standard_error": se, "independent_standard_error": independent,
            "paired": correct is not None, "significant": significant, "text": text}


def per_image_correct(model_npz: str, raw_npz: str, raw_key: str) -> tuple:
    """Right/wrong per test image of every model probe (name -> bool array) and of the raw-pixel probe
    ``raw_key``, from their --save-predictions files, read once; refuses files whose test rows are not
    the same images in the same order."""
    import numpy as np

    with np.load(model_npz) as f, np.load(raw_npz) as g:
        same = np.array_equal(f["labels"], g["labels"]) and (
            "index" not in f or "index" not in g or np.array_equal(f["index"], g["index"]))
        if not same:
            raise SystemExit(f"error: {model_npz} and {raw_npz} do not score the same test images in the same "
                             f"order (labels/index differ); extract both from the same --data and split")
        labels = f["labels"]
        return {k: f[k] == labels for k in f.files if k not in ("labels", "index")}, g[raw_key] == labels


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Linear probes on extracted features: accuracy per layer, the best layer, concatenation, low data.

  python tools/linear_probe.py --train feats/train.npz --test feats/test.npz --out probe.json

For every layer in the files (or --layers): multinomial logistic regression with scikit-learn's
L-BFGS (the paper's CIFAR/STL probe). C is chosen from --c-grid (default 1e-3 .. 1e2, one per
decade) on a stratified held-out --holdout (default 10%) of the TRAINING features, then the probe
is refit on all training features and scored once on the test features. Features are
standardised with training statistics only. The best layer is the one with the highest held-out
accuracy (no test label is used to pick it); the JSON also names the layer with the highest
test accuracy (oracle_layer).

  --concat 5                  also probe the 5 layers around the best one, concatenated
  --low-data 40,250,4000 --seeds 5
                              the low-data protocol on the best layer (or --low-data-layer): n labelled
                              training examples IN TOTAL (n // classes per class, class-balanced),
                              a new random subset per seed, C by k-fold CV inside the subset; mean and
                              std of test accuracy over the seeds
  --baseline raw=raw_probe.json --baseline random=rand_train.npz,rand_test.npz
                              baselines in the same JSON and plot: a probe JSON of an earlier run, or
                              a train,test pair of feature files probed here with the same code

Writes --out (JSON: best_layer, best_test_accuracy, layers.<l>.{test_accuracy, val_accuracy, C, ...},
concat, low_data, baselines) and a PNG of accuracy against depth (--plot, default OUT with .png).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from igpt_ds import quiet  # noqa: E402

quiet.install(sys.argv)  # before torch: third-party notices nobody can act on stay quiet (--verbose)

from igpt_ds.checkpoint.atomic import atomic_write  # noqa: E402  (torch-free, like the probe)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help=quiet.HELP)
    p.add_argument("--train", required=True, help="training features (.npz from tools/extract_features.py)")
    p.add_argument("--test", required=True, help="test features (same layers and widths)")
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--plot", help="PNG of accuracy against depth (default: --out with .png)")
    p.add_argument("--layers", default="all", help="layers to probe: all, 3, 2-5, 1,3,8 (default all in the files)")
    p.add_argument("--concat", type=int, default=0, metavar="K",
                   help="also probe K layers around the best, concatenated")
    p.add_argument("--low-data", default="", metavar="N,N,...", help="labelled examples in total, e.g. 40,250,4000")
    p.add_argument("--seeds", type=int, default=5, help="random subsets per --low-data size (default 5)")
    p.add_argument("--low-data-layer", type=int, help="layer for --low-data (default: the best layer)")
    p.add_argument("--c-grid", default="1e-3,1e-2,1e-1,1,10,100", help="inverse regularisation strengths to try")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of train held out to choose C (default 0.1)")
    p.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the holdout split (default 0)")
    p.add_argument("--baseline", action="append", default=[], metavar="NAME=PATH",
                   help="NAME=PROBE.json or NAME=TRAIN.npz,TEST.npz (repeatable)")
    p.add_argument("--name", default="model", help="legend name of these features (default 'model')")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    args = p.parse_args(argv)
    if not 0 < args.holdout < 1:
        p.error("--holdout must lie in (0, 1)")
    try:
        args.c_grid = [float(c) for c in args.c_grid.split(",") if c.strip()]
        args.low_data = [int(n) for n in args.low_data.split(",") if n.strip()]
    except ValueError as e:
        p.error(f"--c-grid / --low-data: {e}")
    if not args.c_grid or min(args.c_grid) <= 0:
        p.error("--c-grid needs positive values")
    if args.seeds < 1 or args.concat < 0:
        p.error("--seeds must be >= 1 and --concat >= 0")
    return args


def probe_files(train_path: str, test_path: str, layer_spec: str, args, log=print) -> dict:
    """Per-layer probe results of a train/test pair of feature files (the JSON's core)."""
    import numpy as np

    from igpt_ds.evaluate.feature_files import parse_layers
    from igpt_ds.evaluate.probe import check_layers, load_pair, probe

    train, test = load_pair(train_path, test_path)
    n_layer = (train.meta.get("model") or {}).get("n_layer")
    if train.meta.get("kind") == "raw-pixels" or n_layer is None:
        n_layer = max(train.layers)
    layers = parse_layers(layer_spec, n_layer) if layer_spec != "all" else train.layers
    check_layers(layers, train.layers, train.path)
    y_train, y_test = train.labels(), test.labels()
    result = {"train": os.path.abspath(train_path), "test": os.path.abspath(test_path),
              "num_train": int(len(y_train)), "num_test": int(len(y_test)),
              "num_classes": int(len(np.unique(y_train))), "features": train.meta, "layers": {}}
    for layer in layers:
        t0 = time.perf_counter()
        r = probe(train.layer(layer), y_train, test.layer(layer), y_test, args.c_grid, args.holdout,
                  args.seed, args.max_iter)
        result["layers"][str(layer)] = dict(r, width=train.width(layer))
        log(f"  layer {layer:3d}  test {100 * r['test_accuracy']:6.2f}%  val {100 * r['val_accuracy']:6.2f}%  "
            f"C {r['C']:g}  ({time.perf_counter() - t0:.1f}s)")
    best = max(layers, key=lambda l: (result["layers"][str(l)]["val_accuracy"], -l))
    oracle = max(layers, key=lambda l: (result["layers"][str(l)]["test_accuracy"], -l))
    result.update(best_layer=best, best_test_accuracy=result["layers"][str(best)]["test_accuracy"],
                  best_by="val_accuracy (held-out training features)", oracle_layer=oracle,
                  oracle_test_accuracy=result["layers"][str(oracle)]["test_accuracy"])
    result["_files"] = (train, test, y_train, y_test)
    return result


def load_baseline(spec: str, args) -> tuple[str, dict]:
    if "=" not in spec:
        raise ValueError(f"--baseline {spec!r}: expected NAME=PROBE.json or NAME=TRAIN.npz,TEST.npz")
    name, path = spec.split("=", 1)
    if path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        if "layers" not in data or "best_test_accuracy" not in data:
            raise ValueError(f"--baseline {name}: {path} is not a linear_probe.py result JSON")
    else:
        parts = path.split(",")
        if len(parts) != 2:
            raise ValueError(f"--baseline {name}: give TRAIN.npz,TEST.npz (two files), got {path!r}")
        print(f"baseline {name}:")
        data = probe_files(parts[0], parts[1], "all", args)
        for f in data.pop("_files")[:2]:
            f.close()
    keep = ("best_layer", "best_test_accuracy", "layers", "oracle_layer", "oracle_test_accuracy", "train", "test")
    return name, {k: data[k] for k in keep if k in data} | {"kind": (data.get("features") or {}).get("kind")}


def run(args) -> dict:
    import numpy as np

    from igpt_ds.evaluate.probe import concat_window, low_data_probe, plot_depth, probe, summarize

    t_start = time.perf_counter()
    log = (lambda *a, **k: None) if args.quiet else print
    log(f"probing {args.train} / {args.test}")
    result = probe_files(args.train, args.test, args.layers, args, log)
    train, test, y_train, y_test = result.pop("_files")
    result = {"format": "igpt-ds-probe", "version": 1, "name": args.name,
              "protocol": {"classifier": "multinomial logistic regression, scikit-learn L-BFGS, L2",
                           "c_grid": args.c_grid, "holdout_fraction": args.holdout, "seed": args.seed,
                           "max_iter": args.max_iter,
                           "standardize": "per-feature mean/std of the fitted features (train only)",
                           "best_layer_by": "highest held-out validation accuracy"}} | result
    result["chance"] = float(np.bincount(y_test).max() / len(y_test))
    best = result["best_layer"]
    layers = [int(l) for l in result["layers"]]

    if args.concat:
        window = concat_window(best, args.concat, layers)
        xtr = np.concatenate([train.layer(l) for l in window], axis=1)
        xte = np.concatenate([test.layer(l) for l in window], axis=1)
        r = probe(xtr, y_train, xte, y_test, args.c_grid, args.holdout, args.seed, args.max_iter)
        result["concat"] = dict(r, layers=window, width=int(xtr.shape[1]))
        log(f"  concat {window}  test {100 * r['test_accuracy']:6.2f}%  val {100 * r['val_accuracy']:6.2f}%  "
            f"C {r['C']:g}")
        del xtr, xte

    if args.low_data:
        layer = best if args.low_data_layer is None else args.low_data_layer
        if layer not in train.layers:
            raise ValueError(f"--low-data-layer {layer}: not in {train.path} (layers {train.layers})")
        xtr, xte = train.layer(layer), test.layer(layer)
        classes = len(np.unique(y_train))
        low = {"layer": layer, "n_means": "labelled training examples in total; n // classes per class",
               "c_selection": "stratified k-fold CV inside the subset, k = min(5, per class)", "results": {}}
        for n in args.low_data:
            runs = [low_data_probe(xtr, y_train, xte, y_test, n, s, args.c_grid, args.max_iter)
                    for s in range(args.seeds)]
            acc = summarize([r["test_accuracy"] for r in runs])
            low["results"][str(n)] = {"per_class": n // classes, "seeds": list(range(args.seeds)),
                                      "C": [r["C"] for r in runs], "test_accuracy": acc}
            log(f"  low data n={n} ({n // classes}/class), layer {layer}: "
                f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}% over {args.seeds} seeds")
        result["low_data"] = low

    if args.baseline:
        result["baselines"] = dict(load_baseline(spec, args) for spec in args.baseline)
    plot = args.plot or os.path.splitext(args.out)[0] + ".png"
    os.makedirs(os.path.dirname(os.path.abspath(plot)), exist_ok=True)
    result["plot"] = os.path.abspath(plot)
    result["seconds"] = round(time.perf_counter() - t_start, 2)
    plot_depth(result, plot)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=2, sort_keys=False) + "\n")
    train.close()
    test.close()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    from igpt_ds.evaluate.feature_files import FeatureFileError

    try:
        result = run(args)
    except (ValueError, FileNotFoundError, FeatureFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    line = (f"best layer {result['best_layer']} (by held-out accuracy): test accuracy "
            f"{100 * result['best_test_accuracy']:.2f}%")
    for name, base in result.get("baselines", {}).items():
        line += f"; {name}: {100 * base['best_test_accuracy']:.2f}%"
    print(f"{line} -> {args.out}, {result['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

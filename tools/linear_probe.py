#!/usr/bin/env python
"""Linear probes on extracted features: accuracy per layer, the best layer, concatenation, low data.

  python tools/linear_probe.py --train feats/train.npz --test feats/test.npz --out probe.json

Two solvers, one protocol shape: for every layer in the files (or --layers) a multinomial logistic
regression, its regularisation (L-BFGS) or rate (SGD) chosen on a stratified --holdout of the
TRAINING features, then refit on all training features and scored once on the test features.
Features are standardised with training statistics only. The best layer is the one with the
highest held-out accuracy (no test label is used to pick it); the JSON also names the layer with
the highest test accuracy (oracle_layer).

  --solver lbfgs (default)    scikit-learn L-BFGS, the paper's CIFAR/STL probe: C from --c-grid
                              (1e-3 .. 1e2), --holdout 0.1; whole layers in memory
  --solver sgd                the paper's ImageNet probe (Sec. 3.4): torch, SGD momentum 0.9, a rate
                              from --lr-grid (30,10,3,1,0.3,0.1), --holdout 0.04, cosine decay over
                              --epochs / --iterations; rows STREAMED from the files within
                              --memory-budget; every layer (and --concat) trained in the same pass;
                              on a GPU with --device (default cuda when there is one); several GPUs:
                              torchrun --nproc-per-node N tools/linear_probe.py --solver sgd ...
  --concat 5                  also probe the 5 layers around the best one, concatenated
  --concat-layers 1-4         also probe these layers concatenated (a fixed set instead of a window)
  --save-predictions P.npz    (L-BFGS) each probe's predicted class per test row, for paired comparisons
                              of two probes on the same images (tools/quickstart.py's gap to raw pixels)
  --low-data 40,250,4000 --seeds 5
                              (L-BFGS) the low-data protocol on the best layer (or --low-data-layer): n
                              labelled training examples IN TOTAL (n // classes per class, class-balanced),
                              a new random subset per seed, C by k-fold CV inside the subset; mean and
                              std of test accuracy over the seeds
  --bert-eval vote            BERT models: the test accuracy is the modal vote of the K single-mask
                              predictions (ties at random, --seed) of a test file extracted with
                              tools/extract_features.py --bert-eval vote; test_accuracy_single_mask
                              beside it (the paper's main number). Default: single (features as stored)
  --baseline raw=raw_probe.json --baseline random=rand_train.npz,rand_test.npz
                              baselines in the same JSON and plot: a probe JSON of an earlier run, or
                              a train,test pair of feature files probed here with the same code

Writes --out (JSON: best_layer, best_test_accuracy, layers.<l>.{test_accuracy, val_accuracy, C or lr, ...},
concat, low_data, baselines; SGD: lr_search per layer, throughput, peak_rss_bytes) and a PNG of
accuracy against depth (--plot, default OUT with .png).
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

from igpt_ds.checkpoint.atomic import atomic_file, atomic_write  # noqa: E402  (torch-free, like the probe)


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
    p.add_argument("--concat-layers", metavar="SPEC",
                   help="also probe these layers concatenated, e.g. 1-4 or 2,4,6 (instead of --concat's window)")
    p.add_argument("--save-predictions", metavar="NPZ",
                   help="(lbfgs) write each probe's predicted class per test row: layer<l>, concat, labels, index")
    p.add_argument("--low-data", default="", metavar="N,N,...", help="labelled examples in total, e.g. 40,250,4000")
    p.add_argument("--seeds", type=int, default=5, help="random subsets per --low-data size (default 5)")
    p.add_argument("--low-data-layer", type=int, help="layer for --low-data (default: the best layer)")
    p.add_argument("--solver", choices=["lbfgs", "sgd"], default="lbfgs",
                   help="lbfgs: scikit-learn, in memory (CIFAR/STL); sgd: torch, streamed (ImageNet) (default lbfgs)")
    p.add_argument("--holdout", type=float, help="fraction of train held out to choose C / the rate "
                   "(default 0.1 for lbfgs, 0.04 for sgd: the paper's ImageNet split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the holdout split, SGD order and vote ties (default 0)")
    p.add_argument("--bert-eval", choices=["single", "vote"], default="single",
                   help="vote: modal vote over the test file's BERT masks (default single: mask 0 / as stored)")
    lb = p.add_argument_group("lbfgs")
    lb.add_argument("--c-grid", default="1e-3,1e-2,1e-1,1,10,100", help="inverse regularisation strengths to try")
    lb.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations (default 1000)")
    sg = p.add_argument_group("sgd")
    sg.add_argument("--lr-grid", default="30,10,3,1,0.3,0.1", help="rates to try (default 30,10,3,1,0.3,0.1)")
    sg.add_argument("--epochs", type=float, default=10, help="passes over the training rows per fit (default 10)")
    sg.add_argument("--iterations", type=int, help="steps per fit instead of --epochs (the paper: 1,000,000)")
    sg.add_argument("--batch-size", type=int, default=256, help="global mini-batch, split across ranks (default 256)")
    sg.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    sg.add_argument("--weight-decay", type=float, default=0.0, help="L2 on the weights (default 0: the paper)")
    sg.add_argument("--memory-budget", type=float, default=1024, metavar="MB",
                    help="host memory for the shuffle buffer of streamed rows (default 1024 MB)")
    sg.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: cuda:$LOCAL_RANK if there is one)")
    sg.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is fastest for small "
                    "features on a busy machine)")
    sg.add_argument("--save-heads", metavar="NPZ", help="write the final heads (weight, bias, mean, std per layer)")
    p.add_argument("--baseline", action="append", default=[], metavar="NAME=PATH",
                   help="NAME=PROBE.json or NAME=TRAIN.npz,TEST.npz (repeatable)")
    p.add_argument("--name", default="model", help="legend name of these features (default 'model')")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    args = p.parse_args(argv)
    if args.holdout is None:
        args.holdout = 0.04 if args.solver == "sgd" else 0.1
    if not 0 < args.holdout < 1:
        p.error("--holdout must lie in (0, 1)")
    try:
        args.c_grid = [float(c) for c in args.c_grid.split(",") if c.strip()]
        args.lr_grid = [float(c) for c in args.lr_grid.split(",") if c.strip()]
        args.low_data = [int(n) for n in args.low_data.split(",") if n.strip()]
    except ValueError as e:
        p.error(f"--c-grid / --lr-grid / --low-data: {e}")
    if not args.c_grid or min(args.c_grid) <= 0:
        p.error("--c-grid needs positive values")
    if not args.lr_grid or min(args.lr_grid) <= 0:
        p.error("--lr-grid needs positive rates")
    if args.seeds < 1 or args.concat < 0:
        p.error("--seeds must be >= 1 and --concat >= 0")
    if args.concat and args.concat_layers:
        p.error("--concat K (a window around the best layer) and --concat-layers SPEC (a fixed set): choose one")
    if args.solver == "sgd":
        if args.save_predictions:
            p.error("--save-predictions is for --solver lbfgs (the in-memory CIFAR/STL protocol)")
        if args.low_data:
            p.error("--low-data is the L-BFGS protocol (the paper's CIFAR-10 Table 4): use --solver lbfgs")
        if args.batch_size < 1 or args.epochs <= 0 or (args.iterations is not None and args.iterations < 1):
            p.error("--batch-size and --iterations must be >= 1 and --epochs > 0")
        if args.memory_budget <= 0:
            p.error("--memory-budget must be > 0 MB")
    return args


def sgd_settings(args, log, concat_layers=()):
    from igpt_ds.evaluate.sgd_probe import SGDSettings

    return SGDSettings(lr_grid=args.lr_grid, holdout=args.holdout, epochs=args.epochs, iterations=args.iterations,
                       batch_size=args.batch_size, momentum=args.momentum, weight_decay=args.weight_decay,
                       memory_budget_mb=args.memory_budget, seed=args.seed, device=args.device, concat=args.concat,
                       concat_layers=tuple(concat_layers), bert_eval=args.bert_eval, threads=args.threads,
                       progress=not args.quiet, log=log)


def concat_layers(args, n_layer: int, probed: list, path: str) -> list:
    """The layers of --concat-layers (empty without it); each must be one of the probed layers."""
    from igpt_ds.evaluate.feature_files import FeatureFileError, parse_layers

    spec = getattr(args, "concat_layers", None)
    if not spec:
        return []
    window = parse_layers(spec, n_layer)
    missing = sorted(set(window) - set(probed))
    if missing:
        raise FeatureFileError(f"--concat-layers {spec}: layer(s) {missing} are not probed (layers {probed} of "
                               f"{path}); add them to --layers or drop them from --concat-layers")
    if len(window) < 2:
        raise ValueError(f"--concat-layers {spec}: names one layer; a concatenation needs two or more")
    return window


def probe_files(train_path: str, test_path: str, layer_spec: str, args, log=print) -> dict:
    """Per-layer probe results of a train/test pair of feature files (the JSON's core)."""
    import numpy as np

    from igpt_ds.evaluate.feature_files import parse_layers
    from igpt_ds.evaluate.probe import check_layers, common_layers, load_pair, probe

    train, test = load_pair(train_path, test_path)
    n_layer = (train.meta.get("model") or {}).get("n_layer")
    if train.meta.get("kind") == "raw-pixels" or n_layer is None:
        n_layer = max(train.layers)
    shared = common_layers(train, test)
    if layer_spec == "all":
        layers = shared
        skipped = sorted(set(train.layers) ^ set(test.layers))
        if skipped:  # e.g. --layers auto kept the middle half of a large train split, every layer of a small test
            log(f"  note: layers {skipped} are in only one of the two files; probing the {len(shared)} both hold")
    else:
        layers = parse_layers(layer_spec, n_layer)
        check_layers(layers, train.layers, train.path)
        check_layers(layers, test.layers, test.path)
    y_train, y_test = train.labels(), test.labels()
    result = {"train": os.path.abspath(train_path), "test": os.path.abspath(test_path),
              "num_train": int(len(y_train)), "num_test": int(len(y_test)),
              "num_classes": int(len(np.unique(y_train))), "features": train.meta, "layers": {}}
    views = bert_views(args, test, layers)
    predictions = result["_predictions"] = {}
    result["_concat_layers"] = concat_layers(args, n_layer, layers, train.path)
    if args.solver == "sgd":
        from igpt_ds.evaluate.sgd_probe import sgd_probe

        sgd = sgd_probe(train, test, layers, sgd_settings(args, log, result["_concat_layers"]))
        result["layers"] = sgd.pop("layers")
        result.update(sgd)
        for layer in layers:
            r = result["layers"][str(layer)]
            log(f"  layer {layer:3d}  test {100 * r['test_accuracy']:6.2f}%  val {100 * r['val_accuracy']:6.2f}%  "
                f"lr {r['lr']:g}")
    else:
        for layer in layers:
            t0 = time.perf_counter()
            r = probe(train.layer(layer), y_train, test.layer(layer), y_test, args.c_grid, args.holdout,
                      args.seed, args.max_iter, [test.layer(layer, v) for v in range(1, views)])
            predictions[f"layer{layer}"] = r.pop("test_predictions")
            result["layers"][str(layer)] = dict(r, width=train.width(layer))
            log(f"  layer {layer:3d}  test {100 * r['test_accuracy']:6.2f}%  val {100 * r['val_accuracy']:6.2f}%  "
                f"C {r['C']:g}  ({time.perf_counter() - t0:.1f}s)")
        if views > 1:
            result["bert_eval"] = f"modal vote of {views} single-mask predictions, ties at random (seed {args.seed})"
    if result.get("bert_eval") is None:
        result["bert_eval"] = bert_features(test.meta)  # what the test accuracy scored
    best = max(layers, key=lambda l: (result["layers"][str(l)]["val_accuracy"], -l))
    oracle = max(layers, key=lambda l: (result["layers"][str(l)]["test_accuracy"], -l))
    result.update(best_layer=best, best_test_accuracy=result["layers"][str(best)]["test_accuracy"],
                  best_by="val_accuracy (held-out training features)", oracle_layer=oracle,
                  oracle_test_accuracy=result["layers"][str(oracle)]["test_accuracy"])
    result["_files"] = (train, test, y_train, y_test)
    return result


def bert_views(args, test, layers) -> int:
    """How many BERT masks the test accuracy votes over: 1 unless --bert-eval vote (then every mask stored)."""
    from igpt_ds.evaluate.feature_files import FeatureFileError

    if args.bert_eval != "vote":
        return 1
    meta = test.meta
    if (meta.get("model") or {}).get("objective") not in (None, "bert"):
        raise FeatureFileError(f"{test.path}: --bert-eval vote is for BERT models; these features come from an "
                               f"{meta['model']['objective']} model")
    views = min(test.masks(layer) for layer in layers)
    if views < 2:
        how = meta.get("bert_eval") or "one set of features per image"
        raise FeatureFileError(f"{test.path}: --bert-eval vote needs the features of several BERT masks per image "
                               f"(members layer<l>_mask<k>), this file holds {how}; extract the test split again "
                               f"with tools/extract_features.py --bert-eval vote --bert-masks 5")
    return views


def bert_features(meta: dict) -> object:
    """What a BERT model's stored features are, in words (None for AR models and baselines)."""
    if (meta.get("model") or {}).get("objective") != "bert" or meta.get("kind") == "raw-pixels":
        return None
    k = meta.get("bert_masks")
    if not k:
        return "no mask (the unmasked image)"
    if k == 1 or meta.get("bert_eval") == "vote":
        return "single mask (mask 0 of each image)"
    return f"feature average over {k} masks (extraction --bert-eval average)"


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
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"baseline {name}:")
        # The same solver and settings; no window or vote (a baseline has its own layers and no masks).
        data = probe_files(parts[0], parts[1], "all", argparse.Namespace(**{**vars(args), "concat": 0,
                                                                             "concat_layers": None,
                                                                             "bert_eval": "single"}))
        for f in data.pop("_files")[:2]:
            f.close()
    keep = ("best_layer", "best_test_accuracy", "layers", "oracle_layer", "oracle_test_accuracy", "train", "test")
    return name, {k: data[k] for k in keep if k in data} | {"kind": (data.get("features") or {}).get("kind")}


def run(args) -> dict:
    import numpy as np

    from igpt_ds.evaluate.probe import concat_window, low_data_probe, plot_depth, probe, summarize

    t_start = time.perf_counter()
    # Under torchrun only rank 0 talks (and writes); the others compute their share silently.
    log = (lambda *a, **k: None) if args.quiet or int(os.environ.get("RANK", "0")) != 0 else print
    log(f"probing {args.train} / {args.test}")
    result = probe_files(args.train, args.test, args.layers, args, log)
    train, test, y_train, y_test = result.pop("_files")
    fixed_window = result.pop("_concat_layers")
    predictions = result.pop("_predictions")
    if args.solver == "sgd":
        protocol = {"classifier": "multinomial logistic regression, torch SGD (momentum "
                                  f"{args.momentum}, cosine decay, zero init), one head per layer in one pass",
                    "solver": "sgd", "lr_grid": args.lr_grid, "epochs": None if args.iterations else args.epochs,
                    "iterations": args.iterations, "batch_size": args.batch_size, "momentum": args.momentum,
                    "weight_decay": args.weight_decay, "memory_budget_mb": args.memory_budget}
    else:
        protocol = {"classifier": "multinomial logistic regression, scikit-learn L-BFGS, L2", "solver": "lbfgs",
                    "c_grid": args.c_grid, "max_iter": args.max_iter}
    protocol.update(holdout_fraction=args.holdout, seed=args.seed,
                    standardize="per-feature mean/std of the fitted features (train only)",
                    best_layer_by="highest held-out validation accuracy")
    result = {"format": "igpt-ds-probe", "version": 1, "name": args.name, "protocol": protocol} | result
    heads = result.pop("_heads", None)
    result["chance"] = float(np.bincount(y_test).max() / len(y_test))
    best = result["best_layer"]
    layers = [int(l) for l in result["layers"]]

    if (args.concat or fixed_window) and args.solver == "sgd":
        r = result["concat"]
        log(f"  concat {r['layers']}  test {100 * r['test_accuracy']:6.2f}%  val {100 * r['val_accuracy']:6.2f}%  "
            f"lr {r['lr']:g}")
    elif args.concat or fixed_window:
        window = fixed_window or concat_window(best, args.concat, layers)
        xtr = np.concatenate([train.layer(l) for l in window], axis=1)
        xte = np.concatenate([test.layer(l) for l in window], axis=1)
        r = probe(xtr, y_train, xte, y_test, args.c_grid, args.holdout, args.seed, args.max_iter)
        predictions["concat"] = r.pop("test_predictions")
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
    test_index = test.index() if args.save_predictions else None
    train.close()
    test.close()
    if result.get("rank", 0) != 0:  # torchrun: rank 0 writes
        return result
    if args.save_predictions:
        result["predictions"] = save_predictions(args.save_predictions, predictions, y_test, test_index)
    if heads is not None and args.save_heads:
        from igpt_ds.evaluate.sgd_probe import save_heads

        result["heads"] = os.path.abspath(save_heads(args.save_heads, heads))
    plot_depth(result, plot)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write(args.out, json.dumps(result, indent=2, sort_keys=False) + "\n")
    return result


def save_predictions(path: str, predictions: dict, labels, index) -> str:
    """``predictions`` (name -> predicted class per test row) with the rows' ``labels`` and ``index``
    (the test file's image index, when it has one) in one .npz, written to a temporary name first."""
    import numpy as np

    arrays = {name: np.asarray(p, np.int64) for name, p in predictions.items()}
    arrays["labels"] = np.asarray(labels, np.int64)
    if index is not None:
        arrays["index"] = np.asarray(index, np.int64)
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_file(path) as tmp:  # the temporary keeps the .npz suffix: np.savez appends none
        np.savez(tmp, **arrays)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    from igpt_ds.evaluate.feature_files import FeatureFileError

    try:
        result = run(args)
    except (ValueError, FileNotFoundError, FeatureFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.get("rank", 0) != 0:
        return 0
    line = (f"best layer {result['best_layer']} (by held-out accuracy): test accuracy "
            f"{100 * result['best_test_accuracy']:.2f}%")
    for name, base in result.get("baselines", {}).items():
        line += f"; {name}: {100 * base['best_test_accuracy']:.2f}%"
    print(f"{line} -> {args.out}, {result['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

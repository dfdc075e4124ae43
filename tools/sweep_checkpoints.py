#!/usr/bin/env python
"""Linear probes of every checkpoint of pretraining runs, against their validation loss (the paper's Fig. 3).

  python tools/sweep_checkpoints.py runs/igpt-s runs/igpt-m --data cifar-10-batches-py --out sweeps/cifar10

For each RUN_DIR (the --save directory of igpt_ds/pretrain.py: global_stepN/, latest, metrics.jsonl)
every complete global_stepN checkpoint (or every N-th with --every N, counted back from the newest,
so the newest is always in) goes through the project's own commands, each a subprocess:

  tools/extract_features.py --checkpoint RUN/global_stepN --data DATA --split TRAIN  -> features/train.npz
  tools/extract_features.py --checkpoint RUN/global_stepN --data DATA --split TEST   -> features/test.npz
  tools/linear_probe.py --train features/train.npz --test features/test.npz          -> probe.json

(the features tool reads a DeepSpeed checkpoint of any layout directly, in one process). The splits
are --data's train and test splits, or with --val-fraction F the train split minus a held-out F of
it and that held-out part ('val'). --extract-args "..." and --probe-args "..." add flags to those
commands (e.g. --extract-args "--device cuda --batch-size 256", --probe-args "--c-grid 0.1,1,10").

Outputs under --out:
  sweep.json                  settings, runs, and one point per checkpoint: run, step, val_loss (the run's
                              metrics.jsonl val_loss at that step, or null and val_loss_reason), best_layer,
                              best_test_accuracy, per-layer accuracies, the probe JSON's path
  probe_vs_val_loss.png       best-layer probe accuracy against validation loss, one line per run, points
                              labelled with their step; x axis inverted: loss decreases to the right
  depth_curves.png            accuracy against layer, one line per checkpoint coloured by step, a panel per run
  RUN/global_stepN/           probe.json (+ .png), settings.json, log.txt (the commands and their output),
                              features/ (deleted after the probe unless --keep-features)

A checkpoint without a val_loss record at its step is kept in sweep.json with val_loss null and the
reason, and left off the loss plot: pretrain with an --eval-interval that divides --save-interval.

Restarts: a checkpoint whose probe.json exists, was made with the same settings and is newer than
the checkpoint (and the data) is kept ("kept ..."), not probed again; sweep.json and the plots are
rewritten (atomically) after each checkpoint, so an interrupted sweep continues where it stopped.
A second sweep into the same --out with other settings (data, splits, layers, palette, extra
arguments) is REFUSED, naming what differs, unless --redo (which probes every selected checkpoint
again with the new settings). Choosing other runs or another --every is not a change of settings.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from igpt_ds import quiet  # noqa: E402

quiet.install(sys.argv)  # before torch: third-party notices nobody can act on stay quiet (--verbose)

EXTRACT, PROBE = os.path.join(REPO, "tools", "extract_features.py"), os.path.join(REPO, "tools", "linear_probe.py")
# Flags the sweep sets itself (or that would make the files something other than this checkpoint's features).
OWN_EXTRACT = ("--checkpoint", "--data", "--shards", "--split", "--val-fraction", "--split-seed", "--layers", "--out",
               "--palette", "--merge", "--shard-index", "--num-shards", "--raw-pixels", "--random-init", "--model")
OWN_PROBE = ("--train", "--test", "--out", "--plot", "--layers", "--name", "--quiet")
PLOTS = {"probe_vs_val_loss": "probe_vs_val_loss.png", "depth_curves": "depth_curves.png"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help=quiet.HELP + " (also passed to the commands it runs)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="pretraining run directories (--save of pretrain.py)")
    p.add_argument("--data", required=True, help="labelled images: CIFAR-10/100, STL-10, .npz, image folder")
    p.add_argument("--out", required=True, help="output directory (sweep.json, plots, one folder per checkpoint)")
    p.add_argument("--layers", default="all",
                   help="layers to extract and probe: all, middle, 3, 2-5, 1,3,8 (default all)")
    p.add_argument("--every", type=int, default=1, metavar="N",
                   help="probe every N-th checkpoint, counted back from the newest (default 1: all)")
    p.add_argument("--train-split", default="train", help="split of --data the probes are fitted on (default train)")
    p.add_argument("--test-split", help="split the probes are scored on (default test; val with --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="hold out F of the train split as the test split 'val' (for data without a test split)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the --val-fraction split (default 0)")
    p.add_argument("--palette", help="palette .npy for runs that carry none (checked against the checkpoint's hash)")
    p.add_argument("--labels", help="comma-separated run names for the plots and folders (default: the RUN_DIR names)")
    p.add_argument("--extract-args", default="", metavar="ARGS", help="extra flags for tools/extract_features.py")
    p.add_argument("--probe-args", default="", metavar="ARGS", help="extra flags for tools/linear_probe.py")
    p.add_argument("--keep-features", action="store_true", help="keep each checkpoint's feature files after its probe")
    p.add_argument("--redo", action="store_true",
                   help="probe every selected checkpoint again (also: accept settings that differ from --out's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.command = ["tools/sweep_checkpoints.py", *(sys.argv[1:] if argv is None else argv)]
    if args.every < 1:
        p.error(f"--every {args.every}: must be >= 1 (1 = every checkpoint, 2 = every other one, ...)")
    if not 0 <= args.val_fraction < 1:
        p.error(f"--val-fraction {args.val_fraction}: must lie in [0, 1) (0 = use the test split of --data)")
    args.test_split = args.test_split or ("val" if args.val_fraction else "test")
    if args.train_split == args.test_split:
        p.error(f"--train-split and --test-split are both {args.train_split!r}: the probes would be scored on "
                f"their own training images")
    for name, own in (("extract-args", OWN_EXTRACT), ("probe-args", OWN_PROBE)):
        value = getattr(args, name.replace("-", "_"))
        try:
            tokens = shlex.split(value)
        except ValueError as e:
            p.error(f"--{name} {value!r}: {e}")
        for token in tokens:
            flag = token.split("=", 1)[0]
            clash = next((o for o in own if flag.startswith("--") and len(flag) > 2 and o.startswith(flag)), None)
            if clash:
                p.error(f"--{name} sets {clash}, which the sweep sets itself for every checkpoint: use the sweep's "
                        f"own flags (--data, --layers, --out, --palette, --val-fraction, ...) instead")
        setattr(args, name.replace("-", "_"), tokens)
    args.labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    return args


def settings_of(args) -> dict:
    """What every probe of the sweep depends on (not which checkpoints): changing it makes points incomparable."""
    return {"data": os.path.abspath(args.data), "train_split": args.train_split, "test_split": args.test_split,
            "val_fraction": args.val_fraction, "split_seed": args.split_seed, "layers": args.layers,
            "palette": os.path.abspath(args.palette) if args.palette else None,
            "extract_args": args.extract_args, "probe_args": args.probe_args}


def check_data(args) -> None:
    """--data exists and both splits open, with labels (before any work)."""
    from igpt_ds.data.sources import open_source
    from igpt_ds.evaluate.sweep import SweepError

    if not os.path.exists(args.data):
        raise SweepError(f"--data {args.data} does not exist: give labelled images (a cifar-10-batches-py / "
                         f"cifar-100-python / stl10_binary folder, an .npz with images and labels, an image folder)")
    for flag, split in (("--train-split", args.train_split), ("--test-split", args.test_split)):
        try:
            source = open_source(args.data, split, val_fraction=args.val_fraction, split_seed=args.split_seed)
        except (ValueError, OSError) as e:
            raise SweepError(f"--data {args.data} {flag} {split}: {e}") from None
        if not source.has_labels:
            raise SweepError(f"--data {args.data} split {split!r} has no labels: a linear probe needs labelled images")
    if args.palette and not os.path.isfile(args.palette):
        raise SweepError(f"--palette {args.palette} does not exist (the palette.npy the runs were trained with)")


def plan(args, settings: dict):
    """(runs, checkpoints): per run its label, directory, metrics, steps; per selected checkpoint what to do."""
    from igpt_ds.evaluate import sweep as S

    labels = S.run_labels(args.run_dirs, args.labels)
    runs, todo = {}, []
    for label, run_dir in zip(labels, args.run_dirs):
        found, skipped = S.find_checkpoints(run_dir)
        chosen = S.select_every(found, args.every)
        S.check_layers(args.layers, chosen)
        records = S.read_run_metrics(run_dir)
        metrics = os.path.abspath(os.path.join(run_dir, S.METRICS_FILE)) if records is not None else None
        runs[label] = {"run_dir": os.path.abspath(run_dir), "records": records, "metrics": metrics,
                       "checkpoints": [s for s, _ in found], "selected": [s for s, _ in chosen], "skipped": skipped}
        for step, ckpt in chosen:
            work = os.path.join(os.path.abspath(args.out), label, ckpt.name)
            mine = dict(settings, checkpoint=str(ckpt))
            keep, why = (False, "--redo") if args.redo else \
                S.finished(work, mine, [ckpt, args.data, args.palette])
            todo.append({"run": label, "step": step, "checkpoint": str(ckpt), "work": work, "settings": mine,
                         "keep": keep, "why": why})
    return runs, todo


def run_stage(cmd: list, log_path: str, env: dict) -> int:
    """Run one command, appending the command line and its output to ``log_path``; its exit status."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(shlex.quote(str(c)) for c in cmd)}\n")
        log.flush()
        return subprocess.run([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode


class StageFailed(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def probe_checkpoint(item: dict, args, env: dict, bar) -> dict:
    """features (train, test) -> probe of one checkpoint in its work directory; the features' paths (or None)."""
    from igpt_ds.checkpoint.atomic import atomic_write

    work, feats = item["work"], os.path.join(item["work"], "features")
    if args.redo and os.path.isdir(work):
        shutil.rmtree(work)
    os.makedirs(feats, exist_ok=True)
    probe_json = os.path.join(work, "probe.json")
    if os.path.exists(probe_json):
        os.unlink(probe_json)  # a stale probe must not pass for this settings.json's if a stage fails below
    atomic_write(os.path.join(work, "settings.json"), json.dumps(item["settings"], indent=2) + "\n")
    log = os.path.join(work, "log.txt")
    verbose = ["--verbose"] if args.verbose else []
    split = ["--val-fraction", str(args.val_fraction), "--split-seed", str(args.split_seed)]
    palette = ["--palette", os.path.abspath(args.palette)] if args.palette else []
    paths = {"train": os.path.join(feats, "train.npz"), "test": os.path.join(feats, "test.npz")}
    stages = [(f"features {part} ({split_name})", EXTRACT,
               ["--checkpoint", item["checkpoint"], "--data", os.path.abspath(args.data), "--split", split_name, *split,
                "--layers", args.layers, "--out", paths[part], *palette, *args.extract_args, *verbose], paths[part])
              for part, split_name in (("train", args.train_split), ("test", args.test_split))]
    stages.append(("probe", PROBE, ["--train", paths["train"], "--test", paths["test"], "--out", probe_json,
                                    "--name", f"{item['run']} step {item['step']}", "--quiet", *args.probe_args,
                                    *verbose], probe_json))
    for what, tool, argv, output in stages:
        bar.set_postfix_str(f"{item['run']} step {item['step']}: {what}")
        code = run_stage([sys.executable, tool, *argv], log, env)
        if code != 0 or not os.path.isfile(output):
            with open(log) as f:
                tail = "".join(f.readlines()[-25:])
            why = f"exit {code}" if code else f"exit 0 but {output} was not written (stopped by a signal?)"
            raise StageFailed(f"{item['run']} step {item['step']}: {os.path.basename(tool)} failed ({why}); the whole "
                              f"output is in {log}, its end:\n{tail}\nThe checkpoints finished so far are in "
                              f"{os.path.join(args.out, 'sweep.json')}; run the same command again to continue",
                              2 if code == 2 else 1)
        bar.update(1)
    if args.keep_features:
        return paths
    shutil.rmtree(feats)
    return None


def write_sweep(args, settings: dict, runs: dict, points: list, pending: int, started: float) -> dict:
    """sweep.json and both plots from the points so far (every file replaced atomically)."""
    from igpt_ds.checkpoint.atomic import atomic_write
    from igpt_ds.evaluate import sweep as S

    out = os.path.abspath(args.out)
    plots = {name: os.path.join(out, file) for name, file in PLOTS.items()}
    drawn = {"probe_vs_val_loss": S.plot_probe_vs_loss(points, plots["probe_vs_val_loss"]),
             "depth_curves": S.plot_depth_curves(points, plots["depth_curves"])}
    for name, path in plots.items():
        if drawn[name] is None and os.path.exists(path):
            os.unlink(path)  # an older plot of points this sweep no longer has
    left_off = [{"run": p["run"], "step": p["step"], "reason": p["val_loss_reason"]}
                for p in points if p.get("val_loss") is None]
    doc = {"format": S.FORMAT, "version": S.VERSION, "complete": pending == 0, "pending": pending,
           "settings": settings, "command": args.command,
           "x_axis": S.X_AXIS, "best_layer_by": "highest held-out accuracy on the training features (no test label)",
           "runs": {k: {key: v for key, v in r.items() if key != "records"} for k, r in runs.items()},
           "points": points, "left_off_loss_plot": left_off, "plots": drawn,
           "seconds": round(time.perf_counter() - started, 1)}
    atomic_write(os.path.join(out, "sweep.json"), json.dumps(doc, indent=2) + "\n")
    return doc


def sweep(args) -> dict:
    from tqdm import tqdm

    from igpt_ds.evaluate import sweep as S

    started = time.perf_counter()
    settings = settings_of(args)
    runs, items = plan(args, settings)  # bad RUN_DIRs, labels: refused before anything is written
    check_data(args)
    previous = S.read_sweep(os.path.join(args.out, "sweep.json"))
    if previous is not None and not args.redo:
        differ = S.settings_differ(previous["settings"], settings)
        if differ:
            raise S.SweepError(f"{os.path.join(args.out, 'sweep.json')} was made with other settings (differs in: "
                               f"{', '.join(differ)}); its points would not be comparable with new ones. Choose "
                               f"another --out, or pass --redo to probe every checkpoint again with these settings")
    for label, run in runs.items():
        print(f"{label}: {len(run['checkpoints'])} checkpoints in {run['run_dir']}, probing steps "
              f"{', '.join(map(str, run['selected']))}" + (f" (--every {args.every})" if args.every > 1 else ""))
        for s in run["skipped"]:
            print(f"  skipped {s['checkpoint']}: {s['reason']}")
        if run["records"] is None:
            print(f"  note: {run['run_dir']}/{S.METRICS_FILE} does not exist: its points get val_loss null")
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    points = {}
    for item in items:
        if item["keep"]:
            print(f"kept {item['run']} step {item['step']}: {item['work']}/probe.json is from an earlier sweep with "
                  f"the same settings (--redo probes again)")
            features = {p: os.path.join(item["work"], "features", f"{p}.npz") for p in ("train", "test")}
            features = features if all(os.path.isfile(f) for f in features.values()) else None
            points[item["work"]] = S.make_point(item["run"], runs[item["run"]]["run_dir"], item["step"],
                                                item["checkpoint"], item["work"], runs[item["run"]]["records"],
                                                "kept", features)
        elif item["why"] and item["why"] != "--redo":
            print(f"{item['why']}: probing {item['run']} step {item['step']} again")
    todo = [i for i in items if not i["keep"]]

    def ordered():
        return [points[i["work"]] for i in items if i["work"] in points]

    doc = write_sweep(args, settings, runs, ordered(), len(todo), started)
    with tqdm(total=3 * len(todo), desc="sweep", unit="stage", disable=args.no_progress or not todo,
              dynamic_ncols=True) as bar:
        for n, item in enumerate(todo, 1):
            t0 = time.perf_counter()
            features = probe_checkpoint(item, args, env, bar)
            point = S.make_point(item["run"], runs[item["run"]]["run_dir"], item["step"], item["checkpoint"],
                                 item["work"], runs[item["run"]]["records"], "probed", features)
            points[item["work"]] = point
            doc = write_sweep(args, settings, runs, ordered(), len(todo) - n, started)
            loss = f"val_loss {point['val_loss']:.4f}" if point["val_loss"] is not None else "no val_loss"
            tqdm.write(f"{item['run']} step {item['step']}: best layer {point['best_layer']}, test accuracy "
                       f"{100 * point['best_test_accuracy']:.2f}%, {loss} ({time.perf_counter() - t0:.0f}s)")
    return doc


def main(argv=None) -> int:
    args = parse_args(argv)
    from igpt_ds.evaluate.sweep import SweepError

    try:
        doc = sweep(args)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    points = doc["points"]
    kept = sum(p["status"] == "kept" for p in points)
    print(f"{len(points)} checkpoints ({len(points) - kept} probed, {kept} kept) -> {doc['plots']['depth_curves']}")
    if doc["plots"]["probe_vs_val_loss"]:
        print(f"probe accuracy against validation loss ({len(points) - len(doc['left_off_loss_plot'])} points) -> "
              f"{doc['plots']['probe_vs_val_loss']}")
    if doc["left_off_loss_plot"]:
        print(f"{len(doc['left_off_loss_plot'])} checkpoint(s) have no val_loss and are left off the loss plot, e.g. "
              f"{doc['left_off_loss_plot'][0]['reason']}")
    print(f"-> {os.path.join(args.out, 'sweep.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Plot the curves of one or more runs from their metrics.jsonl as one PNG.

    python tools/plot_training.py runs/igpt-s/metrics.jsonl --out runs/igpt-s/training.png
    python tools/plot_training.py runs/ft/metrics.jsonl runs/scratch/metrics.jsonl \\
        --label fine-tuned --label "from scratch" --reference "linear probe=0.427" --out compare.png

Panels: training loss (and validation loss where logged) in nats/token, learning rate, and a third
panel that depends on the runs: validation accuracy for fine-tuning runs (igpt_ds/finetune.py logs
val_acc; --reference NAME=ACCURACY draws a horizontal line, e.g. a linear probe's), otherwise
tokens/s with MFU when the run knew its device's peak FLOP/s (igpt_ds/pretrain.py).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from igpt_ds import quiet  # noqa: E402

quiet.install(sys.argv)  # before torch: third-party notices nobody can act on stay quiet (--verbose)

from igpt_ds.checkpoint.atomic import atomic_file  # noqa: E402
from igpt_ds.train.metrics import read_metrics  # noqa: E402


def _points(records: list[dict], key: str, scale: float = 1.0) -> list[tuple]:
    return [(r["step"], scale * r[key]) for r in records if r.get(key) is not None]


def plot_runs(runs: list[tuple[str, list[dict]]], out: str, title: str = "",
              references: tuple[tuple[str, float], ...] = ()) -> str:
    """``runs``: (label, metrics records) pairs, drawn in the same colour on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for label, records in runs:
        if not records:
            raise ValueError(f"{label}: no metrics records to plot")
    accuracy = any(_points(records, "val_acc") for _, records in runs)
    many = len(runs) > 1
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (label, records) in enumerate(runs):
        color = f"C{i}"
        train, val = _points(records, "loss"), _points(records, "val_loss")
        axes[0].plot(*zip(*train), color=color, alpha=0.8, label=f"{label} train" if many else "train")
        if val:
            axes[0].plot(*zip(*val), "o-", color=color, mfc="white",
                         label=f"{label} validation" if many else "validation")
        axes[1].plot(*zip(*_points(records, "lr")), color=color, label=label)
        ax = axes[2]
        if accuracy:
            acc = _points(records, "val_acc", 100)
            if acc:
                ax.plot(*zip(*acc), "o-", color=color, label=label)
        else:
            tput = _points(records, "tokens_per_s")
            if tput:
                ax.plot(*zip(*tput), color=color if many else "tab:green", label=label)
            mfu = _points(records, "mfu", 100)
            if mfu:
                twin = ax.twinx()
                twin.plot(*zip(*mfu), color=color if many else "tab:red", alpha=0.6, ls="--")
                twin.set_ylabel("MFU (%)")
    axes[0].set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    axes[0].legend(fontsize="small")
    axes[1].set(xlabel="step", ylabel="learning rate", title="schedule")
    if many:
        axes[1].legend(fontsize="small")
    if accuracy:
        for j, (name, value) in enumerate(references):
            axes[2].axhline(100 * value, color=str(min(0.6, 0.2 * j)), ls=(0, (4, 2 + 2 * j)), lw=1,
                            label=f"{name} {100 * value:.1f}%")
        axes[2].set(xlabel="step", ylabel="accuracy (%)", title="validation accuracy")
        axes[2].legend(fontsize="small")
    else:
        axes[2].set(xlabel="step", ylabel="tokens/s", title="throughput")
        if many:
            axes[2].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")  # PNG whatever OUT's suffix, as documented
    plt.close(fig)
    return out


def parse_reference(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    try:
        accuracy = float(value)
    except ValueError:
        accuracy = None
    if not sep or not name or accuracy is None or not 0.0 <= accuracy <= 1.0:
        raise argparse.ArgumentTypeError(f"--reference {text!r}: expected NAME=ACCURACY with ACCURACY a fraction "
                                         f"in [0, 1], e.g. 'linear probe=0.427'")
    return name, accuracy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help=quiet.HELP)
    p.add_argument("metrics", nargs="+",
                   help="metrics.jsonl written by igpt_ds/pretrain.py or igpt_ds/finetune.py --save DIR")
    p.add_argument("--label", action="append", default=[],
                   help="legend name of each metrics file, in order (default: its directory's name)")
    p.add_argument("--reference", action="append", default=[], type=parse_reference, metavar="NAME=ACCURACY",
                   help="a horizontal line on the validation-accuracy panel, e.g. 'linear probe=0.427'")
    p.add_argument("--title", help="figure title (default: the run's directory name for one run)")
    p.add_argument("--out", help="PNG path (default: training.png beside the (first) metrics file)")
    args = p.parse_args(argv)
    if args.label and len(args.label) != len(args.metrics):
        p.error(f"{len(args.label)} --label for {len(args.metrics)} metrics files: give one per file or none")
    runs = []
    for i, path in enumerate(args.metrics):
        if not os.path.isfile(path):
            p.error(f"{path}: no such file (pretrain.py and finetune.py write DIR/metrics.jsonl when run with "
                    f"--save DIR)")
        records = read_metrics(path)
        if not records:
            p.error(f"{path}: holds no metrics records")
        runs.append((args.label[i] if args.label else os.path.basename(os.path.dirname(os.path.abspath(path))),
                     records))
    if args.reference and not any(_points(r, "val_acc") for _, r in runs):
        p.error("--reference draws on the validation-accuracy panel, but no metrics file has val_acc "
                "(a fine-tuning run with --val-data or --val-fraction)")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.metrics[0])), "training.png")
    title = args.title if args.title is not None else (runs[0][0] if len(runs) == 1 else "")
    print(plot_runs(runs, out, title=title, references=tuple(args.reference)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

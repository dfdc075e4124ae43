#!/usr/bin/env python
"""Plot a run's loss and throughput curves from its metrics.jsonl as one PNG.

    python tools/plot_training.py runs/igpt-s/metrics.jsonl --out runs/igpt-s/training.png

Panels: training loss (and validation loss where logged) in nats/token, learning rate, and
tokens/s with MFU when the run knew its device's peak FLOP/s.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from igpt_ds.metrics import read_metrics  # noqa: E402


def plot_training(records: list[dict], out: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("no metrics records to plot")
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(steps, [r["loss"] for r in records], label="train")
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax.legend()
    axes[1].plot(steps, [r["lr"] for r in records])
    axes[1].set(xlabel="step", ylabel="learning rate", title="schedule")
    ax = axes[2]
    ax.plot(steps, [r["tokens_per_s"] for r in records], color="tab:green")
    ax.set(xlabel="step", ylabel="tokens/s", title="throughput")
    mfu = [(r["step"], 100 * r["mfu"]) for r in records if r.get("mfu") is not None]
    if mfu:
        twin = ax.twinx()
        twin.plot(*zip(*mfu), color="tab:red", alpha=0.6)
        twin.set_ylabel("MFU (%)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", help="metrics.jsonl written by igpt_ds/pretrain.py --save DIR")
    p.add_argument("--out", help="PNG path (default: training.png beside the metrics file)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.metrics):
        p.error(f"{args.metrics}: no such file (pretrain.py writes DIR/metrics.jsonl when run with --save DIR)")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.metrics)), "training.png")
    records = read_metrics(args.metrics)
    if not records:
        p.error(f"{args.metrics}: holds no metrics records")
    print(plot_training(records, out, title=os.path.basename(os.path.dirname(os.path.abspath(args.metrics)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

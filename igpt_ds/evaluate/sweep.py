"""Checkpoint sweeps (the paper's Figure 3): linear-probe accuracy against validation loss over training.

``tools/sweep_checkpoints.py`` runs features -> probe for every ``global_stepN`` checkpoint of one or
more pretraining runs; this module holds what it decides and draws, without running anything:

- :func:`find_checkpoints`: the complete ``global_stepN`` directories of a run directory (``--save`` of
  ``igpt_ds/pretrain.py``), in step order, and those it leaves out with the reason;
- :func:`select_every`: every N-th checkpoint counted back from the newest (so the newest is always in);
- :func:`val_loss_at`: the validation loss a run logged at a step (``metrics.jsonl``), or why there is none;
- :func:`finished`: whether a checkpoint's probe from an earlier sweep can be kept;
- :func:`make_point`: one point of ``sweep.json`` from a probe JSON and the run's metrics;
- :func:`plot_probe_vs_loss`, :func:`plot_depth_curves`: the two PNGs.

A checkpoint's validation loss is the ``val_loss`` of the run's ``metrics.jsonl`` record of that step
(written at evaluation steps: ``--eval-interval``, and at the last step). A resumed run may log a step
twice; the last record wins (it belongs to the checkpoint on disk). A step without such a record gets
``val_loss: null`` and a reason, and is left off the loss plot: pretrain with an ``--eval-interval``
that divides ``--save-interval``.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

from igpt_ds.checkpoint.run import META_FILE, TAG_PREFIX, read_latest
from igpt_ds.evaluate.feature_files import restart_blocker
from igpt_ds.train.metrics import read_metrics

PathLike = Union[str, os.PathLike]
FORMAT, VERSION = "igpt-ds-checkpoint-sweep", 1
METRICS_FILE = "metrics.jsonl"
TAG_RE = re.compile(rf"^{TAG_PREFIX}(\d+)$")
LABEL_RE = re.compile(r"^[A-Za-z0-9._-]+$")
X_AXIS = ("validation loss in nats/token (the run's metrics.jsonl val_loss at the checkpoint's step), "
          "axis inverted: loss decreases to the right, so training progresses from left to right")


class SweepError(ValueError):
    """Bad input to a sweep, with the file, the field and the fix in the message."""


# ---------------------------------------------------------------------------------------------
# Checkpoints of a run
# ---------------------------------------------------------------------------------------------

def find_checkpoints(run_dir: PathLike) -> tuple[list[tuple[int, Path]], list[dict]]:
    """``([(step, global_stepN dir), ...] in step order, [{"checkpoint", "reason"}, ...] left out)``.

    A checkpoint is complete when its directory holds ``igpt_meta.json`` and its step is not newer
    than the one ``latest`` names (a newer directory is still being written, or was left by a killed
    save). Raises :class:`SweepError` when ``run_dir`` is not a run directory or holds no complete
    checkpoint.
    """
    run = Path(run_dir)
    layout = (f"the --save directory of igpt_ds/pretrain.py: {TAG_PREFIX}N/{META_FILE} per checkpoint, "
              f"'latest', {METRICS_FILE}")
    if not run.is_dir():
        raise SweepError(f"RUN_DIR {run}: {'not a directory' if run.exists() else 'does not exist'}; "
                         f"expected {layout}")
    if TAG_RE.match(run.name) and (run / META_FILE).is_file():
        raise SweepError(f"RUN_DIR {run} is one checkpoint, not a run directory: give its parent {run.parent} "
                         f"(the sweep takes every {TAG_PREFIX}N inside it; --every N thins them)")
    latest = read_latest(run)
    latest_step = int(TAG_RE.match(latest).group(1)) if latest and TAG_RE.match(latest) else None
    found, skipped = [], []
    for entry in sorted(run.iterdir()):
        m = TAG_RE.match(entry.name)
        if not m or not entry.is_dir():
            continue
        step = int(m.group(1))
        if not (entry / META_FILE).is_file():
            skipped.append({"checkpoint": str(entry.resolve()),
                            "reason": f"no {META_FILE}: not a complete iGPT-DS checkpoint"})
        elif latest_step is not None and step > latest_step:
            skipped.append({"checkpoint": str(entry.resolve()),
                            "reason": f"newer than 'latest' ({latest}): still being written, or left by a killed "
                                      f"save"})
        else:
            found.append((step, entry.resolve()))
    if not found:
        names = sorted(p.name for p in run.iterdir())[:12]
        raise SweepError(f"RUN_DIR {run}: no complete {TAG_PREFIX}N checkpoint directories (found {names}); "
                         f"expected {layout}")
    found.sort()
    return found, skipped


def select_every(checkpoints: Sequence, every: int) -> list:
    """Every ``every``-th of ``checkpoints`` (in step order) counted back from the newest, in step order."""
    if every < 1:
        raise SweepError(f"--every {every}: must be >= 1 (1 = every checkpoint)")
    return list(checkpoints)[::-1][::every][::-1]


def check_layers(spec: str, checkpoints: Sequence[tuple[int, Path]]) -> None:
    """Refuse a ``--layers`` spec that some checkpoint's model (its ``igpt_meta.json``) does not have."""
    from igpt_ds.evaluate.feature_files import parse_layers

    for _, ckpt in checkpoints:
        try:
            n_layer = int(json.loads((ckpt / META_FILE).read_text())["model"]["n_layer"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SweepError(f"{ckpt / META_FILE}: cannot read the model's n_layer ({e!r}); the checkpoint is damaged "
                             f"or not from igpt_ds/pretrain.py") from None
        try:
            parse_layers(spec, n_layer)
        except ValueError as e:
            raise SweepError(f"--layers {spec}: {ckpt} (n_layer={n_layer}): {e}") from None


def run_labels(run_dirs: Sequence[PathLike], labels: Optional[Sequence[str]] = None) -> list[str]:
    """The name of each run in the plots and in ``OUT/<label>/``: ``labels`` or the directories' names."""
    if labels:
        if len(labels) != len(run_dirs):
            raise SweepError(f"--labels gives {len(labels)} names for {len(run_dirs)} RUN_DIRs: give one per run")
        names = list(labels)
    else:
        names = [Path(r).resolve().name for r in run_dirs]
    for name in names:
        if not LABEL_RE.match(name) or name in (".", ".."):
            raise SweepError(f"run name {name!r} is not usable as a directory name: give --labels with letters, "
                             f"digits, '.', '_' or '-'")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(f"two RUN_DIRs are both named {dupes[0]!r}: give --labels NAME,NAME,... (one per run)")
    return names


# ---------------------------------------------------------------------------------------------
# Validation loss from metrics.jsonl
# ---------------------------------------------------------------------------------------------

def read_run_metrics(run_dir: PathLike) -> Optional[list[dict]]:
    """The records of ``run_dir/metrics.jsonl``, or None when the file does not exist."""
    path = Path(run_dir) / METRICS_FILE
    return read_metrics(str(path)) if path.is_file() else None


def val_loss_at(records: Optional[list[dict]], step: int, run_dir: PathLike) -> dict:
    """``{"val_loss", "val_bits_per_dim", "train_loss"}`` logged at ``step``, plus ``val_loss_reason``
    when there is no validation loss for it (``val_loss`` is then None, never a neighbour's value)."""
    metrics = Path(run_dir) / METRICS_FILE
    if records is None:
        return {"val_loss": None, "val_bits_per_dim": None, "train_loss": None,
                "val_loss_reason": f"{metrics} does not exist: the run's validation losses are unknown"}
    at_step = [r for r in records if r.get("step") == step]
    train_loss = next((r["loss"] for r in reversed(at_step) if r.get("loss") is not None), None)
    val = [r for r in at_step if r.get("val_loss") is not None]
    if val:
        last = val[-1]  # a resumed run can log a step twice: the last record is the checkpoint's
        return {"val_loss": float(last["val_loss"]), "val_bits_per_dim": last.get("val_bits_per_dim"),
                "train_loss": train_loss}
    evaluated = sorted({r["step"] for r in records if r.get("val_loss") is not None and "step" in r})
    if not evaluated:
        reason = (f"{metrics} holds no val_loss at all: the run was trained without --val-data or with "
                  f"--eval-interval 0")
    else:
        shown = ", ".join(map(str, evaluated[:8])) + (" ..." if len(evaluated) > 8 else "")
        reason = (f"{metrics} has no val_loss at step {step} (validated at steps {shown}): pretrain with an "
                  f"--eval-interval that divides --save-interval")
    return {"val_loss": None, "val_bits_per_dim": None, "train_loss": train_loss, "val_loss_reason": reason}


# ---------------------------------------------------------------------------------------------
# Restarts and points
# ---------------------------------------------------------------------------------------------

def load_probe(path: PathLike) -> dict:
    """A ``tools/linear_probe.py`` result JSON; ValueError naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not readable as a probe JSON ({e})") from None
    if not isinstance(data, dict) or not {"best_layer", "best_test_accuracy", "layers"} <= set(data):
        raise ValueError(f"{path}: not a tools/linear_probe.py result (no best_layer / best_test_accuracy / layers)")
    return data


def finished(work: PathLike, settings: dict, inputs: Sequence[Optional[PathLike]]) -> tuple[bool, str]:
    """(keep?, why not) for the probe an earlier sweep left in ``work`` (``OUT/<run>/global_stepN``).

    Kept when ``work/probe.json`` is a probe result, ``work/settings.json`` equals ``settings`` (the
    sweep's settings and this checkpoint's path) and the probe is newer than every input (the
    checkpoint directory, the data, the palette): a checkpoint rewritten in place is probed again.
    """
    work = Path(work)
    probe = work / "probe.json"
    if not probe.is_file():
        return False, ""
    try:
        load_probe(probe)
        have = json.loads((work / "settings.json").read_text())
    except (OSError, ValueError) as e:
        return False, f"{probe} exists but cannot be kept ({e})"
    want = json.loads(json.dumps(settings))
    differ, changed = restart_blocker(have, want, os.stat(probe).st_mtime, inputs)
    if differ:
        return False, f"{probe} was made with other settings (differs in: {', '.join(differ)})"
    if changed:
        return False, f"{probe} is older than {changed}"
    return True, ""


def make_point(run: str, run_dir: PathLike, step: int, checkpoint: PathLike, work: PathLike,
               records: Optional[list[dict]], status: str, features: Optional[dict] = None) -> dict:
    """The ``sweep.json`` point of one probed checkpoint (``work/probe.json``)."""
    probe_path = Path(work) / "probe.json"
    probe = load_probe(probe_path)
    layers = {l: {k: v[k] for k in ("test_accuracy", "val_accuracy", "C") if k in v}
              for l, v in sorted(probe["layers"].items(), key=lambda kv: int(kv[0]))}
    point = {"run": run, "run_dir": str(Path(run_dir).resolve()), "step": int(step),
             "checkpoint": str(Path(checkpoint).resolve()), **val_loss_at(records, step, run_dir),
             "best_layer": probe["best_layer"], "best_test_accuracy": probe["best_test_accuracy"],
             "best_layer_by": probe.get("best_by", "val_accuracy"),
             "best_val_accuracy": probe["layers"][str(probe["best_layer"])].get("val_accuracy"),
             "oracle_layer": probe.get("oracle_layer"), "oracle_test_accuracy": probe.get("oracle_test_accuracy"),
             "chance": probe.get("chance"), "num_train": probe.get("num_train"), "num_test": probe.get("num_test"),
             "layers": layers, "probe": str(probe_path.resolve()), "probe_plot": probe.get("plot"),
             "features": features, "status": status}
    if "val_loss_reason" not in point:
        point.pop("val_loss_reason", None)
    return point


def read_sweep(path: PathLike) -> Optional[dict]:
    """An existing ``sweep.json`` (None when there is none); SweepError naming the file when it is not one."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SweepError(f"{path}: exists but is not readable JSON ({e}); delete it or choose another --out") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or "settings" not in data:
        raise SweepError(f"{path}: exists but is not a sweep of tools/sweep_checkpoints.py (no \"format\": "
                         f"\"{FORMAT}\"); choose another --out")
    return data


def settings_differ(old: dict, new: dict) -> list[str]:
    new = json.loads(json.dumps(new))
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def format_step(step: int) -> str:
    """65536 -> '66K', 1000000 -> '1M', 300 -> '300': the step labels of the plots."""
    for div, suffix in ((10**6, "M"), (10**3, "K")):
        if step >= div:
            value = step / div
            return f"{value:.0f}{suffix}" if value >= 10 or value == int(value) else f"{value:.1f}{suffix}"
    return str(step)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _runs(points: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(p["run"] for p in points))


def plot_probe_vs_loss(points: Sequence[dict], path: PathLike, title: Optional[str] = None) -> Optional[str]:
    """PNG of best-layer test accuracy against validation loss, one labelled line per run, each point
    annotated with its step; x axis inverted (loss decreases to the right). Points without a
    ``val_loss`` are left off (counted in a note). None, and no file, when no point has one."""
    from igpt_ds.checkpoint.atomic import atomic_file

    plotted = [p for p in points if p.get("val_loss") is not None]
    if not plotted:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=120)
    for i, run in enumerate(_runs(points)):
        mine = sorted((p for p in plotted if p["run"] == run), key=lambda p: p["step"])
        if not mine:
            continue
        xs, ys = [p["val_loss"] for p in mine], [100 * p["best_test_accuracy"] for p in mine]
        ax.plot(xs, ys, "o-", color=f"C{i}", label=f"{run} ({len(mine)} checkpoints)")
        for p, x, y in zip(mine, xs, ys):
            ax.annotate(format_step(p["step"]), (x, y), textcoords="offset points", xytext=(4, 5), fontsize=7,
                        color=f"C{i}")
    chances = {p.get("chance") for p in plotted}
    if len(chances) == 1 and None not in chances:
        ax.axhline(100 * chances.pop(), ls=":", color="grey", label="chance (most frequent test class)")
    left_off = len(points) - len(plotted)
    if left_off:
        ax.text(0.01, 0.01, f"{left_off} checkpoint(s) without a val_loss record left off (sweep.json says why)",
                transform=ax.transAxes, fontsize=7, color="grey")
    ax.invert_xaxis()
    ax.set_xlabel("validation loss (nats/token), decreasing to the right \u2192")
    ax.set_ylabel("linear probe test accuracy, best layer (%)")
    ax.set_title(title or "Linear probe accuracy against validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return str(path)


def plot_depth_curves(points: Sequence[dict], path: PathLike, title: Optional[str] = None) -> Optional[str]:
    """PNG of test accuracy against layer, one line per checkpoint coloured by its step (one panel per
    run; a star marks each checkpoint's best layer). None, and no file, when there are no points."""
    from igpt_ds.checkpoint.atomic import atomic_file

    if not points:
        return None
    plt = _pyplot()
    from matplotlib.colors import LogNorm, Normalize

    runs = _runs(points)
    fig, axes = plt.subplots(1, len(runs), figsize=(6.0 * len(runs) + 0.8, 4.4), dpi=120, sharey=True,
                             squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, run in zip(axes[0], runs):
        mine = sorted((p for p in points if p["run"] == run), key=lambda p: p["step"])
        steps = [p["step"] for p in mine]
        lo, hi = min(steps), max(steps)
        norm = LogNorm(lo, hi) if lo > 0 and hi / lo >= 8 else Normalize(lo, hi if hi > lo else lo + 1)
        for p in mine:
            layers = sorted(int(l) for l in p["layers"])
            acc = [100 * p["layers"][str(l)]["test_accuracy"] for l in layers]
            colour = cmap(norm(p["step"]))
            ax.plot(layers, acc, "o-", ms=3, color=colour, label=f"step {format_step(p['step'])}")
            ax.plot([p["best_layer"]], [100 * p["best_test_accuracy"]], "*", ms=11, color=colour, mec="black",
                    mew=0.4)
        ax.set_title(run)
        ax.set_xlabel("layer (0 = embedding output)")
        width = max(len(p["layers"]) for p in mine)
        ticks = sorted({int(l) for p in mine for l in p["layers"]})
        ax.set_xticks(ticks if width <= 25 else ticks[::max(1, math.ceil(width / 25))])
        ax.grid(alpha=0.3)
        if len(mine) <= 8:
            ax.legend(fontsize=7, loc="best")
        bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax)
        bar.set_label("training step")
    axes[0][0].set_ylabel("linear probe test accuracy (%)")
    fig.suptitle(title or "Linear probe accuracy against depth, per checkpoint (\u2605 best layer by held-out "
                 "accuracy)", fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return str(path)

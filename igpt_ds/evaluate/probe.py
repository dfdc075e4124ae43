"""Linear probes on feature files: the paper's CIFAR/STL protocol (L-BFGS logistic regression).

    train, test = load_pair("feats/train.npz", "feats/test.npz")
    result = probe(x_train, y_train, x_test, y_test)        # {"C", "val_accuracy", "test_accuracy", ...}

Protocol (one fit per layer; ``tools/linear_probe.py`` runs it over every layer):
- Classifier: multinomial logistic regression, scikit-learn's L-BFGS solver, L2 penalty 1/(2C).
- Regularisation: C from ``C_GRID`` (10^-3 .. 10^2, one per decade) chosen on a stratified
  held-out ``HOLDOUT`` = 10% of the TRAINING features (fit on the other 90%); ties go to the
  smaller C. Then refit on all training features with that C and score the test set once.
- Standardisation: per-feature mean and std from the features being fitted on (the 90% part
  while choosing C, all of train for the final fit) applied to the others: test statistics
  never enter.
- Best layer: the layer with the highest held-out (validation) accuracy, so choosing it sees no
  test label; its test accuracy is ``best_test_accuracy``. The layer with the highest test
  accuracy (the paper's reading of its Figure 2) is reported too, as ``oracle_layer``.
- Low data (the paper's Table 4, CIFAR-10 with 40 / 250 / 4000 labels): ``n`` is the number of
  labelled examples IN TOTAL, drawn class-balanced (n // classes per class) from the training
  features with a seeded RNG (seed s gives subset s); no label outside the subset is used, so C
  is chosen by stratified k-fold cross-validation inside the subset (k = min(5, per-class count);
  with one example per class C = 1). Reported as mean and std over seeds.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, train_test_split

from igpt_ds.evaluate.feature_files import FeatureFile, FeatureFileError

C_GRID = tuple(10.0 ** k for k in range(-3, 3))
HOLDOUT = 0.1
MAX_ITER = 1000


def common_layers(train: FeatureFile, test: FeatureFile) -> list[int]:
    """The layers both files hold (extract_features' ``--layers auto`` may store fewer for a large train split)."""
    both = sorted(set(train.layers) & set(test.layers))
    if not both:
        raise FeatureFileError(f"{train.path} and {test.path} hold different layers (train: {train.layers}, "
                               f"test: {test.layers}), none in common; extract both with the same --layers")
    return both


def load_pair(train_path: str, test_path: str) -> tuple[FeatureFile, FeatureFile]:
    """Open two feature files and check the layers they share have the same widths, and labels."""
    train, test = FeatureFile(train_path), FeatureFile(test_path)
    shared = common_layers(train, test)
    widths = {l: (train.width(l), test.width(l)) for l in shared if train.width(l) != test.width(l)}
    if widths:
        raise FeatureFileError(f"{train_path} and {test_path} disagree on feature widths (layer: (train, test)) "
                               f"{widths}: they come from different models")
    for f in (train, test):
        labels = f.labels()
        if len(labels) and labels.min() < 0:
            raise FeatureFileError(f"{f.path}: {int((labels < 0).sum())} of {len(labels)} rows have no label (-1); "
                                   f"the probe needs a labelled source")
    model_a, model_b = train.meta.get("model"), test.meta.get("model")
    if model_a and model_b and model_a != model_b:
        raise FeatureFileError(f"{train_path} and {test_path} were extracted from different model configs")
    return train, test


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Bool [N]: a seeded, class-stratified ``fraction`` of the rows (the probe's held-out part).

    Every class keeps round(fraction * its count) rows held out (at least one of a class with two
    or more rows), so the held-out part has the training set's class balance.
    """
    rng = np.random.default_rng([seed, 0x401D])
    held = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        k = int(round(fraction * len(rows)))
        k = min(max(k, 1 if len(rows) >= 2 else 0), len(rows) - 1)
        held[rng.choice(rows, k, replace=False)] = True
    if not held.any() or held.all():
        raise ValueError(f"--holdout {fraction}: leaves an empty held-out or fit part of {len(labels)} rows")
    return held


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (a counter-based hash: the same value for the same input, anywhere)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def modal_vote(predictions: np.ndarray, num_classes: int, seed: int, rows: np.ndarray) -> np.ndarray:
    """The modal class of K predictions per row, ties broken at random (the paper's BERT evaluation, Sec. 4.6).

    ``predictions`` [K, n] class indices; ``rows`` [n] the rows' indices in the data set. A tie is
    broken by a hash of (seed, row, class), so the vote of a row is the same whatever the batch or
    process that scores it, and each tied class is equally likely over seeds.
    """
    predictions = np.asarray(predictions)
    k, n = predictions.shape
    counts = np.zeros((n, num_classes), np.int32)
    np.add.at(counts, (np.repeat(np.arange(n), k), predictions.T.reshape(-1)), 1)
    top = counts == counts.max(1, keepdims=True)
    key = (np.asarray(rows, np.uint64)[:, None] * np.uint64(num_classes) + np.arange(num_classes, dtype=np.uint64))
    noise = _mix64(_mix64(key ^ np.uint64(seed & (2**64 - 1))))
    return np.where(top, noise, 0).argmax(1)


def check_layers(requested: Sequence[int], available: Sequence[int], path: str) -> None:
    bad = sorted(set(requested) - set(available))
    if bad:
        raise FeatureFileError(f"layer(s) {bad} are not in {path}: it holds layers {list(available)}")


def standardize(fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Standardise ``fit`` and ``others`` with ``fit``'s per-feature mean and std (float32 out)."""
    fit = fit.astype(np.float32, copy=False)
    mean = fit.mean(0, dtype=np.float64).astype(np.float32)
    std = fit.std(0, dtype=np.float64).astype(np.float32)
    std[std < 1e-6] = 1.0  # constant features stay 0
    return [(a.astype(np.float32, copy=False) - mean) / std for a in (fit, *others)]


def _classifier(C: float, max_iter: int):
    return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=1e-4)


def _fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int):
    clf = _classifier(C, max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def _accuracy(clf, x: np.ndarray, y: np.ndarray) -> float:
    return float((clf.predict(x) == y).mean())


def _choose_c(splits, c_grid: Sequence[float], max_iter: int) -> tuple[float, float]:
    """(best C, its mean validation accuracy) over ``splits`` = [(x_fit, y_fit, x_val, y_val)]."""
    splits = [(*standardize(xf, xv), yf, yv) for xf, yf, xv, yv in splits]  # fit-part statistics only
    best = (-1.0, None)
    for C in sorted(c_grid):
        acc = float(np.mean([_accuracy(_fit(xf, yf, C, max_iter), xv, yv) for xf, xv, yf, yv in splits]))
        if acc > best[0]:  # strict: ties keep the smaller C
            best = (acc, C)
    return best[1], best[0]


def probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
          c_grid: Sequence[float] = C_GRID, holdout: float = HOLDOUT, seed: int = 0,
          max_iter: int = MAX_ITER, test_views: Sequence[np.ndarray] = ()) -> dict:
    """Choose C on a stratified ``holdout`` of train, refit on all of train, score test (see module docstring).

    ``test_views``: the test features under further BERT masks (``x_test`` is mask 0): the test
    accuracy is then the modal vote over all masks (ties at random, ``seed``), and
    ``test_accuracy_single_mask`` the accuracy on ``x_test`` alone.
    """
    counts = np.bincount(y_train)
    stratify = y_train if counts[counts > 0].min() >= 2 else None
    fit_idx, val_idx = train_test_split(np.arange(len(y_train)), test_size=holdout, random_state=seed,
                                        stratify=stratify)
    C, val_acc = _choose_c([(x_train[fit_idx], y_train[fit_idx], x_train[val_idx], y_train[val_idx])],
                           c_grid, max_iter)
    return _final(x_train, y_train, x_test, y_test, C, max_iter, test_views, seed) | {"val_accuracy": val_acc}


def _final(x_train, y_train, x_test, y_test, C, max_iter, test_views=(), seed=0) -> dict:
    xtr, xte, *views = standardize(x_train, x_test, *test_views)
    clf = _fit(xtr, y_train, C, max_iter)
    predicted = clf.predict(xte)
    out = {"C": C, "test_accuracy": float((predicted == y_test).mean()),
           "train_accuracy": _accuracy(clf, xtr, y_train), "converged": bool(np.all(clf.n_iter_ < max_iter))}
    if views:
        preds = np.stack([clf.predict_proba(x).argmax(1) for x in (xte, *views)])  # [K, n] class positions
        predicted = clf.classes_[modal_vote(preds, len(clf.classes_), seed, np.arange(len(y_test)))]
        out.update(test_accuracy=float((predicted == y_test).mean()), test_accuracy_single_mask=out["test_accuracy"])
    out["test_predictions"] = predicted  # per test row (an array: not for JSON; --save-predictions writes it)
    return out


def balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n // classes`` random examples of every class (``n`` labelled examples in total)."""
    classes = np.unique(labels)
    per_class = n // len(classes)
    if per_class < 1:
        raise ValueError(f"--low-data {n}: fewer than one example per class for {len(classes)} classes")
    rng = np.random.default_rng([seed, n])
    chosen = []
    for c in classes:
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise ValueError(f"--low-data {n}: class {c} has {len(pool)} training examples, fewer than the "
                             f"{per_class} per class needed")
        chosen.append(rng.choice(pool, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def low_data_probe(x_train, y_train, x_test, y_test, n: int, seed: int, c_grid: Sequence[float] = C_GRID,
                   max_iter: int = MAX_ITER) -> dict:
    """Probe trained on ``balanced_subset(y_train, n, seed)`` alone; C by k-fold CV inside the subset."""
    idx = balanced_subset(y_train, n, seed)
    x, y = x_train[idx], y_train[idx]
    per_class = n // len(np.unique(y_train))
    if per_class >= 2:
        folds = StratifiedKFold(n_splits=min(5, per_class), shuffle=True, random_state=seed)
        C, cv_acc = _choose_c([(x[a], y[a], x[b], y[b]) for a, b in folds.split(x, y)], c_grid, max_iter)
    else:
        C, cv_acc = 1.0, float("nan")
    return _final(x, y, x_test, y_test, C, max_iter) | {"cv_accuracy": cv_acc, "n": len(idx)}


def concat_window(best: int, k: int, available: Sequence[int]) -> list[int]:
    """The ``k`` available layers centred on ``best`` (shifted inward at the ends of the stack)."""
    available = sorted(available)
    if k < 1 or k > len(available):
        raise ValueError(f"--concat {k}: choose 1..{len(available)} (the layers in the files)")
    i = available.index(best)
    lo = min(max(0, i - (k - 1) // 2), len(available) - k)
    return available[lo:lo + k]


def summarize(values: Sequence[float]) -> dict:
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)) if len(values) > 1 else 0.0,
            "values": values}


def plot_depth(result: dict, path: str, title: Optional[str] = None) -> str:
    """PNG of test (and validation) accuracy against layer (the paper's Figure 2), with baselines."""
    # Lazy: matplotlib.pyplot takes ~0.7 s to import and only the plot needs it; Agg draws without a display.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    layers = sorted(int(l) for l in result["layers"])
    test = [100 * result["layers"][str(l)]["test_accuracy"] for l in layers]
    val = [100 * result["layers"][str(l)]["val_accuracy"] for l in layers]
    ax.plot(layers, test, "o-", color="C0", label=f"{result.get('name', 'model')} (test)")
    ax.plot(layers, val, "o:", color="C0", alpha=0.5, label="held-out train (C selection)")
    best = result["best_layer"]
    ax.plot([best], [100 * result["best_test_accuracy"]], "*", ms=14, color="C3",
            label=f"best layer {best}: {100 * result['best_test_accuracy']:.1f}%")
    for i, (name, base) in enumerate(sorted(result.get("baselines", {}).items()), start=1):
        b_layers = sorted(int(l) for l in base["layers"])
        colour = f"C{i}"
        if len(b_layers) == 1:
            ax.axhline(100 * base["best_test_accuracy"], ls="--", color=colour,
                       label=f"{name}: {100 * base['best_test_accuracy']:.1f}%")
        else:
            ax.plot(b_layers, [100 * base["layers"][str(l)]["test_accuracy"] for l in b_layers], "s--",
                    color=colour, label=f"{name} (best {100 * base['best_test_accuracy']:.1f}%)")
    if result.get("chance") is not None:
        ax.axhline(100 * result["chance"], ls=":", color="grey", label=f"chance {100 * result['chance']:.0f}%")
    ax.set_xlabel("layer (0 = embedding output)")
    ax.set_ylabel("linear probe accuracy (%)")
    ax.set_xticks(layers if len(layers) <= 25 else layers[::max(1, math.ceil(len(layers) / 25))])
    ax.set_title(title or "Linear probe accuracy against depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

"""Classifier evaluation: predictions (BERT: the modal vote over K masks), accuracy, confusion matrices.

Shared by fine-tuning's validation (:class:`igpt_ds.train.classify_task.ClassifyTask`) and
``tools/evaluate_classifier.py`` (a fine-tuned export in a plain process), so both score the same way:
the K evaluation masks of a batch are a function of (seed, batch index, k) only, the same on every
TP/PP rank and in every run. BERT predictions are the paper's (Sec. 4.6): "sample 5 independent
masks for each input and take the modal prediction, breaking ties at random"; the random tie-break
is seeded like the masks, by (seed, batch index), so a run's accuracy is reproducible.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from igpt_ds.checkpoint.atomic import atomic_write
from igpt_ds.checkpoint.consolidated import load_consolidated
from igpt_ds.checkpoint.formats import check_state_dict
from igpt_ds.config import ModelConfig
from igpt_ds.model.classifier import IGPTClassifier, split_pretrained
from igpt_ds.model.losses import EVAL_STREAM, bert_mask, bert_mask_seed
from igpt_ds.parallel.weights import load_full_state_dict


def bert_eval_masks(tokens_shape, prob: float, k: int, seed: int, batch_index: int) -> list[torch.Tensor]:
    """K evaluation masks of a batch, the same on every TP/PP rank and in every run."""
    seeds = [bert_mask_seed(seed, EVAL_STREAM, batch_index, j) for j in range(k)]
    return [bert_mask(tokens_shape, prob, torch.Generator().manual_seed(s)) for s in seeds]


TIE_STREAM = EVAL_STREAM - 1  # seeds the vote's tie-breaks; distinct from the masks' stream


def modal_prediction(clf_logits: list[torch.Tensor], seed: int, batch_index: int = 0) -> torch.Tensor:
    """The class predicted most often over K masks [b]; ties broken uniformly at random.

    Each (image, class) gets a uniform draw in [0, 1) from a generator seeded by (``seed``,
    ``batch_index``); added to the integer vote counts it orders the tied classes at random and
    can never lift a class over one with more votes. Seeded like :func:`bert_eval_masks`, so the
    same run scores the same on every rank and every time.
    """
    votes = torch.zeros_like(clf_logits[0], dtype=torch.float32)
    for logits in clf_logits:
        votes += torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    g = torch.Generator().manual_seed(bert_mask_seed(seed, TIE_STREAM, batch_index))
    return (votes + torch.rand(votes.shape, generator=g).to(votes.device)).argmax(-1)


@torch.no_grad()
def predict(classify: Callable, tokens: torch.Tensor, cfg: ModelConfig, bert_masks: int, seed: int,
            batch_index: int) -> torch.Tensor:
    """Class predictions [b] of a batch: argmax for AR; the mode over ``bert_masks`` masks for BERT."""
    if cfg.objective != "bert":
        return classify(tokens, None)[1].argmax(-1)
    masks = bert_eval_masks(tokens.shape, cfg.bert_mask_prob, bert_masks, seed, batch_index)
    return modal_prediction([classify(tokens, m.to(tokens.device))[1] for m in masks], seed, batch_index)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """[true class, predicted class] counts."""
    return np.bincount(labels * num_classes + preds, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def load_classifier(path: str, device: str = "cpu"):
    """(model, config, palette, classifier info) of a fine-tuned consolidated export (``SAVE/best``)."""
    cfg, sd, palette, meta = load_consolidated(path, device="cpu")
    info = meta.get("classifier")
    if not info or "clf.weight" not in sd:
        raise ValueError(f"{path}: not a fine-tuned classifier export (no 'classifier' in config.json / no "
                         f"clf.weight); fine-tune with igpt_ds/finetune.py --save DIR and pass DIR/best")
    backbone, _ = split_pretrained(sd)
    check_state_dict(cfg, backbone, source=path)
    model = IGPTClassifier(cfg, num_classes=int(info["num_classes"]))
    load_full_state_dict(model, sd)
    return model.to(device).eval(), cfg, palette, info


@torch.no_grad()
def evaluate_export(model, cfg: ModelConfig, loader, bert_masks: int = 5, seed: int = 0) -> dict:
    """Accuracy and confusion matrix of ``model`` (IGPTClassifier) over one pass of ``loader``."""
    labels_all, preds_all = [], []
    device = next(model.parameters()).device
    for b, batch in enumerate(loader):
        tokens = batch["tokens"].to(device)
        preds = predict(model.classify, tokens, cfg, bert_masks, seed, b).cpu()
        valid = batch.get("valid", torch.ones(len(preds), dtype=torch.bool))
        labels_all.append(batch["labels"][valid].numpy())
        preds_all.append(preds[valid].numpy())
    labels, preds = np.concatenate(labels_all), np.concatenate(preds_all)
    if labels.min() < 0 or labels.max() >= model.num_classes:
        raise ValueError(f"the data has labels {labels.min()}..{labels.max()}; the model classifies "
                         f"0..{model.num_classes - 1}")
    cm = confusion_matrix(labels, preds, model.num_classes)
    return {"accuracy": float((labels == preds).mean()), "num_images": int(len(labels)), "confusion": cm}


def plot_confusion(cm: np.ndarray, names: list, title: str, path: str) -> None:
    import matplotlib  # lazy: only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = len(cm)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * c + 2), max(4, 0.5 * c + 2)))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(c), names, rotation=90 if c > 10 else 45, ha="right")
    ax.set_yticks(range(c), names)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: dict, names: list, out_dir: str, title: str) -> dict:
    """``confusion_matrix.json`` and ``confusion_matrix.png`` in ``out_dir``; returns the JSON dict."""
    os.makedirs(out_dir, exist_ok=True)
    report = {"accuracy": result["accuracy"], "num_images": result["num_images"], "label_names": names,
              "confusion_matrix": result["confusion"].tolist(), "rows": "true class", "columns": "predicted class"}
    atomic_write(Path(out_dir, "confusion_matrix.json"), json.dumps(report, indent=2) + "\n")
    plot_confusion(result["confusion"], names, title, os.path.join(out_dir, "confusion_matrix.png"))
    return report

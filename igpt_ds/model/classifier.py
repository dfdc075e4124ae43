"""Fine-tuning model: iGPT plus a classification head on the mean-pooled final norm (the paper's Section 3.4).

    n = ln_f(h^L)                     [b, s, h]   the final norm output (the same tensor the logit head reads)
    clf_logits = clf(mean_s(n))       [b, C]      zero-initialised linear layer, replicated on TP ranks
    loss = gen_weight * L_GEN + L_CLF             L_GEN: the pretraining objective (AR or BERT-masked)

Parameter names: those of :class:`igpt_ds.model.transformer.IGPTModel` plus ``clf.weight`` [C, d] and
``clf.bias`` [C]; a consolidated export carries them under these names. In a pipeline the head
stage holds them as ``<L+1>.clf.weight`` (mapped by :func:`model_param_name`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from igpt_ds.config import ModelConfig
from igpt_ds.model.transformer import Head, IGPTModel
from igpt_ds.model.losses import token_losses

CLF_PARAMS = ("clf.weight", "clf.bias")


class ZeroLinear(nn.Linear):
    """A linear layer initialised to zero, inside ``reset_parameters`` so ZeRO-3's zero.Init sees it."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class IGPTClassifier(IGPTModel):
    """IGPTModel with a class head: ``model.classify(tokens, mask)`` -> (token logits shard, class logits)."""

    def __init__(self, cfg: ModelConfig, tp_group: Optional[dist.ProcessGroup] = None,
                 seed: Optional[int] = None, num_classes: int = 10):
        super().__init__(cfg, tp_group, seed=seed)
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
        self.num_classes = num_classes
        self.clf = ZeroLinear(cfg.d_model, num_classes)

    def forward(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None, gather: bool = True,
                cache=None, classify: bool = False):
        """IGPTModel's forward; with ``classify=True`` :meth:`classify` (how a DeepSpeed engine runs it)."""
        if classify:
            return self.classify(tokens, mask)
        return super().forward(tokens, mask, gather=gather, cache=cache)

    def classify(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token logits [b, s, 512 / tp] of this rank's vocab shard, class logits [b, C])."""
        if self.check_inputs:
            self.validate_inputs(tokens, mask)
        h = self.embed(tokens, mask)
        for block in self.blocks:
            h = block(h)
        return head_outputs(self.final, self.clf, h)


def head_outputs(final: Head, clf: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = final.ln_f(h)  # [b, s, h], replicated over TP
    logits, _ = final.head(n)  # [b, s, V / tp]
    return logits, clf(n.mean(dim=1))  # mean over positions: [b, h] -> [b, C]


@dataclass
class FinetuneLoss:
    loss: torch.Tensor  # gen_weight * gen + clf, what backward sees
    gen: torch.Tensor  # L_GEN, nats per predicted token
    clf: torch.Tensor  # L_CLF, mean cross-entropy over the batch
    correct: torch.Tensor  # number of correct class predictions
    count: int


def finetune_loss(logits: torch.Tensor, clf_logits: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
                  mask: Optional[torch.Tensor], gen_weight: float, tp_size: int) -> FinetuneLoss:
    """L = gen_weight * L_GEN + L_CLF (see the module docstring). ``mask``: BERT positions, else None."""
    losses = token_losses(logits, tokens, tp_size)  # [b, s]
    if mask is None:
        gen = losses.mean()
    else:
        w = mask.to(losses.dtype)
        gen = (losses * w).sum() / w.sum().clamp(min=1)
    clf = F.cross_entropy(clf_logits.float(), labels)
    correct = (clf_logits.argmax(dim=-1) == labels).sum()
    return FinetuneLoss(gen_weight * gen + clf, gen.detach(), clf.detach(), correct.detach(), labels.numel())


# ---- pipeline adapters ------------------------------------------------------------------------

class ClassifierHeadPipe(Head):
    """Last pipeline layer: final norm, logit head and class head; returns (token logits shard, class logits)."""

    def __init__(self, cfg: ModelConfig, tp_group: dist.ProcessGroup, num_classes: int):
        super().__init__(cfg, tp_group)
        self.clf = ZeroLinear(cfg.d_model, num_classes)

    def forward(self, h: torch.Tensor):
        return head_outputs(self, self.clf, h)


class PipelineFinetuneLoss:
    """Loss on the last stage. Labels: ``(tokens, class labels)`` or ``(tokens, class labels, mask)``.

    Keeps the micro-batches' components (``gen``, ``clf``, ``correct``, ``count``) for logging.
    """

    def __init__(self, tp_size: int, gen_weight: float):
        self.tp_size, self.gen_weight = tp_size, gen_weight
        self.reset()

    def reset(self) -> None:
        self.stats = torch.zeros(5, dtype=torch.float64)  # sum of gen, sum of clf, correct, samples, micro-batches

    def __call__(self, outputs, labels) -> torch.Tensor:
        logits, clf_logits = outputs
        tokens, classes = labels[0], labels[1]
        mask = labels[2] if len(labels) > 2 else None
        out = finetune_loss(logits, clf_logits, tokens, classes, mask, self.gen_weight, self.tp_size)
        self.stats += torch.tensor([float(out.gen), float(out.clf), float(out.correct), float(out.count), 1.0],
                                   dtype=torch.float64)
        return out.loss


def model_param_name(name: str, n_layer: int, pipelined: bool) -> str:
    """The plain model's name of a (possibly pipeline) parameter: ``<L+1>.clf.weight`` -> ``clf.weight``."""
    if not pipelined:
        return name
    from igpt_ds.model.pipeline import pipe_to_model_name

    full = pipe_to_model_name(name, n_layer)
    return full[len("final."):] if full.startswith("final.clf.") else full

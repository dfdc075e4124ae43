"""Fine-tuning model: iGPT plus a classification head on the mean-pooled final norm (the paper's Section 3.4).

    n = ln_f(h^L)                     [b, s, h]   the final norm output (the same tensor the logit head reads)
    clf_logits = clf(mean_s(n))       [b, C]      zero-initialised linear layer, replicated on TP ranks
    loss = gen_weight * L_GEN + L_CLF             L_GEN: the pretraining objective (AR or BERT-masked)

Parameter names: those of :class:`igpt_ds.model.transformer.IGPTModel` plus ``clf.weight`` [C, d] and
``clf.bias`` [C]; a consolidated export carries them under these names. In a pipeline the head
stage holds them as ``<L+1>.clf.weight`` (see :mod:`igpt_ds.model.pipeline`); the loss is
:func:`igpt_ds.model.losses.finetune_loss`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from igpt_ds.config import ModelConfig
from igpt_ds.model.transformer import Head, IGPTModel

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


def split_pretrained(sd: dict) -> tuple[dict, dict]:
    """(backbone weights, class-head weights ``clf.*``) of a full state dict."""
    return {k: v for k, v in sd.items() if k not in CLF_PARAMS}, {k: v for k, v in sd.items() if k in CLF_PARAMS}

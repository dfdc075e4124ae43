"""Training objectives: autoregressive (AR) and BERT-style masked prediction.

Both return the mean cross-entropy in nats per predicted token. Loss units:
- nats/token: what the optimizer sees.
- bits/dim: nats/token / (3 ln 2). A token is one pixel, i.e. 3 dimensions (R, G, B), as in the
  PixelCNN family's bits-per-dimension; note the 512-colour palette is lossy, so iGPT's figure is
  a likelihood of the quantised image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

DIMS_PER_TOKEN = 3


def bits_per_dim(nats_per_token: float) -> float:
    return nats_per_token / (DIMS_PER_TOKEN * math.log(2))


def bert_mask(shape: tuple[int, ...], prob: float, generator: Optional[torch.Generator] = None,
              device: Optional[torch.device] = None) -> torch.Tensor:
    """I.i.d. Bernoulli(prob) mask (True = masked), at least one masked position per row.

    All TP (and PP) ranks of a replica must use the same mask: draw it from a generator seeded
    identically on them (e.g. from seed, step and DP rank).
    """
    mask = torch.rand(shape, generator=generator, device=device) < prob
    # A row with nothing masked has no loss and would divide by zero; mask one position there.
    empty = ~mask.any(dim=-1)
    if empty.any():
        pos = torch.randint(0, shape[-1], (int(empty.sum()),), generator=generator, device=device)
        mask[empty.nonzero(as_tuple=True)[0], pos] = True
    return mask


def token_losses(logits: torch.Tensor, targets: torch.Tensor, tp_size: int = 1) -> torch.Tensor:
    """Per-token cross-entropy [b, s] in fp32 from logits [b, s, V] (or this rank's V/tp shard)."""
    if tp_size > 1:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        # megatron's vocab-parallel CE reads the TP group from parallel_state (igpt_ds.parallel.layout.initialize)
        return vocab_parallel_cross_entropy(logits.float(), targets)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, mean nats per predicted token
    num_tokens: int  # tokens that carry loss


def compute_loss(model, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> LossOutput:
    """Objective of ``model.cfg.objective`` on a batch of palette tokens [b, s].

    AR: every position predicts its pixel (the SOS shift is inside the model).
    BERT: ``mask`` (bool [b, s], True = masked) is required; only masked positions carry loss.
    """
    objective = model.cfg.objective
    logits = model(tokens, mask=mask, gather=False)  # [b, s, V / tp]
    losses = token_losses(logits, tokens, model.tp_size)  # [b, s]
    if objective == "ar":
        return LossOutput(losses.mean(), losses.numel())
    if mask is None:
        raise ValueError("the BERT objective needs a mask: igpt_ds.model.losses.bert_mask(tokens.shape, p)")
    weights = mask.to(losses.dtype)
    n = int(mask.sum())
    return LossOutput((losses * weights).sum() / max(n, 1), n)

"""Training objectives: autoregressive (AR), BERT-style masked prediction and classification.

The generative objectives return the mean cross-entropy in nats per predicted token. Loss units:
- nats/token: what the optimizer sees.
- bits/dim: nats/token / (3 ln 2). A token is one pixel, i.e. 3 dimensions (R, G, B), as in the
  PixelCNN family's bits-per-dimension; note the 512-colour palette is lossy, so iGPT's figure is
  a likelihood of the quantised image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

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


def bert_mask_seed(seed: int, *indices: int) -> int:
    """The one seed rule of every BERT mask: a function of the run's seed and the mask's indices only.

    Training draws ``bert_mask_seed(seed, step, micro_batch, dp_rank)``: the same on every TP/PP
    rank of a replica, different across replicas, steps and micro-batches. Evaluation draws
    ``bert_mask_seed(seed, EVAL_STREAM, batch, k)``: the same in every run and layout.
    NumPy's SeedSequence mixes the integers (stable across Python versions, unlike ``hash``).
    """
    words = np.random.SeedSequence([int(seed), *map(int, indices)]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & (2**63 - 1)


EVAL_STREAM = 2**31 - 1  # the first index of evaluation masks; training steps never reach it


def masked_mean(losses: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of per-token losses [b, s] over every position (``mask`` None) or the masked ones."""
    if mask is None:
        return losses.mean()
    w = mask.to(losses.dtype)
    return (losses * w).sum() / w.sum().clamp(min=1)


def token_losses(logits: torch.Tensor, targets: torch.Tensor, tp_size: int = 1) -> torch.Tensor:
    """Per-token cross-entropy [b, s] in fp32 from logits [b, s, V] (or this rank's V/tp shard)."""
    if tp_size > 1:
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
    if model.cfg.objective == "bert" and mask is None:
        raise ValueError("the BERT objective needs a mask: igpt_ds.model.losses.bert_mask(tokens.shape, p)")
    logits = model(tokens, mask=mask, gather=False)  # [b, s, V / tp]
    losses = token_losses(logits, tokens, model.tp_size)  # [b, s]
    mask = mask if model.cfg.objective == "bert" else None
    return LossOutput(masked_mean(losses, mask), losses.numel() if mask is None else int(mask.sum()))


@dataclass
class FinetuneLoss:
    loss: torch.Tensor  # gen_weight * gen + clf, what backward sees
    gen: torch.Tensor  # L_GEN, nats per predicted token
    clf: torch.Tensor  # L_CLF, mean cross-entropy over the batch
    correct: torch.Tensor  # number of correct class predictions
    count: int


def finetune_loss(logits: torch.Tensor, clf_logits: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
                  mask: Optional[torch.Tensor], gen_weight: float, tp_size: int) -> FinetuneLoss:
    """L = gen_weight * L_GEN + L_CLF (the paper's Sec. 3.4). ``mask``: BERT positions, else None."""
    gen = masked_mean(token_losses(logits, tokens, tp_size), mask)
    clf = F.cross_entropy(clf_logits.float(), labels)
    correct = (clf_logits.argmax(dim=-1) == labels).sum()
    return FinetuneLoss(gen_weight * gen + clf, gen.detach(), clf.detach(), correct.detach(), labels.numel())


class RunningStats:
    """Named sums of a step's micro-batch statistics, reduced across ranks as one float64 tensor.

    The values stay on their device (no host sync per micro-batch); :meth:`tensor` is what an
    all-reduce sees and :meth:`named` reads the reduced sums back by name, never by position.
    """

    def __init__(self, names: tuple[str, ...]):
        self.names = tuple(names)
        self.reset()

    def reset(self) -> None:
        self._sums: Optional[torch.Tensor] = None

    def add(self, **values) -> None:
        if set(values) != set(self.names):
            raise KeyError(f"statistics {sorted(values)} differ from the declared {sorted(self.names)}")
        device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        row = torch.stack([torch.as_tensor(values[n], dtype=torch.float64, device=device).detach().reshape(())
                           for n in self.names])
        self._sums = row if self._sums is None else self._sums + row.to(self._sums.device)

    def tensor(self, device: Optional[torch.device] = None) -> torch.Tensor:
        """The sums (zeros where nothing was added, e.g. on ranks that compute no loss)."""
        if self._sums is None:
            return torch.zeros(len(self.names), dtype=torch.float64, device=device)
        return self._sums if device is None else self._sums.to(device)

    def named(self, sums: torch.Tensor) -> dict[str, float]:
        return dict(zip(self.names, sums.tolist()))

"""Image sampling from an AR iGPT: unconditional samples and half-image completions.

    tokens = sample(model, 4, seed=0)                                # [4, resolution**2]
    tokens = complete(model, top_halves, completions=3, seed=0)      # [n, 3, resolution**2]

Pixels are drawn one at a time in raster order. With ``use_cache=True`` (default) the prompt is
run once (prefill, causal attention) and each further pixel costs one forward of one position over
the cached keys and values; ``use_cache=False`` re-runs the whole prefix every step (the
reference, and the baseline the cache is measured against). Both draw the same random numbers in
the same order, so for a seed they give the same tokens (up to float rounding of the logits).

Draws use inverse-CDF sampling from one seeded CPU ``torch.Generator`` (one uniform per image and
pixel), so results depend on the seed and on ``batch_size``, not on the device's RNG. Under tensor
parallelism every rank sees the gathered logits and the same seed, so all ranks draw the same pixels.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from igpt_ds.model.transformer import IGPTModel


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> torch.Tensor:
    """Probabilities [b, V] from logits [b, V] after temperature, top-k and nucleus (top-p) filtering."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must lie in (0, 1]")
    logits = logits.float()
    if temperature == 0:  # greedy: all mass on the (first) arg-max
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``probs`` [b, V] by inverse CDF with one uniform per row from ``generator``."""
    u = torch.rand(probs.shape[0], 1, generator=generator, device=generator.device).to(probs.device)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def _check_model(model: IGPTModel) -> None:
    if model.cfg.objective != "ar":
        raise ValueError(f"sampling draws pixels one after another and needs an autoregressive model; "
                         f"this one is objective={model.cfg.objective!r} (BERT models cannot sample)")


@torch.no_grad()
def generate(model: IGPTModel, prompt: torch.Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
             use_cache: bool = True) -> torch.Tensor:
    """Complete ``prompt`` (pixel tokens [b, k], k >= 0, raster order) to full images [b, resolution**2]."""
    _check_model(model)
    cfg = model.cfg
    if prompt.dim() != 2 or prompt.shape[1] > cfg.seq_len:
        raise ValueError(f"prompt must be [batch, k] pixel tokens with k <= {cfg.seq_len}, got {tuple(prompt.shape)}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    out = torch.zeros(prompt.shape[0], cfg.seq_len, dtype=torch.long, device=device)
    k = prompt.shape[1]
    out[:, :k] = prompt.to(device)
    if k == cfg.seq_len:
        return out
    cache = model.new_cache() if use_cache else None
    if use_cache:
        logits = model(out[:, :k], cache=cache)[:, -1]  # prefill: SOS + prompt; the last predicts pixel k
    for t in range(k, cfg.seq_len):
        if not use_cache:
            logits = model(out[:, :t + 1])[:, t]  # position t predicts pixel t (its own input is unused)
        out[:, t] = draw(filter_logits(logits, temperature, top_k, top_p), generator)
        if use_cache and t + 1 < cfg.seq_len:
            logits = model(out[:, t:t + 1], cache=cache)[:, -1]
    return out


def _batched(model, prompts: torch.Tensor, batch_size: Optional[int], seed: int, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    batch_size = batch_size or max(1, prompts.shape[0])
    parts = [generate(model, prompts[i:i + batch_size], generator=generator, **kwargs)
             for i in range(0, prompts.shape[0], batch_size)]
    return torch.cat(parts) if parts else prompts.new_empty(0, model.cfg.seq_len)


def sample(model: IGPTModel, num_samples: int, *, batch_size: Optional[int] = None, seed: int = 0,
           **kwargs) -> torch.Tensor:
    """``num_samples`` unconditional images as tokens [n, resolution**2] (kwargs: see :func:`generate`)."""
    _check_model(model)
    prompts = torch.empty(num_samples, 0, dtype=torch.long)
    return _batched(model, prompts, batch_size, seed, **kwargs)


def complete(model: IGPTModel, prompts: torch.Tensor, completions: int = 1, *, batch_size: Optional[int] = None,
             seed: int = 0, **kwargs) -> torch.Tensor:
    """``completions`` continuations of each prompt [n, k] (e.g. the top half of images):
    tokens [n, completions, resolution**2] whose first k tokens are the prompt."""
    _check_model(model)
    if completions < 1:
        raise ValueError(f"completions={completions} must be >= 1")
    out = _batched(model, prompts.repeat_interleave(completions, dim=0), batch_size, seed, **kwargs)
    return out.view(prompts.shape[0], completions, model.cfg.seq_len)


def image_grid(images, pad: int = 2, scale: int = 1, background: int = 255):
    """One uint8 image from a grid of images ``(rows, cols, H, W, 3)``: each image upscaled ``scale``
    times (nearest), ``pad`` pixels of ``background`` around and between them. The result is
    ``(rows*H*scale + (rows+1)*pad, cols*W*scale + (cols+1)*pad, 3)``."""
    images = np.asarray(images, dtype=np.uint8)
    if images.ndim != 5 or images.shape[-1] != 3:
        raise ValueError(f"image_grid expects (rows, cols, H, W, 3), got {images.shape}")
    rows, cols, h, w, _ = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=2).repeat(scale, axis=3)
        h, w = h * scale, w * scale
    grid = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, 3), background, dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            grid[top:top + h, left:left + w] = images[r, c]
    return grid

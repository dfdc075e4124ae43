#!/usr/bin/env python
"""Quickstart: a few optimizer steps of igpt-tiny on synthetic token images, on CPU.

Until the data and pretraining pieces land this exercises the real model end to end: the
megatron-core tensor-parallel layers (TP=1 here, no launcher), the AR or BERT objective and
Adam with the paper's betas. The synthetic images have horizontal stripes (each row one
palette colour), so the loss must fall well below the uniform ln(512) = 6.24 nats/token.

    python tools/quickstart.py --steps 30
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from igpt_ds.config import get_preset  # noqa: E402
from igpt_ds.model import IGPTModel  # noqa: E402
from igpt_ds.objectives import bert_mask, bits_per_dim, compute_loss  # noqa: E402


def striped_images(batch: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, side*side] tokens: each row of each image is one random palette colour."""
    rows = torch.randint(0, 512, (batch, side, 1), generator=generator)
    return rows.expand(batch, side, side).reshape(batch, side * side)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="igpt-tiny", help="model preset (default: igpt-tiny)")
    p.add_argument("--objective", choices=["ar", "bert"], default="ar")
    p.add_argument("--resolution", type=int, default=32, help="model resolution side (default 32)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (paper: 0.003 for AR S)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    cfg = get_preset(args.model, resolution=args.resolution, objective=args.objective)
    model = IGPTModel(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    print(f"{cfg.name} ({cfg.num_parameters() / 1e6:.2f}M parameters), {cfg.objective}, "
          f"MR {cfg.resolution}^2 = {cfg.seq_len} tokens, batch {args.batch_size}")
    start = time.perf_counter()
    first = last = float("nan")
    for step in range(1, args.steps + 1):
        tokens = striped_images(args.batch_size, cfg.resolution, data_gen)
        mask = bert_mask(tokens.shape, cfg.bert_mask_prob, data_gen) if cfg.objective == "bert" else None
        out = compute_loss(model, tokens, mask)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = out.loss.item()
        first = last if step == 1 else first
        if step == 1 or step % 5 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {last:.4f} nats/token  {bits_per_dim(last):.3f} bits/dim")
    elapsed = time.perf_counter() - start
    tokens_per_s = args.steps * args.batch_size * cfg.seq_len / elapsed
    print(f"loss {first:.3f} -> {last:.3f} (uniform: {math.log(512):.3f}) in {elapsed:.1f}s, "
          f"{tokens_per_s:,.0f} tokens/s")
    if not last < first:
        print("error: the loss did not decrease", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Learning-rate schedule of the paper: linear warm-up, then cosine decay to ``min_ratio`` (0)."""
from __future__ import annotations

import math


class WarmupCosine:
    """Multiplier for ``torch.optim.lr_scheduler.LambdaLR`` (a class, so its state pickles)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0, decay: bool = True):
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be >= 1")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps={warmup_steps} must lie in 0..total_steps={total_steps}")
        self.warmup_steps, self.total_steps, self.min_ratio, self.decay = warmup_steps, total_steps, min_ratio, decay

    def __call__(self, step: int) -> float:
        # `step` counts optimizer steps already taken: step 0 is the first update.
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.decay:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

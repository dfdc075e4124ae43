"""Deterministic synthetic token images: for parity tests, benchmarks and smoke runs.

Sample i is a function of (seed, i) alone: horizontal stripes, each row one palette colour, so
an AR model's loss falls quickly. The loader splits the global sample stream exactly like a
data-parallel batch: the n-th batch of DP rank r holds samples [(n*D + r)*B, (n*D + r + 1)*B),
so a run's global batch n is the same set of samples for every DP size and accumulation.
``train-data synthetic`` in the trainer uses it.
"""
from __future__ import annotations

from typing import Iterator

import torch


def synthetic_sample(seed: int, index: int, side: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    rows = torch.randint(0, 512, (side, 1), generator=g)
    return rows.expand(side, side).reshape(side * side)


class SyntheticLoader:
    """Infinite batches ``{"tokens", "labels", "keys"}`` with a resumable position."""

    def __init__(self, *, batch_size: int, dp_rank: int, dp_world_size: int, resolution: int, seed: int = 0):
        self.batch_size, self.dp_rank, self.dp_world_size = batch_size, dp_rank, dp_world_size
        self.resolution, self.seed, self.position = resolution, seed, 0
        self.num_samples = None  # infinite: epochs are not defined

    def __iter__(self) -> Iterator[dict]:
        while True:
            start = (self.position * self.dp_world_size + self.dp_rank) * self.batch_size
            idx = range(start, start + self.batch_size)
            self.position += 1
            yield {"tokens": torch.stack([synthetic_sample(self.seed, i, self.resolution) for i in idx]),
                   "labels": torch.full((self.batch_size,), -1, dtype=torch.long),
                   "keys": [f"synthetic-{i}" for i in idx]}

    def set_epoch(self, epoch: int) -> None:
        """Back to sample 0. The stream is infinite, so every epoch is the same stream from its start
        (what a validation pass needs: each evaluation scores the same batches)."""
        self.position = 0

    def state_dict(self) -> dict:
        """``sample``: the next sample of the global stream, the same for every layout with the same
        global batch (so a resharded checkpoint continues it); ``position``: this rank's batch count."""
        return {"position": self.position, "sample": self.position * self.dp_world_size * self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if "sample" not in state:
            self.position = int(state["position"])
            return
        per_batch = self.dp_world_size * self.batch_size
        if state["sample"] % per_batch:
            raise ValueError(f"synthetic loader state: sample {state['sample']} is not a multiple of "
                             f"DP {self.dp_world_size} x batch {self.batch_size}; resume at a step boundary")
        self.position = int(state["sample"]) // per_batch

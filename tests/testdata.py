"""Small data the tests make for themselves (no ../shared needed): probe-able images and tiny shards.

``tests/`` is on ``sys.path`` under pytest's default import mode: ``from testdata import ...``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from igpt_ds.data.shards import BuildSettings, build_shards
from igpt_ds.data.sources import open_source


def synthetic_images(n: int, seed: int, side: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Three classes a linear probe can tell apart (a colour each, plus noise): (images uint8, labels)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    rng.shuffle(labels)
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], np.float64)
    images = base[labels][:, None, None, :] + rng.normal(0, 60, (n, side, side, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def tiny_shards(root: Path, n: int = 96, resolution: int = 8, shard_size: int = 24) -> Path:
    """``root/train``: ``n`` random 8x8 images in 4 classes as shards of a random palette (a loader with workers)."""
    images = np.random.default_rng(0).integers(0, 256, (n, resolution, resolution, 3), dtype=np.uint8)
    np.savez(root / "d.npz", images=images, labels=np.arange(n) % 4)
    palette = np.random.default_rng(1).uniform(-1, 1, (512, 3)).astype(np.float32)
    build_shards(open_source(root / "d.npz"), str(root / "train"), palette,
                 BuildSettings(resolution=resolution, shard_size=shard_size), progress=False)
    return root / "train"

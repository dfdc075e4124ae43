"""Fine-tuning data: image augmentation before quantization, and an image loader that quantizes on the fly.

Augmentations of the paper (applied to the uint8 image, before the palette):
  - ``cifar``: 4-pixel reflection padding, a random crop of the original size, a horizontal flip
    with probability 1/2 (then resized to the model resolution if it differs);
  - ``random-resized-crop``: the ImageNet-style random square crop of
    :func:`igpt_ds.data.shards.resize_view` (``crop="random-resized"``), resized to the model resolution;
  - ``none``: the evaluation transform, a centre crop of the shorter side resized to the resolution.

:class:`ImageLoader` reads any :func:`igpt_ds.data.sources.open_source` source, augments and quantizes
(with :func:`igpt_ds.palette.quantize`, the quantizer the shard builder uses) inside DataLoader
workers, and splits each epoch by DATA-parallel rank: every DP rank yields the same number of
batches, all TP/PP ranks of a replica get the same ones. A sample's augmentation is seeded by
``(seed, epoch, image index)``, so batches do not depend on the worker count.
"""
from __future__ import annotations

import functools
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from igpt_ds.data.shards import resize_view
from igpt_ds.data.sources import ImageSource, SubsetSource
from igpt_ds.palette import palette_sha256, quantize
from igpt_ds.parallel import signals

AUGMENTATIONS = ("cifar", "random-resized-crop", "none")


def cifar_augment(image: np.ndarray, rng: np.random.Generator, pad: int = 4,
                  flip: Optional[bool] = None) -> np.ndarray:
    """Reflection-pad ``pad`` pixels, take a random crop of the input's size, flip horizontally (p=1/2).

    ``image`` (H, W, 3) uint8 -> (H, W, 3) uint8. ``flip`` forces the flip decision (tests).
    """
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    top, left = int(rng.integers(0, 2 * pad + 1)), int(rng.integers(0, 2 * pad + 1))
    crop = padded[top:top + h, left:left + w]
    if flip is None:
        flip = bool(rng.random() < 0.5)
    return np.ascontiguousarray(crop[:, ::-1] if flip else crop)


def augment_view(image: np.ndarray, resolution: int, augment: str = "none",
                 rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """One (resolution, resolution, 3) uint8 view of ``image`` under ``augment`` (see the module docstring)."""
    if augment == "none":
        return resize_view(image, resolution, "center")
    if rng is None:
        raise ValueError(f"augment={augment!r} needs an rng")
    if augment == "cifar":
        return resize_view(cifar_augment(image, rng), resolution, "center")
    if augment == "random-resized-crop":
        return resize_view(image, resolution, "random-resized", rng)
    raise ValueError(f"augment={augment!r}: choose one of {AUGMENTATIONS}")


def source_labels(source: ImageSource) -> np.ndarray:
    """Every label of ``source`` as int64 (N,), -1 where unlabeled, without decoding images where possible."""
    if isinstance(source, SubsetSource):
        return source_labels(source.base)[source.indices]
    labels = getattr(source, "_labels", None)
    if labels is not None:
        return np.asarray(labels, dtype=np.int64)
    if not source.has_labels:
        return np.full(len(source), -1, dtype=np.int64)
    return np.asarray([source[i][1] for i in range(len(source))], dtype=np.int64)


class _EpochBatches(Dataset):
    """Batch ``(epoch, b)`` of one DP rank's plan: read, augment, quantize (runs in a DataLoader worker).

    One object per loader, in persistent workers; the sampler (in the main process) names the epoch
    with each batch, and a worker computes an epoch's plan once, when it first sees that epoch.
    """

    def __init__(self, loader: "ImageLoader"):
        self.source, self.palette, self.resolution = loader.source, loader.palette, loader.resolution
        self.augment, self.seed = loader.augment, loader.seed
        self.plan_of = functools.partial(epoch_plan, len(loader.source), loader.dp_rank, loader.dp_world_size,
                                         loader.batch_size, loader.batches_per_epoch, loader.seed, loader.shuffle)
        self._epoch, self._plan = None, None

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, b = key
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, self.plan_of(epoch)
        plan, valid = self._plan
        views, labels, keys = [], [], []
        for index in plan[b].tolist():
            image, label = self.source[index]
            rng = np.random.default_rng([self.seed, epoch, index]) if self.augment != "none" else None
            views.append(augment_view(image, self.resolution, self.augment, rng))
            labels.append(label)
            keys.append(self.source.key(index))
        tokens = quantize(np.stack(views), self.palette, device="cpu")
        return {"tokens": torch.from_numpy(tokens), "labels": torch.tensor(labels, dtype=torch.long),
                "valid": torch.from_numpy(valid[b].copy()), "keys": keys}


class _Positions:
    """The sampler: ``(epoch, b)`` for the batches of the current pass, set by the loader before it."""

    def __init__(self):
        self.epoch, self.start, self.stop = 0, 0, 0

    def __iter__(self):
        return iter([(self.epoch, b) for b in range(self.start, self.stop)])

    def __len__(self) -> int:
        return self.stop - self.start


def epoch_plan(n: int, dp_rank: int, dp_world_size: int, batch_size: int, batches_per_epoch: int, seed: int,
               shuffle: bool, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices (batches, B), valid (batches, B)) of DP rank ``dp_rank`` in ``epoch`` (see :class:`ImageLoader`)."""
    d, b = dp_world_size, batch_size
    order = np.random.default_rng([seed, epoch, 0x46_54]).permutation(n) if shuffle else np.arange(n)
    total = batches_per_epoch * d * b
    valid = np.arange(total) < n
    if total > n:  # evaluation: pad with repeats that carry no weight
        order = np.concatenate([order, np.resize(order, total - n)])
    # Round k takes the next d * b samples; DP rank r the r-th b of them. A global batch (all
    # ranks, all accumulation steps) is therefore the same set of images at any DP size.
    pick = lambda a: a[:total].reshape(batches_per_epoch, d, b)[:, dp_rank]  # noqa: E731
    return pick(order), pick(valid)


def _worker_init(worker_id: int) -> None:
    signals.worker_init(worker_id)  # the job's SIGTERM/SIGUSR1 go to the trainer, not kill the worker
    torch.set_num_threads(1)  # one worker per core; quantize's blocks are too small for threads


class ImageLoader:
    """Batches ``{"tokens" (B, R*R) int64, "labels" (B,), "valid" (B,) bool, "keys"}`` from images.

    The epoch's (seeded, per-epoch) permutation is cut into rounds of ``D x B`` samples; DP rank r
    takes the r-th ``B`` of each round, so the global batch does not depend on the DP size.
    ``drop_last=True`` (training): only whole rounds. ``drop_last=False`` (evaluation): every
    sample once; the last round is padded by repeating samples with ``valid=False``, so all ranks
    still yield ``batches_per_epoch`` batches of ``batch_size``.
    ``epochs=None`` runs forever; ``state_dict``/``load_state_dict`` resume mid-epoch. The
    ``num_workers`` processes persist across epochs and passes; ``pin_memory`` (default: when CUDA
    is available) pins the batches for asynchronous copies.
    """

    def __init__(self, source: ImageSource, palette: np.ndarray, resolution: int, *, batch_size: int,
                 dp_rank: int, dp_world_size: int, augment: str = "none", seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, num_workers: int = 2, epochs: Optional[int] = None,
                 pin_memory: Optional[bool] = None):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment={augment!r}: choose one of {AUGMENTATIONS}")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_world_size={dp_world_size})")
        self.source, self.palette, self.resolution = source, palette, resolution
        self.batch_size, self.dp_rank, self.dp_world_size = batch_size, dp_rank, dp_world_size
        self.augment, self.seed, self.shuffle, self.drop_last = augment, seed, shuffle, drop_last
        self.num_workers, self.epochs = num_workers, epochs
        self.palette_sha256 = palette_sha256(palette)
        self.label_names = list(source.label_names)
        n, d, b = len(source), dp_world_size, batch_size
        self.batches_per_epoch = n // (d * b) if drop_last else -(-n // (d * b))
        if self.batches_per_epoch == 0:
            raise ValueError(f"{source.name}: {n} images do not make one batch of {b} on each of {d} DP ranks; "
                             f"lower the batch size (DeepSpeed config) or add images")
        self.epoch, self.batch = 0, 0
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._loader: Optional[DataLoader] = None
        self._positions: Optional[_Positions] = None
        self._passes = 0

    @property
    def num_samples(self) -> int:
        return len(self.source)

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices (batches, B), valid (batches, B)) of this DP rank in ``epoch``."""
        return epoch_plan(len(self.source), self.dp_rank, self.dp_world_size, self.batch_size,
                          self.batches_per_epoch, self.seed, self.shuffle, epoch)

    def _data_loader(self) -> DataLoader:
        """The loader's one DataLoader: its workers persist across epochs (and across passes)."""
        if self._loader is None:
            self._positions = _Positions()
            self._loader = DataLoader(_EpochBatches(self), batch_size=None, sampler=self._positions,
                                      num_workers=self.num_workers, worker_init_fn=_worker_init,
                                      pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)
        return self._loader

    def __iter__(self) -> Iterator[dict]:
        self._passes += 1
        this_pass = self._passes
        while self.epochs is None or self.epoch < self.epochs:
            if self.batch < self.batches_per_epoch:
                loader = self._data_loader()
                self._positions.epoch, self._positions.start = self.epoch, self.batch
                self._positions.stop = self.batches_per_epoch
                for batch in loader:
                    self.batch += 1
                    yield batch
                    if this_pass != self._passes:  # the shared DataLoader now serves a newer pass
                        raise RuntimeError("this ImageLoader was iterated again while an earlier iteration "
                                           "was still in use; iterate one loader from one place at a time")
            self.epoch, self.batch = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Start at the beginning of ``epoch``."""
        self.epoch, self.batch = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "batch_size": self.batch_size,
                "dp_world_size": self.dp_world_size, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "dp_world_size", "num_samples"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"loader state was saved with {key}={state.get(key)!r}, this run has "
                                 f"{getattr(self, key)!r}: resume with the same data, seed, batch and DP size")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

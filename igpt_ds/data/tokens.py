"""Streaming loader of token shards for data-parallel training.

    loader = build_loader("shards/cifar10/train", batch_size=64, dp_rank=dp, dp_world_size=dp_size,
                          expected_palette_sha256=palette_sha256(palette), expected_resolution=32)
    for batch in loader:          # {"tokens": LongTensor (B, T), "labels": LongTensor (B,), "keys": [str]}
        ...
    state = loader.state_dict()   # save with the checkpoint; loader.load_state_dict(state) resumes

How an epoch is cut (the same arithmetic on every rank, from the manifests' sample counts):
  1. The shards are put in a seeded random order (new each epoch), concatenated into one
     sequence of N samples.
  2. DP replica r takes the contiguous range [r*n, (r+1)*n) of it. ``drop_last=True``: n = N // D
     and each replica uses the first (n // B) * B of its range, so up to D - 1 + D*(B - 1) samples
     sit out an epoch (different ones each epoch, as the shard order changes).
     ``drop_last=False``: n = ceil(N / D), the sequence wraps around to fill the last replica
     (at most D - 1 samples are seen twice), and the last batch is smaller, on every rank alike.
     Either way every DP rank yields exactly ``batches_per_epoch`` batches, so collectives stay
     in step. Ranks of one replica (all TP / PP ranks) pass the same dp_rank and get the same batches.
  3. Within a replica, DataLoader worker w builds batches w, w + W, w + 2W, ... (the DataLoader
     takes batches from its workers round-robin) from its own contiguous part of the range:
     each worker opens only the shards it needs. A seeded shuffle buffer mixes each worker's
     samples. Shards were cut from a randomly ordered source, so each is a random sample.

Resume: the position is (epoch, batches yielded in the epoch). A restored loader rebuilds the same
epoch plan and each worker skips the batches it had already produced (worker w produced those
with index < k and index = w mod W), so the epoch continues where it stopped. It needs the same
seed, batch size, DP size and worker count; load_state_dict refuses a mismatch.

Workers: one DataLoader per loader with persistent workers, started at the first batch and kept
for every later epoch and pass; each pass tells them its (epoch, skip) through shared memory, so
what an epoch serves is exactly what a fresh DataLoader for that epoch would serve.

Sources: a shard directory (or its dataset.json), a list of them, or shard URLs/brace patterns
(``/data/train-{000000..000099}.tar``, ``pipe:aws s3 cp s3://b/train-000000.tar -``) with a
``manifest=`` giving their sample counts (a local pattern finds the dataset.json beside it).
Shard names inside a manifest are plain file names in its directory: a manifest cannot make the
loader open another path or run a command; URLs and ``pipe:`` only come from the caller.
"""
from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from igpt_ds.config import NUM_COLORS
from igpt_ds.data.manifest import (
    LABEL_EXT,
    MANIFEST_NAME,
    TOKENS_EXT,
    Manifest,
    ShardError,
    check_manifest,
    read_manifest,
)
from igpt_ds.parallel import signals

__all__ = ["build_loader", "read_manifest", "TokenLoader", "ShardSpec", "epoch_segments", "ShardError"]

Source = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]
_TAR_NAME = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.-]*\.tar)")


@dataclass(frozen=True)
class ShardSpec:
    """One shard to read: where (a path or any URL webdataset opens) and how many samples it holds."""

    url: str
    samples: int
    views: int = 1  # pre-quantized views per sample (the manifest's ``views``)


# ---------------------------------------------------------------------------------------------
# Resolving the source to shards with known counts
# ---------------------------------------------------------------------------------------------

def _is_manifest_location(item: str) -> bool:
    return os.path.isdir(item) or (os.path.basename(item) == MANIFEST_NAME and os.path.isfile(item))


def resolve_source(source: Source, manifest: Optional[str] = None) -> tuple[list[ShardSpec], list[Manifest]]:
    """Shards (with sample counts) and the manifests they come from."""
    items = [os.fspath(source)] if isinstance(source, (str, os.PathLike)) else [os.fspath(s) for s in source]
    if not items:
        raise ValueError("build_loader: no shard source given")
    shards: list[ShardSpec] = []
    manifests: list[Manifest] = []
    given = read_manifest(manifest) if manifest is not None else None
    for item in items:
        if _is_manifest_location(item):
            m = read_manifest(item)
            manifests.append(m)
            shards += [ShardSpec(p, s.samples, m.views) for p, s in zip(m.shard_paths(), m.shards)]
            continue
        for url in braceexpand(item):
            m = given or _manifest_beside(url)
            if m is None:
                raise ValueError(f"{url}: the loader needs each shard's sample count so that every DP rank "
                                 f"yields the same number of batches; pass manifest=<dataset.json> "
                                 f"(of the shard set these URLs hold) or a shard directory")
            if m not in manifests:
                manifests.append(m)
            names = _TAR_NAME.findall(url)
            counts = {s.name: s.samples for s in m.shards}
            if not names or names[-1] not in counts:
                raise ValueError(f"{url}: no shard of that name in {m.path} (it lists "
                                 f"{[s.name for s in m.shards][:4]}...)")
            shards.append(ShardSpec(url, counts[names[-1]], m.views))
    return shards, manifests


def _manifest_beside(url: str) -> Optional[Manifest]:
    if "://" in url or url.startswith("pipe:"):
        return None
    candidate = os.path.join(os.path.dirname(os.path.abspath(url)), MANIFEST_NAME)
    return read_manifest(candidate) if os.path.isfile(candidate) else None


# ---------------------------------------------------------------------------------------------
# The epoch plan: which samples each (DP rank, worker) reads
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EpochLayout:
    num_samples: int
    dp_world_size: int
    batch_size: int
    drop_last: bool

    @property
    def samples_per_rank(self) -> int:
        n, d, b = self.num_samples, self.dp_world_size, self.batch_size
        return (n // d // b) * b if self.drop_last else -(-n // d)

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.samples_per_rank // self.batch_size)

    def worker_batches(self, worker: int, num_workers: int) -> int:
        return max(0, -(-(self.batches_per_epoch - worker) // num_workers))

    def worker_range(self, dp_rank: int, worker: int, num_workers: int) -> tuple[int, int]:
        """[start, stop) of the worker's samples in the epoch's global sample sequence."""
        per_rank, b, nb = self.samples_per_rank, self.batch_size, self.batches_per_epoch
        last = per_rank - (nb - 1) * b  # size of the final batch
        sizes = []
        for w in range(num_workers):
            k = self.worker_batches(w, num_workers)
            owns_last = nb > 0 and (nb - 1) % num_workers == w
            sizes.append(k * b - (b - last if owns_last else 0))
        start = dp_rank * (-(-self.num_samples // self.dp_world_size) if not self.drop_last
                           else self.num_samples // self.dp_world_size) + sum(sizes[:worker])
        return start, start + sizes[worker]


def epoch_segments(counts: Sequence[int], epoch: int, seed: int, shuffle: bool,
                   start: int, stop: int) -> list[tuple[int, int, int]]:
    """(shard index, first, end) sample ranges covering global positions [start, stop) of an epoch.

    The global sequence is the shards in a seeded order for this epoch; positions past the end
    wrap around to its start (used to pad when drop_last is False).
    """
    order = (np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(counts)) if shuffle
             else np.arange(len(counts)))
    offsets = np.concatenate([[0], np.cumsum([counts[i] for i in order])])
    total = int(offsets[-1])
    segments = []
    pos = start
    while pos < stop:
        local = pos % total
        j = int(np.searchsorted(offsets, local, side="right") - 1)
        shard = int(order[j])
        first = local - int(offsets[j])
        take = min(counts[shard] - first, stop - pos)
        segments.append((shard, first, first + take))
        pos += take
    return segments


# ---------------------------------------------------------------------------------------------
# Reading samples
# ---------------------------------------------------------------------------------------------

def _tar_samples(url: str) -> Iterator[dict]:
    """Samples of one shard through webdataset's tar reader; tar errors name the shard."""
    stream = gopen(url, "rb")
    last_key = None
    try:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        for sample in group_by_keys(files):
            last_key = sample["__key__"]
            yield sample
    except ShardError:
        raise
    except Exception as e:
        where = f"after sample {last_key!r}" if last_key else "at its start"
        raise ShardError(f"{url}: corrupt or truncated tar {where} ({type(e).__name__}: {e}); "
                         f"rebuild it with tools/build_shards.py (re-running the build replaces bad shards)") from e
    finally:
        stream.close()


def epoch_view(seed: int, epoch: int, key: str, views: int) -> int:
    """Which of a sample's ``views`` pre-quantized crops epoch ``epoch`` serves.

    Epochs come in cycles of ``views``: within a cycle every view is served once, in an order drawn
    from (seed, image key, cycle), so K views give K epochs of different crops before any repeats, and
    the next cycle serves them in a new order. The same on every rank, worker and resume.
    """
    if views == 1:
        return 0
    cycle, position = divmod(epoch, views)
    order = np.random.default_rng([seed, zlib.crc32(key.encode()), cycle]).permutation(views)
    return int(order[position])


def read_shard(spec: ShardSpec, first: int, end: int, seq_len: int, vocab_size: int,
               view_of: Optional[Callable[[str], int]] = None) -> Iterator[tuple[str, np.ndarray, int]]:
    """(key, tokens int64 (seq_len,), label) for samples [first, end) of a shard, validated.

    A sample of K views (``spec.views``) gives the view ``view_of(key)`` (default: view 0).
    """
    index = -1
    for index, sample in enumerate(_tar_samples(spec.url)):
        if index >= end:
            raise ShardError(f"{spec.url}: holds more than the {spec.samples} samples its manifest lists "
                             f"(sample {sample['__key__']!r}); the manifest does not describe this shard, rebuild it")
        if index < first:
            continue
        yield _decode(spec.url, sample, seq_len, vocab_size, spec.views, view_of)
        if index == end - 1 and end < spec.samples:
            return  # the rest of this shard belongs to another worker or rank
    if index + 1 < min(end, spec.samples):
        raise ShardError(f"{spec.url}: ends after {index + 1} samples, its manifest lists {spec.samples} "
                         f"(truncated?); rebuild it with tools/build_shards.py")


def _decode(url: str, sample: dict, seq_len: int, vocab_size: int, views: int = 1,
            view_of: Optional[Callable[[str], int]] = None) -> tuple[str, np.ndarray, int]:
    key = sample["__key__"]
    raw = sample.get(TOKENS_EXT)
    if raw is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise ShardError(f"{url}: sample {key!r} has no .{TOKENS_EXT} member (has {members})")
    if len(raw) != 2 * seq_len * views:
        held = len(raw) / (2 * seq_len)
        expected = f"{seq_len}" if views == 1 else f"{views} views x {seq_len} (the manifest's 'views': {views})"
        raise ShardError(f"{url}: sample {key!r} has {len(raw) / 2:g} tokens, expected {expected} "
                         f"(resolution {int(seq_len ** 0.5)})"
                         + (f"; it holds {held:g} views: the manifest does not describe this shard"
                            if held == int(held) and held != views else
                            "; the shard is corrupt or from another build") + ", rebuild it with tools/build_shards.py")
    tokens = np.frombuffer(raw, dtype="<u2").astype(np.int64)
    if views > 1:
        view = view_of(key) if view_of is not None else 0
        tokens = tokens[view * seq_len:(view + 1) * seq_len]
    if tokens.max(initial=0) >= vocab_size:
        raise ShardError(f"{url}: sample {key!r} has token {int(tokens.max())} >= vocabulary size {vocab_size}; "
                         f"the shard is corrupt or was built with a larger palette")
    label = -1
    if LABEL_EXT in sample:
        try:
            label = int(sample[LABEL_EXT])
        except ValueError:
            raise ShardError(f"{url}: sample {key!r} has label {sample[LABEL_EXT][:20]!r}, not an integer") from None
    return key, tokens, label


class _EpochStream(IterableDataset):
    """Batches of one epoch for one DP rank; each DataLoader worker reads its own part.

    One object per loader, in persistent DataLoader workers: which epoch, and how many of its
    batches to skip, is read from ``position`` (shared memory the loader sets before each pass)
    when a pass starts, so the workers live across epochs while every epoch is planned as before.
    """

    def __init__(self, loader: "TokenLoader"):
        self.shards, self.layout = loader.shards, loader.layout
        self.dp_rank, self.num_workers = loader.dp_rank, max(1, loader.num_workers)
        self.seed, self.shuffle, self.shuffle_buffer = loader.seed, loader.shuffle, loader.shuffle_buffer
        self.seq_len, self.vocab_size = loader.seq_len, loader.vocab_size
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()  # [epoch, batches to skip]

    def __iter__(self):
        # Read now (the DataLoader calls iter() when a pass starts), not at the generator's first step.
        epoch, skip_batches = (int(v) for v in self.position.tolist())
        return self._batches(epoch, skip_batches)

    def _batches(self, epoch: int, skip_batches: int):
        info = get_worker_info()
        # The DataLoader asks worker 0 first; after resuming at batch k the next batch belongs to
        # worker k mod W, so DataLoader worker i plays the role of worker (i + k) mod W.
        worker = ((info.id if info is not None else 0) + skip_batches) % self.num_workers
        start, stop = self.layout.worker_range(self.dp_rank, worker, self.num_workers)
        segments = epoch_segments([s.samples for s in self.shards], epoch, self.seed, self.shuffle, start, stop)
        samples = self._samples(epoch, segments)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = np.random.default_rng([self.seed, epoch, self.dp_rank, worker])
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        # This worker made batches worker, worker + W, ... : skip those before the resume point.
        skip = max(0, -(-(skip_batches - worker) // self.num_workers))
        batch: list = []
        made = 0
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.layout.batch_size:
                if made >= skip:
                    yield _collate(batch)
                made += 1
                batch = []
        if batch and made >= skip:
            yield _collate(batch)

    def _samples(self, epoch: int, segments: list) -> Iterator[tuple[str, np.ndarray, int]]:
        """(key, tokens, label) of the segments' samples, in order (image shards override the decode)."""
        for shard, first, end in segments:
            yield from read_shard(self.shards[shard], first, end, self.seq_len, self.vocab_size,
                                  view_of=partial(epoch_view, self.seed, epoch, views=self.shards[shard].views))


def _shuffled(samples: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    buffer: list = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = int(rng.integers(size))
        buffer[i], sample = sample, buffer[i]
        yield sample
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


def _collate(batch: list) -> dict:
    return {"tokens": torch.from_numpy(np.stack([t for _, t, _ in batch])),
            "labels": torch.tensor([label for _, _, label in batch], dtype=torch.int64),
            "keys": [key for key, _, _ in batch]}


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------

class TokenLoader:
    """Iterable of batches for one DP rank across epochs, with a resumable position.

    Iterating continues from the current position (``epoch``, ``batch``) and runs to the end of
    ``epochs`` (forever when None). Batches: ``tokens`` LongTensor (B, T), ``labels``
    LongTensor (B,) (-1 where unlabeled), ``keys`` list of B sample keys.
    """

    stream_class = _EpochStream  # what the workers run (igpt_ds.data.image_shards: crop + quantize images)

    def __init__(self, shards: Sequence[ShardSpec], manifests: Sequence[Manifest], *, batch_size: int,
                 dp_rank: int, dp_world_size: int, num_workers: int = 2, seed: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 2000, epochs: Optional[int] = None, drop_last: bool = True,
                 vocab_size: int = NUM_COLORS, pin_memory: Optional[bool] = None):
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_world_size={dp_world_size})")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and num_workers={num_workers} >= 0")
        resolutions = {m.resolution for m in manifests}
        if len(resolutions) != 1 or len({m.palette_sha256 for m in manifests}) != 1:
            raise ShardError(f"shard sets disagree on resolution or palette: "
                             f"{[(m.path, m.resolution, m.palette_sha256[:12]) for m in manifests]}")
        self.shards, self.manifests = list(shards), list(manifests)
        self.seq_len = manifests[0].seq_len
        self.palette_sha256 = manifests[0].palette_sha256
        # the palette itself when a manifest carries it (all share the hash); None for older manifests
        self.palette = next((m.palette for m in manifests if m.palette is not None), None)
        self.label_names = list(manifests[0].label_names)
        self.batch_size, self.dp_rank, self.dp_world_size = batch_size, dp_rank, dp_world_size
        self.num_workers, self.seed, self.shuffle = num_workers, seed, shuffle
        self.shuffle_buffer, self.epochs, self.drop_last = shuffle_buffer, epochs, drop_last
        # Pinned host batches make the trainer's .to(device, non_blocking=True) an asynchronous copy.
        self.vocab_size = vocab_size
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._loader: Optional[DataLoader] = None
        self._stream: Optional[_EpochStream] = None
        self._passes = 0
        self.layout = EpochLayout(sum(s.samples for s in self.shards), dp_world_size, batch_size, drop_last)
        if self.layout.batches_per_epoch == 0:
            raise ValueError(f"{self.num_samples} samples do not make one batch of {batch_size} on each of "
                             f"{dp_world_size} DP ranks; lower the batch size or use drop_last=False")
        self.epoch, self.batch = 0, 0

    @property
    def num_samples(self) -> int:
        """Samples in the shard set (all DP ranks together)."""
        return self.layout.num_samples

    @property
    def batches_per_epoch(self) -> int:
        """Batches every DP rank yields per epoch (identical on all ranks)."""
        return self.layout.batches_per_epoch

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless loader (epochs=None) has no length; use batches_per_epoch")
        return self.epochs * self.batches_per_epoch

    def _data_loader(self) -> DataLoader:
        """The loader's one DataLoader: its workers persist across epochs (and across passes)."""
        if self._loader is None:
            self._stream = self.stream_class(self)
            # worker_init: the job's SIGTERM/SIGUSR1 go to the trainer instead of killing a worker
            self._loader = DataLoader(self._stream, batch_size=None, num_workers=self.num_workers,
                                      pin_memory=self.pin_memory, worker_init_fn=signals.worker_init,
                                      persistent_workers=self.num_workers > 0)
        return self._loader

    def __iter__(self) -> Iterator[dict]:
        self._passes += 1
        this_pass = self._passes
        while self.epochs is None or self.epoch < self.epochs:
            if self.batch < self.batches_per_epoch:
                loader = self._data_loader()
                self._stream.position[0], self._stream.position[1] = self.epoch, self.batch
                for batch in loader:  # a new pass over the same workers (they re-read the position)
                    self.batch += 1
                    yield batch
                    if this_pass != self._passes:  # the shared DataLoader now serves a newer pass
                        raise RuntimeError("this TokenLoader was iterated again while an earlier iteration "
                                           "was still in use; iterate one loader from one place at a time")
                if self.batch != self.batches_per_epoch:  # would desynchronise DP ranks: never silent
                    raise RuntimeError(f"epoch {self.epoch} gave {self.batch} batches, "
                                       f"planned {self.batches_per_epoch}")
            self.epoch, self.batch = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Start at the beginning of ``epoch``."""
        self.epoch, self.batch = epoch, 0

    def _fixed(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "dp_world_size": self.dp_world_size,
                "num_workers": max(1, self.num_workers), "drop_last": self.drop_last, "shuffle": self.shuffle,
                "num_samples": self.num_samples}

    def state_dict(self) -> dict:
        """Position (epoch, batches yielded in it) and what the plan depends on.

        Every DP rank is at the same position (they yield equal batch counts), so one rank's copy,
        e.g. the client state DeepSpeed stores with rank 0's checkpoint, restores all of them;
        ``dp_rank`` is recorded for information only.
        """
        return {"version": 1, "epoch": self.epoch, "batch": self.batch, "dp_rank": self.dp_rank, **self._fixed()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; refuses one saved under a different plan."""
        fixed = self._fixed()
        diff = {k: (state.get(k), v) for k, v in fixed.items() if state.get(k) != v}
        if diff:
            raise ValueError(
                "loader state was saved under a different data plan, (saved, now): "
                + ", ".join(f"{k}={a!r}->{b!r}" for k, (a, b) in diff.items())
                + ". Restore the saved settings to continue the epoch exactly, or call "
                  f"set_epoch({state.get('epoch', 0) + 1}) to start the next epoch with the new ones")
        if not 0 <= state["batch"] <= self.batches_per_epoch:
            raise ValueError(f"loader state batch={state['batch']} outside 0..{self.batches_per_epoch}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def build_loader(source: Source, *, batch_size: int, dp_rank: int, dp_world_size: int, num_workers: int = 2,
                 seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 2000, epochs: Optional[int] = None,
                 expected_palette_sha256: Optional[str] = None, expected_resolution: Optional[int] = None,
                 drop_last: bool = True, manifest: Optional[str] = None, vocab_size: int = NUM_COLORS,
                 pin_memory: Optional[bool] = None) -> TokenLoader:
    """A :class:`TokenLoader` over ``source`` for DP replica ``dp_rank`` of ``dp_world_size``.

    ``source``: a shard directory / dataset.json, a list of them, or shard URLs / brace patterns
    (then ``manifest`` gives their counts, unless a local pattern has dataset.json beside it).
    ``dp_rank`` / ``dp_world_size`` are the DATA-parallel coordinates (ParallelState.dp_rank),
    never the global rank. Every manifest is checked against ``expected_palette_sha256`` and
    ``expected_resolution`` when given. ``shuffle=False`` reads in shard order (evaluation).
    ``num_workers`` processes start at the first batch and serve every later epoch (persistent);
    ``pin_memory`` (default: when CUDA is available) pins the batches for asynchronous copies.
    """
    shards, manifests = resolve_source(source, manifest)
    for m in manifests:
        check_manifest(m, expected_palette_sha256, expected_resolution)
    contents = {m.data.get("content", "tokens") for m in manifests}
    if contents == {"images"}:  # image shards: crop and quantize in the workers
        from igpt_ds.data.image_shards import ImageShardLoader

        return ImageShardLoader(shards, manifests, batch_size=batch_size, dp_rank=dp_rank,
                                dp_world_size=dp_world_size, num_workers=num_workers, seed=seed, shuffle=shuffle,
                                shuffle_buffer=shuffle_buffer, epochs=epochs, drop_last=drop_last,
                                vocab_size=vocab_size, pin_memory=pin_memory)
    if len(contents) > 1:
        raise ShardError(f"cannot mix image shards and token shards in one loader: "
                         f"{[(m.path, m.data.get('content', 'tokens')) for m in manifests]}")
    return TokenLoader(shards, manifests, batch_size=batch_size, dp_rank=dp_rank, dp_world_size=dp_world_size,
                       num_workers=num_workers, seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                       epochs=epochs, drop_last=drop_last, vocab_size=vocab_size, pin_memory=pin_memory)

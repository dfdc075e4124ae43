"""Image shards: the on-the-fly path, cropping and quantizing in the loader workers.

Beside the pre-quantized shards of :mod:`igpt_ds.data.shards` (K fixed crops per image), a shard set
can hold the images themselves, for users with CPU to spare: every epoch then draws a new crop.
Each sample is, as tar members,

    <key>.png   the source image, resized (bicubic) so its shorter side is ``store_side`` (lossless:
                the tokens of a crop are exactly those the pre-quantized path gives for it)
    <key>.idx   the image's index in its source (ASCII digits): the crop's seed
    <key>.cls   the label (only when the source has labels)

The ``dataset.json`` is the pre-quantized one (same format and version, read by
:func:`igpt_ds.data.manifest.read_manifest`) plus ``"content": "images"`` and ``"store_side"``;
``resolution`` is the crop's side, and the palette is required (the workers quantize with it).

:func:`igpt_ds.data.tokens.build_loader` gives an :class:`ImageShardLoader` for such a set: the
TokenLoader's epoch plan, DP split, worker split, shuffle buffer and resume state, with each worker
decoding the PNG, cropping and quantizing (:func:`igpt_ds.palette.quantize`, the builder's quantizer).
Training (``shuffle=True``) takes the paper's random-resized crop
(:func:`igpt_ds.data.shards.resize_view`) with rng ``[seed, image index, epoch]``: the very crop
``build_shards(seed=seed, crop="random-resized", views=K)`` stores as view ``epoch`` (for ``epoch < K``,
when the source images are already at ``store_side``). Evaluation (``shuffle=False``) takes the centre crop.
"""
from __future__ import annotations

import datetime
import io
import os
import tarfile
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image

from igpt_ds.checkpoint.atomic import atomic_file
from igpt_ds.data.manifest import FORMAT_NAME, FORMAT_VERSION, LABEL_EXT, MANIFEST_NAME, ShardError, palette_to_json
from igpt_ds.data.shards import (
    BuildSettings,
    _add_member,
    _sha256_file,
    _write_manifest,
    plan_shards,
    resize_view,
    shard_name,
)
from igpt_ds.data.sources import ImageSource
from igpt_ds.data.tokens import TokenLoader, _EpochStream, _tar_samples
from igpt_ds.palette import palette_sha256, quantize

CONTENT = "images"
IMAGE_EXT = "png"
INDEX_EXT = "idx"


def store_image(image: np.ndarray, store_side: int) -> np.ndarray:
    """``image`` resized (bicubic) so its shorter side is ``store_side``; unchanged when it already is."""
    h, w = image.shape[:2]
    short = min(h, w)
    if short == store_side:
        return image
    size = (max(store_side, round(w * store_side / short)), max(store_side, round(h * store_side / short)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


def _png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG", compress_level=1)  # fast to write; lossless either way
    return out.getvalue()


def build_image_shards(source: ImageSource, out_dir: str, palette: np.ndarray, *, resolution: int,
                       store_side: Optional[int] = None, shard_size: int = 5000, seed: int = 0,
                       prefix: str = "train") -> dict:
    """Write ``source`` as image shards + ``dataset.json`` into ``out_dir``; returns the manifest dict.

    ``store_side`` (default ``2 * resolution``): the stored images' shorter side. Images are shuffled
    into shards with ``seed`` as :func:`igpt_ds.data.shards.plan_shards` does. One process, no resume.
    """
    store_side = store_side or 2 * resolution
    if store_side < resolution:
        raise ValueError(f"store_side={store_side} is below the crop resolution {resolution}")
    settings = BuildSettings(resolution=resolution, shard_size=shard_size, seed=seed, prefix=prefix).validate()
    os.makedirs(out_dir, exist_ok=True)
    records = []
    for i, slots in enumerate(plan_shards(len(source), settings)):
        name = shard_name(settings, i)
        path = os.path.join(out_dir, name)
        with atomic_file(path, temp=path + ".tmp", fsync=True) as tmp, open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for index in slots[:, 0].tolist():
                    image, label = source[index]
                    key = source.key(index)
                    _add_member(tar, f"{key}.{IMAGE_EXT}", _png(store_image(image, store_side)))
                    _add_member(tar, f"{key}.{INDEX_EXT}", str(index).encode("ascii"))
                    if source.has_labels:
                        _add_member(tar, f"{key}.{LABEL_EXT}", str(int(label)).encode("ascii"))
        records.append({"name": name, "samples": len(slots), "bytes": os.path.getsize(path),
                        "sha256": _sha256_file(path)})
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "content": CONTENT,
        "palette_sha256": palette_sha256(palette), "num_colors": int(len(palette)),
        "resolution": resolution, "seq_len": resolution ** 2, "store_side": store_side,
        "sample_encoding": f"{IMAGE_EXT}: RGB, shorter side store_side; {INDEX_EXT}: source index; "
                           f"{LABEL_EXT}: ASCII int",
        "label_names": list(source.label_names), "has_labels": source.has_labels,
        "num_samples": sum(r["samples"] for r in records), "num_images": len(source),
        "crop": {"train": "random-resized, rng [loader seed, image index, epoch]", "eval": "center"},
        "shards": records, "source": source.describe(),
        "build": {"seed": seed, "shard_size": shard_size, "prefix": prefix,
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "palette": palette_to_json(palette),
    }
    _write_manifest(os.path.join(out_dir, MANIFEST_NAME), manifest)
    return manifest


def decode_image_sample(url: str, sample: dict, resolution: int, palette: np.ndarray, crop: str,
                        seed: int, epoch: int) -> tuple[str, np.ndarray, int]:
    """(key, tokens int64 (resolution**2,), label) of one image-shard sample, cropped and quantized."""
    key = sample["__key__"]
    if IMAGE_EXT not in sample or INDEX_EXT not in sample:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise ShardError(f"{url}: sample {key!r} lacks .{IMAGE_EXT} or .{INDEX_EXT} (has {members}); "
                         f"rebuild it with igpt_ds.data.image_shards.build_image_shards")
    try:
        image = np.asarray(Image.open(io.BytesIO(sample[IMAGE_EXT])).convert("RGB"))
        index = int(sample[INDEX_EXT])
        label = int(sample[LABEL_EXT]) if LABEL_EXT in sample else -1
    except Exception as e:
        raise ShardError(f"{url}: sample {key!r} is corrupt ({type(e).__name__}: {e}); rebuild the shard") from e
    rng = np.random.default_rng([seed, index, epoch]) if crop == "random-resized" else None
    view = resize_view(image, resolution, crop, rng)
    return key, quantize(np.stack([view]), palette, device="cpu")[0].astype(np.int64), label


class _ImageEpochStream(_EpochStream):
    """The TokenLoader's epoch stream, decoding images: each worker crops and quantizes its samples."""

    def __init__(self, loader: "ImageShardLoader"):
        super().__init__(loader)
        self.palette, self.resolution, self.crop = loader.palette, loader.resolution, loader.crop

    def _samples(self, epoch: int, segments: list) -> Iterator[tuple[str, np.ndarray, int]]:
        torch.set_num_threads(1)  # one worker per core; quantize's blocks are too small for threads
        for shard, first, end in segments:
            spec = self.shards[shard]
            index = -1
            for index, sample in enumerate(_tar_samples(spec.url)):
                if index >= end:
                    raise ShardError(f"{spec.url}: holds more than the {spec.samples} samples its manifest lists")
                if index >= first:
                    yield decode_image_sample(spec.url, sample, self.resolution, self.palette, self.crop,
                                              self.seed, epoch)
                if index == end - 1:
                    break
            if index + 1 < end:
                raise ShardError(f"{spec.url}: ends after {index + 1} samples, its manifest lists {spec.samples}")


class ImageShardLoader(TokenLoader):
    """A :class:`~igpt_ds.data.tokens.TokenLoader` over image shards (made by ``build_loader``).

    ``crop``: ``random-resized`` when shuffling (training), ``center`` otherwise (evaluation).
    """

    stream_class = _ImageEpochStream

    def __init__(self, shards, manifests, *, crop: Optional[str] = None, **kwargs):
        super().__init__(shards, manifests, **kwargs)
        if self.palette is None:
            raise ShardError(f"{manifests[0].path}: an image shard set must carry its palette")
        self.resolution = manifests[0].resolution
        self.crop = crop or ("random-resized" if self.shuffle else "center")

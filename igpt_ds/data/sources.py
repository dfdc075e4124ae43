"""Image sources behind one interface: ``open_source(path, split)``.

Every source is a sequence of ``(image, label)``: ``image`` uint8 (H, W, 3) RGB, ``label`` an int
(``-1`` when the source has no labels). It also gives a stable key per image (``source.key(i)``,
letters, digits, ``_`` and ``-`` only: WebDataset splits a key from its extension at the first
dot), ``label_names`` (maybe empty), a ``name`` and a ``kind``.

Formats, detected from ``path``:
  - CIFAR-10 (``cifar-10-batches-py/``: data_batch_1..5 = train, test_batch = test)
  - CIFAR-100 (``cifar-100-python/``: train, test, meta; fine labels)
  - STL-10 (``stl10_binary/``: train_X.bin/train_y.bin, test_*, unlabeled_X.bin)
  - ``.npz`` (``images`` N x H x W x 3 uint8, optional ``labels``, optional ``label_names``)
  - an image folder: ImageNet layout (one sub-folder per class, labels = sorted folder names;
    ``PATH/train``, ``PATH/val`` used when ``split`` names one) or a flat folder (no labels).

Held-out split: ``val_fraction=f`` carves ``round(f * N)`` images out of the train split
(the paper holds out 4% of ImageNet train). Which images go to ``val`` is a seeded permutation,
so ``split="train"`` and ``split="val"`` with the same ``val_fraction`` and ``split_seed`` are
disjoint and together are the whole train split.
"""
from __future__ import annotations

import glob
import hashlib
import os
import pickle
import re
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
CIFAR10_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


class BadImageError(ValueError):
    """A source image that cannot be read (corrupt or not an image). Names the file."""


class ImageSource:
    """Base class: a sequence of (uint8 HxWx3 image, int label or -1) with stable keys."""

    kind: str = "source"

    def __init__(self, path: str, split: str, label_names: Sequence[str] = ()):
        self.path = os.path.abspath(path)
        self.split = split
        self.label_names = list(label_names)
        self.open_args: dict = {}  # set by open_source: how another process reopens this source

    @property
    def name(self) -> str:
        return f"{self.kind}:{os.path.basename(self.path.rstrip(os.sep))}:{self.split}"

    @property
    def has_labels(self) -> bool:
        return bool(self.label_names)

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def key(self, index: int) -> str:
        raise NotImplementedError

    def describe(self) -> dict:
        """What a manifest records about where its samples came from."""
        return {"path": self.path, "type": self.kind, "split": self.split, "name": self.name,
                "num_images": len(self), "val_fraction": self.open_args.get("val_fraction", 0.0),
                "split_seed": self.open_args.get("split_seed", 0)}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ({len(self)} images)>"


class ArraySource(ImageSource):
    """Images already in an array (N, H, W, 3) uint8 (or a memmap): CIFAR, STL-10, .npz."""

    def __init__(self, path: str, split: str, kind: str, images: np.ndarray, labels: Optional[np.ndarray],
                 label_names: Sequence[str], keys: Sequence[str]):
        super().__init__(path, split, label_names)
        self.kind = kind
        self._images = images
        self._labels = labels
        self._keys = list(keys)
        if len(self._keys) != len(images) or (labels is not None and len(labels) != len(images)):
            raise ValueError(f"{path}: {len(images)} images but {len(self._keys)} keys / "
                             f"{None if labels is None else len(labels)} labels")

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        label = -1 if self._labels is None else int(self._labels[index])
        return np.ascontiguousarray(self._image(index)), label

    def _image(self, index: int) -> np.ndarray:
        return self._images[index]

    def key(self, index: int) -> str:
        return self._keys[index]


class STL10Source(ArraySource):
    """STL-10 binary: (N, 3, 96, 96) column-major planes, read lazily from a memmap."""

    def _image(self, index: int) -> np.ndarray:
        return self._images[index].transpose(2, 1, 0)  # (C, W, H) -> (H, W, C)


class FolderSource(ImageSource):
    """Image files read with PIL and converted to RGB; class sub-folders give labels."""

    kind = "folder"

    def __init__(self, path: str, split: str, files: list[str], labels: Optional[list[int]],
                 label_names: Sequence[str], root: str):
        super().__init__(path, split, label_names)
        self.files, self._labels, self.root = files, labels, root
        self._keys = _unique_keys([os.path.relpath(f, root) for f in files])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        file = self.files[index]
        try:
            with Image.open(file) as im:
                image = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except Exception as e:  # PIL raises many types for a bad file
            raise BadImageError(f"{file}: cannot read image ({type(e).__name__}: {e}); "
                                f"remove or replace the file, or pass --skip-bad to build_shards") from e
        return image, (-1 if self._labels is None else self._labels[index])

    def key(self, index: int) -> str:
        return self._keys[index]


class SubsetSource(ImageSource):
    """A fixed subset of another source (the held-out split), keeping its keys and labels."""

    def __init__(self, base: ImageSource, indices: np.ndarray, split: str):
        super().__init__(base.path, split, base.label_names)
        self.base, self.indices, self.kind = base, np.asarray(indices, dtype=np.int64), base.kind

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.base[int(self.indices[index])]

    def key(self, index: int) -> str:
        return self.base.key(int(self.indices[index]))


def _unique_keys(names: list[str]) -> list[str]:
    """Keys from relative paths: other characters become ``_``; a collision gets a hash suffix."""
    keys = [re.sub(r"[^A-Za-z0-9_-]", "_", n) for n in names]
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    return [k if counts[k] == 1 else f"{k}-{hashlib.sha1(n.encode()).hexdigest()[:10]}"
            for k, n in zip(keys, names)]


def detect_kind(path: str) -> str:
    """``cifar10``, ``cifar100``, ``stl10``, ``npz`` or ``folder`` from what ``path`` holds."""
    if os.path.isfile(path):
        if path.endswith(".npz"):
            return "npz"
        raise ValueError(f"{path}: a file source must be a .npz (images N x H x W x 3 uint8, "
                         f"optional labels); for other formats give the directory")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    names = set(os.listdir(path))
    if names & {"batches.meta", "test_batch"} or any(n.startswith("data_batch_") for n in names):
        return "cifar10"
    if "meta" in names and names & {"train", "test"}:
        return "cifar100"
    if any(n.endswith("_X.bin") for n in names):
        return "stl10"
    return "folder"


def open_source(path: str, split: str = "train", *, val_fraction: float = 0.0,
                split_seed: int = 0) -> ImageSource:
    """Open the images of ``split`` at ``path`` (format detected; see the module docstring).

    ``split``: ``train`` or ``test`` (STL-10 also ``unlabeled``; folders any sub-folder name),
    or ``val`` with ``val_fraction > 0`` to take the held-out part of train. With
    ``val_fraction > 0``, ``train`` is the rest of train.
    """
    path = os.fspath(path)
    source = _open_split(path, split, val_fraction, split_seed)
    source.open_args = {"path": os.path.abspath(path), "split": split, "val_fraction": val_fraction,
                        "split_seed": split_seed}
    return source


def _open_split(path: str, split: str, val_fraction: float, split_seed: int) -> ImageSource:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must lie in [0, 1)")
    if val_fraction > 0 and split in ("train", "val"):
        base = _open(path, "train")
        n_val = int(round(val_fraction * len(base)))
        if n_val == 0 or n_val == len(base):
            raise ValueError(f"val_fraction={val_fraction} of {len(base)} images leaves "
                             f"{n_val} for val: choose a fraction that gives both splits images")
        order = np.random.default_rng(split_seed).permutation(len(base))
        chosen = np.sort(order[:n_val] if split == "val" else order[n_val:])
        return SubsetSource(base, chosen, split)
    if split == "val" and detect_kind(path) != "folder":
        raise ValueError(f"{path}: has no 'val' split; carve one from train with a held-out "
                         f"fraction (val_fraction=0.04 / --val-fraction 0.04)")
    return _open(path, split)


def _open(path: str, split: str) -> ImageSource:
    kind = detect_kind(path)
    return {"cifar10": _open_cifar10, "cifar100": _open_cifar100, "stl10": _open_stl10,
            "npz": _open_npz, "folder": _open_folder}[kind](path, split)


def _unpickle(file: str) -> dict:
    with open(file, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_images(data: np.ndarray) -> np.ndarray:
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # R, G, B planes -> (N, H, W, C)


def _missing_split(path: str, split: str, expected: list[str], splits: Sequence[str]) -> ValueError:
    return ValueError(f"{path}: split {split!r} needs file(s) {expected}, which are not there "
                      f"(found {sorted(os.listdir(path))}). Splits of this format: {list(splits)}; "
                      f"to hold out part of train use val_fraction / --val-fraction")


def _open_cifar10(path: str, split: str) -> ImageSource:
    if split not in CIFAR10_SPLITS:
        raise ValueError(f"{path}: CIFAR-10 has splits {list(CIFAR10_SPLITS)}, not {split!r}")
    files = CIFAR10_SPLITS[split]
    present = [f for f in files if os.path.isfile(os.path.join(path, f))]
    if not present:
        raise _missing_split(path, split, files, list(CIFAR10_SPLITS))
    images, labels, keys = [], [], []
    for name in present:  # a subset of the batches (e.g. 2 of 5) is allowed: it is what is there
        batch = _unpickle(os.path.join(path, name))
        images.append(_cifar_images(batch[b"data"]))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        keys += [f"{name}_{i:05d}" for i in range(len(labels[-1]))]
    names = "airplane automobile bird cat deer dog frog horse ship truck".split()
    meta = os.path.join(path, "batches.meta")
    if os.path.isfile(meta):
        names = [n.decode() for n in _unpickle(meta)[b"label_names"]]
    return ArraySource(path, split, "cifar10", np.concatenate(images), np.concatenate(labels), names, keys)


def _open_cifar100(path: str, split: str) -> ImageSource:
    file = os.path.join(path, split)
    if split not in ("train", "test"):
        raise ValueError(f"{path}: CIFAR-100 has splits ['train', 'test'], not {split!r}")
    if not os.path.isfile(file):
        raise _missing_split(path, split, [split], ["train", "test"])
    batch = _unpickle(file)
    names = [n.decode() for n in _unpickle(os.path.join(path, "meta"))[b"fine_label_names"]]
    labels = np.asarray(batch[b"fine_labels"], dtype=np.int64)
    keys = [f"{split}_{i:05d}" for i in range(len(labels))]
    return ArraySource(path, split, "cifar100", _cifar_images(batch[b"data"]), labels, names, keys)


def _open_stl10(path: str, split: str) -> ImageSource:
    if split not in ("train", "test", "unlabeled"):
        raise ValueError(f"{path}: STL-10 has splits ['train', 'test', 'unlabeled'], not {split!r}")
    x_file = os.path.join(path, f"{split}_X.bin")
    y_file = os.path.join(path, f"{split}_y.bin")
    expected = [f"{split}_X.bin"] + ([] if split == "unlabeled" else [f"{split}_y.bin"])
    if not os.path.isfile(x_file) or (split != "unlabeled" and not os.path.isfile(y_file)):
        raise _missing_split(path, split, expected, ["train", "test", "unlabeled"])
    size = os.path.getsize(x_file)
    if size % (3 * 96 * 96):
        raise ValueError(f"{x_file}: {size} bytes is not a whole number of 96x96x3 images (truncated?)")
    images = np.memmap(x_file, dtype=np.uint8, mode="r", shape=(size // (3 * 96 * 96), 3, 96, 96))
    labels, names = None, []
    if split != "unlabeled":
        labels = np.fromfile(y_file, dtype=np.uint8).astype(np.int64) - 1  # stored as 1..10
        names = STL10_CLASSES
        class_file = os.path.join(path, "class_names.txt")
        if os.path.isfile(class_file):
            with open(class_file) as f:
                names = [line.strip() for line in f if line.strip()]
    keys = [f"{split}_{i:06d}" for i in range(len(images))]
    return STL10Source(path, split, "stl10", images, labels, names, keys)


def _open_npz(path: str, split: str) -> ImageSource:
    with np.load(path, allow_pickle=False) as f:
        if "images" not in f:
            raise ValueError(f"{path}: no 'images' array (found {list(f.keys())}); an .npz source holds "
                             f"images (N, H, W, 3) uint8 and optionally labels (N,) and label_names")
        images = f["images"]
        labels = f["labels"].astype(np.int64) if "labels" in f else None
        names = [str(n) for n in f["label_names"]] if "label_names" in f else []
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: 'images' is {images.shape} {images.dtype}, expected (N, H, W, 3) uint8")
    if labels is not None and not names:
        names = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
    if split != "train":
        raise ValueError(f"{path}: an .npz source is one split ('train'); pass split='train' "
                         f"and hold out part of it with val_fraction / --val-fraction")
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(os.path.basename(path))[0])
    return ArraySource(path, split, "npz", images, labels, names, [f"{stem}_{i:07d}" for i in range(len(images))])


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _open_folder(path: str, split: str) -> ImageSource:
    root = os.path.join(path, split) if os.path.isdir(os.path.join(path, split)) else path
    if root == path and split != "train":
        raise ValueError(f"{path}: no sub-folder {split!r}; a folder source is its own 'train' split "
                         f"(or holds train/, val/, ... sub-folders); hold out part of train with "
                         f"val_fraction / --val-fraction")
    entries = sorted(os.listdir(root))
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
    loose = [e for e in entries if _is_image(e) and os.path.isfile(os.path.join(root, e))]
    if classes and loose:
        raise ValueError(f"{root}: has both class sub-folders {classes[:3]}... and loose images "
                         f"{loose[:3]}...; use one layout (class folders, or a flat folder without labels)")
    if not classes:
        files = [os.path.join(root, e) for e in loose]
        source = FolderSource(path, split, files, None, [], root)
    else:
        files, labels = [], []
        for label, cls in enumerate(classes):
            found = sorted(glob.glob(os.path.join(glob.escape(os.path.join(root, cls)), "**", "*"),
                                     recursive=True))
            found = [f for f in found if _is_image(f) and os.path.isfile(f)]
            files += found
            labels += [label] * len(found)
        source = FolderSource(path, split, files, labels, classes, root)
    if not len(source):
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return source


def sample_pixels(source: ImageSource, count: int, seed: int = 0, *, per_image: int = 256,
                  exclude_images: int = 0,
                  transform: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> np.ndarray:
    """``count`` random RGB pixels (uint8 (count, 3)) from random images of ``source``.

    At most ``per_image`` pixels come from one image, so few images need reading. Images are
    taken in a seeded order after skipping its first ``exclude_images`` (pass the number used
    for a fitting sample to draw held-out pixels from other images, while there are any).
    ``transform`` (e.g. the shard builder's resize) is applied to each image before sampling.
    """
    rng = np.random.default_rng(seed)
    order = np.random.default_rng([seed, 1]).permutation(len(source))
    if exclude_images < len(order):
        order = order[exclude_images:]
    chunks, have = [], 0
    for index in np.resize(order, len(order) * 64):  # a small source is visited again
        if have >= count:
            break
        image = source[int(index)][0]
        image = (transform(image) if transform is not None else image).reshape(-1, 3)
        take = min(per_image, count - have, len(image))
        chunks.append(image[rng.choice(len(image), take, replace=False)])
        have += take
    return np.concatenate(chunks) if chunks else np.zeros((0, 3), np.uint8)


def images_for_pixels(count: int, per_image: int = 256) -> int:
    """How many images :func:`sample_pixels` reads for ``count`` pixels."""
    return -(-count // per_image)

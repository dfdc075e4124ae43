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
    ``PATH/train``, ``PATH/val`` used when ``split`` names one) or a flat folder (no labels),
    listed with ``os.scandir`` (no per-file ``stat``; only the sorted names are kept).
  - a flat folder with a ground-truth file, in it or beside it (the official ILSVRC2012 val:
    ``PATH/val/ILSVRC2012_val_00000001.JPEG``...): ``LOC_<split>_solution.csv`` (Kaggle's
    ``ImageId,PredictionString``, the class first) or ``<split>_labels.txt`` (one ``file class``
    per line, space or comma between; ``file`` with or without its extension). Label names are
    ``PATH/train/``'s sorted class folders when there are any (val labels then match train's),
    else ``synsets.txt`` / ``LOC_synset_mapping.txt`` (first word of each line, in file order),
    else the sorted class names of the file. Every image needs exactly one line and every line
    an image. (The devkit's ``ILSVRC2012_validation_ground_truth.txt`` holds ILSVRC2012_IDs, whose
    map to synsets is in ``meta.mat``: convert it to ``val_labels.txt`` first.)
  - image archives: a ``.tar`` file, or a folder (or ``PATH/<split>/``) holding only ``.tar``
    files (WebDataset shards of JPEGs, read in sorted order): one image per WebDataset sample
    (members ``<key>.jpg`` / ``.png`` / ..., ``<key>`` = the name up to the basename's first dot),
    in tar order; labels from ``<key>.cls`` (ASCII int) when every sample has one. Uncompressed
    tars only: images are read in place by offset.

Held-out split: ``val_fraction=f`` carves ``round(f * N)`` images out of the train split
(the paper holds out 4% of ImageNet train). Which images go to ``val`` is a seeded permutation,
so ``split="train"`` and ``split="val"`` with the same ``val_fraction`` and ``split_seed`` are
disjoint and together are the whole train split.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import pickle
import re
import tarfile
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

# A flat folder is labelled by the first of these found in it or in the folder above it.
GROUND_TRUTH_FILES = ("LOC_{split}_solution.csv", "{split}_labels.txt")
CLASS_LIST_FILES = ("synsets.txt", "LOC_synset_mapping.txt")
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
                 label_names: Sequence[str], root: str, labels_file: Optional[str] = None):
        super().__init__(path, split, label_names)
        # ``files`` relative to ``root``: for millions of files the names are most of the memory
        self.files, self._labels, self.root, self.labels_file = files, labels, root, labels_file
        self._keys = _unique_keys(files)

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> dict:
        out = super().describe()
        if self.labels_file:
            out["labels_file"] = self.labels_file
        return out

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        file = os.path.join(self.root, self.files[index])
        try:
            with Image.open(file) as im:
                image = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except Exception as e:  # PIL raises many types for a bad file
            raise BadImageError(f"{file}: cannot read image ({type(e).__name__}: {e}); "
                                f"remove or replace the file, or pass --skip-bad to build_shards") from e
        return image, (-1 if self._labels is None else self._labels[index])

    def key(self, index: int) -> str:
        return self._keys[index]


class TarSource(ImageSource):
    """Images inside uncompressed tar archives (WebDataset shards), indexed once, read by offset."""

    kind = "tar"

    def __init__(self, path: str, split: str, archives: list[str]):
        super().__init__(path, split)
        self.archives = archives
        where, offsets, sizes, labels, names = [], [], [], [], []
        for a, archive in enumerate(archives):
            try:
                tar = tarfile.open(archive, mode="r:")
            except tarfile.TarError as e:
                raise ValueError(f"{archive}: not an uncompressed tar ({e}); image archives are read "
                                 f"in place, so unpack .tar.gz / .tgz to .tar first") from e
            with tar:
                samples: dict[str, dict] = {}
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, base = os.path.split(member.name)
                    stem, _, ext = base.partition(".")
                    sample = samples.setdefault(f"{folder}/{stem}" if folder else stem, {})
                    if ext.lower() == "cls":
                        sample["cls"] = int(tar.extractfile(member).read().decode("ascii").strip())
                    elif _is_image(base) and "image" not in sample:
                        sample["image"] = (member.offset_data, member.size)
            for key, sample in samples.items():  # insertion order: tar order
                if "image" not in sample:
                    continue
                where.append(a)
                offsets.append(sample["image"][0])
                sizes.append(sample["image"][1])
                labels.append(sample.get("cls", -1))
                names.append(f"{os.path.basename(archive).partition('.')[0]}/{key}")
        has_labels = bool(labels) and all(v >= 0 for v in labels)
        if not has_labels and any(v >= 0 for v in labels):
            raise ValueError(f"{path}: {sum(v < 0 for v in labels)} of {len(labels)} archive samples have "
                             f"no .cls member; give every sample a label, or none")
        self._where, self._offsets, self._sizes = (np.asarray(where, np.int32), np.asarray(offsets, np.int64),
                                                   np.asarray(sizes, np.int64))
        self._labels = np.asarray(labels, np.int64) if has_labels else None
        if has_labels:
            self.label_names = [str(i) for i in range(int(self._labels.max()) + 1)]
        self._keys = _unique_keys(names)
        self._files: dict[int, object] = {}  # opened on first read, in each process

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        a = int(self._where[index])
        if a not in self._files:
            self._files[a] = open(self.archives[a], "rb")
        f = self._files[a]
        f.seek(int(self._offsets[index]))
        data = f.read(int(self._sizes[index]))
        try:
            with Image.open(io.BytesIO(data)) as im:
                image = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except Exception as e:  # PIL raises many types for a bad file
            raise BadImageError(f"{self.archives[a]}: member {self._keys[index]}: cannot read image "
                                f"({type(e).__name__}: {e}); pass --skip-bad to build_shards") from e
        return image, (-1 if self._labels is None else int(self._labels[index]))

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
    """``cifar10``, ``cifar100``, ``stl10``, ``npz``, ``tar`` or ``folder`` from what ``path`` holds."""
    if os.path.isfile(path):
        if path.endswith(".npz"):
            return "npz"
        if path.endswith(".tar"):
            return "tar"
        raise ValueError(f"{path}: a file source must be a .npz (images N x H x W x 3 uint8, "
                         f"optional labels) or a .tar of images; for other formats give the directory")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    # named files, not a listing: a flat folder may hold millions of images
    has = lambda *names: any(os.path.exists(os.path.join(path, n)) for n in names)  # noqa: E731
    if has("batches.meta", "test_batch", *CIFAR10_SPLITS["train"]):
        return "cifar10"
    if has("meta") and has("train", "test"):
        return "cifar100"
    if has("train_X.bin", "test_X.bin", "unlabeled_X.bin"):
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
            "npz": _open_npz, "folder": _open_folder, "tar": _open_tar}[kind](path, split)


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


def _open_tar(path: str, split: str) -> ImageSource:
    if split != "train":
        raise ValueError(f"{path}: a .tar source is one split ('train'); pass split='train' and hold "
                         f"out part of it with val_fraction / --val-fraction, or give a folder of "
                         f"<split>/ sub-folders of tars")
    return _non_empty(TarSource(path, split, [os.path.abspath(path)]), path)


def _non_empty(source: ImageSource, where: str) -> ImageSource:
    if not len(source):
        raise ValueError(f"{where}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return source


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _open_folder(path: str, split: str) -> ImageSource:
    root = os.path.join(path, split) if os.path.isdir(os.path.join(path, split)) else path
    if root == path and split != "train":
        raise ValueError(f"{path}: no sub-folder {split!r}; a folder source is its own 'train' split "
                         f"(or holds train/, val/, ... sub-folders); hold out part of train with "
                         f"val_fraction / --val-fraction")
    classes, loose = _list_folder(root)
    if classes and loose:
        raise ValueError(f"{root}: has both class sub-folders {classes[:3]}... and loose images "
                         f"{loose[:3]}...; use one layout (class folders, or a flat folder without labels)")
    if not classes and not loose:
        archives = sorted(glob.glob(os.path.join(glob.escape(root), "*.tar")))
        if archives:
            return _non_empty(TarSource(path, split, archives), root)
    if not classes:
        labelled = _flat_labels(path, split, root, loose)
        if labelled is None:
            source = FolderSource(path, split, loose, None, [], root)
        else:
            labels, names, gt_file = labelled
            source = FolderSource(path, split, loose, labels, names, root, labels_file=gt_file)
    else:
        files, labels = [], []
        for label, cls in enumerate(classes):
            found = sorted(glob.glob(os.path.join(glob.escape(os.path.join(root, cls)), "**", "*"),
                                     recursive=True))
            found = [os.path.relpath(f, root) for f in found if _is_image(f) and os.path.isfile(f)]
            files += found
            labels += [label] * len(found)
        source = FolderSource(path, split, files, labels, classes, root)
    if not len(source):
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return source


def _list_folder(root: str) -> tuple[list[str], list[str]]:
    """Sorted class sub-folders and loose image names of ``root``, streamed with ``os.scandir``.

    The file type comes from the directory entry (no ``stat`` per file on most file systems) and
    only names are kept, so a flat folder of many millions of images lists in one pass.
    """
    classes, loose = [], []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if _is_image(entry.name) and entry.is_file():
                loose.append(entry.name)
            elif entry.is_dir():
                classes.append(entry.name)
    classes.sort()
    loose.sort()
    return classes, loose


def _flat_labels(path: str, split: str, root: str,
                 names: list[str]) -> Optional[tuple[list[int], list[str], str]]:
    """Labels of a flat folder's ``names`` from a ground-truth file (module docstring), or None."""
    dirs = [root] + ([path] if os.path.abspath(root) != os.path.abspath(path) else [])
    found = [os.path.join(d, f.format(split=split)) for f in GROUND_TRUTH_FILES for d in dirs]
    gt_file = next((f for f in found if os.path.isfile(f)), None)
    if gt_file is None:
        return None
    table: dict[str, str] = {}
    with open(gt_file) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#") or (number == 1 and line.startswith("ImageId,")):
                continue
            if gt_file.endswith(".csv"):
                image, _, rest = line.partition(",")
            else:
                image, rest = (re.split(r"[,\s]+", line, maxsplit=1) + [""])[:2]
            label = rest.replace(",", " ").split()[0] if rest.strip() else ""
            if not image or not label:
                raise ValueError(f"{gt_file}:{number}: {line!r} is not 'image class'")
            if image in table:
                raise ValueError(f"{gt_file}:{number}: image {image!r} is listed twice")
            table[image] = label
    train = os.path.join(path, "train")
    train_classes = (_list_folder(train)[0] if os.path.abspath(train) != os.path.abspath(root)
                     and os.path.isdir(train) else [])
    if train_classes:
        classes, classes_from = train_classes, f"the class folders of {train}"
    else:
        lists = [os.path.join(d, f) for f in CLASS_LIST_FILES for d in dirs if os.path.isfile(os.path.join(d, f))]
        if lists:
            with open(lists[0]) as f:
                classes = [line.split()[0] for line in f if line.strip()]
            classes_from = lists[0]
        else:
            classes, classes_from = sorted(set(table.values())), gt_file
    index = {c: i for i, c in enumerate(classes)}
    labels, used, unlabelled = [], set(), []
    for name in names:
        image = name if name in table else os.path.splitext(name)[0]
        if image not in table:
            unlabelled.append(name)
            continue
        used.add(image)
        if table[image] not in index:
            raise ValueError(f"{gt_file}: {image} has class {table[image]!r}, which is not in {classes_from} "
                             f"({len(classes)} classes)")
        labels.append(index[table[image]])
    missing = sorted(set(table) - used)
    if missing:
        raise ValueError(f"{gt_file}: names {len(missing)} image(s) that are not in {root}: "
                         f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; "
                         f"restore them, or remove their lines")
    if unlabelled:
        raise ValueError(f"{root}: {len(unlabelled)} image(s) have no line in {gt_file}: "
                         f"{', '.join(unlabelled[:3])}{' ...' if len(unlabelled) > 3 else ''}; "
                         f"add them, or move them out of the folder")
    return labels, classes, gt_file


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

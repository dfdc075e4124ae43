"""Feature files: the ``.npz`` format of ``tools/extract_features.py``, written streaming and atomically.

    layer<l>   (N, d) float32 or float16, one per extracted layer (0 = embedding output, L = last block)
    labels     (N,) int64, -1 where the source has no labels
    index      (N,) int64, each row's position in the full source (or shard set) order
    meta       0-d unicode array holding JSON: what was extracted from what

Uncompressed (``ZIP_STORED``), so ``np.load`` reads it and rows can be streamed out of it. Written
as per-array ``.npy`` memory maps in a temporary directory beside the output, packed into the
``.npz`` at the end and renamed into place: features of an ImageNet-sized set never sit in
memory, and a crash leaves no partial file. A slice ``i`` of ``n`` covers rows
``[i*N//n, (i+1)*N//n)`` and is written as ``OUT.part<i>-of-<n>.npz``;
:func:`merge_feature_files` concatenates the slices of one extraction in order.

No torch here: the linear probe reads these files without it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from igpt_ds.checkpoint.atomic import atomic_file

PathLike = Union[str, os.PathLike]
FORMAT = "igpt-ds-features"
VERSION = 1
LAYER_KEY = re.compile(r"^layer(\d+)$")
OUT_DTYPES = {"float32": np.float32, "float16": np.float16}


def feature_key(layer: int, mask: int = 0) -> str:
    """Array name of layer ``layer`` under BERT mask ``mask``: ``layer<l>`` for mask 0, else ``layer<l>_mask<k>``.

    Mask 0 keeps the plain name, so readers that know only ``layer<l>`` see single-mask features.
    """
    return f"layer{layer}" if mask == 0 else f"layer{layer}_mask{mask}"


class FeatureFileError(ValueError):
    """A feature file that cannot be used as asked. The message names the file and the fix."""


def parse_layers(spec: Union[str, int, Sequence[int]], n_layer: int) -> list[int]:
    """Sorted unique layer indices from ``all``, ``middle``, ``3``, ``2-5`` (inclusive), ``1,3,8``.

    0 is the embedding output, ``n_layer`` the last block. Raises ValueError naming the valid range.
    """
    valid = f"valid layers are 0..{n_layer} (0 = embedding output, {n_layer} = last block)"
    if isinstance(spec, int):
        parts: list = [spec]
    elif isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(n_layer + 1))
        if text in ("middle", "mid"):
            return [n_layer // 2]
        parts = [p.strip() for p in text.split(",")]
    else:
        parts = list(spec)
    layers: set[int] = set()
    for part in parts:
        if isinstance(part, str):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise ValueError(f"layer spec {spec!r}: cannot read {part!r}; use 'all', 'middle', a number, "
                                 f"a range 'a-b' or a list '1,3,8'; {valid}")
            lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
            if hi < lo:
                raise ValueError(f"layer spec {spec!r}: range {part!r} runs backwards; {valid}")
            chosen = range(lo, hi + 1)
        else:
            chosen = [int(part)]
        for layer in chosen:
            if not 0 <= layer <= n_layer:
                raise ValueError(f"layer {layer} is outside the model (n_layer={n_layer}): {valid}")
            layers.add(layer)
    if not layers:
        raise ValueError(f"layer spec {spec!r} names no layer; {valid}")
    return sorted(layers)


class FeatureWriter:
    """Rows of several named arrays written into memory-mapped ``.npy`` files, then packed into one ``.npz``.

        with FeatureWriter(out, {"layer3": ((N, d), np.float32), "labels": ((N,), np.int64)}) as w:
            w.write(0, {"layer3": ..., "labels": ...})
            w.finish(meta)     # packs and renames; leaving the block without finish() removes everything
    """

    def __init__(self, out: PathLike, arrays: dict[str, tuple[tuple[int, ...], type]]):
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        self.maps = {name: np.lib.format.open_memmap(self.tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
                     for name, (shape, dtype) in arrays.items()}
        self.rows = np.zeros(next(iter(arrays.values()))[0][0], dtype=bool) if arrays else np.zeros(0, bool)

    def write(self, start: int, values: dict[str, np.ndarray]) -> None:
        n = None
        for name, value in values.items():
            self.maps[name][start:start + len(value)] = value
            n = len(value)
        if n:
            self.rows[start:start + n] = True

    def finish(self, meta: dict) -> Path:
        if not self.rows.all():
            missing = np.flatnonzero(~self.rows)
            raise RuntimeError(f"{self.out}: rows {missing[:5].tolist()}... were never written ({len(missing)} of "
                               f"{len(self.rows)}); the data stream ended early")
        for m in self.maps.values():
            m.flush()
        names = list(self.maps)
        self.maps.clear()  # close the memory maps before packing
        with atomic_file(self.out) as packed:
            with zipfile.ZipFile(packed, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name in names:
                    zf.write(self.tmp / f"{name}.npy", arcname=f"{name}.npy")  # streamed in chunks
                    os.unlink(self.tmp / f"{name}.npy")
                with zf.open("meta.npy", "w") as f:
                    np.save(f, np.array(json.dumps(meta, sort_keys=True)))
        self.close()
        return self.out

    def close(self) -> None:
        self.maps.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return np.lib.format._read_array_header(f, version)  # 3.0: no public reader


def _member_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple[int, ...], np.dtype]:
    with zf.open(name) as f:
        shape, _, dtype = _read_header(f)
    return shape, dtype


def _member_rows(zf: zipfile.ZipFile, name: str, chunk_rows: int = 4096) -> Iterator[np.ndarray]:
    """Rows of a C-order array member, ``chunk_rows`` at a time (bounded memory)."""
    with zf.open(name) as f:
        shape, fortran, dtype = _read_header(f)
        if fortran and len(shape) > 1:
            raise FeatureFileError(f"{zf.filename}: {name} is Fortran-ordered; re-save it in C order")
        row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        for start in range(0, shape[0], chunk_rows):
            n = min(chunk_rows, shape[0] - start)
            buf = f.read(n * row * dtype.itemsize)
            yield np.frombuffer(buf, dtype=dtype).reshape((n, *shape[1:]))


class FeatureFile:
    """A feature ``.npz`` opened lazily: layer widths and counts come from headers, arrays on demand."""

    def __init__(self, path: PathLike):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such feature file; make one with tools/extract_features.py")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise FeatureFileError(f"{self.path}: not an .npz feature file (not a zip archive)") from None
        self.headers = {n[:-4]: _member_header(self._zip, n) for n in self._zip.namelist() if n.endswith(".npy")}
        self.layers = sorted(int(m.group(1)) for k in self.headers if (m := LAYER_KEY.match(k)))
        if not self.layers:
            raise FeatureFileError(f"{self.path}: holds no layer<l> arrays (found {sorted(self.headers)}); "
                                   f"it is not a feature file from tools/extract_features.py")
        counts = {k: shape[0] for k, (shape, _) in self.headers.items() if k != "meta" and shape}
        if len(set(counts.values())) != 1:
            raise FeatureFileError(f"{self.path}: arrays disagree on the number of rows: {counts}")
        for layer in self.layers:
            shape = self.headers[f"layer{layer}"][0]
            if len(shape) != 2:
                raise FeatureFileError(f"{self.path}: layer{layer} has shape {shape}, expected (N, d)")
        self.num_rows = next(iter(counts.values()))
        self._members: dict = {}
        self._raw_fd: Optional[int] = None
        self.meta = json.loads(str(self._load("meta"))) if "meta" in self.headers else {}

    def _load(self, name: str) -> np.ndarray:
        with self._zip.open(f"{name}.npy") as f:
            return np.lib.format.read_array(f, allow_pickle=False)

    # ---- streaming: rows read straight from the file, never a whole member in memory -------------
    def _member(self, name: str) -> tuple[int, tuple[int, ...], np.dtype]:
        """(byte offset of the array data in the file, shape, dtype) of member ``name`` (stored, C order)."""
        cached = self._members.get(name)
        if cached is not None:
            return cached
        info = self._zip.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise FeatureFileError(f"{self.path}: {name} is compressed (np.savez_compressed); streaming reads need "
                                   f"stored members: re-save with np.savez or write it with tools/extract_features.py")
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                raise FeatureFileError(f"{self.path}: bad zip local header for {name}; the file is damaged")
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            start = info.header_offset + 30 + name_len + extra_len
            f.seek(start)
            shape, fortran, dtype = _read_header(f)
            data = f.tell()
        if fortran and len(shape) > 1:
            raise FeatureFileError(f"{self.path}: {name} is Fortran-ordered; re-save it in C order")
        self._members[name] = (data, shape, dtype)
        return self._members[name]

    def read_rows(self, name: str, start: int, stop: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Rows ``[start, stop)`` of member ``name`` (e.g. ``"layer3"``), read with one ``pread``.

        Bytes go from the file into the returned array (or ``out``) and nothing else is kept, so a
        reader's memory is what it asks for, whatever the size of the file.
        """
        offset, shape, dtype = self._member(name)
        start, stop = max(0, start), min(stop, shape[0])
        row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        n = max(0, stop - start)
        if out is None:
            out = np.empty((n, *shape[1:]), dtype=dtype)
        elif out.shape != (n, *shape[1:]) or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError(f"read_rows {name}: out is {out.shape} {out.dtype}, expected {(n, *shape[1:])} {dtype}")
        view = memoryview(out.reshape(-1).view(np.uint8))
        pos, want = offset + start * row * dtype.itemsize, n * row * dtype.itemsize
        done = 0
        while done < want:
            got = os.preadv(self._fd(), [view[done:]], pos + done)
            if got <= 0:
                raise FeatureFileError(f"{self.path}: {name} ends early (rows {start}..{stop}); the file is truncated")
            done += got
        return out

    def _fd(self) -> int:
        if self._raw_fd is None:
            self._raw_fd = os.open(self.path, os.O_RDONLY)
        return self._raw_fd

    def masks(self, layer: int) -> int:
        """How many BERT masks this file holds features of for ``layer``: 1 + the ``layer<l>_mask<k>`` members."""
        k = 1
        while feature_key(layer, k) in self.headers:
            k += 1
        return k

    def width_of(self, name: str) -> int:
        """Row width of member ``name`` (``layer3``, ``layer3_mask1``)."""
        if name not in self.headers:
            raise FeatureFileError(f"{self.path}: no member {name!r}; it holds {sorted(self.headers)}")
        return self.headers[name][0][1]

    def dtype_of(self, name: str) -> np.dtype:
        return self.headers[name][1]

    def width(self, layer: int) -> int:
        return self.headers[f"layer{layer}"][0][1]

    def layer(self, layer: int, view: int = 0) -> np.ndarray:
        """The whole (N, d) features of ``layer`` (``view`` k > 0: under BERT mask k, ``layer<l>_mask<k>``)."""
        if layer not in self.layers:
            raise FeatureFileError(f"{self.path}: no layer {layer}; it holds layers {self.layers}")
        if view and view >= self.masks(layer):
            raise FeatureFileError(f"{self.path}: no BERT mask {view} of layer {layer} (it holds {self.masks(layer)})")
        return self._load(feature_key(layer, view))

    @property
    def has_labels(self) -> bool:
        return "labels" in self.headers

    def labels(self) -> np.ndarray:
        if not self.has_labels:
            raise FeatureFileError(f"{self.path}: no 'labels' array; the probe needs labelled images "
                                   f"(extract from a labelled source or labelled shards)")
        return self._load("labels")

    def index(self) -> Optional[np.ndarray]:
        return self._load("index") if "index" in self.headers else None

    def close(self) -> None:
        self._zip.close()
        if self._raw_fd is not None:
            os.close(self._raw_fd)
            self._raw_fd = None

    def __enter__(self) -> "FeatureFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def newest_mtime(path: PathLike) -> float:
    """Newest modification time of ``path`` and, for a directory, of its direct entries.

    What restarts compare an output with: a checkpoint or data set replaced after the output was
    written makes it stale (feature extraction, checkpoint sweeps).
    """
    times = [os.stat(path).st_mtime]
    if os.path.isdir(path):
        with os.scandir(path) as entries:
            times += [e.stat().st_mtime for e in entries]
    return max(times)


def restart_blocker(have: dict, want: dict, written: float, inputs) -> tuple[Optional[list], Optional[str]]:
    """Why an existing output cannot be kept: (the settings keys that differ, or None; an input newer
    than ``written``, or None). The one rule of extraction's and the checkpoint sweep's restarts."""
    if have != want:
        return sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k)), None
    for path in inputs:
        if path and os.path.exists(path) and newest_mtime(path) > written:
            return None, str(path)
    return None, None


def part_path(out: PathLike, shard_index: int, num_shards: int) -> Path:
    """Where slice ``shard_index`` of ``num_shards`` writes: ``OUT.part00001-of-00004.npz`` beside ``OUT``."""
    out = Path(out)
    stem = out.name[:-4] if out.name.endswith(".npz") else out.name
    return out.with_name(f"{stem}.part{shard_index:05d}-of-{num_shards:05d}.npz")


def find_parts(out: PathLike) -> list[Path]:
    """The slice files of ``OUT`` (``OUT.partIIIII-of-NNNNN.npz``) that exist, in order."""
    out = Path(out)
    stem = out.name[:-4] if out.name.endswith(".npz") else out.name
    pattern = re.compile(re.escape(stem) + r"\.part(\d{5})-of-(\d{5})\.npz$")
    found = sorted(p for p in out.parent.glob(f"{stem}.part*-of-*.npz") if pattern.match(p.name))
    if not found:
        raise FileNotFoundError(f"no slice files {stem}.partIIIII-of-NNNNN.npz in {out.parent}; run "
                                f"extract_features.py with --shard-index i --num-shards n --out {out} first")
    return found


def merge_feature_files(parts: Sequence[PathLike], out: PathLike, chunk_rows: int = 4096) -> Path:
    """Concatenate the slices of one extraction (any order given; sorted by slice index) into ``out``.

    Checks that every slice of ``num_shards`` is there exactly once, and that they hold the same
    layers, widths and dtypes and come from the same extraction. Streams row chunks: memory stays bounded.
    """
    files = [FeatureFile(p) for p in parts]
    try:
        if not files:
            raise ValueError("merge: no slice files given")
        for f in files:
            if "slice" not in f.meta:
                raise FeatureFileError(f"{f.path}: not a slice of a sharded extraction (no slice information "
                                       f"in its meta); only --shard-index/--num-shards outputs merge")
        files.sort(key=lambda f: f.meta["slice"]["shard_index"])
        first = files[0]
        n = first.meta["slice"]["num_shards"]
        got = [f.meta["slice"]["shard_index"] for f in files]
        if got != list(range(n)) or any(f.meta["slice"]["num_shards"] != n for f in files):
            raise FeatureFileError(f"merge: expected slices 0..{n - 1} of {n} exactly once, got slice indices {got} "
                                   f"(of {sorted({f.meta['slice']['num_shards'] for f in files})}) from "
                                   f"{[f.path for f in files]}")
        names = {k: v for k, v in first.headers.items() if k != "meta"}
        for f in files[1:]:
            other = {k: (v[0][1:], v[1]) for k, v in f.headers.items() if k != "meta"}
            mine = {k: (v[0][1:], v[1]) for k, v in names.items()}
            if other != mine:
                raise FeatureFileError(f"merge: {f.path} holds {sorted(other.items())}, {first.path} holds "
                                       f"{sorted(mine.items())}: slices of different extractions")
            keys = ("source", "layers", "checkpoint", "kind", "total")
            diff = {k: (first.meta.get(k), f.meta.get(k)) for k in keys if first.meta.get(k) != f.meta.get(k)}
            if diff:
                raise FeatureFileError(f"merge: {f.path} and {first.path} come from different extractions: {diff}")
        total = sum(f.num_rows for f in files)
        if total != first.meta.get("total", total):
            raise FeatureFileError(f"merge: slices hold {total} rows, the extraction had {first.meta['total']}")
        arrays = {k: ((total, *shape[1:]), dtype) for k, (shape, dtype) in names.items()}
        meta = {k: v for k, v in first.meta.items() if k != "slice"}
        meta["merged_from"] = len(files)
        with FeatureWriter(out, arrays) as writer:
            offset = 0
            for f in files:
                for name in names:
                    row = offset
                    for chunk in _member_rows(f._zip, f"{name}.npy", chunk_rows):
                        writer.write(row, {name: chunk})
                        row += len(chunk)
                offset += f.num_rows
            return writer.finish(meta)
    finally:
        for f in files:
            f.close()

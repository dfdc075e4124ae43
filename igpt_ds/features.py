"""Per-layer image representations: f^l = mean over positions of norm(h^l) (Chen et al. 2020, Sec. 3.4).

    model, cfg, palette = igpt_ds.load_pretrained("runs/tiny/export")
    layers = parse_layers("all", cfg.n_layer)                    # [0, 1, ..., L]
    feats = pooled_features(model, tokens, layers)                # {l: float32 [b, d]}

Definitions (the contract of ``tools/extract_features.py`` and its ``.npz`` files):

- ``h^0`` is the embedding output (token + position, after the AR start-of-sequence shift or the
  BERT mask), ``h^l`` the residual stream after block l (``IGPTModel.hidden_states``), l = 1..L.
- ``norm`` is the PARAMETER-FREE normalisation of the model's own kind, over the channel dim:
  ``layernorm`` models: ``(h - mean(h)) / sqrt(var(h) + eps)`` (LayerNorm without gain or bias);
  ``rmsnorm`` models (the released OpenAI / HF checkpoints): ``h / sqrt(mean(h^2) + eps)``;
  ``eps`` is the model's ``norm_eps``. No learned gain is applied: h^l has no norm of its own
  (each block's ln_1 / the final ln_f belong to what reads h^l), and a per-channel gain and bias
  are exactly undone by the probe's per-feature standardisation anyway.
- ``f^l = mean_t norm(h^l)_t`` over all ``resolution**2`` positions, computed in float32 whatever
  the model's dtype.
- AR models see the SOS shift they were trained with (inside the model: position t holds pixels
  before t). BERT models: pass k of K draws a fresh i.i.d. mask (p = ``cfg.bert_mask_prob``,
  masked content embeddings zeroed, as in training), and ``f^l = (1/K) sum_k mean_t norm(h^l_k)``:
  features are averaged over the K masks (the paper's ensemble of 5; the mean pools over every
  position, masked or not). Image i's masks depend only on (seed, i, k), so the features do not
  depend on the batch size or on how the data is split across processes. K = 0 feeds the
  unmasked image.

Feature files (``.npz``, uncompressed, readable with ``np.load``):

    layer<l>   (N, d) float32 or float16, one per extracted layer
    labels     (N,) int64, -1 where the source has no labels
    index      (N,) int64, each row's position in the full source (or shard set) order
    meta       0-d unicode array holding JSON: what was extracted from what (see ``extract``)

They are written streaming (per-array ``.npy`` memory maps in a temporary directory beside the
output, packed into the ``.npz`` at the end) and atomically (a temporary name, then a rename).
A slice ``i`` of ``n`` (``shard_index``, ``num_shards``) covers rows ``[i*N//n, (i+1)*N//n)``;
:func:`merge_feature_files` concatenates the slices of one extraction in order.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig

PathLike = Union[str, os.PathLike]
FORMAT = "igpt-ds-features"
VERSION = 1
LAYER_KEY = re.compile(r"^layer(\d+)$")
OUT_DTYPES = {"float32": np.float32, "float16": np.float16}


class FeatureFileError(ValueError):
    """A feature file that cannot be used as asked. The message names the file and the fix."""


# ---------------------------------------------------------------------------------------------
# Layers and the feature definition
# ---------------------------------------------------------------------------------------------

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


def feature_norm(h: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Parameter-free norm of the model's kind over the last dim, in float32 (see the module docstring)."""
    h = h.float()
    if cfg.norm == "rmsnorm":
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
    return F.layer_norm(h, (h.shape[-1],), eps=cfg.norm_eps)


@torch.no_grad()
def pooled_features(model, tokens: torch.Tensor, layers: Sequence[int],
                    mask: Optional[torch.Tensor] = None) -> dict[int, torch.Tensor]:
    """``{l: f^l}`` float32 [b, d] of one forward pass over ``tokens`` [b, s] (``mask`` for BERT).

    Runs the blocks only up to the deepest requested layer, pooling each as it passes, so the
    full stack of hidden states is never held. Equal to pooling ``model.hidden_states(tokens, mask)``.
    """
    cfg = model.cfg
    if model.check_inputs:
        model.validate_inputs(tokens, mask)
    wanted, deepest = set(layers), max(layers)
    h = model.embed(tokens, mask)  # h^0 [b, s, d]
    out = {0: feature_norm(h, cfg).mean(1)} if 0 in wanted else {}
    for i, block in enumerate(model.blocks[:deepest]):
        h = block(h)  # h^{i+1}
        if i + 1 in wanted:
            out[i + 1] = feature_norm(h, cfg).mean(1)
    return out


def image_masks(indices: Sequence[int], passes: int, seq_len: int, prob: float, seed: int) -> torch.Tensor:
    """Bool [passes, b, seq_len]: BERT masks of each image, a function of (seed, image index, pass) only."""
    from .objectives import bert_mask

    masks = []
    for index in indices:
        state = np.random.SeedSequence([seed, int(index)]).generate_state(2)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        masks.append(bert_mask((passes, seq_len), prob, gen))  # [passes, s]
    return torch.stack(masks, dim=1)


@torch.no_grad()
def batch_features(model, tokens: torch.Tensor, layers: Sequence[int], indices: Sequence[int],
                   bert_masks: int = 5, seed: int = 0) -> dict[int, torch.Tensor]:
    """``{l: f^l}`` float32 [b, d]; for BERT models averaged over ``bert_masks`` masked passes.

    ``indices`` are the images' positions in the whole data set (they seed the BERT masks).
    """
    cfg = model.cfg
    if cfg.objective != "bert" or bert_masks == 0:
        return pooled_features(model, tokens, layers)
    masks = image_masks(indices, bert_masks, tokens.shape[1], cfg.bert_mask_prob, seed).to(tokens.device)
    total: dict[int, torch.Tensor] = {}
    for k in range(bert_masks):
        for layer, f in pooled_features(model, tokens, layers, masks[k]).items():
            total[layer] = f if k == 0 else total[layer] + f
    return {layer: f / bert_masks for layer, f in total.items()}


# ---------------------------------------------------------------------------------------------
# The palette a model was trained with
# ---------------------------------------------------------------------------------------------

def recorded_palette_sha256(checkpoint: PathLike) -> Optional[str]:
    """The palette SHA-256 a checkpoint directory records (None when it records none).

    Consolidated exports: ``config.json`` ``palette_sha256``; DeepSpeed run directories (``latest``
    + ``<tag>/igpt_meta.json``, or a ``global_stepN`` directory itself): ``palette_sha256`` of the
    meta. Hugging Face directories carry the palette itself, which ``load_pretrained`` returns.
    """
    path = Path(checkpoint)
    candidates = [path / "config.json", path / "igpt_meta.json"]
    if (path / "latest").is_file():
        candidates.append(path / (path / "latest").read_text().strip() / "igpt_meta.json")
    for file in candidates:
        if file.is_file():
            try:
                value = json.loads(file.read_text()).get("palette_sha256")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                continue
            if value:
                return str(value)
    return None


def resolve_palette(checkpoint: str, carried: Optional[np.ndarray], recorded: Optional[str],
                    palette_file: Optional[str], vocab_size: int) -> tuple[Optional[np.ndarray], Optional[str], str]:
    """``(palette, sha256, how)``: the palette to quantize with, checked against what the checkpoint holds.

    ``carried``: the palette the checkpoint carries (``load_pretrained``), ``recorded``: the hash
    it records. ``palette_file`` (``--palette``) must agree with both. Raises ValueError naming
    both hashes when a checkpoint and a palette do not belong together.
    """
    from .palette import load_palette, palette_sha256

    carried_hash = palette_sha256(carried) if carried is not None else None
    if carried_hash and recorded and carried_hash != recorded:
        raise ValueError(f"{checkpoint}: its palette (sha256 {carried_hash[:16]}...) is not the one its config "
                         f"records ({recorded[:16]}...); the checkpoint is inconsistent")
    expected = carried_hash or recorded
    if palette_file is None:
        if carried is None:
            raise ValueError(f"{checkpoint} carries no palette; pass --palette FILE (the palette.npy the model "
                             f"was trained with{'; its sha256 must be ' + recorded[:16] + '...' if recorded else ''})")
        return carried, carried_hash, "carried by the checkpoint"
    palette = load_palette(palette_file, clusters=None)
    got = palette_sha256(palette)
    if len(palette) != vocab_size:
        raise ValueError(f"--palette {palette_file} has {len(palette)} colours but the model {vocab_size} tokens: "
                         f"they do not belong together")
    if expected is not None and got != expected:
        raise ValueError(f"--palette {palette_file} (sha256 {got[:16]}...) is not the palette {checkpoint} was "
                         f"trained with (sha256 {expected[:16]}...): tokens from another palette are other colours. "
                         f"Use the palette.npy of the training run" + (" or leave out --palette (the checkpoint "
                         f"carries its own)" if carried is not None else ""))
    how = "--palette, matches the checkpoint's" if expected else "--palette (the checkpoint records none: unchecked)"
    return palette, got, how


# ---------------------------------------------------------------------------------------------
# Data: token batches of a slice of an image source or a shard set
# ---------------------------------------------------------------------------------------------

def slice_range(total: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of slice ``shard_index`` of ``num_shards`` (contiguous, sizes differ by <= 1)."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index {shard_index} must lie in 0..{num_shards - 1} (--num-shards {num_shards})")
    return total * shard_index // num_shards, total * (shard_index + 1) // num_shards


class _ResizedImages(torch.utils.data.Dataset):
    """Images ``start..end`` of a source, centre-cropped and resized to the model resolution."""

    def __init__(self, source, start: int, end: int, resolution: int):
        self.source, self.start, self.end, self.resolution = source, start, end, resolution

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i: int):
        from .shards import resize_view  # the evaluation transform the shards are built with

        index = self.start + i
        image, label = self.source[index]
        image = resize_view(np.asarray(image, dtype=np.uint8), self.resolution, "center")
        return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)), int(label), index


def source_batches(source, palette: np.ndarray, resolution: int, start: int, end: int, batch_size: int,
                   num_workers: int = 0, device: Union[str, torch.device] = "cpu") -> Iterator[dict]:
    """Batches ``{"tokens" [b, r*r] on device, "labels", "index"}`` of images ``start..end`` of an image source.

    Resizing happens in ``num_workers`` DataLoader workers, quantization (``palette.quantize``,
    the one quantizer of the project) on ``device``.
    """
    from .palette import quantize

    loader = torch.utils.data.DataLoader(_ResizedImages(source, start, end, resolution), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers)
    for images, labels, index in loader:
        tokens = quantize(images.to(device), palette, device=device)
        yield {"tokens": tokens, "labels": labels.numpy(), "index": index.numpy()}


def shard_batches(specs, seq_len: int, vocab_size: int, start: int, end: int, batch_size: int,
                  device: Union[str, torch.device] = "cpu") -> Iterator[dict]:
    """Batches of samples ``start..end`` of a shard set read in manifest order (no shuffling)."""
    from .data import read_shard

    def samples():
        offset = 0
        for spec in specs:
            lo, hi = max(start, offset), min(end, offset + spec.samples)
            if lo < hi:
                for k, (_, tokens, label) in enumerate(read_shard(spec, lo - offset, hi - offset, seq_len, vocab_size)):
                    yield lo + k, tokens, label
            offset += spec.samples

    batch: list = []
    for sample in samples():
        batch.append(sample)
        if len(batch) == batch_size:
            yield _stack(batch, device)
            batch = []
    if batch:
        yield _stack(batch, device)


def _stack(batch: list, device) -> dict:
    return {"tokens": torch.from_numpy(np.stack([t for _, t, _ in batch])).to(device),
            "labels": np.array([label for _, _, label in batch], dtype=np.int64),
            "index": np.array([i for i, _, _ in batch], dtype=np.int64)}


# ---------------------------------------------------------------------------------------------
# Feature files: streaming, atomic writing; lazy reading; merging slices
# ---------------------------------------------------------------------------------------------

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
        packed = self.tmp / "packed.npz"
        with zipfile.ZipFile(packed, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name in names:
                zf.write(self.tmp / f"{name}.npy", arcname=f"{name}.npy")  # streamed in chunks
                os.unlink(self.tmp / f"{name}.npy")
            with zf.open("meta.npy", "w") as f:
                np.save(f, np.array(json.dumps(meta, sort_keys=True)))
        os.replace(packed, self.out)
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
        self.meta = json.loads(str(self._load("meta"))) if "meta" in self.headers else {}

    def _load(self, name: str) -> np.ndarray:
        with self._zip.open(f"{name}.npy") as f:
            return np.lib.format.read_array(f, allow_pickle=False)

    def width(self, layer: int) -> int:
        return self.headers[f"layer{layer}"][0][1]

    def layer(self, layer: int) -> np.ndarray:
        if layer not in self.layers:
            raise FeatureFileError(f"{self.path}: no layer {layer}; it holds layers {self.layers}")
        return self._load(f"layer{layer}")

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

    def __enter__(self) -> "FeatureFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

@dataclass
class Extraction:
    """What :func:`extract` writes into one feature file, and how to compute each batch's rows."""

    layers: list[int]
    widths: dict[int, int]
    total: int
    """Rows in the whole data set (all slices)."""
    start: int
    end: int
    meta: dict


def extract(batches: Iterable[dict], compute, ex: Extraction, out: PathLike, dtype_out: str = "float32",
            progress: bool = True, num_batches: Optional[int] = None) -> Path:
    """Write the features of ``batches`` (rows ``ex.start..ex.end``) to ``out``, streaming and atomically.

    ``compute(batch) -> {layer: float32 tensor [b, d]}``. Rows land at ``batch["index"] - ex.start``.
    """
    if dtype_out not in OUT_DTYPES:
        raise ValueError(f"dtype_out={dtype_out!r}: choose one of {sorted(OUT_DTYPES)}")
    n, np_dtype = ex.end - ex.start, OUT_DTYPES[dtype_out]
    arrays = {f"layer{l}": ((n, ex.widths[l]), np_dtype) for l in ex.layers}
    arrays.update(labels=((n,), np.int64), index=((n,), np.int64))
    from tqdm import tqdm

    with FeatureWriter(out, arrays) as writer:
        for batch in tqdm(batches, total=num_batches, disable=not progress, desc="features", unit="batch"):
            feats = compute(batch)
            row = int(batch["index"][0]) - ex.start
            values = {f"layer{l}": feats[l].cpu().numpy().astype(np_dtype) for l in ex.layers}
            values.update(labels=np.asarray(batch["labels"], np.int64), index=np.asarray(batch["index"], np.int64))
            writer.write(row, values)
        meta = dict(ex.meta, format=FORMAT, version=VERSION, layers=ex.layers, total=ex.total,
                    num_rows=n, dtype=dtype_out)
        return writer.finish(meta)

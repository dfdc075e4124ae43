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
  masked content embeddings zeroed, as in training). ``bert_eval="average"``:
  ``f^l = (1/K) sum_k mean_t norm(h^l_k)``, the features averaged over the K masks (the mean pools
  over every position, masked or not). ``bert_eval="vote"`` keeps the K per-mask features apart
  (``layer<l>`` = mask 0, ``layer<l>_mask<k>`` = mask k) for the paper's modal vote (Sec. 4.6: "5
  independent masks for each input ... the modal prediction"); ``layer<l>`` alone is the paper's
  single-mask feature. Mask k of image i is drawn from its own generator seeded by (seed, i, k)
  only, so it does not depend on K, the batch size or how the data is split across processes.
  K = 0 feeds the unmasked image.

Feature files (``layer<l>`` (N, d), ``labels``, ``index``, ``meta``; streaming, atomic, slices and
merging) are defined in :mod:`igpt_ds.evaluate.feature_files`; the names are re-exported here.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from igpt_ds.checkpoint.run import find_checkpoint
from igpt_ds.config import ModelConfig
from igpt_ds.data.shards import resize_view  # the evaluation transform the shards are built with
from igpt_ds.data.tokens import read_shard
from igpt_ds.evaluate.feature_files import (  # noqa: F401 (re-exported)
    FORMAT,
    OUT_DTYPES,
    VERSION,
    FeatureFile,
    FeatureFileError,
    FeatureWriter,
    PathLike,
    feature_key,
    find_parts,
    merge_feature_files,
    parse_layers,
    part_path,
)
from igpt_ds.model.losses import bert_mask
from igpt_ds.palette import load_palette, palette_sha256, quantize
from igpt_ds.parallel import signals

# ---------------------------------------------------------------------------------------------
# The feature definition
# ---------------------------------------------------------------------------------------------

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
    """Bool [passes, b, seq_len]: BERT masks; mask k of image i is a function of (seed, i, k) only.

    One generator per (image, mask): mask k is the same whatever the number of passes (a single
    (passes, s) draw would tie mask k to the rows before it through ``bert_mask``'s fix-up draws).
    """
    masks = []
    for index in indices:
        rows = []
        for k in range(passes):
            state = np.random.SeedSequence([seed, int(index), k]).generate_state(2)
            gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            rows.append(bert_mask((1, seq_len), prob, gen)[0])
        masks.append(torch.stack(rows) if rows else torch.zeros(0, seq_len, dtype=torch.bool))
    return torch.stack(masks, dim=1)


@torch.no_grad()
def mask_features(model, tokens: torch.Tensor, layers: Sequence[int], indices: Sequence[int],
                  bert_masks: int, seed: int = 0) -> list[dict[int, torch.Tensor]]:
    """``[{l: f^l}]``: float32 [b, d] features of a BERT model under each of ``bert_masks`` masks.

    ``indices`` are the images' positions in the whole data set (they seed the masks).
    """
    if model.cfg.objective != "bert" or bert_masks < 1:
        raise ValueError(f"mask_features needs a BERT model and bert_masks >= 1 (got objective "
                         f"{model.cfg.objective!r}, bert_masks={bert_masks})")
    masks = image_masks(indices, bert_masks, tokens.shape[1], model.cfg.bert_mask_prob, seed).to(tokens.device)
    return [pooled_features(model, tokens, layers, masks[k]) for k in range(bert_masks)]


@torch.no_grad()
def batch_features(model, tokens: torch.Tensor, layers: Sequence[int], indices: Sequence[int],
                   bert_masks: int = 5, seed: int = 0) -> dict[int, torch.Tensor]:
    """``{l: f^l}`` float32 [b, d]; for BERT models averaged over ``bert_masks`` masked passes.

    ``indices`` are the images' positions in the whole data set (they seed the BERT masks).
    """
    if model.cfg.objective != "bert" or bert_masks == 0:
        return pooled_features(model, tokens, layers)
    per_mask = mask_features(model, tokens, layers, indices, bert_masks, seed)
    total = dict(per_mask[0])
    for feats in per_mask[1:]:
        for layer, f in feats.items():
            total[layer] = total[layer] + f
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
    found = find_checkpoint(path)  # a DeepSpeed run directory or tag directory
    if found is not None:
        return found[2].get("palette_sha256") or None
    config = path / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text()).get("palette_sha256")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
        return str(value) if value else None
    return None


def resolve_palette(checkpoint: str, carried: Optional[np.ndarray], recorded: Optional[str],
                    palette_file: Optional[str], vocab_size: int) -> tuple[Optional[np.ndarray], Optional[str], str]:
    """``(palette, sha256, how)``: the palette to quantize with, checked against what the checkpoint holds.

    ``carried``: the palette the checkpoint carries (``load_pretrained``), ``recorded``: the hash
    it records. ``palette_file`` (``--palette``) must agree with both. Raises ValueError naming
    both hashes when a checkpoint and a palette do not belong together.
    """
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
                         "carries its own)" if carried is not None else ""))
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
        index = self.start + i
        image, label = self.source[index]
        image = resize_view(np.asarray(image, dtype=np.uint8), self.resolution, "center")
        return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)), int(label), index


def image_loader(source, resolution: int, start: int, end: int, batch_size: int,
                 num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Batches ``(images uint8 [b, r, r, 3], labels, index)`` of images ``start..end``, in order.

    Decoding (an image folder's JPEGs) and the centre-crop resize run in ``num_workers`` DataLoader
    worker processes (0: in this process).
    """
    return torch.utils.data.DataLoader(_ResizedImages(source, start, end, resolution), batch_size=batch_size,
                                       shuffle=False, num_workers=num_workers, worker_init_fn=signals.worker_init)


def source_batches(source, palette: np.ndarray, resolution: int, start: int, end: int, batch_size: int,
                   num_workers: int = 0, device: Union[str, torch.device] = "cpu") -> Iterator[dict]:
    """Batches ``{"tokens" [b, r*r] on device, "labels", "index"}`` of images ``start..end`` of an image source.

    Decoding and resizing happen in ``num_workers`` DataLoader workers (:func:`image_loader`),
    quantization (``palette.quantize``, the one quantizer of the project) on ``device``.
    """
    for images, labels, index in image_loader(source, resolution, start, end, batch_size, num_workers):
        tokens = quantize(images.to(device), palette, device=device)
        yield {"tokens": tokens, "labels": labels.numpy(), "index": index.numpy()}


def shard_batches(specs, seq_len: int, vocab_size: int, start: int, end: int, batch_size: int,
                  device: Union[str, torch.device] = "cpu") -> Iterator[dict]:
    """Batches of samples ``start..end`` of a shard set read in manifest order (no shuffling)."""
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
# Extraction
# ---------------------------------------------------------------------------------------------

IMAGENET_SIZED = 100_000
"""Images in a source (the whole split, all slices) from which ``auto`` picks ImageNet-sized defaults."""
FLOAT16_ABOVE_BYTES = 16 * 2**30
"""``--dtype-out auto``: float16 also when the float32 features of the whole extraction would exceed this."""


def resolve_layers(spec: str, n_layer: int, total: int) -> tuple[list[int], str]:
    """``(layers, why)`` for a ``--layers`` spec; ``auto``: every layer, or the middle half for ImageNet-sized data.

    The middle half is layers ``L//4 .. L - L//4`` (iGPT-L: 12..36 of 0..48): the paper finds the
    best linear-probe layer in the middle of the stack (Sec. 4.1, Fig. 3), and a contiguous range
    keeps the neighbours that ``--concat`` adds. Depends on the whole source's size, not on a
    slice's, so every slice of one extraction picks the same layers.
    """
    if str(spec).strip().lower() != "auto":
        return parse_layers(spec, n_layer), f"--layers {spec}"
    if total < IMAGENET_SIZED:
        return list(range(n_layer + 1)), f"auto: every layer, the source holding {total:,} < {IMAGENET_SIZED:,} images"
    lo, hi = n_layer // 4, n_layer - n_layer // 4
    return list(range(lo, hi + 1)), (f"auto: the middle half of 0..{n_layer}, the source holding "
                                     f"{total:,} >= {IMAGENET_SIZED:,} images")


def resolve_dtype_out(spec: str, total: int, row_values: int) -> tuple[str, str]:
    """``(dtype, why)`` for ``--dtype-out``; ``auto``: float16 for ImageNet-sized or very large outputs, else float32.

    ``row_values``: feature values per image (sum of the widths of every stored array). Decided
    on the whole extraction (``total`` rows), so every slice stores the same dtype.
    """
    if spec != "auto":
        if spec not in OUT_DTYPES:
            raise ValueError(f"--dtype-out {spec!r}: choose auto, {', '.join(sorted(OUT_DTYPES))}")
        return spec, f"--dtype-out {spec}"
    fp32 = total * row_values * 4
    if total >= IMAGENET_SIZED:
        return "float16", f"auto: the source holds {total:,} >= {IMAGENET_SIZED:,} images"
    if fp32 > FLOAT16_ABOVE_BYTES:
        return "float16", (f"auto: float32 features of all {total:,} images would take "
                           f"{human_bytes(fp32)} > {human_bytes(FLOAT16_ABOVE_BYTES)}")
    return "float32", (f"auto: {total:,} < {IMAGENET_SIZED:,} images and {human_bytes(fp32)} "
                       f"<= {human_bytes(FLOAT16_ABOVE_BYTES)} in float32")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


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
    masks: int = 1
    """Feature arrays per layer: 1, or K for a BERT vote file (``layer<l>`` and ``layer<l>_mask<k>``, k < K)."""

    def arrays(self) -> dict[str, int]:
        """``{array name: width}`` of the feature arrays, in the order they are stored."""
        return {feature_key(l, k): self.widths[l] for l in self.layers for k in range(self.masks)}

    def projected_bytes(self, dtype_out: str) -> tuple[int, int]:
        """``(file bytes, largest array bytes)`` of this slice's output in ``dtype_out``.

        Features (rows x width x itemsize per array), ``labels`` and ``index`` (int64) and each
        member's ``.npy`` header (at most 4 KiB with the zip entry; the arrays dominate).
        """
        rows, size = self.end - self.start, np.dtype(OUT_DTYPES[dtype_out]).itemsize
        arrays = [rows * w * size for w in self.arrays().values()] + [rows * 8, rows * 8]
        return sum(arrays) + 4096 * (len(arrays) + 1), max(arrays)


def free_bytes(path: PathLike) -> int:
    """Free bytes on the file system of ``path`` (its nearest existing parent directory)."""
    p = Path(path).absolute().parent
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(out: PathLike, file_bytes: int, largest_bytes: int, free: int, dtype_out: str,
                     masks: int = 1) -> int:
    """Refuse (ValueError) an output that does not fit in ``free`` bytes; returns the bytes needed.

    The writer fills memory-mapped ``.npy`` files beside ``out`` and packs them into the ``.npz``
    one array at a time, deleting each once packed, so the peak is the file plus its largest array.
    """
    need = file_bytes + largest_bytes
    if need <= free:
        return need
    fixes = []
    if dtype_out != "float16":
        fixes.append("--dtype-out float16 (half the size)")
    fixes.append("fewer --layers (e.g. --layers middle, or a range a-b)")
    if masks > 1:
        fixes.append(f"--bert-eval average (one array per layer instead of {masks})")
    fixes.append("--out on a disk with more free space")
    where = Path(out).absolute().parent
    raise ValueError(f"{out}: the features need {human_bytes(need)} of disk ({human_bytes(file_bytes)} for the file "
                     f"plus {human_bytes(largest_bytes)} while its largest array is packed), but {where} has "
                     f"{human_bytes(free)} free. Use " + ", or ".join(fixes))


def extract(batches: Iterable[dict], compute, ex: Extraction, out: PathLike, dtype_out: str = "float32",
            progress: bool = True, num_batches: Optional[int] = None) -> Path:
    """Write the features of ``batches`` (rows ``ex.start..ex.end``) to ``out``, streaming and atomically.

    ``compute(batch) -> {array name: float32 tensor [b, d]}`` for every name of ``ex.arrays()``.
    Rows land at ``batch["index"] - ex.start``.
    """
    if dtype_out not in OUT_DTYPES:
        raise ValueError(f"dtype_out={dtype_out!r}: choose one of {sorted(OUT_DTYPES)}")
    n, np_dtype = ex.end - ex.start, OUT_DTYPES[dtype_out]
    names = ex.arrays()
    arrays = {name: ((n, width), np_dtype) for name, width in names.items()}
    arrays.update(labels=((n,), np.int64), index=((n,), np.int64))
    with FeatureWriter(out, arrays) as writer:
        for batch in tqdm(batches, total=num_batches, disable=not progress, desc="features", unit="batch"):
            feats = compute(batch)
            row = int(batch["index"][0]) - ex.start
            values = {name: feats[name].cpu().numpy().astype(np_dtype) for name in names}
            values.update(labels=np.asarray(batch["labels"], np.int64), index=np.asarray(batch["index"], np.int64))
            writer.write(row, values)
        meta = dict(ex.meta, format=FORMAT, version=VERSION, layers=ex.layers, total=ex.total,
                    num_rows=n, dtype=dtype_out)
        return writer.finish(meta)

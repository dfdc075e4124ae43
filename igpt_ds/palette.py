"""The 512-colour palette: loading, saving, fitting (k-means) and pixel <-> token conversion.

A palette is a float32 array (K, 3) of RGB centres in [-1, 1], the format of OpenAI's
``kmeans_centers.npy`` (K = 512). A pixel x in 0..255 maps to x/127.5 - 1 and its token is the
index of the nearest palette row by squared Euclidean distance (DESIGN.md, "Pixels and palette").

:func:`quantize` is the one quantizer every tool uses. It gives token for token what Hugging Face's
``ImageGPTImageProcessor`` gives, because it performs the same float32 arithmetic in the same
order: the pixel scaling ``float32(x * (1/255))``, then ``(v - 0.5) / 0.5``; the distance
``(|a|^2 - 2 a.b) + |b|^2``; ``argmin`` taking the first index on ties. Only the execution
differs (torch, batched, chunked, on GPU when asked), which is where the speed comes from.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional, Union

import numpy as np
import torch

from igpt_ds.checkpoint.atomic import atomic_file
from igpt_ds.config import NUM_COLORS

Device = Union[str, torch.device, None]

# Normalised value of each 8-bit level, computed exactly as HF's rescale + normalize do it
# (float64 multiply, cast to float32, then float32 subtract/divide). Equal to x/127.5 - 1 within
# one float32 ulp; using HF's rounding is what makes near-tie pixels get HF's token.
_LEVELS = ((np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
           - np.float32(0.5)) / np.float32(0.5)


def pixel_levels() -> np.ndarray:
    """The 256 float32 values in [-1, 1] that the 8-bit levels 0..255 map to."""
    return _LEVELS.copy()


def _check_palette(palette: np.ndarray, source: str, clusters: Optional[int]) -> np.ndarray:
    fix = ("a palette is a float array of shape (K, 3) with values in [-1, 1] "
           "(OpenAI's kmeans_centers.npy format); make one with tools/make_palette.py")
    palette = np.asarray(palette)
    if not np.issubdtype(palette.dtype, np.floating):
        raise ValueError(f"{source}: palette dtype is {palette.dtype}, expected float32; {fix}")
    if palette.ndim != 2 or palette.shape[1] != 3 or (clusters is not None and palette.shape[0] != clusters):
        want = f"({clusters}, 3)" if clusters is not None else "(K, 3)"
        raise ValueError(f"{source}: palette shape is {palette.shape}, expected {want}; {fix}")
    if not 1 <= palette.shape[0] <= 65536:
        raise ValueError(f"{source}: palette has {palette.shape[0]} colours; tokens are uint16, "
                         f"so 1..65536 are allowed")
    if not np.all(np.isfinite(palette)) or palette.min() < -1.0 - 1e-6 or palette.max() > 1.0 + 1e-6:
        raise ValueError(f"{source}: palette values must be finite and lie in [-1, 1] "
                         f"(found min {np.nanmin(palette):.4g}, max {np.nanmax(palette):.4g}); "
                         f"values in 0..255 need x/127.5 - 1; {fix}")
    return np.ascontiguousarray(palette, dtype=np.float32)


def check_palette(palette, source: str, clusters: Optional[int] = None) -> np.ndarray:
    """``palette`` as float32 (clusters, 3), or ValueError starting with ``source`` (shape, dtype, range)."""
    return _check_palette(palette, source, clusters)


def load_palette(path: Union[str, os.PathLike], clusters: Optional[int] = NUM_COLORS) -> np.ndarray:
    """Load a palette ``.npy`` as float32 (clusters, 3). ``clusters=None`` accepts any K.

    Raises ValueError naming the file when the array has the wrong shape, dtype or range.
    """
    path = os.fspath(path)
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"palette file {path} not found; make one with "
                                f"`python tools/make_palette.py --data DATA --out {path}`") from None
    except ValueError as e:
        raise ValueError(f"{path}: not a readable .npy palette ({e})") from None
    return _check_palette(array, path, clusters)


def save_palette(path: Union[str, os.PathLike], palette: np.ndarray) -> None:
    """Write ``palette`` as a float32 .npy atomically (a temporary name, then a rename)."""
    path = os.fspath(path)
    palette = _check_palette(palette, path, clusters=None)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # a file object, so np.save writes exactly ``path`` even when it does not end in .npy
    with atomic_file(path, mode=0o644) as tmp, open(tmp, "wb") as f:
        np.save(f, palette)


def palette_sha256(palette: np.ndarray) -> str:
    """SHA-256 hex digest of the palette as float32 little-endian C-order bytes.

    Independent of how the .npy file was written (header, dtype); manifests and checkpoints
    record this to tie tokens to the palette that made them.
    """
    return hashlib.sha256(np.ascontiguousarray(palette, dtype="<f4").tobytes()).hexdigest()


def _device(device: Device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _nearest(points: torch.Tensor, centres: torch.Tensor, centres_sq: torch.Tensor) -> torch.Tensor:
    """argmin_j of (|p|^2 - 2 p.c_j) + |c_j|^2 for float32 points (P, 3): int64 (P,).

    The sums are spelled out so their rounding is numpy's (HF's): |p|^2 = (p0^2 + p1^2) + p2^2.
    """
    p_sq = (points[:, 0] * points[:, 0] + points[:, 1] * points[:, 1]) + points[:, 2] * points[:, 2]
    dist = torch.mm(points, centres.T)  # (P, K); TF32 is off (see quantize), so this is exact sgemm
    dist.mul_(-2.0).add_(p_sq[:, None]).add_(centres_sq[None, :])
    return dist.argmin(dim=1)  # first index on ties, like numpy


def _centres_sq(centres: torch.Tensor) -> torch.Tensor:
    return (centres[:, 0] * centres[:, 0] + centres[:, 1] * centres[:, 1]) + centres[:, 2] * centres[:, 2]


def quantize(images, palette: np.ndarray, *, device: Device = None, chunk_pixels: Optional[int] = None,
             cpu_threads: Optional[int] = 1) -> Union[np.ndarray, torch.Tensor]:
    """Tokens of uint8 RGB images: (N, H, W, 3) -> int64 (N, H*W), raster order.

    ``images`` may be a numpy array (the result is a numpy array) or a torch tensor (the result
    is a tensor on ``images``' device). ``device`` picks where the arithmetic runs: ``None``
    means CUDA when available, else CPU. Work is done ``chunk_pixels`` pixels at a time, so
    memory stays bounded (chunk_pixels x K x 4 bytes for the distance block, plus a few bytes
    per input pixel for the distinct-colour index). The default, 4096 on CPU (the block stays
    in cache: ~3x faster than 64K here) and 1M on GPU, is fast.

    ``cpu_threads``: torch threads for the call on CPU (restored afterwards; None keeps torch's
    setting). Default 1: the blocks are too small for intra-op threads to pay, and on a busy
    machine they stall each other (2 threads ran 10x slower than 1 on a loaded 2-core host).
    Scale out with processes instead (``build_shards.py --workers``).
    """
    as_numpy = not isinstance(images, torch.Tensor)
    tensor = torch.from_numpy(np.ascontiguousarray(images)) if as_numpy else images
    if tensor.dtype != torch.uint8 or tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"quantize expects uint8 images of shape (N, H, W, 3), "
                         f"got {tuple(tensor.shape)} {tensor.dtype}")
    n, h, w, _ = tensor.shape
    dev = _device(device)
    chunk_pixels = chunk_pixels or (1 << 20 if dev.type == "cuda" else 1 << 12)
    centres = torch.from_numpy(_check_palette(palette, "quantize", None)).to(dev)
    centres_sq = _centres_sq(centres)
    levels = torch.from_numpy(_LEVELS).to(dev)
    # TF32 would round the matmul inputs to 10 bits and change tokens; force full fp32.
    with _full_fp32_matmul(), _cpu_threads(cpu_threads if dev.type == "cpu" else None):
        # A token depends only on the colour: compute it once per distinct colour (natural images
        # repeat colours: 5.2M CIFAR pixels hold 1.7M colours), then scatter back.
        rgb = tensor.reshape(-1, 3).to(dev).int()
        colours, inverse = torch.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2], return_inverse=True)
        del rgb
        tokens = torch.empty(colours.shape[0], dtype=torch.int64, device=dev)
        for start in range(0, colours.shape[0], chunk_pixels):
            code = colours[start:start + chunk_pixels]
            pixels = torch.stack([code >> 16, (code >> 8) & 255, code & 255], dim=1)
            tokens[start:start + chunk_pixels] = _nearest(levels[pixels], centres, centres_sq)
        out = tokens[inverse].reshape(n, h * w)
    if as_numpy:
        return out.cpu().numpy()
    return out.to(images.device)


class _cpu_threads:
    def __init__(self, threads: Optional[int]):
        self.threads = threads

    def __enter__(self):
        self._saved = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc):
        if self.threads:
            torch.set_num_threads(self._saved)


class _full_fp32_matmul:
    def __enter__(self):
        self._saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self._saved


def dequantize(tokens, palette: np.ndarray, side: Optional[int] = None) -> np.ndarray:
    """uint8 RGB images (N, H, W, 3) from tokens (N, H, W), or (N, H*W) with H = ``side``
    (default: square images). Each token becomes its palette colour, (c + 1) * 127.5 rounded."""
    tokens = tokens.cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    palette = _check_palette(palette, "dequantize", None)
    if tokens.ndim == 2:
        side = side or int(round(tokens.shape[1] ** 0.5))
        if side < 1 or tokens.shape[1] % side:
            raise ValueError(f"dequantize: {tokens.shape[1]} tokens per image do not make rows of "
                             f"{side}; pass side= (the image height)")
        tokens = tokens.reshape(tokens.shape[0], side, tokens.shape[1] // side)
    if tokens.ndim != 3:
        raise ValueError(f"dequantize expects tokens (N, H*W) or (N, H, W), got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= len(palette)):
        raise ValueError(f"dequantize: token ids must lie in 0..{len(palette) - 1}, "
                         f"found {tokens.min()}..{tokens.max()}")
    rgb = (palette[tokens].astype(np.float64) + 1.0) * 127.5
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def fit_palette(pixels, clusters: int = NUM_COLORS, seed: int = 0, *, iters: int = 30,
                tol: float = 1e-5, device: Device = None, chunk_pixels: Optional[int] = None,
                cpu_threads: Optional[int] = 1) -> np.ndarray:
    """k-means palette of uint8 RGB ``pixels`` (P, 3): float32 (clusters, 3) in [-1, 1].

    k-means++ initialisation, then Lloyd iterations until the largest centre move is below
    ``tol`` or ``iters`` is reached. Deterministic for a seed on a given device (a seeded
    torch.Generator drives every random choice). An empty cluster is re-seeded at the point
    farthest from its centre, so every one of ``clusters`` colours is used. ``cpu_threads`` as
    in :func:`quantize` (one thread also keeps CPU sums in a fixed order).
    """
    pixels = torch.as_tensor(np.asarray(pixels) if not isinstance(pixels, torch.Tensor) else pixels)
    if pixels.dtype != torch.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3:
        raise ValueError(f"fit_palette expects uint8 pixels of shape (P, 3), got "
                         f"{tuple(pixels.shape)} {pixels.dtype}")
    if pixels.shape[0] < clusters:
        raise ValueError(f"fit_palette: {pixels.shape[0]} pixels cannot make {clusters} clusters; "
                         f"sample more pixels")
    dev = _device(device)
    chunk_pixels = chunk_pixels or (1 << 20 if dev.type == "cuda" else 1 << 12)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with _full_fp32_matmul(), _cpu_threads(cpu_threads if dev.type == "cpu" else None):
        points = torch.from_numpy(_LEVELS)[pixels.long()].to(dev)  # (P, 3) in [-1, 1]
        centres = _kmeans_pp(points, clusters, gen, chunk_pixels)
        for _ in range(iters):
            assign, dist = _assign(points, centres, chunk_pixels)
            sums = torch.zeros_like(centres).index_add_(0, assign, points)
            counts = torch.bincount(assign, minlength=clusters).to(points.dtype)
            new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
            for j in torch.nonzero(counts == 0).flatten().tolist():
                far = int(dist.argmax())
                new[j] = points[far]
                dist[far] = 0.0
            shift = float((new - centres).abs().max())
            centres = new
            if shift < tol:
                break
    return centres.clamp(-1.0, 1.0).cpu().numpy().astype(np.float32)


def _assign(points: torch.Tensor, centres: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of every point and its squared distance."""
    c_sq = _centres_sq(centres)
    idx = torch.empty(points.shape[0], dtype=torch.int64, device=points.device)
    dist = torch.empty(points.shape[0], dtype=points.dtype, device=points.device)
    for s in range(0, points.shape[0], chunk):
        p = points[s:s + chunk]
        d = torch.mm(p, centres.T).mul_(-2.0).add_(c_sq[None, :]).add_((p * p).sum(1, keepdim=True))
        dist[s:s + chunk], idx[s:s + chunk] = d.min(dim=1)
    return idx, dist.clamp_(min=0.0)


def _kmeans_pp(points: torch.Tensor, k: int, gen: torch.Generator, chunk: int) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to D(x)^2."""
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [points[first]]
    best = ((points - points[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(best.sum())
        if total <= 0.0:  # fewer distinct colours than clusters: duplicate a point
            nxt = int(torch.randint(n, (1,), generator=gen))
        else:
            nxt = int(torch.multinomial(best.cpu().double(), 1, generator=gen))
        centres.append(points[nxt])
        best = torch.minimum(best, ((points - points[nxt]) ** 2).sum(1))
    return torch.stack(centres)

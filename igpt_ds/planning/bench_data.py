"""Measurements behind ``tools/benchmark.py data``: quantizer vs Hugging Face, loader throughput."""
from __future__ import annotations

import os
import tempfile
import time
from typing import Optional

import numpy as np

from igpt_ds.config import get_preset
from igpt_ds.data.shards import BuildSettings, build_shards, resize_view
from igpt_ds.data.sources import ImageSource, open_source
from igpt_ds.data.tokens import build_loader
from igpt_ds.palette import quantize

H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA H100 SXM datasheet, dense (no sparsity)


def load_images(source: ImageSource, count: int = 0, resolution: int = 32) -> np.ndarray:
    """The first ``count`` images (0: all) of ``source`` at ``resolution`` (centre crop), uint8 (N, R, R, 3)."""
    n = len(source) if count <= 0 else min(count, len(source))
    return np.stack([resize_view(source[i][0], resolution, "center") for i in range(n)])


def compare_quantizers(images: np.ndarray, palette: np.ndarray, device: Optional[str] = None,
                       rounds: int = 5, cpu_threads: Optional[int] = 1) -> dict:
    """Time our :func:`quantize` and HF's ImageGPTImageProcessorPil on the same images; tokens must match.

    The images are split into ``rounds`` parts, each timed with ours then HF's, so that both see
    the same machine load when other jobs share it.
    """
    # Lazy: transformers takes seconds to import and only this comparison needs it.
    from transformers.models.imagegpt.image_processing_pil_imagegpt import ImageGPTImageProcessorPil

    processor = ImageGPTImageProcessorPil(clusters=palette, do_resize=False)  # images are already at size
    quantize(images[:8], palette, device=device, cpu_threads=cpu_threads)  # warm-up
    processor(list(images[:8]), return_tensors=None)
    ours_s = hf_s = 0.0
    mismatches = 0
    for part in np.array_split(np.arange(len(images)), rounds):
        batch = images[part]
        start = time.perf_counter()
        ours = quantize(batch, palette, device=device, cpu_threads=cpu_threads)
        ours_s += time.perf_counter() - start
        start = time.perf_counter()
        hf = np.stack(processor(list(batch), return_tensors=None)["input_ids"])
        hf_s += time.perf_counter() - start
        mismatches += int((hf != ours).sum())
    tokens = images.shape[0] * images.shape[1] * images.shape[2]
    if mismatches:
        raise AssertionError(f"quantize differs from HF ImageGPTImageProcessor on {mismatches} of {tokens} tokens")
    return {"images": len(images), "ours_images_per_s": len(images) / ours_s,
            "hf_images_per_s": len(images) / hf_s, "speedup": hf_s / ours_s, "identical_tokens": tokens}


def loader_throughput(images: np.ndarray, labels: np.ndarray, palette: np.ndarray, *, batch_size: int = 64,
                      num_workers: int = 2, min_samples: int = 50_000, shard_size: int = 1000) -> dict:
    """Samples/s of :func:`build_loader` (one DP rank, ``num_workers`` workers) over shards of ``images``.

    Runs whole epochs until ``min_samples`` are read; the time includes each epoch's worker start.
    """
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(os.path.join(tmp, "bench.npz"), images=images, labels=labels)
        shard_dir = os.path.join(tmp, "shards")
        build_shards(open_source(os.path.join(tmp, "bench.npz")), shard_dir, palette,
                     BuildSettings(resolution=images.shape[1], shard_size=shard_size), progress=False,
                     log=lambda s: None)
        loader = build_loader(shard_dir, batch_size=batch_size, dp_rank=0, dp_world_size=1,
                              num_workers=num_workers)
        epochs = max(1, -(-min_samples // (loader.batches_per_epoch * batch_size)))
        loader.epochs = epochs
        samples = 0
        start = time.perf_counter()
        for batch in loader:
            samples += len(batch["keys"])
        seconds = time.perf_counter() - start
    return {"samples": samples, "epochs": epochs, "batch_size": batch_size, "num_workers": num_workers,
            "samples_per_s": samples / seconds, "shards": -(-len(images) // shard_size)}


def gpu_consumption(preset: str = "igpt-l", mfu: float = 0.5, peak_flops: float = H100_BF16_DENSE_FLOPS) -> dict:
    """Samples/s one GPU trains on: peak * MFU / (train FLOPs per token * tokens per sample)."""
    cfg = get_preset(preset)
    per_sample = cfg.train_flops_per_token() * cfg.seq_len
    return {"preset": preset, "seq_len": cfg.seq_len, "flops_per_token": cfg.train_flops_per_token(),
            "flops_per_sample": per_sample, "mfu": mfu, "peak_flops": peak_flops,
            "samples_per_s": peak_flops * mfu / per_sample}


# ---------------------------------------------------------------------------------------------
# tools/benchmark.py decode: the image-folder path of tools/extract_features.py
# ---------------------------------------------------------------------------------------------

def write_jpeg_folder(source: ImageSource, out_dir: str, count: int = 0, side: int = 256,
                      quality: int = 90) -> int:
    """An ImageNet-layout folder (one sub-folder per class) of ``source``'s first ``count`` images (0: all).

    Each image is upscaled (bicubic) to ``side`` x ``side`` and saved as a baseline JPEG of
    ``quality``: ImageNet-like decode work from real photographs. Returns the number written.
    """
    from PIL import Image

    n = len(source) if count <= 0 else min(count, len(source))
    for i in range(n):
        image, label = source[i]
        folder = os.path.join(out_dir, f"class{max(label, 0):04d}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC).save(
            os.path.join(folder, f"{i:06d}.jpg"), quality=quality)
    return n


def decode_throughput(folder: str, palette: np.ndarray, resolution: int, num_workers: int, *,
                      batch_size: int = 64, quantize_too: bool = True, device: str = "cpu") -> dict:
    """Images/s of one pass over an image folder through the feature extractor's data path.

    ``quantize_too``: :func:`igpt_ds.evaluate.features.source_batches` (decode, centre-crop resize
    in ``num_workers`` workers, then ``quantize`` on ``device`` in this process); otherwise the
    workers' decode + resize alone (:func:`~igpt_ds.evaluate.features.image_loader`), which is the
    CPU's share when quantization runs on the GPU. ``images_per_s`` is the steady rate, timed from
    the first batch's arrival (worker start-up is a one-off in an hours-long extraction);
    ``startup_s`` is the time to that first batch. ``cpu_ms_per_image``: CPU time of this process
    and its (joined) workers over the whole pass, per image: what one core must spend, unaffected
    by other jobs competing for the cores.
    """
    import resource

    from igpt_ds.evaluate.features import image_loader, source_batches

    def cpu_seconds() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    source = open_source(folder, "train")
    n = len(source)
    if n <= batch_size:
        raise ValueError(f"{folder}: {n} images are one batch of {batch_size}; use more images for a steady rate")
    cpu0, begin = cpu_seconds(), time.perf_counter()
    if quantize_too:
        sizes = (len(b["index"]) for b in source_batches(source, palette, resolution, 0, n, batch_size,
                                                         num_workers, device))
    else:
        sizes = (len(index) for _, _, index in image_loader(source, resolution, 0, n, batch_size, num_workers))
    first = next(sizes)
    start = time.perf_counter()
    seen = first + sum(sizes)
    end = time.perf_counter()
    del sizes  # the exhausted loader has joined its workers, so their CPU time is counted
    cpu = cpu_seconds() - cpu0
    if seen != n:
        raise AssertionError(f"{folder}: the loader gave {seen} of {n} images")
    return {"images": n, "startup_s": start - begin, "images_per_s": (n - first) / (end - start),
            "cpu_ms_per_image": 1000 * cpu / n, "num_workers": num_workers, "resolution": resolution,
            "quantize": quantize_too}


def extraction_consumption(preset: str, precision: str, mfu: float = 0.5, passes: int = 1,
                           gpu: str = "H100 SXM") -> dict:
    """Images/s one GPU extracts features of ``preset`` at: peak * MFU / forward FLOPs per image.

    Forward FLOPs = a third of :meth:`ModelConfig.train_flops_per_token` (2N + 4·L·d·T per token,
    every block and the head: an upper bound, the extractor stops at the deepest requested layer)
    times the sequence length, times ``passes`` (BERT: one forward per mask). Peak from
    :data:`igpt_ds.train.metrics.PEAK_TFLOPS` (fp32 is plain FP32, as extraction runs it).
    """
    from igpt_ds.train.metrics import peak_flops

    cfg = get_preset(preset)
    peak = peak_flops(precision, name=gpu)
    if peak is None:
        raise ValueError(f"no peak FLOP/s known for {gpu} at {precision} (igpt_ds.train.metrics.PEAK_TFLOPS)")
    per_image = cfg.train_flops_per_token() / 3 * cfg.seq_len * passes
    return {"preset": preset, "resolution": cfg.resolution, "precision": precision, "mfu": mfu, "passes": passes,
            "gpu": gpu, "peak_flops": peak, "flops_per_image": per_image, "images_per_s": peak * mfu / per_image}


# ---------------------------------------------------------------------------------------------
# tools/benchmark.py images: the on-the-fly image-shard path (igpt_ds.data.image_shards)
# ---------------------------------------------------------------------------------------------

def image_shard_throughput(images: np.ndarray, palette: np.ndarray, resolution: int, *, store_side: int = 0,
                           num_workers: int = 1, batch_size: int = 64, min_samples: int = 5000,
                           shard_size: int = 1000) -> dict:
    """Samples/s of :func:`build_loader` over image shards of ``images`` (random-resized crop + quantize).

    The images are stored at a shorter side of ``store_side`` (default ``2 * resolution``); whole
    epochs run until ``min_samples`` are read, without the shuffle buffer. ``samples_per_s`` is the
    steady rate, timed from the first batch (worker start-up, a one-off, is ``startup_s``);
    ``per_worker`` divides it by the worker count.
    """
    from igpt_ds.data.image_shards import build_image_shards

    store_side = store_side or 2 * resolution
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(os.path.join(tmp, "bench.npz"), images=images)
        shard_dir = os.path.join(tmp, "shards")
        build_image_shards(open_source(os.path.join(tmp, "bench.npz")), shard_dir, palette, resolution=resolution,
                           store_side=store_side, shard_size=shard_size)
        # No shuffle buffer: it would fill with 2000 samples before the first batch, so a rate timed
        # from the first batch would count work done before it; the decode work per sample is the same.
        loader = build_loader(shard_dir, batch_size=batch_size, dp_rank=0, dp_world_size=1,
                              num_workers=num_workers, expected_resolution=resolution, shuffle_buffer=0)
        loader.epochs = max(1, -(-min_samples // (loader.batches_per_epoch * batch_size)))
        begin = time.perf_counter()
        batches = iter(loader)
        first = len(next(batches)["keys"])
        start = time.perf_counter()
        samples = first + sum(len(b["keys"]) for b in batches)
        seconds = time.perf_counter() - start
    rate = (samples - first) / seconds
    return {"samples": samples, "epochs": loader.epochs, "batch_size": batch_size, "num_workers": num_workers,
            "resolution": resolution, "store_side": store_side, "startup_s": start - begin,
            "samples_per_s": rate, "per_worker": rate / max(1, num_workers)}

#!/usr/bin/env python
"""Fit the k-means colour palette (palette.npy) on a random sample of an image source's pixels.

    python tools/make_palette.py --data cifar-10-batches-py --out palette.npy
    python tools/make_palette.py --data imagenet --resolution 64 --out palette.npy

Pixels are sampled from each image as the model sees it: resized to --resolution (default 32,
tools/build_shards.py's default) with the shard builder's centre crop, so the 512 colours are spent
on the colours of downsampled images (CIFAR at 32 passes through unchanged). Pass the resolution
the shards are built at; --resolution native samples the images' own pixels instead.

Writes float32 (clusters, 3) in [-1, 1] (the format of OpenAI's kmeans_centers.npy) atomically,
then prints how well it reconstructs pixels of images it was not fitted on (MSE, 0..255 units).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from igpt_ds import quiet  # noqa: E402

quiet.install(sys.argv)  # before torch: third-party notices nobody can act on stay quiet (--verbose)

import numpy as np  # noqa: E402

from igpt_ds.data.shards import resize_view  # noqa: E402
from igpt_ds.data.sources import images_for_pixels, open_source, sample_pixels  # noqa: E402
from igpt_ds.palette import dequantize, fit_palette, palette_sha256, quantize, save_palette  # noqa: E402


def resolution(value: str) -> int:
    """--resolution: a side in pixels, or ``native`` (0): no resize."""
    if value.lower() in ("native", "0"):
        return 0
    try:
        side = int(value)
    except ValueError:
        side = -1
    if side < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give the image side in pixels (e.g. 32) or 'native'")
    return side


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help=quiet.HELP)
    p.add_argument("--data", required=True, help="image source: cifar-10-batches-py/, cifar-100-python/, "
                   "stl10_binary/, an image folder, or a .npz")
    p.add_argument("--split", default="train", help="split to sample pixels from (default: train)")
    p.add_argument("--out", required=True, help="where to write the palette (.npy)")
    p.add_argument("--resolution", type=resolution, default=32,
                   help="resize each image to this side (centre crop, as tools/build_shards.py --crop center) "
                        "before sampling its pixels; 'native' (or 0): the images' own pixels (default: 32)")
    p.add_argument("--clusters", type=int, default=512, help="palette size (default: 512, the paper's 9-bit palette)")
    p.add_argument("--sample-pixels", type=int, default=1_000_000, help="pixels to fit on (default: 1000000)")
    p.add_argument("--heldout-pixels", type=int, default=100_000, help="pixels to measure MSE on (default: 100000)")
    p.add_argument("--iters", type=int, default=30, help="maximum Lloyd iterations (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pixel sample and k-means++ (default: 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    source = open_source(args.data, args.split)
    print(f"source: {source.name}, {len(source)} images")
    side = args.resolution
    resize = (lambda image: resize_view(image, side, "center")) if side else None
    per_image = min(256, side * side) if side else 256
    print(f"pixels: from images resized to {side}x{side} (centre crop, as tools/build_shards.py)" if side
          else "pixels: from the images at their native resolution (--resolution native)")
    pixels = sample_pixels(source, args.sample_pixels, args.seed, per_image=per_image, transform=resize)
    heldout = sample_pixels(source, args.heldout_pixels, args.seed + 1, per_image=per_image, transform=resize,
                            exclude_images=images_for_pixels(args.sample_pixels, per_image))
    start = time.time()
    palette = fit_palette(pixels, args.clusters, args.seed, iters=args.iters, device=args.device)
    print(f"k-means: {args.clusters} colours from {len(pixels)} pixels in {time.time() - start:.1f}s")
    save_palette(args.out, palette)
    recon = dequantize(quantize(heldout[None, :, None, :], palette, device=args.device), palette, side=len(heldout))
    mse = float(np.mean((recon.reshape(-1, 3).astype(np.float64) - heldout.astype(np.float64)) ** 2))
    print(f"held-out reconstruction: MSE {mse:.2f} (RMSE {mse ** 0.5:.2f}) in 0..255 units "
          f"on {len(heldout)} pixels")
    print(f"wrote {args.out} (palette sha256 {palette_sha256(palette)}; fitted at "
          f"{f'resolution {side}' if side else 'native resolution'})")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # our errors name the file and the fix
        sys.exit(f"make_palette.py: error: {e}")

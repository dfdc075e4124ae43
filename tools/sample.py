#!/usr/bin/env python
"""Sample images from a trained AR iGPT and write them as a PNG grid.

Completions (as in OpenAI's iGPT blog): the top half of real images is given, the model draws
the bottom half, several times per image. The grid has one column per image; its first row is
the image as the model sees it (resized to the model resolution, then palette round trip), the
next K rows are its completions (their top halves are exactly that first row's):

  python tools/sample.py --checkpoint runs/tiny/export --data cifar-10-batches-py --split test \\
      --num-images 8 --completions 4 --out completions.png

Unconditional samples (from the start-of-sequence token alone), 8 per grid row:

  python tools/sample.py --checkpoint runs/tiny/export --unconditional 16 --out samples.png

The checkpoint is anything igpt_ds.load_pretrained reads (a consolidated export, a Hugging Face
ImageGPT directory). Its palette turns images into tokens and back; pass --palette when the
checkpoint carries none. Pixels are drawn with a KV cache (one forward of one position per pixel);
--no-cache re-runs the whole prefix each step (for measuring). Prints samples/s.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from igpt_ds import quiet  # noqa: E402

quiet.install(sys.argv)  # before torch: third-party notices nobody can act on stay quiet (--verbose)

import numpy as np  # noqa: E402


def load_images(path: str, split: str, count: int, resolution: int) -> np.ndarray:
    """The first ``count`` images of a source, centre-cropped and resized to ``resolution``: uint8 (N, r, r, 3)."""
    from igpt_ds.data.sources import open_source

    source = open_source(path, split)
    if len(source) == 0:
        raise ValueError(f"{path} ({split}) holds no images")
    images = []
    for i in range(min(count, len(source))):
        image = np.asarray(source[i][0], dtype=np.uint8)
        if image.shape[:2] != (resolution, resolution):
            from igpt_ds.data.shards import resize_view  # the transform the shards were built with

            image = resize_view(image, resolution, "center")
        images.append(image)
    return np.stack(images)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help=quiet.HELP)
    p.add_argument("--checkpoint", required=True, help="model directory (consolidated export or HF ImageGPT)")
    p.add_argument("--out", required=True, help="PNG file to write")
    src = p.add_argument_group("completions of real images")
    src.add_argument("--data", help="image source: CIFAR-10/100 folder, STL-10 folder, .npz, image folder")
    src.add_argument("--split", default="test", help="split of --data (default test)")
    src.add_argument("--num-images", type=int, default=8, help="images to complete: the first N (default 8)")
    src.add_argument("--completions", type=int, default=4, help="completions per image (default 4)")
    src.add_argument("--prompt-rows", type=int, default=None,
                     help="image rows given to the model (default: the top half)")
    p.add_argument("--unconditional", type=int, metavar="N", help="draw N unconditional samples instead")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely colours only")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole prefix each step (slow; for measuring)")
    p.add_argument("--batch-size", type=int, default=None, help="images generated at once (default: all)")
    p.add_argument("--palette", help="palette .npy to use when the checkpoint has none")
    p.add_argument("--scale", type=int, default=4, help="upscale each pixel to scale x scale in the PNG (default 4)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if (args.data is None) == (args.unconditional is None):
        p.error("give either --data (completions of real images) or --unconditional N")

    import torch
    from PIL import Image

    import igpt_ds
    from igpt_ds.evaluate.sampling import complete, image_grid, sample
    from igpt_ds.palette import dequantize, load_palette, quantize

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, cfg, palette = igpt_ds.load_pretrained(args.checkpoint, device=device)
        if args.palette:
            palette = load_palette(args.palette)
        if palette is None:
            raise ValueError(f"{args.checkpoint} carries no palette; pass --palette PATH (the palette.npy "
                             f"the model was trained with)")
        if len(palette) != cfg.vocab_size:
            raise ValueError(f"palette has {len(palette)} colours but the model {cfg.vocab_size} tokens")
        kwargs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      use_cache=not args.no_cache, batch_size=args.batch_size)
        r = cfg.resolution
        start = time.perf_counter()
        if args.unconditional is not None:
            tokens = sample(model, args.unconditional, **kwargs)
            elapsed, count = time.perf_counter() - start, args.unconditional
            images = dequantize(tokens.cpu(), palette, side=r)
            cols = min(8, count)
            rows = -(-count // cols)
            blank = np.full((rows * cols - count, r, r, 3), 255, np.uint8)
            grid = np.concatenate([images, blank]).reshape(rows, cols, r, r, 3)
        else:
            prompt_rows = args.prompt_rows if args.prompt_rows is not None else r // 2
            if not 0 <= prompt_rows < r:
                raise ValueError(f"--prompt-rows {prompt_rows} must lie in 0..{r - 1}")
            originals = load_images(args.data, args.split, args.num_images, r)
            prompts = torch.as_tensor(quantize(originals, palette), dtype=torch.long)
            start = time.perf_counter()
            tokens = complete(model, prompts[:, :prompt_rows * r], args.completions, **kwargs)  # [n, K, r*r]
            elapsed, count = time.perf_counter() - start, tokens.shape[0] * tokens.shape[1]
            seen = dequantize(prompts, palette, side=r)[None]  # [1, n, r, r, 3]
            drawn = dequantize(tokens.transpose(0, 1).reshape(-1, r * r), palette, side=r)
            grid = np.concatenate([seen, drawn.reshape(args.completions, -1, r, r, 3)])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    Image.fromarray(image_grid(grid, pad=2, scale=args.scale)).save(args.out)
    print(f"{count} samples of {r}x{r} in {elapsed:.2f}s: {count / elapsed:.3f} samples/s, "
          f"{count * r * r / elapsed:,.0f} pixels/s ({'no cache' if args.no_cache else 'KV cache'}, "
          f"{device}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

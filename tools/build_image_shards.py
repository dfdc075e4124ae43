#!/usr/bin/env python
"""Store an image source as WebDataset image shards for the on-the-fly path (crop + quantize in the loader).

    python tools/build_image_shards.py --data cifar-10-batches-py --palette palette.npy \\
        --resolution 32 --out shards/cifar10-images

Each image is resized (bicubic) so its shorter side is --store-side (default: 2x --resolution) and
written losslessly as <key>.png, with <key>.idx (its source index: the crop's seed) and <key>.cls.
Pretraining with --train-data on such a directory draws a new random-resized crop of each image every
epoch in the loader workers and quantizes it with the palette recorded in dataset.json (docs/data.md).
--val-fraction F holds out F of train as OUT/val (centre-cropped when evaluated); shards then go to
OUT/train/ and OUT/val/.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from igpt_ds import quiet  # noqa: E402

quiet.install(sys.argv)

from igpt_ds.data.image_shards import build_image_shards  # noqa: E402
from igpt_ds.data.sources import open_source  # noqa: E402
from igpt_ds.palette import load_palette  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help=quiet.HELP)
    p.add_argument("--data", required=True, help="image source (as tools/build_shards.py takes)")
    p.add_argument("--split", default="train", help="source split (default: train)")
    p.add_argument("--palette", required=True, help="palette.npy the loader quantizes with")
    p.add_argument("--resolution", type=int, default=32, help="crop side the loader yields (default: 32)")
    p.add_argument("--store-side", type=int, default=0, help="stored shorter side (default: 2x --resolution)")
    p.add_argument("--out", required=True, help="output directory for shards and dataset.json")
    p.add_argument("--shard-size", type=int, default=5000, help="images per shard (default: 5000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image order and held-out split (default: 0)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction of train as OUT/val")
    args = p.parse_args(argv)
    palette = load_palette(args.palette)
    jobs = ([(s, os.path.join(args.out, s)) for s in ("train", "val")] if args.val_fraction > 0
            else [(args.split, args.out)])
    for split, out in jobs:
        source = open_source(args.data, split, val_fraction=args.val_fraction, split_seed=args.seed)
        m = build_image_shards(source, out, palette, resolution=args.resolution, store_side=args.store_side or None,
                               shard_size=args.shard_size, seed=args.seed, prefix=split)
        print(f"{out}: {m['num_samples']} images of {source.name} at shorter side {m['store_side']} "
              f"in {len(m['shards'])} shard(s)")


if __name__ == "__main__":
    main()

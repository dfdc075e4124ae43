#!/usr/bin/env python
"""Quantize an image source into WebDataset shards of uint16 tokens + a dataset.json manifest.

    python tools/build_shards.py --data cifar-10-batches-py --split train \\
        --palette palette.npy --resolution 32 --out shards/cifar10

Each image is resized to --resolution (--crop center: shorter side, then the centre square;
--crop random-resized --views K: K random crops per image, the paper's ImageNet augmentation),
quantized with the palette, and written as one sample per image: <key>.tokens (little-endian
uint16, raster order; K views one after the other) and <key>.cls (label) in shards
<split>-000000.tar, ... . The loader serves one of an image's K views per epoch, a different one
in each of K epochs (docs/data.md).

--val-fraction F holds out F of the train images (the paper: 0.04): the shards then go to
OUT/train/ and OUT/val/, each with its own dataset.json. Without it they go to OUT/. Held-out
splits (val, test) are always centre-cropped, one view per image: --crop/--views apply to train.

Interrupted? Run the same command again: finished shards are verified and kept, the rest built.
Output is identical for a given --seed whatever --workers is.

Several nodes: run the same command on each with --num-nodes N --node-rank R (0..N-1) and one
shared --out; node R builds shards R, R+N, R+2N, ... and records them in OUT/.slice-R-of-N.json.
Then, once, the same command with --merge (and --num-nodes N, no --node-rank) checks every slice
and shard and writes dataset.json, identical to a one-node build's for the same --seed (apart from
build.created and build.args). A re-run node keeps its finished shards.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from igpt_ds import quiet  # noqa: E402

quiet.install(sys.argv)  # before torch: third-party notices nobody can act on stay quiet (--verbose)

from igpt_ds.data.shards import CROPS, BuildSettings, build_shards, check_nodes  # noqa: E402
from igpt_ds.data.sources import open_source  # noqa: E402
from igpt_ds.palette import load_palette  # noqa: E402

# Splits that are evaluated, never trained on: always one centre crop per image, whatever --crop says.
HELD_OUT = ("val", "test")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help=quiet.HELP)
    p.add_argument("--data", required=True, help="image source: cifar-10-batches-py/, cifar-100-python/, "
                   "stl10_binary/, an image folder (ImageNet layout, or flat: ILSVRC2012 val with LOC_val_solution.csv "
                   "or val_labels.txt), a .tar of images or a folder of them (WebDataset), or a .npz (docs/data.md)")
    p.add_argument("--split", default="train", help="train, test (STL-10: also unlabeled; folders: any "
                   "sub-folder) (default: train)")
    p.add_argument("--palette", required=True, help="palette.npy from tools/make_palette.py (or OpenAI's "
                   "kmeans_centers.npy)")
    p.add_argument("--resolution", type=int, default=32, help="image side in pixels; MR = side^2 tokens (default: 32)")
    p.add_argument("--out", required=True, help="output directory for shards and dataset.json")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default: 5000, ~20 MB)")
    p.add_argument("--workers", type=int, default=1, help="processes building shards in parallel (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image order, crops and held-out split (default: 0)")
    p.add_argument("--crop", choices=CROPS, default="center", help="resize mode (default: center)")
    p.add_argument("--views", type=int, default=1, help="views per image with --crop random-resized, stored in one "
                   "sample; the loader serves one per epoch, all K in K epochs (default: 1)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of train as OUT/val (paper: 0.04; default: 0, no held-out split)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (they are counted, "
                   "listed and recorded in the manifest) instead of stopping at the first one")
    p.add_argument("--device", default=None, help="quantize on cpu or cuda (default: cuda when available; "
                   "worker processes use cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes sharing the build (default: 1)")
    p.add_argument("--node-rank", type=int, default=0, help="this node, 0..N-1: builds shards i with "
                   "i %% N == rank into OUT/.slice-R-of-N.json (default: 0)")
    p.add_argument("--merge", action="store_true", help="after all --num-nodes slices are built: verify "
                   "them and write the one dataset.json")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_nodes(args.num_nodes, args.node_rank)
    palette = load_palette(args.palette)
    if args.val_fraction > 0:
        if args.split != "train":
            sys.exit(f"--val-fraction holds out part of the train split; it cannot be used with --split {args.split}")
        jobs = [(split, os.path.join(args.out, split)) for split in ("train", "val")]
    else:
        jobs = [(args.split, args.out)]
    for split, out in jobs:
        source = open_source(args.data, split, val_fraction=args.val_fraction, split_seed=args.seed)
        crop, views = args.crop, args.views
        if split in HELD_OUT and crop != "center":
            # evaluation sees each image once, as the model is judged: the augmentation is for training only
            print(f"{split}: centre crops, one per image (--crop {crop} --views {views} apply to train only)")
            crop, views = "center", 1
        settings = BuildSettings(resolution=args.resolution, shard_size=args.shard_size, seed=args.seed,
                                 crop=crop, views=views, skip_bad=args.skip_bad, prefix=split)
        info = {"args": vars(args), "palette_file": os.path.abspath(args.palette),
                "tool": "tools/build_shards.py"}
        result = build_shards(source, out, palette, settings, workers=args.workers, device=args.device,
                              build_info=info, progress=not args.no_progress, num_nodes=args.num_nodes,
                              node_rank=args.node_rank, merge=args.merge)
        if "slice" in result:
            print(f"{out}: node {args.node_rank} of {args.num_nodes}: {result['num_samples']} samples in "
                  f"{len(result['shards'])} shards ({len(result['built'])} built, {len(result['reused'])} kept), "
                  f"recorded in {result['slice']}; run --merge when every node is done")
            continue
        print(f"{out}: {result['num_samples']} samples from {len(source)} {source.name} images in "
              f"{len(result['shards'])} shards ({len(result['built'])} built, {len(result['reused'])} kept)")
        if result["skipped"]:
            print(f"skipped {len(result['skipped'])} unreadable image(s) (listed in {out}/dataset.json):")
            for bad in result["skipped"]:
                print(f"  {bad['key']}: {bad['error']}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # our errors name the file and the fix
        sys.exit(f"build_shards.py: error: {e}")

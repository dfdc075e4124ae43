#!/usr/bin/env python
"""Extract per-layer image features f^l = mean over positions of norm(h^l) into an .npz file.

  python tools/extract_features.py --checkpoint runs/tiny/export --data cifar-10-batches-py \\
      --split train --layers all --out feats/train.npz

The checkpoint is anything igpt_ds.load_pretrained reads (a consolidated export, a Hugging Face
ImageGPT directory, a DeepSpeed checkpoint directory where supported). Images from --data (CIFAR-10/100,
STL-10, .npz, image folders; see igpt_ds.data.sources) are centre-cropped, resized to the model
resolution and quantized with the palette the model was trained with; --shards DIR reads
pre-quantized shards instead (their manifest's palette hash must match). A checkpoint that
carries no palette needs --palette FILE, checked against the hash the checkpoint records.

Output (.npz): layer<l> (N, d) per extracted layer (0 = embedding output, L = last block),
labels (N,) (-1 = unlabeled), index (N,), meta (JSON). norm is the parameter-free norm of the
model's kind (LayerNorm without gain/bias, or RMS without gain). BERT models see --bert-masks K
fresh random masks (default 5): --bert-eval average (default) stores the features averaged over
them; --bert-eval vote stores layer<l> = the features under mask 0 (what --bert-masks 1 gives:
the paper's single-mask number) and layer<l>_mask<k>, k = 1..K-1, the features under mask k, for
the paper's modal vote (Sec. 4.6). Written streaming and atomically.

ImageNet-sized sources (>= 100,000 images in the split, all slices together) get other defaults:
--layers auto stores the middle half of the stack (L//4 .. L-L//4; the paper's best layers lie
in the middle) instead of every layer, and --dtype-out auto stores float16 (also when float32
would exceed 16 GiB). The resolved choices and the projected size of the output are printed
before any work; an output that does not fit in the free space of its directory is refused.

Baselines for the linear probe, with the same files and the same probe code:
  --raw-pixels           features = the palette colours of the quantized image, flattened (layer0)
  --random-init          the checkpoint's architecture (or --model PRESET) with fresh random weights

Several processes (e.g. one per GPU), each a contiguous slice, then a merge:
  python tools/extract_features.py ... --out feats/train.npz --shard-index $i --num-shards 4
      (writes feats/train.part0000i-of-00004.npz)
  python tools/extract_features.py merge feats/train.npz          (finds the parts; or list them)

Restarts: an output (a slice or the whole file) that already exists, is a valid feature file,
was made with exactly the same settings (meta) and is newer than the checkpoint and the data is
kept, not extracted again (--overwrite forces it): a requeued or re-submitted job redoes only the
unfinished slices. SIGTERM/SIGUSR1 (Slurm's preemption, time limit, requeue) stop the extraction
at the next batch: the unfinished file is discarded (finished ones stay), the exit status is 0,
and running the same command again continues.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from igpt_ds import quiet  # noqa: E402

quiet.install(sys.argv)  # before torch: third-party notices nobody can act on stay quiet (--verbose)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true", help=quiet.HELP)
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", help="model directory (consolidated export, HF ImageGPT, DeepSpeed checkpoint)")
    m.add_argument("--random-init", action="store_true",
                   help="baseline: fresh random weights of the checkpoint's architecture (or of --model)")
    m.add_argument("--model", help="preset for --random-init / --raw-pixels without --checkpoint (e.g. igpt-tiny)")
    m.add_argument("--resolution", type=int, help="model resolution with --model (default: the preset's)")
    m.add_argument("--objective", choices=["ar", "bert"], default="ar", help="objective with --model (default ar)")
    m.add_argument("--raw-pixels", action="store_true",
                   help="baseline: the quantized image's palette colours, flattened (r*r*3 values in [-1, 1])")
    d = p.add_argument_group("data")
    d.add_argument("--data", help="image source: CIFAR-10/100 or STL-10 folder, .npz, image folder")
    d.add_argument("--shards", help="shard directory (tools/build_shards.py) instead of --data")
    d.add_argument("--split", default="train", help="split of --data: train, test, ... (default train)")
    d.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of train as split 'val' (and 'train' is the rest)")
    d.add_argument("--split-seed", type=int, default=0, help="seed of the --val-fraction split (default 0)")
    d.add_argument("--palette", help="palette .npy (needed when the checkpoint carries none; checked by hash)")
    d.add_argument("--num-workers", type=int, default=None,
                   help="JPEG decoding/resizing worker processes for --data (default: min(8, CPU cores this "
                        "process may use): BENCHMARKS.md 'Feature extraction decoders' measures a worker's images/s "
                        "against what one GPU extracts per preset (igpt-s in bf16 needs the most); 0 decodes in "
                        "this process)")
    d.add_argument("--allow-augmented-shards", action="store_true",
                   help="accept --shards built with random crops (tools/build_shards.py --crop random-resized): "
                        "their features are of augmented views, not of the evaluation centre crop (one row "
                        "per image: a sample's first view)")
    f = p.add_argument_group("features")
    f.add_argument("--layers", default="auto",
                   help="'auto', 'all', 'middle', 3, 2-5, 1,3,8 (0 = embedding output). Default auto: every layer, "
                        "or for sources of >= 100,000 images the middle half L//4..L-L//4 (iGPT-L: 12..36), where "
                        "the paper finds the best probe layers (about half the layers; with float16 a quarter "
                        "of the disk)")
    f.add_argument("--out", help="output .npz")
    f.add_argument("--dtype-out", choices=["auto", "float32", "float16"], default="auto",
                   help="stored dtype. Default auto: float16 for sources of >= 100,000 images or when float32 "
                        "features would exceed 16 GiB (half the disk), "
                        "else float32")
    f.add_argument("--bert-masks", type=int, default=5,
                   help="BERT models: masked passes per image (default 5, the paper's; 0 = no mask)")
    f.add_argument("--bert-eval", choices=["average", "vote"], default="average",
                   help="BERT models: 'average' (default) stores the features averaged over the --bert-masks "
                        "masks; 'vote' stores layer<l> = mask 0 (the single-mask features, equal to --bert-masks 1) "
                        "and layer<l>_mask<k> for k = 1..K-1, for a modal vote over masks (paper Sec. 4.6); "
                        "K times the disk")
    f.add_argument("--seed", type=int, default=0, help="seed of BERT masks and --random-init weights (default 0)")
    r = p.add_argument_group("running")
    r.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: cuda if available; with "
                   "--num-shards, cuda:$LOCAL_RANK)")
    r.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model precision (default fp32)")
    r.add_argument("--shard-index", type=int, default=0, help="this process's slice (default 0)")
    r.add_argument("--num-shards", type=int, default=1, help="number of slices/processes (default 1)")
    r.add_argument("--merge", action="store_true", help="merge the slice files of --out instead of extracting")
    r.add_argument("--overwrite", action="store_true",
                   help="extract even if --out (or this slice) already holds the same extraction")
    r.add_argument("--progress-file", help="after writing the output, write its name and the time to this file "
                   "(atomically): how a batch script tells that a requeued run made progress")
    r.add_argument("--threads", type=int, help="torch CPU threads")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not args.out:
        p.error("--out is required")
    if args.merge:
        return args
    if (args.data is None) == (args.shards is None):
        p.error("give exactly one of --data PATH or --shards DIR")
    if args.checkpoint is None and not (args.model and (args.random_init or args.raw_pixels)):
        p.error("give --checkpoint (or --model PRESET with --random-init / --raw-pixels)")
    if args.random_init and args.raw_pixels:
        p.error("--random-init and --raw-pixels are two different baselines: run them separately")
    if args.batch_size < 1 or args.bert_masks < 0:
        p.error("--batch-size must be >= 1 and --bert-masks >= 0")
    if args.num_workers is not None and args.num_workers < 0:
        p.error(f"--num-workers {args.num_workers} must be >= 0 (0 decodes in this process)")
    if args.bert_eval == "vote" and args.bert_masks < 2:
        p.error(f"--bert-eval vote needs --bert-masks >= 2 (got {args.bert_masks}): a vote over one mask is its "
                f"single-mask features, which --bert-eval average --bert-masks 1 stores")
    if args.bert_eval == "vote" and args.raw_pixels:
        p.error("--bert-eval vote needs a BERT model; --raw-pixels has no masks")
    return args


def default_num_workers() -> int:
    """min(8, CPU cores this process may use): enough decoders for one GPU (BENCHMARKS.md), no more
    than a Slurm task's cores (its CPU affinity), and 8 per process when 8 GPUs share a node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return min(8, cores)


def check_shard_crop(manifests, shards: str, allow: bool) -> None:
    """Refuse shards built with random crops (augmented views) unless ``allow``; the manifest records the crop."""
    for man in manifests:
        build = man.data.get("build") or {}
        crop = build.get("crop")
        if crop == "center" or allow:
            continue
        what = f"were built with --crop {crop} ({build.get('views', 1)} view(s) per image)" if crop else \
            "record no crop mode (build.crop)"
        raise ValueError(f"--shards {shards}: the shards of {man.directory} {what} according to {man.path}; "
                         f"features must be of the evaluation transform (centre crop), not of augmented views. "
                         f"Rebuild them with tools/build_shards.py --crop center (the default), extract from the "
                         f"images with --data, or pass --allow-augmented-shards to use these anyway")


class Interrupted(Exception):
    """A job signal (SIGTERM/SIGUSR1) arrived: stop without writing the unfinished output."""

    def __init__(self, signum):
        self.signum = signum
        super().__init__(signum)


def _check_signal() -> None:
    from igpt_ds.parallel import signals

    if signals.received() is not None:
        raise Interrupted(signals.received())


def _until_signalled(batches):
    """The batches, stopping (Interrupted) at the first batch boundary after a job signal."""
    for batch in batches:
        _check_signal()
        yield batch


def reusable(out: str, meta: dict, inputs: list) -> tuple[bool, str]:
    """(keep?, why not) for an existing output ``out`` that this extraction would write with ``meta``.

    Kept only if it opens as a feature file, its meta is exactly ``meta`` (same checkpoint path,
    model, palette, source, slice, layers, dtype, seed) and it is newer than every input: a
    checkpoint or data set replaced in place after the file was written makes it stale.
    """
    import json

    from igpt_ds.evaluate.feature_files import FeatureFile, FeatureFileError, restart_blocker

    if not os.path.exists(out):
        return False, ""
    try:
        with FeatureFile(out) as f:
            have, rows = f.meta, f.num_rows
    except (FeatureFileError, OSError, ValueError, KeyError) as e:
        return False, f"{out} exists but is not a valid feature file ({e})"
    want = json.loads(json.dumps(meta, sort_keys=True))
    differ, changed = restart_blocker(have, want, os.stat(out).st_mtime, inputs)
    if differ:
        return False, f"{out} exists but was made with other settings (differs in: {', '.join(differ)})"
    if rows != want["num_rows"]:
        return False, f"{out} exists but holds {rows} rows, not {want['num_rows']}"
    if changed:
        return False, f"{out} exists but {changed} changed after it was written"
    return True, ""


def pick_device(arg: str, shard_index: int):
    import torch

    if arg != "auto":
        return torch.device(arg)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", shard_index))
    return torch.device("cuda", local % torch.cuda.device_count())


def own_process_group() -> None:
    """A 1-rank process group of this process alone, made before any model is built.

    Each extraction process is independent (a slice, TP = 1): under srun / torchrun the launcher's
    RANK / SLURM_PROCID would otherwise make the model join one world-wide group.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def build_model(args, device):
    """(model or None, config, palette, palette sha256, description) for the chosen features."""
    import torch

    import igpt_ds
    from igpt_ds.config import get_preset
    from igpt_ds.evaluate.features import recorded_palette_sha256, resolve_palette
    from igpt_ds.model.transformer import IGPTModel

    dtype = getattr(torch, DTYPES[args.dtype])
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("--dtype fp16 needs a GPU (CPU half-precision matmuls are slow and inexact); "
                         "use --dtype bf16 or fp32 on CPU")
    if args.checkpoint:
        model, cfg, carried = igpt_ds.load_pretrained(args.checkpoint, device=device, dtype=dtype)
        palette, sha, how = resolve_palette(args.checkpoint, carried, recorded_palette_sha256(args.checkpoint),
                                            args.palette, cfg.vocab_size)
    else:
        overrides = {"objective": args.objective, **({"resolution": args.resolution} if args.resolution else {})}
        cfg, model = get_preset(args.model, **overrides), None
        if not args.palette and not args.shards:
            raise ValueError(f"--model {args.model} without --checkpoint: pass --palette FILE to quantize --data")
        palette, sha, how = resolve_palette(args.model, None, None, args.palette, cfg.vocab_size) \
            if args.palette else (None, None, "none (tokens from shards)")
    if args.random_init:
        model = IGPTModel(cfg, seed=args.seed).to(device=device, dtype=dtype).eval()
    if args.raw_pixels:
        model = None
    return model, cfg, palette, sha, how


def extract(args) -> str:
    import numpy as np
    import torch

    from igpt_ds.evaluate import features as F

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device, args.shard_index)
    own_process_group()
    _check_signal()
    # The data first: a source or shard set that cannot be used is refused before the model loads.
    if args.data:
        from igpt_ds.data.sources import open_source

        source = open_source(args.data, args.split, val_fraction=args.val_fraction, split_seed=args.split_seed)
        total, label_names = len(source), list(source.label_names)
        origin = {"data": os.path.abspath(args.data), "split": args.split, "val_fraction": args.val_fraction,
                  "split_seed": args.split_seed, "name": source.name}
    else:
        from igpt_ds.data.shards import check_manifest
        from igpt_ds.data.tokens import resolve_source

        specs, manifests = resolve_source(args.shards)
        check_shard_crop(manifests, args.shards, args.allow_augmented_shards)
        total, label_names = sum(s.samples for s in specs), list(manifests[0].label_names)
        origin = {"shards": os.path.abspath(args.shards)}
    start, end = F.slice_range(total, args.shard_index, args.num_shards)
    if end <= start:
        raise ValueError(f"slice {args.shard_index} of {args.num_shards} of {total} images is empty")
    model, cfg, palette, sha, how = build_model(args, device)
    r = cfg.resolution
    if args.shards:
        for man in manifests:
            check_manifest(man, sha, r)
        sha = sha or manifests[0].palette_sha256
        if palette is None:  # the shards' manifest carries it (older manifests do not)
            palette = next((man.palette for man in manifests if man.palette is not None), None)
            how = how if palette is None else "the shards' dataset.json"
        if palette is None and args.raw_pixels:
            raise ValueError("--raw-pixels turns tokens into palette colours: pass --palette or a checkpoint with one")
    bert = cfg.objective == "bert" and not args.raw_pixels
    if args.bert_eval == "vote" and not bert:
        raise ValueError(f"--bert-eval vote needs a BERT model: {args.checkpoint or args.model} is "
                         f"{cfg.objective!r} (AR models have no masks); leave out --bert-eval")
    masks = args.bert_masks if bert else None
    vote = bert and args.bert_eval == "vote"
    bert_eval = None if not bert else "vote" if vote else "average" if masks else "unmasked"

    if args.raw_pixels:
        layers, widths, kind, layers_why = [0], {0: cfg.seq_len * 3}, "raw-pixels", "raw pixels: one array"
        colours = torch.from_numpy(np.asarray(palette, np.float32)).to(device)

        def compute(batch):
            return {F.feature_key(0): colours[batch["tokens"]].reshape(len(batch["tokens"]), -1)}
    else:
        layers, layers_why = F.resolve_layers(args.layers, cfg.n_layer, total)
        widths, kind = {l: cfg.d_model for l in layers}, "random-init" if args.random_init else "model"

        def compute(batch):
            if vote:
                per_mask = F.mask_features(model, batch["tokens"], layers, batch["index"], masks, args.seed)
                return {F.feature_key(l, k): f[l] for k, f in enumerate(per_mask) for l in layers}
            feats = F.batch_features(model, batch["tokens"], layers, batch["index"], masks or 0, args.seed)
            return {F.feature_key(l): feats[l] for l in layers}

    meta = {"kind": kind, "checkpoint": os.path.abspath(args.checkpoint) if args.checkpoint else None,
            "model": cfg.to_dict(), "palette_sha256": sha, "palette_from": how, "source": origin,
            "label_names": label_names, "dtype_model": args.dtype,
            "norm": ("none (raw pixels)" if args.raw_pixels else
                     f"parameter-free {cfg.norm} (no gain/bias), eps={cfg.norm_eps}, then mean over positions"),
            "bert_masks": masks, "bert_eval": bert_eval, "seed": args.seed}
    out = args.out
    if args.num_shards > 1:
        out = str(F.part_path(args.out, args.shard_index, args.num_shards))
        meta["slice"] = {"shard_index": args.shard_index, "num_shards": args.num_shards, "start": start, "end": end}
    ex = F.Extraction(layers=layers, widths=widths, total=total, start=start, end=end, meta=meta,
                      masks=masks if vote else 1)
    dtype_out, dtype_why = F.resolve_dtype_out(args.dtype_out, total, sum(ex.arrays().values()))
    num_workers = args.num_workers if args.num_workers is not None else default_num_workers()
    span = f"layers {layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1 \
        else f"layers {','.join(map(str, layers))}"
    print(f"{total:,} images, rows {start}..{end}; {span} ({layers_why}); {dtype_out} ({dtype_why})"
          + (f"; BERT {bert_eval} over {masks} masks" if bert else "")
          + (f"; {num_workers} decoding workers" if args.data else ""), flush=True)
    # What F.extract will record: compared with an existing file to decide whether a restart keeps it.
    final = dict(meta, format=F.FORMAT, version=F.VERSION, layers=layers, total=total, num_rows=end - start,
                 dtype=dtype_out)
    if not args.overwrite:
        keep, why = reusable(out, final, [args.checkpoint, args.data or args.shards, args.palette])
        if keep:
            print(f"kept {out}: already extracted with the same settings (rows {start}..{end} of {total}; "
                  f"--overwrite extracts again)")
            return out
        if why:
            print(f"{why}: extracting again", flush=True)
    file_bytes, largest = ex.projected_bytes(dtype_out)
    free = F.free_bytes(out)
    need = F.check_free_space(out, file_bytes, largest, free, dtype_out, ex.masks)
    print(f"output {out}: {end - start:,} rows x {len(ex.arrays())} arrays ({sum(ex.arrays().values()):,} values "
          f"per row) in {dtype_out} + labels/index = {F.human_bytes(file_bytes)}; needs {F.human_bytes(need)} while "
          f"written, {F.human_bytes(free)} free", flush=True)
    if args.data:
        batches = F.source_batches(source, palette, r, start, end, args.batch_size, num_workers, device)
    else:
        batches = F.shard_batches(specs, cfg.seq_len, cfg.vocab_size, start, end, args.batch_size, device)
    _check_signal()
    t0 = time.perf_counter()
    path = F.extract(_until_signalled(batches), compute, ex, out, dtype_out, progress=not args.no_progress,
                     num_batches=math.ceil((end - start) / args.batch_size))
    dt = time.perf_counter() - t0
    if args.progress_file:
        from igpt_ds.checkpoint.atomic import atomic_write

        os.makedirs(os.path.dirname(os.path.abspath(args.progress_file)), exist_ok=True)
        atomic_write(args.progress_file, f"{path} {time.time():.3f}\n")
    print(f"{end - start} images ({kind}, {span}, {device}, {args.dtype}) in {dt:.1f}s "
          f"({(end - start) / max(dt, 1e-9):.1f} images/s) -> {path}")
    return str(path)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from igpt_ds.evaluate.features import FeatureFileError

    try:
        if argv and argv[0] == "merge":
            p = argparse.ArgumentParser(prog="extract_features.py merge",
                                        description="Merge the slice files of a sharded extraction in order.")
            p.add_argument("out", help="merged .npz to write")
            p.add_argument("parts", nargs="*", help="slice files (default: OUT.part*-of-*.npz beside OUT)")
            margs = p.parse_args(argv[1:])
            return merge(margs.out, margs.parts)
        args = parse_args(argv)
        if args.merge:
            return merge(args.out, [])
        extract(args)
    except Interrupted as e:
        from igpt_ds.parallel import signals

        # Exit 0 as the trainer does after its checkpoint: the batch script decides about requeueing.
        print(f"stopped by {signals.describe(e.signum)}: the unfinished output was discarded, finished slices "
              f"are kept; run the same command again to continue", file=sys.stderr)
        return 0
    except (ValueError, FileNotFoundError, FeatureFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def merge(out: str, parts: list) -> int:
    import re

    from igpt_ds.evaluate.features import FeatureFile, find_parts, merge_feature_files

    if not parts:
        try:
            parts = find_parts(out)
        except FileNotFoundError:
            # A one-task extraction (--num-shards 1) writes OUT itself: nothing to merge, and a
            # chain that always merges must not fail on it.
            if os.path.isfile(out):
                with FeatureFile(out) as f:
                    whole = "slice" not in f.meta
                if whole:
                    print(f"{out} is already one file (an unsliced extraction): nothing to merge")
                    return 0
            raise
        counts = sorted({int(m.group(1)) for p in parts if (m := re.search(r"-of-(\d{5})\.npz$", str(p)))})
        if len(counts) > 1:
            stem = out[:-4] if out.endswith(".npz") else out
            raise ValueError(f"{out}: slice files of extractions with different --num-shards ({counts}) lie "
                             f"beside it; delete those of the run you no longer want ({stem}.part*-of-NNNNN.npz, "
                             f"NNNNN one of {', '.join(f'{c:05d}' for c in counts)}) or list the parts to merge")
    path = merge_feature_files(parts, out)
    print(f"merged {len(parts)} slices -> {path}")
    return 0


if __name__ == "__main__":
    from igpt_ds.parallel import signals

    signals.install()  # before torch and the data: a signal during start-up is remembered, not fatal
    sys.exit(main())

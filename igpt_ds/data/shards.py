"""Pre-quantized WebDataset shards and their ``dataset.json`` manifest.

A shard is an uncompressed tar. Each sample is one view of one source image, as tar members

    <key>.tokens   MR = resolution**2 tokens, little-endian uint16, raster order
    <key>.cls      the label as ASCII digits (only when the source has labels)

``<key>`` is ``<source key>_v<view>`` (letters, digits, ``_``, ``-``; no dots, since WebDataset
splits key from extension at the first dot). Shards are named ``<split>-<000000>.tar``.

Images are put in a seeded random order before they are cut into shards, so each shard is a
random sample of the source (class-sorted folders do not give class-sorted shards) and a reader
that takes contiguous shard ranges still sees a well-mixed stream.

The manifest ``dataset.json`` (written last, atomically; read and checked by
:mod:`igpt_ds.data.manifest`, whose names are re-exported here) records the format version, palette
SHA-256 and the palette itself, resolution, each shard's name, sample count, size and SHA-256, the
total, the label names, the source, any skipped images, and the build settings. A build that is
interrupted keeps a ``.build-progress.json`` of the shards finished so far; re-running it verifies
and keeps those and builds only the rest. Shards are written as ``<name>.tmp`` and renamed when
complete, so a final name never holds a truncated shard. Output bytes depend only on the settings
and the seed, not on the number of worker processes.

Several nodes (``num_nodes=N, node_rank=R``): every node plans the same shards (same seed, same
permutation and cut) and builds only shard ``i`` with ``i % N == R``, recording them in its own
``.slice-R-of-N.json`` (not the manifest). ``merge=True`` then checks that all N slices are there
and finished and every shard's size and SHA-256, and writes the one ``dataset.json``: the same
bytes as a one-node build's apart from ``build.created`` and ``build.args``.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import multiprocessing
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from igpt_ds.checkpoint.atomic import atomic_file, atomic_write

# Re-exported: tools, tests and the fine-tuning task read manifests through this module's names.
from igpt_ds.data.manifest import (  # noqa: F401
    FORMAT_NAME,
    FORMAT_VERSION,
    LABEL_EXT,
    MANIFEST_NAME,
    TOKENS_EXT,
    Manifest,
    ShardError,
    ShardRecord,
    check_manifest,
    check_shard_name,
    palette_to_json,
    read_manifest,
)
from igpt_ds.data.sources import BadImageError, ImageSource, open_source
from igpt_ds.palette import palette_sha256, quantize

PROGRESS_NAME = ".build-progress.json"
SLICE_NAME = ".slice-{rank}-of-{nodes}.json"  # one node's finished shards in a multi-node build
CROPS = ("center", "random-resized")
# The paper's ImageNet augmentation (Sec. 3.1), as resize_view implements it; recorded in the manifest.
RANDOM_RESIZED_PARAMS = {"shorter_side": [256, 384], "crop": 224, "seed": "[build seed, image index, view]"}
# How a sample holds its views: part of a build's fingerprint, so a directory of shards made when every
# view was its own sample is not mixed with new ones.
SAMPLE_LAYOUT = "views-in-one-sample"


# ---------------------------------------------------------------------------------------------
# Resizing: the paper's two variants
# ---------------------------------------------------------------------------------------------

def resize_view(image: np.ndarray, resolution: int, crop: str = "center",
                rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """One (resolution, resolution, 3) uint8 view of ``image`` (H, W, 3).

    ``center``: resize so the shorter side is ``resolution``, then take the centre square (the
    paper's evaluation transform). ``random-resized``: the paper's ImageNet pretraining
    augmentation made size-independent: resizing the shorter side to s ~ U[256, 384] and taking
    a random 224 crop is a random square crop of 224/s of the shorter side, then resized to
    ``resolution``. Images already at the resolution pass through unchanged in ``center`` mode.
    """
    h, w = image.shape[:2]
    short = min(h, w)
    if crop == "center":
        if h == w == resolution:
            return image
        new_w, new_h = max(resolution, round(w * resolution / short)), max(resolution, round(h * resolution / short))
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
        return np.ascontiguousarray(resized[top:top + resolution, left:left + resolution])
    if crop == "random-resized":
        if rng is None:
            raise ValueError("random-resized crops need an rng")
        side = max(1, int(round(short * 224.0 / rng.uniform(256.0, 384.0))))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        patch = Image.fromarray(np.ascontiguousarray(image[top:top + side, left:left + side]))
        return np.asarray(patch.resize((resolution, resolution), Image.Resampling.BILINEAR))
    raise ValueError(f"crop={crop!r}: choose one of {CROPS}")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _write_json_atomic(path: str, data: dict) -> None:
    # 0644 whatever the umask: the manifest is read by other users' training jobs
    atomic_write(path, json.dumps(data, indent=1, sort_keys=False) + "\n", mode=0o644)


def _write_manifest(path: str, manifest: dict) -> None:
    """Like :func:`_write_json_atomic`, but the palette (the last field) gets one line per colour."""
    rest = {k: v for k, v in manifest.items() if k != "palette"}
    text = json.dumps(rest, indent=1, sort_keys=False)
    if "palette" in manifest:
        rows = ",\n".join(f"  {json.dumps(row)}" for row in manifest["palette"])
        text = f'{text[:-2]},\n "palette": [\n{rows}\n ]\n}}'
    atomic_write(path, text + "\n", mode=0o644)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildSettings:
    """Everything the output bytes depend on (worker count excluded: it changes nothing)."""

    resolution: int = 32
    shard_size: int = 5000
    seed: int = 0
    crop: str = "center"
    views: int = 1
    skip_bad: bool = False
    prefix: str = "train"

    def validate(self) -> "BuildSettings":
        if self.resolution < 1 or self.shard_size < 1 or self.views < 1:
            raise ValueError(f"resolution, shard_size and views must be >= 1 ({self})")
        if self.crop not in CROPS:
            raise ValueError(f"crop={self.crop!r}: choose one of {CROPS}")
        if self.crop == "center" and self.views != 1:
            raise ValueError(f"views={self.views} needs --crop random-resized: centre crops are all identical")
        if not re.match(r"^[A-Za-z0-9_-]+$", self.prefix):
            raise ValueError(f"shard prefix {self.prefix!r}: use letters, digits, '_' or '-'")
        return self


def plan_shards(num_images: int, settings: BuildSettings) -> list[np.ndarray]:
    """Per shard, the (image index, view) pairs it holds, as an int64 array (n, 2).

    Images are permuted with the seed; the views of one image are consecutive and form ONE sample
    (``--views K``: K pre-quantized crops in one ``.tokens`` member, of which the loader serves one
    per epoch), so a shard holds ``shard_size`` images whatever K is.
    """
    order = np.random.default_rng([settings.seed, 0x5A4D]).permutation(num_images)
    slots = np.stack([np.repeat(order, settings.views),
                      np.tile(np.arange(settings.views), num_images)], axis=1)
    per_shard = settings.shard_size * settings.views
    return [slots[s:s + per_shard] for s in range(0, len(slots), per_shard)]


def shard_name(settings: BuildSettings, index: int) -> str:
    return f"{settings.prefix}-{index:06d}.tar"


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644  # fixed metadata: reproducible bytes
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _write_tar(path: str, keys: Sequence[str], tokens: np.ndarray, labels: Optional[Sequence[int]]) -> None:
    # A fixed temporary name: what a killed build leaves is swept up by the next run (build_shards).
    with atomic_file(path, temp=path + ".tmp", fsync=True) as tmp, open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for i, key in enumerate(keys):
                _add_member(tar, f"{key}.{TOKENS_EXT}", tokens[i].astype("<u2").tobytes())
                if labels is not None:
                    _add_member(tar, f"{key}.{LABEL_EXT}", str(int(labels[i])).encode("ascii"))


def build_one_shard(source: ImageSource, palette: np.ndarray, settings: BuildSettings, index: int,
                    slots: np.ndarray, out_dir: str, device: Optional[str] = None) -> dict:
    """Read, resize, quantize and write shard ``index``; returns its manifest record."""
    views, keys, labels, skipped = [], [], [], []
    current, image, label = -1, None, -1
    for image_index, view in slots.tolist():
        if image_index != current:
            current = image_index
            try:
                image, label = source[image_index]
            except BadImageError as e:
                if not settings.skip_bad:
                    raise
                image = None
                skipped.append({"key": source.key(image_index), "index": image_index, "error": str(e)})
        if image is None:
            continue
        rng = np.random.default_rng([settings.seed, image_index, view]) if settings.crop != "center" else None
        views.append(resize_view(image, settings.resolution, settings.crop, rng))
        if view == 0:  # one sample per image: key <image key>_v0 (one view) or <image key>_k<K> (K views)
            keys.append(f"{source.key(image_index)}_v0" if settings.views == 1
                        else f"{source.key(image_index)}_k{settings.views}")
            labels.append(label)
    seq_len = settings.resolution ** 2
    tokens = (quantize(np.stack(views), palette, device=device) if views else np.zeros((0, seq_len), np.int64))
    tokens = np.asarray(tokens).reshape(len(keys), settings.views * seq_len)  # an image's K views, view-major
    name = shard_name(settings, index)
    for record in skipped:
        record["shard"] = name
    path = os.path.join(out_dir, name)
    _write_tar(path, keys, tokens, labels if source.has_labels else None)
    return {"name": name, "samples": len(keys), "bytes": os.path.getsize(path),
            "sha256": _sha256_file(path), "skipped": skipped}


_WORKER: dict = {}


def _worker_init(open_args: dict, palette: np.ndarray, settings: BuildSettings, out_dir: str) -> None:
    torch.set_num_threads(1)  # one process per core; threads inside would oversubscribe
    _WORKER.update(source=open_source(**open_args), palette=palette, settings=settings, out_dir=out_dir)


def _worker_build(job: tuple[int, np.ndarray]) -> dict:
    w = _WORKER
    return build_one_shard(w["source"], w["palette"], w["settings"], job[0], job[1], w["out_dir"], device="cpu")


def _fingerprint(source: ImageSource, palette: np.ndarray, settings: BuildSettings) -> dict:
    out = {"source": source.describe(), "palette_sha256": palette_sha256(palette),
           "settings": dataclasses.asdict(settings), "format_version": FORMAT_VERSION}
    if settings.views > 1:
        out["sample_layout"] = SAMPLE_LAYOUT
    return out


def _reusable(out_dir: str, record: dict) -> bool:
    path = os.path.join(out_dir, record["name"])
    return (os.path.isfile(path) and os.path.getsize(path) == record["bytes"]
            and _sha256_file(path) == record["sha256"])


def slice_name(node_rank: int, num_nodes: int) -> str:
    return SLICE_NAME.format(rank=node_rank, nodes=num_nodes)


def check_nodes(num_nodes: int, node_rank: int) -> None:
    """Refuse a node rank outside [0, num_nodes) before anything is written."""
    if num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise ValueError(f"--node-rank {node_rank} with --num-nodes {num_nodes}: the rank must lie in "
                         f"0..{max(num_nodes, 1) - 1} and --num-nodes be >= 1")


def build_shards(source: ImageSource, out_dir: str, palette: np.ndarray, settings: BuildSettings, *,
                 workers: int = 1, device: Optional[str] = None, build_info: Optional[dict] = None,
                 progress: bool = True, open_args: Optional[dict] = None,
                 log: Callable[[str], None] = print, num_nodes: int = 1, node_rank: int = 0,
                 merge: bool = False) -> dict:
    """Write ``source`` as shards + ``dataset.json`` into ``out_dir``; returns the manifest dict.

    ``workers > 1`` builds shards in that many processes; they reopen the source from
    ``open_args`` (default ``source.open_args``, set by :func:`open_source`). Re-running after an
    interruption keeps every shard whose recorded size and SHA-256 still match and builds the
    rest. The result has ``"built"`` / ``"reused"`` shard name lists (not part of the file).

    ``num_nodes > 1``: build only this node's slice (shards ``i % num_nodes == node_rank``) and
    return its record (``"slice"``: the file, ``"shards"``, ``"built"``, ``"reused"``), no manifest;
    with ``merge=True`` build nothing, verify all slices and write the manifest.
    """
    settings.validate()
    check_nodes(num_nodes, node_rank)
    fingerprint = _fingerprint(source, palette, settings)
    plan = plan_shards(len(source), settings)
    if merge:
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"{out_dir}: no such directory; build the slices first (--node-rank)")
        records = _merge_slices(out_dir, fingerprint, settings, len(plan), num_nodes)
        manifest = _manifest(source, palette, settings, fingerprint, [records[i] for i in range(len(plan))],
                             build_info)
        _write_manifest(os.path.join(out_dir, MANIFEST_NAME), manifest)
        for rank in range(num_nodes):
            leftover = os.path.join(out_dir, slice_name(rank, num_nodes))
            if os.path.exists(leftover):
                os.unlink(leftover)
        return {**manifest, "built": [], "reused": [r["name"] for r in manifest["shards"]]}
    os.makedirs(out_dir, exist_ok=True)
    mine = [i for i in range(len(plan)) if i % num_nodes == node_rank]
    progress_name = PROGRESS_NAME if num_nodes == 1 else slice_name(node_rank, num_nodes)
    done = _previous_records(out_dir, fingerprint, progress_name)
    if num_nodes == 1:
        strays = [n for n in os.listdir(out_dir) if n.endswith(".tar.tmp")]
    else:  # other nodes write their own .tmp files into the same directory right now
        strays = [shard_name(settings, i) + ".tmp" for i in mine]
    for stray in strays:  # a shard cut off mid-write by the interruption
        if os.path.exists(os.path.join(out_dir, stray)):
            os.unlink(os.path.join(out_dir, stray))
    records: dict[int, dict] = {}
    reused = []
    for i in mine:
        record = done.get(shard_name(settings, i))
        if record is not None and _reusable(out_dir, record):
            records[i] = record
            reused.append(record["name"])
    jobs = [(i, plan[i]) for i in mine if i not in records]
    if reused:
        log(f"{out_dir}: {len(reused)} finished shard(s) verified and kept, {len(jobs)} to build")
    bar = tqdm(total=sum(len(plan[i]) for i in mine), initial=sum(len(plan[i]) for i in records),
               unit="sample", desc=f"shards {settings.prefix}", disable=not progress)
    node = {} if num_nodes == 1 else {"num_nodes": num_nodes, "node_rank": node_rank}

    def finished(i: int, record: Optional[dict], complete: bool = False) -> None:
        if record is not None:
            records[i] = record
            bar.update(len(plan[i]))
        _write_json_atomic(os.path.join(out_dir, progress_name),
                           {"fingerprint": fingerprint, **node, **({"complete": True} if complete else {}),
                            "shards": [records[k] for k in sorted(records)]})

    if workers <= 1 or len(jobs) <= 1:
        for i, slots in jobs:
            finished(i, build_one_shard(source, palette, settings, i, slots, out_dir, device))
    else:
        open_args = open_args or source.open_args
        if not open_args:
            raise ValueError("workers > 1 needs open_args (how worker processes reopen the source): "
                             "open the source with igpt_ds.data.sources.open_source")
        # spawn, not fork: a forked child of a process that already ran torch ops can deadlock.
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), _worker_init,
                                          (open_args, palette, settings, out_dir)) as pool:
            for (i, _), record in zip(jobs, pool.imap(_worker_build, jobs)):
                finished(i, record)
    bar.close()
    built = [shard_name(settings, i) for i, _ in jobs]
    if num_nodes > 1:  # this node's slice, marked finished; the merge writes the manifest
        finished(-1, None, complete=True)
        return {"slice": os.path.join(out_dir, progress_name), "shards": [records[i] for i in mine],
                "num_samples": sum(records[i]["samples"] for i in mine),
                "skipped": [s for i in mine for s in records[i]["skipped"]], "built": built, "reused": reused}
    manifest = _manifest(source, palette, settings, fingerprint, [records[i] for i in range(len(plan))], build_info)
    _write_manifest(os.path.join(out_dir, MANIFEST_NAME), manifest)
    progress_file = os.path.join(out_dir, PROGRESS_NAME)
    if os.path.exists(progress_file):
        os.unlink(progress_file)
    return {**manifest, "built": built, "reused": reused}


def _manifest(source: ImageSource, palette: np.ndarray, settings: BuildSettings, fingerprint: dict,
              ordered: list[dict], build_info: Optional[dict]) -> dict:
    skipped = [s for r in ordered for s in r["skipped"]]
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "palette_sha256": fingerprint["palette_sha256"],
        "num_colors": int(len(palette)),
        "resolution": settings.resolution,
        "seq_len": settings.resolution ** 2,
        "token_encoding": f"{TOKENS_EXT}: little-endian uint16, raster order; {LABEL_EXT}: ASCII int",
        "label_names": list(source.label_names),
        "has_labels": source.has_labels,
        "num_samples": sum(r["samples"] for r in ordered),
        "num_images": len(source) - len(skipped),
        # K views per sample (one .tokens member of K x seq_len tokens); the loader serves one per epoch
        "views": settings.views,
        "crop": {"mode": settings.crop, **(RANDOM_RESIZED_PARAMS if settings.crop == "random-resized" else {})},
        "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in ordered],
        "skipped": skipped,
        "source": source.describe(),
        "build": {**dataclasses.asdict(settings), **(build_info or {}),
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "palette": palette_to_json(palette),  # last: the long field (read back and checked by read_manifest)
    }


def _merge_slices(out_dir: str, fingerprint: dict, settings: BuildSettings, num_shards: int,
                  num_nodes: int) -> dict[int, dict]:
    """Every shard's record from the N slice files, each shard checked on disk; nothing written."""
    index = {shard_name(settings, i): i for i in range(num_shards)}
    slices = [os.path.join(out_dir, slice_name(r, num_nodes)) for r in range(num_nodes)]
    if not any(os.path.isfile(s) for s in slices) and os.path.isfile(os.path.join(out_dir, MANIFEST_NAME)):
        done = _previous_records(out_dir, fingerprint, PROGRESS_NAME)  # merged before: check it again
        slices = []
    else:
        done, missing = {}, []
        for rank, path in enumerate(slices):
            data = None
            if os.path.isfile(path):
                with open(path) as f:
                    data = json.load(f)
                if data.get("fingerprint") != fingerprint:
                    raise ShardError(f"{path}: a slice of a different build (source, palette or settings "
                                     f"differ); re-run node {rank} with the merge's arguments")
            if data is None or not data.get("complete"):
                missing.append(f"{os.path.basename(path)} (--node-rank {rank}"
                               f"{'' if data is None else ', unfinished'})")
                continue
            for record in data.get("shards", []):
                check_shard_name(record.get("name"), path)
                if index.get(record["name"], -1) % num_nodes != rank:
                    raise ShardError(f"{path}: shard {record['name']} is not node {rank}'s")
                done[record["name"]] = {**record, "slice": path}
        if missing:
            raise ShardError(f"{out_dir}: cannot merge, {len(missing)} of {num_nodes} slice(s) missing or "
                             f"unfinished: {', '.join(missing)}. Run tools/build_shards.py with the same "
                             f"arguments and --num-nodes {num_nodes} --node-rank R (no --merge) for each "
                             f"R named, then merge again; nothing was written")
    records = {}
    for name, i in index.items():
        record = done.get(name)
        where = (record.pop("slice", None) if record else None) or (
            slices[i % num_nodes] if slices else os.path.join(out_dir, MANIFEST_NAME))
        if record is None or not _reusable(out_dir, record):
            what = "not recorded in" if record is None else "missing, or its size or SHA-256 differs from"
            raise ShardError(f"{os.path.join(out_dir, name)}: {what} {where}; re-run "
                             f"--node-rank {i % num_nodes} --num-nodes {num_nodes} "
                             f"(it rebuilds only that), then merge again; nothing was written")
        records[i] = record
    return records


def _previous_records(out_dir: str, fingerprint: dict, progress_name: str = PROGRESS_NAME,
                      use_manifest: bool = True) -> dict[str, dict]:
    """Shard records of an earlier run of the same build in ``out_dir`` (progress or manifest)."""
    progress = os.path.join(out_dir, progress_name)
    manifest = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.isfile(progress):
        with open(progress) as f:
            data = json.load(f)
        previous, shards = data.get("fingerprint"), data.get("shards", [])
        where = progress
    elif use_manifest and os.path.isfile(manifest):
        with open(manifest) as f:
            data = json.load(f)
        previous = {"source": data.get("source"), "palette_sha256": data.get("palette_sha256"),
                    "settings": {k: data.get("build", {}).get(k) for k in fingerprint["settings"]},
                    "format_version": data.get("version")}
        if int(data.get("views", 1)) > 1:
            previous["sample_layout"] = SAMPLE_LAYOUT
        shards = [{**s, "skipped": [x for x in data.get("skipped", [])
                                    if x.get("shard") == s["name"]]} for s in data.get("shards", [])]
        where = manifest
    else:
        return {}
    if previous != fingerprint:
        raise ShardError(f"{out_dir}: holds shards of a different build ({where} differs in source, "
                         f"palette or settings); use another --out directory, or delete this one")
    for record in shards:
        check_shard_name(record.get("name"), where)
    return {r["name"]: r for r in shards}

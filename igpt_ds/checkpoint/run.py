"""The run checkpoint: what ``--save`` writes and ``--load`` resumes, for every task and layout.

    SAVE/latest                          the tag of the newest complete checkpoint ("global_stepN")
    SAVE/global_stepN/                   DeepSpeed's model/optimizer/schedule files (any ZeRO stage, TP, PP)
    SAVE/global_stepN/igpt_meta.json     model config, objective, palette hash, layout, DS config, step,
                                         and the task's own fields (fine-tuning: "finetune")
    SAVE/global_stepN/trainer_state_rankRRRRR.pt   this rank's data position and RNG states
    SAVE/palette.npy                     the palette the run was trained with, when it has one

``latest`` is replaced atomically after a barrier, only once every rank finished writing, so a
crash mid-save leaves the previous checkpoint as the one that loads. This module is the only one
that knows these names; the loop, conversion (:mod:`igpt_ds.checkpoint.reshard`) and the feature
tools read checkpoints through it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from igpt_ds.checkpoint.atomic import atomic_file, atomic_write
from igpt_ds.checkpoint.lazy_torch import CheckpointFileError
from igpt_ds.config import ModelConfig

PathLike = Union[str, os.PathLike]
META_FILE = "igpt_meta.json"
LATEST_FILE = "latest"
TAG_PREFIX = "global_step"


def tag_of(step: int) -> str:
    return f"{TAG_PREFIX}{step}"


def read_latest(directory: PathLike) -> Optional[str]:
    """The tag ``directory/latest`` names, or None when there is no complete checkpoint."""
    latest = Path(directory) / LATEST_FILE
    return latest.read_text().strip() if latest.is_file() else None


def locate_checkpoint(path: PathLike) -> tuple[Path, str, dict]:
    """(root, tag, meta) of a run directory (its ``latest``) or a ``global_stepN`` directory.

    The one reader of where a checkpoint is; its errors (CheckpointFileError) name what is missing.
    """
    path = Path(path)
    tag = read_latest(path)
    if tag is not None:
        root = path
        if not (root / tag).is_dir():
            raise CheckpointFileError(f"{path / LATEST_FILE} names {tag!r}, but {root / tag} does not exist; "
                                      f"point at an existing global_stepN directory of {root} or fix 'latest'")
    elif (path / META_FILE).is_file():
        root, tag = path.parent, path.name
    else:
        raise CheckpointFileError(f"{path}: not an iGPT-DS DeepSpeed checkpoint (expected {LATEST_FILE} or "
                                  f"{META_FILE}, written by igpt_ds/pretrain.py --save DIR)")
    meta_file = root / tag / META_FILE
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise CheckpointFileError(f"{meta_file}: missing; {root / tag} is not a complete iGPT-DS checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointFileError(f"{meta_file}: not valid JSON ({e})") from None
    return root, tag, meta


def find_checkpoint(path: PathLike) -> Optional[tuple[Path, str, dict]]:
    """(root, tag, meta) of a run directory with ``latest`` or a ``global_stepN`` tag directory, else None."""
    try:
        return locate_checkpoint(path)
    except CheckpointFileError:
        return None


def read_checkpoint_meta(directory: PathLike) -> tuple[str, dict]:
    """(tag, meta) of the latest complete checkpoint in ``directory`` (``--load``), with clear errors."""
    tag = read_latest(directory)
    if tag is None:
        raise FileNotFoundError(f"--load {directory}: no checkpoint there (expected {Path(directory) / LATEST_FILE}, "
                                f"written by a run with --save {directory})")
    meta_file = Path(directory) / tag / META_FILE
    try:
        return tag, json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{meta_file}: missing; {directory}/{tag} is not an iGPT-DS checkpoint") from None


def last_good(directory: Optional[PathLike]) -> Optional[str]:
    """``SAVE/global_stepN`` of the newest complete checkpoint, for messages; None if there is none."""
    tag = read_latest(directory) if directory else None
    return None if tag is None else f"{directory}/{tag}"


def check_compatible(meta: dict, cfg: ModelConfig, source: str) -> None:
    """Refuse to resume a checkpoint of another architecture or objective."""
    saved = ModelConfig.from_dict(meta["model"], source=source)
    ignore = {"activation_checkpointing", "name"}
    diffs = {k: (getattr(saved, k), getattr(cfg, k)) for k in cfg.to_dict()
             if k not in ignore and getattr(saved, k) != getattr(cfg, k)}
    if diffs:
        listed = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(f"{source}: checkpoint does not match this run's model ({listed}); "
                         f"use the same --model/--objective/--resolution/--variant/--norm/--activation/--bias/"
                         f"--bert-mask-prob/--dropout as the run that wrote it")


def checkpoint_meta(cfg: ModelConfig, ds, layout, palette_sha256: Optional[str], **extra) -> dict:
    """What ``igpt_meta.json`` records: enough to rebuild the engine that wrote the checkpoint."""
    return {"model": cfg.to_dict(), "objective": cfg.objective, "palette_sha256": palette_sha256,
            "zero_stage": ds.zero_stage, "precision": ds.precision, "world_size": layout.world_size,
            "tensor_parallel": layout.tensor_parallel, "pipeline_parallel": layout.pipeline_parallel,
            "data_parallel": layout.data_parallel, "train_batch_size": ds.train_batch_size,
            "ds_config": ds.config, **extra}


# ---- per-rank state: RNG and data position --------------------------------------------------------

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rank_state_file(directory: PathLike, tag: str, rank: int) -> Path:
    return Path(directory) / tag / f"trainer_state_rank{rank:05d}.pt"


def read_rank_state(directory: PathLike, tag: str, rank: int) -> Optional[dict]:
    """This rank's ``{"step", "rng", "loader"}`` of a checkpoint, None if it has none (a converted one)."""
    path = rank_state_file(directory, tag, rank)
    return torch.load(path, weights_only=True) if path.is_file() else None


# ---- writing ---------------------------------------------------------------------------------------

def write_checkpoint(engine, directory: PathLike, step: int, meta: dict, rank_state: dict) -> Path:
    """Collective: DeepSpeed's files + this rank's state + (rank 0) ``igpt_meta.json``, then ``latest``.

    ``latest`` is replaced atomically after a barrier, i.e. only once every rank has finished.
    """
    directory = Path(directory)
    rank = dist.get_rank()
    tag = tag_of(step)
    tag_dir = directory / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(rank_state_file(directory, tag, rank)) as tmp:
        torch.save({"step": step, **rank_state}, tmp)
    engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step, "model": meta["model"]},
                           save_latest=False)
    dist.barrier()
    if rank == 0:
        atomic_write(tag_dir / META_FILE, json.dumps({**meta, "step": step}, indent=2, sort_keys=True) + "\n")
        atomic_write(directory / LATEST_FILE, tag)  # only now does this checkpoint become the one to load
    dist.barrier()
    return tag_dir


def prune(directory: PathLike, keep: str) -> None:
    """Remove every ``global_stepN`` but ``keep`` (rank 0, after ``latest`` names ``keep``)."""
    for old in Path(directory).glob(f"{TAG_PREFIX}*"):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)

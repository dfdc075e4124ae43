"""DeepSpeed checkpoints of any layout <-> full (layout-independent) weights.

Reading: the checkpoint's own layout (DP x TP x PP, ZeRO stage, precision, from its
``igpt_meta.json``) is re-created as ``world_size`` gloo ranks on this host's CPU. Each rank
builds the same engine, lets DeepSpeed load its own files (so every ZeRO stage and the pipeline's
per-layer files are read by DeepSpeed itself), gathers ZeRO-3 partitions and TP shards, and the
(DP 0, TP 0) rank of every pipeline stage writes its part; the parts are merged under the plain
model's parameter names. fp16/bf16 runs yield their 16-bit training weights (upcast on export).

Writing (resharding): the full weights are loaded into a fresh engine of the target layout and
saved as a DeepSpeed checkpoint at the source's step. Adam's moments cannot be carried across a
change of layout here, so the checkpoint is marked ``optimizer_restarted``: a run resumed from it
keeps the weights and the learning-rate schedule position and restarts Adam's state.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from igpt_ds.checkpoint.atomic import atomic_directory
from igpt_ds.checkpoint.run import META_FILE, checkpoint_meta, find_checkpoint, write_checkpoint
from igpt_ds.config import ModelConfig
from igpt_ds.model.pipeline import model_param_names
from igpt_ds.palette import load_palette, palette_sha256
from igpt_ds.parallel import layout as parallel
from igpt_ds.parallel.spawn import run_ranks
from igpt_ds.parallel.weights import gather_full, load_full
from igpt_ds.train.engine import DSSettings, WarmupCosine, build_engine, build_model, load_ds_config, set_schedule_step

PathLike = Union[str, os.PathLike]


def is_deepspeed_checkpoint(path: PathLike) -> bool:
    """A run or tag directory whose ``igpt_meta.json`` carries the DeepSpeed config that wrote it."""
    found = find_checkpoint(path)
    return found is not None and "ds_config" in found[2]


def _rank_env() -> dict:
    return {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _settings(meta: dict) -> DSSettings:
    ds = dict(meta["ds_config"])
    return DSSettings(path="<checkpoint>", config=ds, zero_stage=int(meta["zero_stage"]), precision=meta["precision"],
                      micro_batch_size=ds["train_micro_batch_size_per_gpu"],
                      gradient_accumulation_steps=ds["gradient_accumulation_steps"],
                      train_batch_size=ds["train_batch_size"])


def _engine_for(meta: dict, tensor_parallel: int, pipeline_parallel: int, weights: Optional[dict] = None):
    """This rank's parallel state and a DeepSpeed engine of the checkpoint's architecture.

    ``weights`` (full state dict) are copied in before ``deepspeed.initialize``, which is when
    16-bit and ZeRO engines take their fp32 master copies.
    """
    cfg = ModelConfig.from_dict(meta["model"])
    state = parallel.initialize(tensor_parallel, pipeline_parallel, model=cfg, backend="gloo")
    parallel.init_deepspeed_comm()
    ds = _settings(meta)
    module = build_model(cfg, state, ds, seed=0)
    if weights is not None:
        load_full(module, weights, state.tp_rank, tensor_parallel,
                  name_of=model_param_names(cfg.n_layer, pipeline_parallel > 1))
    engine, scheduler = build_engine(module, state, ds, lr=0.0, schedule=WarmupCosine(0, max(1, meta["step"])))
    return cfg, state, ds, engine, scheduler


def _consolidate_rank(rank: int, world: int, root: str, tag: str, meta: dict, parts_dir: str) -> int:
    tp, pp = meta["tensor_parallel"], meta["pipeline_parallel"]
    cfg, state, ds, engine, _ = _engine_for(meta, tp, pp)
    path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"{root}/{tag}: DeepSpeed found no loadable checkpoint files for rank {rank}")
    tensors = gather_full(engine.module, state.tp_group, tp, model_param_names(cfg.n_layer, pp > 1))
    if state.dp_rank == 0 and state.tp_rank == 0:
        save_file(tensors, os.path.join(parts_dir, f"stage{state.pp_rank:03d}.safetensors"))
    return len(tensors)


def load_deepspeed(path: PathLike, device: Union[str, torch.device] = "cpu"
                   ) -> tuple[ModelConfig, dict[str, torch.Tensor], Optional[np.ndarray], dict]:
    """(config, full state dict, palette or None, meta) of a DeepSpeed checkpoint of any layout.

    Spawns the checkpoint's world size of CPU ranks (gloo) on this host.
    """
    found = find_checkpoint(path)
    if found is None or "ds_config" not in found[2]:
        raise ValueError(f"{path}: not an iGPT-DS DeepSpeed checkpoint (expected 'latest' and "
                         f"global_stepN/{META_FILE} written by igpt_ds/pretrain.py)")
    root, tag, meta = found
    cfg = ModelConfig.from_dict(meta["model"], source=str(root / tag / META_FILE))
    with tempfile.TemporaryDirectory(prefix="igpt-consolidate-") as parts:
        run_ranks(_consolidate_rank, int(meta["world_size"]), str(root), tag, meta, parts,
                  timeout=3600, env=_rank_env())
        sd = {}
        for file in sorted(Path(parts).glob("stage*.safetensors")):
            sd.update(load_file(str(file), device=str(device)))
    palette = None
    if (root / "palette.npy").is_file():
        palette = load_palette(root / "palette.npy")
        if meta.get("palette_sha256") and palette_sha256(palette) != meta["palette_sha256"]:
            raise ValueError(f"{root / 'palette.npy'}: its SHA-256 differs from the palette_sha256 the run recorded "
                             f"in {root / tag / META_FILE}; the palette file was replaced after training")
    return cfg, sd, palette, meta


def _reshard_rank(rank: int, world: int, weights_file: str, meta: dict, out_dir: str) -> int:
    full = load_file(weights_file)
    cfg, state, ds, engine, scheduler = _engine_for(meta, meta["tensor_parallel"], meta["pipeline_parallel"], full)
    set_schedule_step(scheduler, meta["step"])
    extra = {k: meta[k] for k in ("converted_from", "optimizer_restarted")}
    new_meta = checkpoint_meta(cfg, ds, state.layout, meta.get("palette_sha256"), **extra)
    write_checkpoint(engine, out_dir, meta["step"], new_meta, {"rng": None, "loader": None})
    return len(full)


def save_deepspeed(path: PathLike, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                   palette: Optional[np.ndarray] = None, dtype: torch.dtype = torch.float32, *,
                   tensor_parallel: int = 1, pipeline_parallel: int = 1, data_parallel: int = 1,
                   ds_config: Optional[str] = None, step: int = 0, source: str = "") -> Path:
    """Write full weights as a DeepSpeed checkpoint for DP x TP x PP (resharding), atomically."""
    path = Path(path)
    world = tensor_parallel * pipeline_parallel * data_parallel
    default = Path(__file__).resolve().parents[2] / "ds_configs" / (
        "zero1_pipe_fp32.json" if pipeline_parallel > 1 else "zero0_fp32.json")
    ds = load_ds_config(ds_config or str(default), data_parallel, pipeline_parallel)
    parallel.ParallelLayout(world, tensor_parallel, pipeline_parallel).validate(config, ds.zero_stage)
    meta = {"model": config.to_dict(), "tensor_parallel": tensor_parallel, "pipeline_parallel": pipeline_parallel,
            "zero_stage": ds.zero_stage, "precision": ds.precision, "ds_config": ds.config, "step": step,
            "converted_from": source, "optimizer_restarted": True, "palette_sha256": None}
    if palette is not None:
        meta["palette_sha256"] = palette_sha256(palette)
    with atomic_directory(path) as out, tempfile.TemporaryDirectory(prefix="igpt-reshard-") as scratch:
        weights = Path(scratch) / "full.safetensors"
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}, str(weights))
        run_ranks(_reshard_rank, world, str(weights), meta, str(out), timeout=3600, env=_rank_env())
        if palette is not None:
            np.save(out / "palette.npy", np.asarray(palette, dtype=np.float32))
    return path

"""Reference reader: a DeepSpeed checkpoint read by DeepSpeed itself, in engines of its own layout.

This was iGPT-DS's only reader before :mod:`igpt_ds.checkpoint.deepspeed_files`: it re-creates the
checkpoint's world as ``world_size`` gloo ranks on this host's CPU, each builds the engine, lets
DeepSpeed load its files, gathers ZeRO partitions and TP shards, and the (DP 0, TP 0) rank of each
stage writes its part. Every rank holds the whole model plus its optimizer share, so it does not
scale (iGPT-XL at 64 ranks: ~1.7 TB of RAM on one host). It stays as the independent check of the
file reader (tests/test_ds_checkpoint.py) and as the old path ``tools/benchmark.py checkpoint``
measures against; no tool reads checkpoints through it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from igpt_ds.checkpoint.deepspeed_files import locate
from igpt_ds.checkpoint.engine_state import get_full
from igpt_ds.config import ModelConfig
from igpt_ds.model.pipeline import model_param_names
from igpt_ds.parallel import layout as parallel
from igpt_ds.parallel.spawn import run_ranks
from igpt_ds.parallel.weights import gather_full, unshard
from igpt_ds.train.engine import DSSettings, WarmupCosine, build_engine, build_model
from igpt_ds.train.metrics import peak_rss_bytes


def rank_env() -> dict:
    return {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def settings(meta: dict) -> DSSettings:
    ds = dict(meta["ds_config"])
    return DSSettings(path="<checkpoint>", config=ds, zero_stage=int(meta["zero_stage"]), precision=meta["precision"],
                      micro_batch_size=ds["train_micro_batch_size_per_gpu"],
                      gradient_accumulation_steps=ds["gradient_accumulation_steps"],
                      train_batch_size=ds["train_batch_size"])


def engine_for(meta: dict):
    """This rank's parallel state and a DeepSpeed engine of the checkpoint's architecture and layout."""
    cfg = ModelConfig.from_dict(meta["model"])
    state = parallel.initialize(meta["tensor_parallel"], meta["pipeline_parallel"], model=cfg, backend="gloo")
    parallel.init_deepspeed_comm()
    ds = settings(meta)
    module = build_model(cfg, state, ds, seed=0)
    engine, scheduler = build_engine(module, state, ds, lr=0.0, schedule=WarmupCosine(0, max(1, meta["step"])))
    return cfg, state, engine


def _rank(rank: int, world: int, root: str, tag: str, meta: dict, kinds: Sequence[str], parts_dir: str) -> int:
    cfg, state, engine = engine_for(meta)
    tp, pp = meta["tensor_parallel"], meta["pipeline_parallel"]
    path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"{root}/{tag}: DeepSpeed found no loadable checkpoint files for rank {rank}")
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
    name_of = model_param_names(cfg.n_layer, pp > 1)
    out = {}
    for kind in kinds:
        if kind == "module":
            tensors = gather_full(engine.module, state.tp_group, tp, name_of)
        else:
            tensors = {}
            for name, p in engine.module.named_parameters():
                t = get_full(engine, p, kind)
                if getattr(p, "tensor_model_parallel", False) and tp > 1:
                    parts = [torch.empty_like(t) for _ in range(tp)]
                    dist.all_gather(parts, t.contiguous(), group=state.tp_group)
                    t = unshard(parts, p.partition_dim, p.partition_stride)
                tensors[name_of(name)] = t
        out.update({f"{kind}/{k}": v for k, v in tensors.items()})
    if state.dp_rank == 0 and state.tp_rank == 0:
        save_file(out, os.path.join(parts_dir, f"stage{state.pp_rank:03d}.safetensors"))
    return peak_rss_bytes() / 2**20  # this rank's peak RSS, MB


def read_with_engines(path, kinds: Sequence[str] = ("module",), stats: Optional[dict] = None
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """``{kind: {name: full fp32 tensor}}`` of a DeepSpeed checkpoint, read by its own layout's engines.
    ``stats`` (a dict), when given, receives ``rank_peak_rss_mb``: every rank's peak RSS."""
    root, tag, meta = locate(path)
    with tempfile.TemporaryDirectory(prefix="igpt-consolidate-") as parts:
        peaks = run_ranks(_rank, int(meta["world_size"]), str(root), tag, meta, list(kinds), parts,
                          timeout=3600, env=rank_env())
        if stats is not None:
            stats["rank_peak_rss_mb"] = peaks
        merged = {}
        for file in sorted(Path(parts).glob("stage*.safetensors")):
            merged.update(load_file(str(file)))
    return {kind: {k.split("/", 1)[1]: v for k, v in merged.items() if k.startswith(kind + "/")} for kind in kinds}

"""DeepSpeed checkpoints of any layout <-> full weights, and resharding that keeps Adam.

Reading (export, ``load_pretrained``) is :class:`igpt_ds.checkpoint.deepspeed_files.DeepSpeedCheckpoint`:
one process, no engine, tensor by tensor. ``weights="master"`` (the default) gives the fp32 weights
the optimizer holds; ``"module"`` the copy the forward used (16-bit for bf16/fp16 runs).

Writing (resharding, ``--to deepspeed``) starts the *target* layout's ranks on this host's CPU
(gloo). Each builds its engine and pulls, one parameter at a time, exactly its own shard from the
source: the fp32 master into the module and DeepSpeed's fp32 partition, and, from a DeepSpeed
source, Adam's ``exp_avg``/``exp_avg_sq`` and step count into its optimizer partition (through
:mod:`igpt_ds.checkpoint.engine_state`). The learning-rate schedule, the optimizer's current
hyperparameters and the engine's step/sample counters carry over, and the data position does where
the loader allows it (:func:`carried_loader_state`), so ``--load`` continues as if the run had never
moved. No rank holds more than its own shard plus the parameter being copied. Sources without
optimizer state (consolidated exports, Hugging Face directories) give checkpoints marked
``optimizer_restarted``: a run resumed from one keeps the weights and the schedule position and
restarts Adam.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from igpt_ds.checkpoint.atomic import atomic_directory
from igpt_ds.checkpoint.consolidated import save_consolidated_stream
from igpt_ds.checkpoint.deepspeed_files import DeepSpeedCheckpoint
from igpt_ds.checkpoint.engine_state import create_adam_state, inner_optimizer, set_full
from igpt_ds.checkpoint.lazy_torch import DerivedTensor
from igpt_ds.checkpoint.run import META_FILE, checkpoint_meta, find_checkpoint, write_checkpoint
from igpt_ds.config import ModelConfig
from igpt_ds.model.pipeline import model_param_names
from igpt_ds.palette import load_palette, palette_sha256

PathLike = Union[str, os.PathLike]
WEIGHTS = ("master", "module")
LAYOUT_KEYS = ("model", "objective", "palette_sha256", "zero_stage", "precision", "world_size", "tensor_parallel",
               "pipeline_parallel", "data_parallel", "train_batch_size", "ds_config", "step", "converted_from",
               "optimizer_restarted", "data_position")


def is_deepspeed_checkpoint(path: PathLike) -> bool:
    """A run or tag directory whose ``igpt_meta.json`` carries the DeepSpeed config that wrote it."""
    found = find_checkpoint(path)
    return found is not None and "ds_config" in found[2]


def checkpoint_palette(root: Path, meta: dict, meta_file: Path) -> Optional[np.ndarray]:
    """``root/palette.npy`` checked against the hash the run recorded, or None."""
    if not (root / "palette.npy").is_file():
        return None
    palette = load_palette(root / "palette.npy")
    if meta.get("palette_sha256") and palette_sha256(palette) != meta["palette_sha256"]:
        raise ValueError(f"{root / 'palette.npy'}: its SHA-256 differs from the palette_sha256 the run recorded "
                         f"in {meta_file}; the palette file was replaced after training")
    return palette


def load_deepspeed(path: PathLike, device: Union[str, torch.device] = "cpu", weights: str = "master"
                   ) -> tuple[ModelConfig, dict[str, torch.Tensor], Optional[np.ndarray], dict]:
    """(config, full state dict, palette or None, meta) of a DeepSpeed checkpoint of any layout, read in
    this process (the state dict is fp32 for ``weights="master"``, the run's precision for "module")."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: expected one of {WEIGHTS}")
    ckpt = DeepSpeedCheckpoint(path)
    try:
        sd = {name: t.to(device) for name, t in ckpt.tensors(weights)}
    finally:
        ckpt.close()
    palette = checkpoint_palette(ckpt.root, ckpt.meta, ckpt.dir / META_FILE)
    return ckpt.config, sd, palette, {**ckpt.meta, "weights": weights}


def open_deepspeed(path: PathLike) -> tuple[ModelConfig, dict[str, DerivedTensor], Optional[np.ndarray], dict]:
    """Like :func:`load_deepspeed` (fp32 masters), but each full tensor is assembled from the files when
    its ``load()`` is called; the checkpoint's files stay open while the tensors are referenced."""
    ckpt = DeepSpeedCheckpoint(path)
    sd = {name: DerivedTensor(ckpt.full_shape(name), torch.float32,
                              lambda name=name: ckpt.tensor(name, "master").float()) for name in ckpt.names()}
    palette = checkpoint_palette(ckpt.root, ckpt.meta, ckpt.dir / META_FILE)
    return ckpt.config, sd, palette, {**ckpt.meta, "weights": "master"}


def export_deepspeed(src: PathLike, dst: PathLike, weights: str = "master", dtype: torch.dtype = torch.float32,
                     source: str = "") -> tuple[Path, int]:
    """Stream a DeepSpeed checkpoint into a consolidated export, one tensor at a time; returns
    (path, number of parameters). Memory: one parameter and its TP shards."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: expected one of {WEIGHTS}")
    ckpt = DeepSpeedCheckpoint(src)
    try:
        from igpt_ds.checkpoint.formats import expected_shapes

        shapes = {name: ckpt.full_shape(name) for name in ckpt.names()}
        expected = expected_shapes(ckpt.config)
        for name, shape in shapes.items():
            if name in expected and tuple(expected[name]) != shape:
                raise ValueError(f"{ckpt.dir}: {name} assembles to {shape}, the config needs {tuple(expected[name])}")
        palette = checkpoint_palette(ckpt.root, ckpt.meta, ckpt.dir / META_FILE)
        extra = {"step": int(ckpt.meta.get("step", 0)), "converted_from": source or str(ckpt.dir), "weights": weights,
                 "trained_precision": ckpt.precision}
        out = save_consolidated_stream(dst, ckpt.config, shapes, lambda name: ckpt.tensor(name, weights),
                                       palette=palette, dtype=dtype, extra=extra)
        return out, sum(int(np.prod(s)) for s in shapes.values())
    finally:
        ckpt.close()


# ---- writing: the target layout's ranks --------------------------------------------------------

class _SafetensorsSource:
    """Full weights in a safetensors file, read one tensor at a time; no optimizer state."""

    has_optimizer_state = False

    def __init__(self, file: str):
        from safetensors import safe_open

        self._file = safe_open(file, framework="pt")

    def tensor(self, name: str, kind: str = "master") -> torch.Tensor:
        return self._file.get_tensor(name).float()


def _open_source(source: dict):
    if source["kind"] == "deepspeed":
        ckpt = DeepSpeedCheckpoint(source["path"])
        ckpt.has_optimizer_state = True
        return ckpt
    return _SafetensorsSource(source["path"])


def carried_loader_state(loader: Optional[dict], target_dp: int, target_micro: int, dp_rank: int) -> Optional[dict]:
    """The source's data position for a target rank, or None where the target layout cannot continue it.

    The shard loader's epoch plan depends on the DP size and micro-batch (its state records both), so
    its position carries over only when they are unchanged; the synthetic loader's position is a
    sample index of the global stream, valid for any layout with the same global batch.
    """
    if loader is None:
        return None
    if "dp_world_size" in loader:
        if (loader["dp_world_size"], loader["batch_size"]) != (target_dp, target_micro):
            return None
        return {**loader, "dp_rank": dp_rank}
    return dict(loader)


def _copy_in(source, module, state, name_of):
    """Every parameter of this rank's module from ``source``'s masters (its TP shard), one at a time."""
    from igpt_ds.parallel.weights import gathered

    for pname, p in module.named_parameters():
        with gathered([(pname, p)], modifier_rank=0), torch.no_grad():
            local = _local(source, p, name_of(pname), "master", state)
            if local.shape != p.shape:
                raise ValueError(f"{name_of(pname)}: the source holds {tuple(local.shape)}, the target needs "
                                 f"{tuple(p.shape)}")
            p.copy_(local.to(p.dtype))


def _local(source, p, key, kind, state):
    """This rank's TP shard of ``source``'s ``key`` (``kind``: master, exp_avg, exp_avg_sq)."""
    from igpt_ds.parallel.weights import is_tp_sharded, shard

    full = source.tensor(key, kind)
    if is_tp_sharded(p):
        full = shard(full, p.partition_dim, p.partition_stride, state.tp_rank, state.layout.tensor_parallel)
    return full


def _write_rank(rank: int, world: int, source: dict, meta: dict, out_dir: str) -> dict:
    from igpt_ds.checkpoint.engine_reader import settings
    from igpt_ds.parallel import layout as parallel
    from igpt_ds.train.engine import WarmupCosine, build_engine, build_model, set_schedule_step

    src = _open_source(source)
    cfg = ModelConfig.from_dict(meta["model"])
    tp, pp = meta["tensor_parallel"], meta["pipeline_parallel"]
    state = parallel.initialize(tp, pp, model=cfg, backend="gloo")
    parallel.init_deepspeed_comm()
    ds = settings(meta)
    module = build_model(cfg, state, ds, seed=0)
    name_of = model_param_names(cfg.n_layer, pp > 1)
    _copy_in(src, module, state, name_of)  # before deepspeed.initialize, which copies the masters from it
    step = int(meta["step"])
    hp = src.optimizer_hyperparameters() if src.has_optimizer_state else {}
    engine, scheduler = build_engine(module, state, ds, lr=float(hp.get("initial_lr", hp.get("lr", 0.0))),
                                     schedule=WarmupCosine(0, max(1, step)), adam_eps=float(hp.get("eps", 1e-8)))
    report = {"optimizer": "restarted", "data_position": "reset"}
    rank_state = {"rng": None, "loader": None}
    if src.has_optimizer_state:
        create_adam_state(engine, src.adam_step())
        for pname, p in engine.module.named_parameters():
            for kind in ("master", "exp_avg", "exp_avg_sq"):
                set_full(engine, p, kind, _local(src, p, name_of(pname), kind, state))
        for group in inner_optimizer(engine).param_groups:
            group.update({k: (tuple(v) if k == "betas" else v) for k, v in hp.items()})
        counters = src.engine_state()
        if counters.get("lr_scheduler"):
            scheduler.load_state_dict(counters["lr_scheduler"])
        engine.global_steps = int(counters.get("global_steps") or step)
        engine.global_samples = int(counters.get("global_samples") or step * ds.train_batch_size)
        engine.skipped_steps = int(counters.get("skipped_steps") or 0)
        report["optimizer"] = "carried"
        same_layout = (src.tp, src.pp, src.dp) == (tp, pp, state.layout.data_parallel)
        src_state = src.rank_state(rank if same_layout else 0) or {}
        rank_state["rng"] = src_state.get("rng") if same_layout else None
        same_batch = src.meta.get("train_batch_size") == ds.train_batch_size
        loader = carried_loader_state(src_state.get("loader"), state.layout.data_parallel, ds.micro_batch_size,
                                      state.dp_rank) if same_batch else None
        rank_state["loader"] = loader
        report["data_position"] = "carried" if loader is not None else "reset"
    else:
        set_schedule_step(scheduler, step)
    # Every rank agrees on what was carried (the loader rule is the same on every rank).
    extra = {k: v for k, v in meta.items() if k not in LAYOUT_KEYS}
    new_meta = checkpoint_meta(cfg, ds, state.layout, meta.get("palette_sha256"), **extra,
                               converted_from=meta.get("converted_from", ""),
                               optimizer_restarted=report["optimizer"] == "restarted",
                               data_position=report["data_position"])
    write_checkpoint(engine, out_dir, step, new_meta, rank_state)
    from igpt_ds.train.metrics import peak_rss_bytes

    return {**report, "peak_rss_mb": peak_rss_bytes() / 2**20}


def _target_meta(config: ModelConfig, *, tensor_parallel: int, pipeline_parallel: int, data_parallel: int,
                 ds_config: Optional[str], step: int, source: str, palette, extra: Optional[dict] = None) -> dict:
    from igpt_ds.parallel import layout as parallel
    from igpt_ds.train.engine import load_ds_config

    for flag, value in (("--tensor-parallel", tensor_parallel), ("--pipeline-parallel", pipeline_parallel),
                        ("--data-parallel", data_parallel)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    world = tensor_parallel * pipeline_parallel * data_parallel
    default = Path(__file__).resolve().parents[2] / "ds_configs" / (
        "zero1_pipe_fp32.json" if pipeline_parallel > 1 else "zero0_fp32.json")
    ds = load_ds_config(ds_config or str(default), data_parallel, pipeline_parallel)
    parallel.ParallelLayout(world, tensor_parallel, pipeline_parallel).validate(config, ds.zero_stage)
    meta = {**(extra or {}), "model": config.to_dict(), "tensor_parallel": tensor_parallel,
            "pipeline_parallel": pipeline_parallel, "zero_stage": ds.zero_stage, "precision": ds.precision,
            "ds_config": ds.config, "step": step, "converted_from": source, "world_size": world,
            "palette_sha256": palette_sha256(palette) if palette is not None else None}
    return meta


def _write_target(path: PathLike, source: dict, meta: dict, palette) -> tuple[Path, list[dict]]:
    from igpt_ds.checkpoint.engine_reader import rank_env
    from igpt_ds.parallel.spawn import run_ranks

    path = Path(path)
    with atomic_directory(path) as out:
        reports = run_ranks(_write_rank, int(meta["world_size"]), source, meta, str(out), timeout=3600,
                            env=rank_env())
        if palette is not None:
            np.save(out / "palette.npy", np.asarray(palette, dtype=np.float32))
    return path, reports


def reshard_deepspeed(src: PathLike, dst: PathLike, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                      data_parallel: int = 1, ds_config: Optional[str] = None, source: str = "") -> tuple[Path, dict]:
    """A DeepSpeed checkpoint rewritten for another DP x TP x PP layout / ZeRO stage, with Adam's state;
    returns (path, {"optimizer": "carried", "data_position": "carried" | "reset", "largest_rank_peak_rss_mb"})."""
    with DeepSpeedCheckpoint(src) as checked:  # every file of the source is there before any rank starts
        root, tag, src_meta = checked.root, checked.tag, checked.meta
    config = ModelConfig.from_dict(src_meta["model"], source=str(root / tag / META_FILE))
    palette = checkpoint_palette(root, src_meta, root / tag / META_FILE)
    extra = {k: v for k, v in src_meta.items() if k not in LAYOUT_KEYS}
    meta = _target_meta(config, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                        data_parallel=data_parallel, ds_config=ds_config, step=int(src_meta.get("step", 0)),
                        source=source or str(root / tag), palette=palette, extra=extra)
    out, reports = _write_target(dst, {"kind": "deepspeed", "path": str(root / tag)}, meta, palette)
    summary = {k: reports[0][k] for k in ("optimizer", "data_position")}  # the same rule ran on every rank
    return out, {**summary, "largest_rank_peak_rss_mb": max(r["peak_rss_mb"] for r in reports)}


def save_deepspeed(path: PathLike, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                   palette: Optional[np.ndarray] = None, dtype: torch.dtype = torch.float32, *,
                   tensor_parallel: int = 1, pipeline_parallel: int = 1, data_parallel: int = 1,
                   ds_config: Optional[str] = None, step: int = 0, source: str = "") -> Path:
    """Full weights (no optimizer state) as a DeepSpeed checkpoint for DP x TP x PP, atomically; marked
    ``optimizer_restarted``."""
    meta = _target_meta(config, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                        data_parallel=data_parallel, ds_config=ds_config, step=step, source=source, palette=palette)
    with tempfile.TemporaryDirectory(prefix="igpt-reshard-") as scratch:
        from safetensors.torch import save_file

        weights = Path(scratch) / "full.safetensors"
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()
                   if isinstance(v, torch.Tensor)}, str(weights))
        out, _ = _write_target(path, {"kind": "safetensors", "path": str(weights)}, meta, palette)
    return out


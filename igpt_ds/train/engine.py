"""The DeepSpeed engine of a run: its JSON config, the learning-rate schedule, the model and the engine.

The DeepSpeed JSON config is the one place batch size and precision are stated. The loop reads
micro-batch size, gradient accumulation, precision and ZeRO stage from it, resolves the batch
triple against the data-parallel size exactly as DeepSpeed does, and refuses a config that
contradicts the run's flags before any work starts. The schedule is the paper's: linear warm-up,
then cosine decay to ``min_ratio`` (0), or a constant rate (fine-tuning).

Used by the training loop (:mod:`igpt_ds.train.loop`) and by checkpoint resharding
(:mod:`igpt_ds.checkpoint.reshard`), which re-creates a run's engine without its loop.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import deepspeed
import torch
from torch import nn

from igpt_ds.config import ModelConfig
from igpt_ds.model import compile as compiling
from igpt_ds.model.pipeline import build_pipeline_module
from igpt_ds.model.transformer import IGPTModel
from igpt_ds.parallel import layout as parallel


@dataclass(frozen=True)
class DSSettings:
    path: str
    config: dict  # the dict handed to deepspeed.initialize (batch triple resolved)
    zero_stage: int
    precision: str  # "fp32" | "fp16" | "bf16"
    micro_batch_size: int
    gradient_accumulation_steps: int
    train_batch_size: int  # global: micro x accumulation x DP

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]


def _positive_int(cfg: dict, key: str, path: str):
    value = cfg.get(key)
    if value is None or value == "auto":
        return None
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: field '{key}' must be a positive integer, got {value!r}")
    return value


def load_ds_config(path: str, data_parallel: int, pipeline_parallel: int = 1) -> DSSettings:
    """Read and check a DeepSpeed config for a run with the given DP and PP sizes."""
    file = Path(path)
    try:
        cfg = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--deepspeed_config {path}: no such file (ready configs are in ds_configs/)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for block in ("optimizer", "scheduler"):
        if block in cfg:
            raise ValueError(f"{path}: remove the '{block}' block; iGPT-DS builds Adam (betas 0.9, 0.95, no weight "
                             f"decay) and the warm-up + cosine schedule from --lr/--warmup-*/--train-steps")
    fp16 = bool(cfg.get("fp16", {}).get("enabled", False))
    bf16 = bool(cfg.get("bf16", {}).get("enabled", False))
    if fp16 and bf16:
        raise ValueError(f"{path}: both 'fp16' and 'bf16' are enabled; enable at most one")
    precision = "fp16" if fp16 else "bf16" if bf16 else "fp32"
    if fp16 and not torch.cuda.is_available():
        raise ValueError(f"{path}: fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16 support); "
                         f"on CPU use a bf16 or fp32 config, e.g. ds_configs/zero3_bf16.json")
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{path}: zero_optimization.stage={stage}; expected 0, 1, 2 or 3")
    if pipeline_parallel > 1 and stage not in parallel.PIPELINE_ZERO_STAGES:
        raise ValueError(f"{path}: ZeRO stage {stage} cannot be combined with --pipeline-parallel {pipeline_parallel}: "
                         f"DeepSpeed's pipeline engine supports ZeRO-0/1 only. "
                         f"Use ds_configs/zero1_pipe_{precision}.json, "
                         f"or --pipeline-parallel 1")

    train = _positive_int(cfg, "train_batch_size", path)
    micro = _positive_int(cfg, "train_micro_batch_size_per_gpu", path)
    gas = _positive_int(cfg, "gradient_accumulation_steps", path)
    dp = data_parallel
    # DeepSpeed's rules: any two of the three determine the third (accumulation defaults to 1).
    if train and micro and gas:
        pass
    elif train and micro:
        gas = train // (micro * dp)
    elif train and gas:
        micro = train // (gas * dp)
    elif train:
        gas, micro = 1, train // dp
    elif micro:
        gas = gas or 1
        train = micro * gas * dp
    else:
        raise ValueError(f"{path}: state 'train_batch_size' or 'train_micro_batch_size_per_gpu'")
    if not micro or not gas or train != micro * gas * dp:
        raise ValueError(
            f"{path}: train_batch_size={cfg.get('train_batch_size')} does not split over data-parallel size {dp} "
            f"(micro-batch {cfg.get('train_micro_batch_size_per_gpu')}, accumulation "
            f"{cfg.get('gradient_accumulation_steps')}): it must equal micro x accumulation x DP. "
            f"Change the batch fields or the number of processes / --tensor-parallel / --pipeline-parallel")
    resolved = dict(cfg)
    resolved.update(train_batch_size=train, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=gas)
    resolved.setdefault("zero_allow_untested_optimizer", True)  # our client torch Adam under ZeRO
    resolved.setdefault("steps_per_print", 10 ** 9)  # we log ourselves
    return DSSettings(str(path), resolved, stage, precision, micro, gas, train)


def matmul_precision(precision: str) -> str:
    """The precision the matmuls of a run at ``precision`` (a DS config's) run in; turns TF32 on where it applies.

    An fp32 config on a CUDA GPU computes its matmuls and convolutions in TF32 (10 mantissa bits, fp32 range,
    about 7x plain FP32 on A100/H100; PyTorch's default is plain FP32): returns "tf32", and MFU is against the
    TF32 peak. ``NVIDIA_TF32_OVERRIDE=0`` (NVIDIA's switch, read by cuBLAS/cuDNN) keeps plain FP32.
    """
    if precision != "fp32" or not torch.cuda.is_available() or os.environ.get("NVIDIA_TF32_OVERRIDE") == "0":
        return precision
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return "tf32"


class WarmupCosine:
    """Multiplier for ``torch.optim.lr_scheduler.LambdaLR`` (a class, so its state pickles)."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0, decay: bool = True):
        if total_steps < 1:
            raise ValueError(f"total_steps={total_steps} must be >= 1")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps={warmup_steps} must lie in 0..total_steps={total_steps}")
        self.warmup_steps, self.total_steps, self.min_ratio, self.decay = warmup_steps, total_steps, min_ratio, decay

    def __call__(self, step: int) -> float:
        # `step` counts optimizer steps already taken: step 0 is the first update.
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.decay:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(cfg: ModelConfig, state: parallel.ParallelState, ds: DSSettings, seed: int,
                model_cls: Optional[Callable[..., nn.Module]] = None, pipeline_options: Optional[dict] = None):
    """The model for this rank: a PipelineModule stage for PP > 1, else IGPTModel (under zero.Init for ZeRO-3).

    Per-layer seeds make the weights independent of the layout (see ``IGPTModel(seed=...)``).
    Variants (fine-tuning) pass ``model_cls`` (called as ``model_cls(cfg, tp_group, seed=seed)``) and
    ``pipeline_options`` (extra keyword arguments of ``build_pipeline_module``).
    """
    torch.manual_seed(seed)
    layout = state.layout
    if layout.pipeline_parallel > 1:
        return build_pipeline_module(cfg, state.tp_group, layout.pipeline_parallel, layout.tensor_parallel,
                                     layout.data_parallel, seed=seed, **(pipeline_options or {}))
    init = contextlib.nullcontext()
    if ds.zero_stage == 3:
        init = deepspeed.zero.Init(data_parallel_group=state.dp_group, config_dict_or_path=ds.config,
                                   mpu=parallel.DeepSpeedMPU(state))
    with init:
        module = (model_cls or IGPTModel)(cfg, state.tp_group, seed=seed)
    if cfg.dropout:
        # Dropout draws from the default generator (which activation checkpointing replays): one stream per
        # data-parallel replica. Without dropout nothing is reseeded, so such runs stay as they were.
        torch.manual_seed(seed + 1_000_003 * (1 + state.dp_rank))
    return module


def build_engine(module: nn.Module, state: parallel.ParallelState, ds: DSSettings, lr: float,
                 schedule: WarmupCosine, adam_eps: float = 1e-8, compile: bool = False):
    """Adam (betas 0.9, 0.95, no weight decay, as the paper) + LambdaLR(schedule) inside a DeepSpeed engine.

    With ``compile`` (``--compile``) the transformer blocks go through torch.compile: at ZeRO-0..2 (and
    pipeline stages) before ``deepspeed.initialize``, at ZeRO-3 by DeepSpeed's ``engine.compile()``;
    refused with the reason where it cannot work (:mod:`igpt_ds.model.compile`). The engine gets
    ``engine.graph_breaks()``: the count for the step records (None uncompiled), printed once on rank 0.
    """
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    compiling.prefer_fast_attention(device)  # sm90: cuDNN, then Flash attention; elsewhere torch's choice
    if compile:
        compiling.check_compile(ds.zero_stage, device)
        if ds.zero_stage < 3:
            compiling.compile_blocks(module)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.95), eps=adam_eps, weight_decay=0.0,
                                 fused=torch.cuda.is_available() or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds.config,
        mpu=None if state.layout.pipeline_parallel > 1 else parallel.DeepSpeedMPU(state))
    if compile and ds.zero_stage == 3:
        compiling.compile_engine(engine)
    engine.graph_breaks = compiling.GraphBreaks(compile, announce=state.rank == 0)
    return engine, scheduler


def set_schedule_step(scheduler, step: int) -> None:
    """Put a LambdaLR at ``step`` without replaying it (for checkpoints that carry no schedule state)."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs

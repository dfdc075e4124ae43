"""The DeepSpeed JSON config: the one place batch size and precision are stated.

The trainer reads micro-batch size, gradient accumulation, precision and ZeRO stage from it,
resolves the batch triple against the data-parallel size exactly as DeepSpeed does, and refuses
a config that contradicts the run's flags before any work starts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


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
    if pipeline_parallel > 1 and stage >= 2:
        raise ValueError(f"{path}: ZeRO stage {stage} cannot be combined with --pipeline-parallel {pipeline_parallel}: "
                         f"DeepSpeed's pipeline engine supports ZeRO-0/1 only. Use ds_configs/zero1_pipe_{precision}.json, "
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

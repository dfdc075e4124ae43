"""One parameter's fp32 master and Adam moments inside a live DeepSpeed engine, for every optimizer
DeepSpeed wraps ours in: ZeRO-1/2 and the bf16 optimizer (fragments, ``_hp_mapping``), ZeRO-3
(``ds_id``), and ZeRO-0 (the module itself in fp32; ``fp32_groups`` for 16-bit; ``fp32_groups_flat``
for fused fp16). Values are this TP rank's full parameter (every DP fragment joined).

Resharding writes through :func:`set_full`; the engine-side reference reader
(:mod:`igpt_ds.checkpoint.engine_reader`) reads through :func:`get_full`. ``get_full`` is a
collective over the DP group under ZeRO (every rank calls it for the same parameters in the same
order); ``set_full`` is local.
"""
from __future__ import annotations

import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

KINDS = ("master", "exp_avg", "exp_avg_sq")


def _is_zero(param) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer (our Adam) under DeepSpeed's wrapper."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _zero0_master(engine, param) -> torch.Tensor:
    """The fp32 tensor ZeRO-0 updates for ``param`` (a view into the flat group for fused fp16)."""
    opt = engine.optimizer
    if hasattr(opt, "fp16_groups"):
        for g, group in enumerate(opt.fp16_groups):
            offset = 0
            for j, p in enumerate(group):
                if p is param:
                    if hasattr(opt, "fp32_groups"):
                        return opt.fp32_groups[g][j]
                    return opt.fp32_groups_flat[g].narrow(0, offset, p.numel()).view(p.shape)
                offset += p.numel()
        raise KeyError("parameter not found in the optimizer's fp16_groups")
    return param  # fp32: the optimizer updates the module's parameter itself


def _zero0_state(engine, param, kind: str) -> torch.Tensor:
    opt, inner = engine.optimizer, inner_optimizer(engine)
    master = _zero0_master(engine, param)
    if hasattr(opt, "fp32_groups_flat") and not hasattr(opt, "fp32_groups"):
        for flat in opt.fp32_groups_flat:
            if master.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr():
                start = (master.data_ptr() - flat.data_ptr()) // flat.element_size()
                return inner.state[flat][kind].narrow(0, start, master.numel()).view(master.shape)
    return inner.state[master][kind]


def get_full(engine, param, kind: str) -> torch.Tensor:
    """fp32 ``kind`` ("master", "exp_avg", "exp_avg_sq") of ``param``, on the CPU."""
    if _is_zero(param):
        value = safe_get_full_fp32_param(param) if kind == "master" else safe_get_full_optimizer_state(param, kind)
    else:
        value = _zero0_master(engine, param) if kind == "master" else _zero0_state(engine, param, kind)
    return value.detach().to("cpu", torch.float32).clone()


def set_full(engine, param, kind: str, value: torch.Tensor) -> None:
    """Write ``kind`` of ``param`` (its TP-local full value) into this rank's partition."""
    value = value.to(torch.float32)
    if _is_zero(param):
        target = getattr(param, "ds_tensor", param)
        value = value.to(target.device)
        if kind == "master":
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, kind)
        return
    with torch.no_grad():
        target = _zero0_master(engine, param) if kind == "master" else _zero0_state(engine, param, kind)
        target.copy_(value.view(target.shape))


def create_adam_state(engine, step: int) -> None:
    """Give every parameter of the inner Adam a state (zeros at ``step``) before its first step, and let
    DeepSpeed link its fragments to it, so :func:`set_full` can write the moments."""
    inner = inner_optimizer(engine)
    # ZeRO-3 puts its flat fp32 sub-groups into the param groups only while it steps
    zero3 = [(inner.param_groups[0], p) for p in getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])]
    for group, p in [(g, p) for g in inner.param_groups for p in g["params"]] + zero3:
        state = inner.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = torch.tensor(float(step), dtype=torch.float32,
                                     device=p.device if group.get("capturable") or group.get("fused") else "cpu")
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()

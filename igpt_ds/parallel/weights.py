"""Full (layout-independent) weights <-> this rank's parameters, for any ZeRO stage x TP x PP.

Two levels:
- a plain module in one process or a TP group: :func:`load_full_state_dict` / :func:`full_state_dict`;
- a training module of any layout (ZeRO-3 partitions, TP shards, a pipeline stage's layers under
  their pipeline names): :func:`load_full` / :func:`gather_full`, used by fine-tuning's init and
  best export and by checkpoint conversion, so each placement rule has one implementation.

The rule for each parameter is read from the attributes megatron-core sets on it
(``tensor_model_parallel``, ``partition_dim``, ``partition_stride``), never from its name:
a full tensor is cut along ``partition_dim`` into ``stride * tp`` equal chunks and rank r keeps
chunks ``r, r + tp, ...`` (the fused [q; k; v] weight has stride 3). Replicated parameters are
the same on every rank.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Collection, Mapping

import deepspeed
import torch
import torch.distributed as dist
from torch import nn


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def shard(full: torch.Tensor, dim: int, stride: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's slice of ``full`` (see module docstring)."""
    if tp_size == 1:
        return full
    if full.shape[dim] % (stride * tp_size):
        raise ValueError(f"cannot shard dim {dim} of size {full.shape[dim]} into {stride} x {tp_size} parts")
    chunks = torch.chunk(full, stride * tp_size, dim=dim)
    return torch.cat(chunks[tp_rank::tp_size], dim=dim)


def unshard(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of :func:`shard` given every rank's slice, in rank order."""
    tp_size = len(shards)
    if tp_size == 1:
        return shards[0]
    pieces = [torch.chunk(s, stride, dim=dim) for s in shards]  # pieces[rank][j]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(tp_size)], dim=dim)


def load_full_state_dict(model: nn.Module, full: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Copy a full (TP=1 layout) state dict into a possibly TP-sharded model, in place."""
    tp_group = getattr(model, "tp_group", None)
    tp_rank = dist.get_rank(tp_group) if tp_group is not None and dist.is_initialized() else 0
    tp_size = getattr(model, "tp_size", 1)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    if strict:
        own = set(params) | set(buffers)
        missing, unexpected = sorted(own - set(full)), sorted(set(full) - own)
        if missing or unexpected:
            raise ValueError(f"state dict does not match the model: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
    load_full(model, full, tp_rank, tp_size, optional=() if strict else params.keys(),
              source=f"TP rank {tp_rank} of {tp_size}")
    with torch.no_grad():
        for name, b in buffers.items():
            if name in full:
                b.copy_(full[name].to(b.dtype))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather the full (TP=1 layout) state dict on every TP rank, in the model's dtype and device; a
    collective over the TP group."""
    out = gather_full(model, getattr(model, "tp_group", None), getattr(model, "tp_size", 1), fp32_cpu=False)
    out.update({name: b.detach().clone() for name, b in model.named_buffers()})
    return out


def gathered(named: list, modifier_rank=None):
    """ZeRO-3 partitions gathered for the block (written back from ``modifier_rank``); else nothing to do."""
    params = [p for _, p in named]
    if any(hasattr(p, "ds_id") for p in params):
        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def load_full(module: nn.Module, full: Mapping[str, torch.Tensor], tp_rank: int, tp_size: int,
              name_of: Callable[[str], str] = lambda name: name, optional: Collection[str] = (),
              source: str = "weights") -> None:
    """Copy full weights into this rank's module of any layout, in place (before ``deepspeed.initialize``).

    ``name_of`` maps the module's parameter names to the full state dict's (pipeline stages);
    keys in ``optional`` missing from ``full`` keep their init (a fresh class head). Every rank of
    a ZeRO-3 group calls it; DP rank 0 of each parameter's group writes the gathered value.
    """
    named = list(module.named_parameters())
    with gathered(named, modifier_rank=0), torch.no_grad():
        for name, p in named:
            key = name_of(name)
            if key not in full:
                if key in optional:
                    continue
                raise ValueError(f"{source}: no weight {key}")
            src = full[key]
            if is_tp_sharded(p):
                src = shard(src, p.partition_dim, p.partition_stride, tp_rank, tp_size)
            if src.shape != p.shape:
                raise ValueError(f"{source}: {key} {tuple(src.shape)} does not fit {tuple(p.shape)}")
            p.copy_(src.to(p.dtype))


def gather_full(module: nn.Module, tp_group, tp_size: int, name_of: Callable[[str], str] = lambda name: name,
                fp32_cpu: bool = True) -> dict[str, torch.Tensor]:
    """This rank's (stage's) parameters as full tensors under ``name_of`` names: fp32 on the CPU (an
    export), or with ``fp32_cpu=False`` in the parameters' own dtype and device. Collective over the
    ZeRO-3 and TP groups: every rank calls it and gets the same tensors within its stage."""
    named = list(module.named_parameters())
    out = {}
    with gathered(named):
        for name, p in named:
            t = p.detach()
            if is_tp_sharded(p) and tp_size > 1:
                parts = [torch.empty_like(t) for _ in range(tp_size)]
                dist.all_gather(parts, t.contiguous(), group=tp_group)
                t = unshard(parts, p.partition_dim, p.partition_stride)
            out[name_of(name)] = t.to("cpu", torch.float32).clone() if fp32_cpu else t.clone()
    return out


def merge_stages(stage_weights: dict[str, torch.Tensor], is_stage_writer: bool) -> dict[str, torch.Tensor]:
    """Every pipeline stage's full weights on global rank 0 (empty elsewhere). Collective over the world.

    ``is_stage_writer``: this rank contributes its stage (DP 0, TP 0 of each stage).
    """
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(stage_weights if is_stage_writer else {}, parts, dst=0)
    return {k: v for part in (parts or []) for k, v in part.items()}

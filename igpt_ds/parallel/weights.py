"""Full (layout-independent) weights <-> this rank's parameters, for any ZeRO stage x TP x PP.

Two levels:
- a plain module in one process or a TP group: :func:`load_full_state_dict` / :func:`full_state_dict`;
- a training module of any layout (ZeRO-3 partitions, TP shards, a pipeline stage's layers under
  their pipeline names): :func:`load_full` / :func:`gather_full`, used by fine-tuning's init and
  best export and by checkpoint conversion, so each placement rule has one implementation.
  ZeRO-3 partitions are gathered one module at a time (never the whole model); ``load_full(src=0)``
  has one rank read the full weights (lazily, tensor by tensor) and broadcast each tensor.

The rule for each parameter is read from the attributes megatron-core sets on it
(``tensor_model_parallel``, ``partition_dim``, ``partition_stride``), never from its name:
a full tensor is cut along ``partition_dim`` into ``stride * tp`` equal chunks and rank r keeps
chunks ``r, r + tp, ...`` (the fused [q; k; v] weight has stride 3). Replicated parameters are
the same on every rank.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Collection, Mapping, Optional

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


def _per_module(module: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """``named_parameters()`` in its order, cut into each module's own parameters: ZeRO-3 gathers
    one module at a time, never the whole model."""
    units, seen = [], set()
    for prefix, m in module.named_modules():
        unit = []
        for name, p in m.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                unit.append((f"{prefix}.{name}" if prefix else name, p))
        if unit:
            units.append(unit)
    return units


class HeldElsewhere:
    """A tensor of a full state dict that another rank reads: its shape and dtype, no data."""

    def __init__(self, shape, dtype: torch.dtype, rank: int):
        self.shape, self.dtype, self.rank = torch.Size(shape), dtype, rank

    def load(self) -> torch.Tensor:
        raise RuntimeError(f"this tensor is read by rank {self.rank}; pass src={self.rank} to load_full")


def tensor_specs(full: Mapping) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of a full state dict of tensors or lazy tensors (nothing is read)."""
    return {k: (tuple(v.shape), v.dtype) for k, v in full.items() if hasattr(v, "shape")}


def placeholders(specs: Mapping[str, tuple], rank: int) -> dict[str, HeldElsewhere]:
    """What ranks other than ``rank`` pass to :func:`load_full` (``src=rank``) for ``rank``'s state dict."""
    return {k: HeldElsewhere(shape, dtype, rank) for k, (shape, dtype) in specs.items()}


def _materialize(t) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else t.load()


def _shard_shape(full_shape, p: torch.Tensor, tp_size: int) -> tuple[int, ...]:
    shape = list(full_shape)
    if is_tp_sharded(p) and tp_size > 1:
        dim, stride = p.partition_dim, p.partition_stride
        if shape[dim] % (stride * tp_size):
            raise ValueError(f"cannot shard dim {dim} of size {shape[dim]} into {stride} x {tp_size} parts")
        shape[dim] //= tp_size
    return tuple(shape)


def _agree(error: Optional[str], needed: list, distributed: bool) -> tuple[Optional[str], set]:
    """(the first rank's error, the keys any rank needs): every rank raises together, none hangs."""
    if not distributed:
        return error, set(needed)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (error, needed))
    errors = [f"rank {r}: {e}" for r, (e, _) in enumerate(everyone) if e is not None]
    return (errors[0] if errors else None), {k for _, keys in everyone for k in keys}


def load_full(module: nn.Module, full: Mapping, tp_rank: int, tp_size: int,
              name_of: Callable[[str], str] = lambda name: name, optional: Collection[str] = (),
              source: str = "weights", src: Optional[int] = None,
              device: Optional[torch.device] = None) -> None:
    """Copy full weights into this rank's module of any layout, in place (before ``deepspeed.initialize``).

    ``full`` maps names to tensors or lazy tensors (``shape``, ``dtype``, ``load()``; see
    :mod:`igpt_ds.checkpoint.lazy_torch`), read one at a time. ``name_of`` maps the module's parameter
    names to ``full``'s (pipeline stages); keys in ``optional`` missing from ``full`` keep their init
    (a fresh class head). Under ZeRO-3 every rank of the group calls it and the parameters are
    gathered one module at a time; DP rank 0 of each parameter's group writes the gathered value.

    ``src`` (a global rank) makes it a collective over the default group: only rank ``src`` reads
    ``full``'s tensors, the others pass the same names, shapes and dtypes without data
    (:func:`placeholders`), and each tensor reaches every rank by one broadcast on ``device`` (the
    compute device; CPU by default). Each rank keeps only its TP shard / ZeRO partition, so none
    holds more than one full tensor beyond its own parameters.
    """
    distributed = src is not None and dist.is_initialized() and dist.get_world_size() > 1
    named = list(module.named_parameters())
    keys = {name: name_of(name) for name, _ in named}
    error, needed = None, []
    for name, p in named:
        key = keys[name]
        if key not in full:
            if key not in optional and error is None:
                error = f"{source}: no weight {key}"
            continue
        needed.append(key)
        try:
            want = _shard_shape(full[key].shape, p, tp_size)
        except ValueError as e:
            error = error or f"{source}: {key}: {e}"
            continue
        have = tuple(getattr(p, "ds_shape", p.shape))
        if want != have and error is None:
            error = f"{source}: {key} {want} does not fit {have}"
    error, wanted = _agree(error, needed, distributed)
    if error is not None:
        raise ValueError(error)

    device = torch.device("cpu") if device is None else torch.device(device)

    def fetch(key: str) -> torch.Tensor:
        if not distributed:
            return _materialize(full[key])
        if dist.get_rank() == src:
            t = _materialize(full[key]).to(device).contiguous()
        else:
            t = torch.empty(full[key].shape, dtype=full[key].dtype, device=device)
        dist.broadcast(t, src)
        return t

    def copy(p: torch.Tensor, t: torch.Tensor) -> None:
        if is_tp_sharded(p):
            t = shard(t, p.partition_dim, p.partition_stride, tp_rank, tp_size)
        p.copy_(t.to(p.dtype))

    mine = {keys[name]: p for name, p in named if keys[name] in full}
    with torch.no_grad():
        if any(hasattr(p, "ds_id") for _, p in named):
            # ZeRO-3 (PP = 1: the same modules on every rank): one module's parameters gathered at a time.
            for unit in _per_module(module):
                with gathered(unit, modifier_rank=0):
                    for name, p in unit:
                        if keys[name] in full:
                            copy(p, fetch(keys[name]))
        else:
            # Every rank walks the same key order (the full state dict's): each broadcast is matched.
            order = [k for k in full if k in wanted] if distributed else list(mine)
            for key in order:
                t = fetch(key)
                if key in mine:
                    copy(mine[key], t)
                del t


def gather_full(module: nn.Module, tp_group, tp_size: int, name_of: Callable[[str], str] = lambda name: name,
                fp32_cpu: bool = True, keep: bool = True) -> dict[str, torch.Tensor]:
    """This rank's (stage's) parameters as full tensors under ``name_of`` names: fp32 on the CPU (an
    export), or with ``fp32_cpu=False`` in the parameters' own dtype and device. Collective over the
    ZeRO-3 and TP groups: every rank calls it and gets the same tensors within its stage. ZeRO-3
    partitions are gathered one module at a time. A rank with ``keep=False`` takes part in the
    collectives and keeps nothing (an empty dict): an export needs the full copy on one rank only, and
    at iGPT-XL that copy is 27 GB of host memory."""
    out = {}
    for unit in _per_module(module):
        with gathered(unit):
            for name, p in unit:
                t = p.detach()
                if is_tp_sharded(p) and tp_size > 1:
                    parts = [torch.empty_like(t) for _ in range(tp_size)]
                    dist.all_gather(parts, t.contiguous(), group=tp_group)
                    if not keep:
                        continue
                    t = unshard(parts, p.partition_dim, p.partition_stride)
                if keep:
                    out[name_of(name)] = t.to("cpu", torch.float32).clone() if fp32_cpu else t.clone()
    return out


def merge_stages(stage_weights: dict[str, torch.Tensor], is_stage_writer: bool) -> dict[str, torch.Tensor]:
    """Every pipeline stage's full weights on global rank 0 (empty elsewhere). Collective over the world.

    ``is_stage_writer``: this rank contributes its stage (DP 0, TP 0 of each stage).
    """
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(stage_weights if is_stage_writer else {}, parts, dst=0)
    return {k: v for part in (parts or []) for k, v in part.items()}

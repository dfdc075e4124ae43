"""Memory and layout planner: will a model, batch and DP x TP x PP layout fit on these GPUs?

Everything is arithmetic on :class:`~igpt_ds.config.ModelConfig`; nothing is allocated. Each figure
is per GPU, for the heaviest pipeline stage, in bytes (printed in GiB = 2^30 bytes). The terms
(model states under each ZeRO stage and precision, activations per layer with and without
checkpointing, in-flight micro-batches under 1F1B) and their derivation are in
:mod:`igpt_ds.planning.costs`; this module adds them up per stage, explains the sum line by line,
and searches the layouts that fit.

Fits: usable memory = (GPU memory - 2 GiB for the CUDA context, NCCL and cuBLAS workspaces) x 0.9
(allocator fragmentation). The predicted peak adds every term at once (full gradients and all
activations), an upper bound: in backward, gradients grow while activations are freed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, Optional

from igpt_ds.config import ModelConfig
from igpt_ds.parallel.layout import ParallelLayout
from igpt_ds.planning.costs import (
    GIB,
    activation_bytes_per_layer,
    bytes_per_activation,
    gib,
    head_activation_bytes,
    largest_layer_parameters,
    model_state_bytes,
    stage_layers,
    stage_parameters,
)

CONTEXT_RESERVE_GIB = 2.0  # CUDA context, NCCL buffers, cuBLAS workspace
FRAGMENTATION = 0.10  # fraction of the rest lost to the caching allocator
TP_LAYOUT_HINT = "tensor parallelism all-reduces twice per layer and needs NVLink: keep it inside a node"


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PlanInput:
    """What is planned: a model, a batch, a precision, ZeRO, a layout and the GPUs."""

    model: ModelConfig
    micro_batch: int = 1
    precision: str = "bf16"
    zero_stage: int = 0
    layout: ParallelLayout = field(default_factory=ParallelLayout)
    activation_checkpointing: bool = False
    gpu_memory_gib: float = 80.0
    gpus_per_node: int = 8
    attention: str = "flash"
    grad_accum: Optional[int] = None
    """Gradient-accumulation steps (micro-batches per step); None: at least PP (1F1B fills the pipe)."""

    def validate(self) -> "PlanInput":
        """Refuse an impossible request with the reason and the fix (reuses ParallelLayout.validate)."""
        if self.micro_batch < 1:
            raise ValueError(f"micro-batch {self.micro_batch} must be >= 1")
        bytes_per_activation(self.precision)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage {self.zero_stage}: choose 0, 1, 2 or 3")
        if self.gpu_memory_gib <= CONTEXT_RESERVE_GIB:
            raise ValueError(f"GPU memory {self.gpu_memory_gib} GiB is below the {CONTEXT_RESERVE_GIB} GiB "
                             "reserved for the CUDA context alone")
        tp = self.layout.tensor_parallel
        if tp > self.gpus_per_node:
            raise ValueError(f"TP={tp} is larger than a node ({self.gpus_per_node} GPUs, --gpus-per-node): "
                             f"{TP_LAYOUT_HINT}. Use TP <= {self.gpus_per_node} and add pipeline stages (PP) "
                             "or ZeRO-3 for the rest")
        self.layout.validate(self.model, self.zero_stage)
        return self


@dataclass
class Plan:
    """Per-GPU memory of the heaviest pipeline stage, with the arithmetic behind each figure."""

    request: PlanInput
    total_parameters: int
    stage: int
    stage_parameters: int
    largest_layer_parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_no_checkpointing: int
    activations_checkpointing: int
    in_flight_micro_batches: int
    usable: int
    lines: list[str]

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    @property
    def headroom(self) -> int:
        return self.usable - self.total

    def describe(self) -> str:
        r = self.request
        lo = r.layout
        return (f"DP={lo.data_parallel} TP={lo.tensor_parallel} PP={lo.pipeline_parallel} ZeRO-{r.zero_stage} "
                f"{r.precision} micro-batch {r.micro_batch}"
                f"{' +ckpt' if r.activation_checkpointing else ''}")

    def to_dict(self) -> dict:
        r = self.request
        return {
            "model": r.model.name, "n_layer": r.model.n_layer, "d_model": r.model.d_model,
            "n_head": r.model.n_head, "seq_len": r.model.seq_len, "micro_batch": r.micro_batch,
            "precision": r.precision, "zero_stage": r.zero_stage, "gpus": r.layout.world_size,
            "dp": r.layout.data_parallel, "tp": r.layout.tensor_parallel, "pp": r.layout.pipeline_parallel,
            "activation_checkpointing": r.activation_checkpointing, "attention": r.attention,
            "gpu_memory_gib": r.gpu_memory_gib, "total_parameters": self.total_parameters,
            "heaviest_stage": self.stage, "stage_parameters": self.stage_parameters,
            "largest_layer_parameters": self.largest_layer_parameters,
            "in_flight_micro_batches": self.in_flight_micro_batches,
            "bytes": {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                      "model_states": self.model_states, "activations": self.activations,
                      "activations_no_checkpointing": self.activations_no_checkpointing,
                      "activations_checkpointing": self.activations_checkpointing,
                      "total": self.total, "usable": self.usable},
            "fits": self.fits, "arithmetic": self.lines,
        }


def usable_bytes(gpu_memory_gib: float) -> int:
    return int((gpu_memory_gib - CONTEXT_RESERVE_GIB) * (1 - FRAGMENTATION) * GIB)


def plan(req: PlanInput) -> Plan:
    """Per-GPU memory for ``req`` (validated first). Evaluates every pipeline stage, keeps the heaviest."""
    req.validate()
    cfg, lo = req.model, req.layout
    tp, pp, dp = lo.tensor_parallel, lo.pipeline_parallel, lo.data_parallel
    layers, params = stage_layers(cfg.n_layer, pp), stage_parameters(cfg, tp, pp)
    largest = largest_layer_parameters(cfg, tp)
    per_layer = activation_bytes_per_layer(cfg, req.micro_batch, req.precision, tp, req.attention)
    e = bytes_per_activation(req.precision)
    if req.attention == "math":
        # its backward holds the gradients of the probabilities and of the scores at once
        per_layer_bwd = 2 * e * cfg.n_head * cfg.seq_len ** 2 * req.micro_batch // tp
    else:
        per_layer_bwd = 0
    layer_input = cfg.seq_len * req.micro_batch * cfg.d_model * e
    head = head_activation_bytes(cfg, req.micro_batch, req.precision, tp)
    gas = req.grad_accum if req.grad_accum is not None else pp

    best = None
    for i in range(pp):
        in_flight = max(1, min(pp - i, gas))
        extra = head if i == pp - 1 else 0
        # without checkpointing everything forward kept is live when backward starts at the loss;
        # with it, the head's logits are gone by the time a block is recomputed: the larger counts
        no_ckpt = in_flight * layers[i] * per_layer + max(per_layer_bwd, extra)
        ckpt = in_flight * layers[i] * layer_input + max(per_layer + per_layer_bwd, extra)
        acts = ckpt if req.activation_checkpointing else no_ckpt
        states = model_state_bytes(params[i], dp, req.zero_stage, req.precision, largest)
        total = sum(states.values()) + acts
        if best is None or total > best[0]:
            best = (total, i, states, acts, no_ckpt, ckpt, in_flight)
    _, i, states, acts, no_ckpt, ckpt, in_flight = best
    p = Plan(request=req, total_parameters=sum(stage_parameters(cfg, 1, 1)), stage=i,
             stage_parameters=params[i], largest_layer_parameters=largest, activations=acts,
             activations_no_checkpointing=no_ckpt, activations_checkpointing=ckpt,
             in_flight_micro_batches=in_flight, usable=usable_bytes(req.gpu_memory_gib), lines=[],
             **states)
    p.lines = _arithmetic(p, layers[i], per_layer, layer_input, head, per_layer_bwd)
    return p


def _arithmetic(p: Plan, n_layers: int, per_layer: int, layer_input: int, head: int, bwd: int) -> list[str]:
    """The plan as human-readable arithmetic, one line per figure."""
    r, cfg = p.request, p.request.model
    lo, e = r.layout, bytes_per_activation(r.precision)
    tp, pp, dp = lo.tensor_parallel, lo.pipeline_parallel, lo.data_parallel
    P, z = p.stage_parameters, r.zero_stage
    s, b, h, a = cfg.seq_len, r.micro_batch, cfg.d_model, cfg.n_head
    G = lambda n: f"{gib(n):.2f} GiB"  # noqa: E731
    head_here = head if p.stage == pp - 1 else 0
    out = [
        f"model {cfg.name}: L={cfg.n_layer} d={h} heads={a} seq={s} ({cfg.resolution}^2), "
        f"{p.total_parameters:,} parameters",
        f"layout {p.describe()} on {lo.world_size} GPUs",
        f"heaviest stage {p.stage} of {pp}: {n_layers} blocks, P = {P:,} parameters per GPU "
        f"(TP shard {tp}, PP stage), ZeRO shards over N = DP = {dp}",
    ]
    if r.precision == "fp32":
        out += [f"weights    4 B x P{' / N' if z >= 3 else ''}" + (" + 4 B x largest layer" if z == 3 else "")
                + f" = {G(p.weights)}",
                f"gradients  4 B x P{' / N' if z >= 2 else ''} = {G(p.gradients)}",
                f"optimizer  Adam m+v 8 B x P{' / N' if z >= 1 else ''} = {G(p.optimizer)}"]
    elif z == 3:
        out += [f"weights    2 B x P / N + 4 B x largest layer {p.largest_layer_parameters:,} = {G(p.weights)}",
                f"gradients  fp32 partition 4 B x P / N = {G(p.gradients)}",
                f"optimizer  (fp32 master 4 + Adam 8) B x P / N = {G(p.optimizer)}",
                "           = DeepSpeed's ZeRO-3 estimate 18 B x P / N + 4 B x largest layer"]
    else:
        out += [f"weights    16-bit 2 B x P = {G(p.weights)}",
                f"gradients  16-bit 2 B x P{' / N' if z >= 2 else ''} = {G(p.gradients)}",
                f"optimizer  (fp32 master 4 + Adam 8 + fp32 grads 4) B x P{' / N' if z >= 1 else ''}"
                f" = {G(p.optimizer)}"]
        if z == 2:
            out.append("           = DeepSpeed's ZeRO-2 estimate 2 B x P + 18 B x P / N")
    out.append(f"model states {G(p.model_states)}")
    attn = f" + {e} a s^2 b/t + sbh e/t (math attention)" if r.attention == "math" else ""
    out += [
        f"activations per layer, per micro-batch (e={e} B): 4 sbh e + 12 sbh e/t + 16 sb + 4 asb/t{attn}"
        f" with s={s} b={b} h={h} a={a} t={tp} = {G(per_layer)}",
        f"micro-batches in flight on this stage (1F1B): {p.in_flight_micro_batches}",
        f"  without checkpointing: {p.in_flight_micro_batches} x {n_layers} layers x {G(per_layer)}"
        + _plus_max([("math-attention backward", bwd), ("head", head_here)], G)
        + f" = {G(p.activations_no_checkpointing)}",
        f"  with checkpointing:    {p.in_flight_micro_batches} x {n_layers} x sbh e {G(layer_input)}"
        + _plus_max([("one recomputed layer" + (" + its math-attention backward" if bwd else ""), per_layer + bwd),
                     ("head", head_here)], G) + f" = {G(p.activations_checkpointing)}",
        f"activations used ({'with' if r.activation_checkpointing else 'without'} checkpointing): "
        f"{G(p.activations)}",
        f"total {G(p.model_states)} + {G(p.activations)} = {G(p.total)}",
        f"usable ({r.gpu_memory_gib:g} GiB - {CONTEXT_RESERVE_GIB:g} GiB context) x {1 - FRAGMENTATION:g} "
        f"= {G(p.usable)}  ->  {'FITS' if p.fits else 'DOES NOT FIT'} "
        f"({'headroom' if p.fits else 'short by'} {G(abs(p.headroom))})",
    ]
    return out


def _plus_max(terms: list[tuple[str, int]], fmt) -> str:
    """' + name X' for one non-zero term, ' + max(a X, b Y)' for several (they are live at different times)."""
    terms = [(name, n) for name, n in terms if n]
    if not terms:
        return ""
    if len(terms) == 1:
        return f" + {terms[0][0]} {fmt(terms[0][1])}"
    return " + max(" + ", ".join(f"{name} {fmt(n)}" for name, n in terms) + ")"


# --------------------------------------------------------------------------- layout search


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(model: ModelConfig, gpus: int, gpus_per_node: int = 8) -> Iterable[tuple[ParallelLayout, int]]:
    """Every valid (layout, ZeRO stage) on ``gpus`` GPUs with TP inside one node."""
    for tp in _divisors(gpus):
        if tp > gpus_per_node:
            continue
        for pp in _divisors(gpus // tp):
            for zero in (0, 1, 2, 3):
                layout = ParallelLayout(gpus, tp, pp)
                try:
                    layout.validate(model, zero)
                except ValueError:
                    continue
                yield layout, zero


def ranking_key(p: Plan) -> tuple:
    """Best first: fewest model-parallel ranks (TP x PP, then fewer pipeline stages: bubbles and
    inter-node hops cost more than intra-node TP), then no activation checkpointing (recompute
    costs ~1/3 more compute), then communication (ZeRO-0/1/2 move what plain data parallelism
    moves, ZeRO-3 adds a parameter all-gather: 1.5x), then the most free memory."""
    lo, r = p.request.layout, p.request
    return (lo.tensor_parallel * lo.pipeline_parallel, lo.pipeline_parallel, r.activation_checkpointing,
            r.zero_stage == 3, -p.headroom)


RANKING_RULE = ("fewest model-parallel ranks (TP x PP, fewer PP stages first), then no activation "
                "checkpointing, then not ZeRO-3 (1.5x communication), then most headroom")


def search(base: PlanInput, gpus: int, include_nonfitting: bool = False) -> list[Plan]:
    """Plans for every layout, ZeRO stage and checkpointing choice on ``gpus`` GPUs, best first.

    ``base`` gives the model, micro-batch, precision and GPU; its layout and ZeRO stage are ignored.
    """
    plans = []
    for layout, zero in candidate_layouts(base.model, gpus, base.gpus_per_node):
        for ckpt in (False, True):
            req = PlanInput(model=base.model, micro_batch=base.micro_batch, precision=base.precision,
                            zero_stage=zero, layout=layout, activation_checkpointing=ckpt,
                            gpu_memory_gib=base.gpu_memory_gib, gpus_per_node=base.gpus_per_node,
                            attention=base.attention, grad_accum=base.grad_accum)
            p = plan(req)
            if p.fits or include_nonfitting:
                plans.append(p)
    return sorted(plans, key=ranking_key)


def what_would_fit(base: PlanInput, gpus: int) -> str:
    """Why nothing fits on ``gpus`` GPUs, and the nearest things that would."""
    every = search(base, gpus, include_nonfitting=True)
    msg = [f"nothing fits on {gpus} x {base.gpu_memory_gib:g} GiB for {base.model.name} "
           f"micro-batch {base.micro_batch} {base.precision}"]
    if every:
        least = min(every, key=lambda p: p.total)
        msg.append(f"the smallest per-GPU need is {gib(least.total):.2f} GiB ({least.describe()}) "
                   f"> usable {gib(least.usable):.2f} GiB")
    else:
        msg.append(f"no valid layout exists on {gpus} GPUs for this model")
    if base.micro_batch > 1:
        smaller = search(dataclasses.replace(base, micro_batch=1), gpus)
        if smaller:
            msg.append(f"fits with micro-batch 1: {smaller[0].describe()} (raise gradient accumulation instead)")
    counts = sorted(n for n in {2 ** k for k in range(13)} | {base.gpus_per_node * k for k in range(1, 129)}
                    if n > gpus)
    for n in counts:
        found = search(base, n) or (search(dataclasses.replace(base, micro_batch=1), n) if base.micro_batch > 1 else [])
        if found:
            msg.append(f"fits on {n} GPUs: {found[0].describe()}")
            break
    else:
        msg.append(f"no GPU count up to {counts[-1] if counts else gpus} fits: use a smaller model, "
                   "resolution or micro-batch, or GPUs with more memory")
    return "; ".join(msg)

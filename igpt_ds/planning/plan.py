"""Memory and layout planner: will a model, batch and DP x TP x PP layout fit on these GPUs?

Everything is arithmetic on :class:`~igpt_ds.config.ModelConfig`; nothing is allocated. Each figure
is per GPU, for the heaviest pipeline stage, in bytes (printed in GiB = 2^30 bytes). The terms
(model states under each ZeRO stage and precision, activations per layer with and without
checkpointing, in-flight micro-batches under 1F1B) and their derivation are in
:mod:`igpt_ds.planning.costs`; this module adds them up per stage, explains the sum line by line,
and searches the layouts that fit.

Fits: usable memory = (GPU memory - 2 GiB for the CUDA context and cuBLAS workspaces - 1 GiB per
NCCL communicator the layout uses: one each for TP, DP and PP groups of more than one rank) x 0.9
(allocator fragmentation). The predicted peak adds every term at once (full gradients and all
activations), an upper bound: in backward, gradients grow while activations are freed.

Speed: :func:`estimate_step` gives an *estimated* time of one optimizer step (no GPU is asked):

    compute    = train FLOPs per GPU (6N + 12 L d T per token, ``ModelConfig.train_flops_per_token``,
                 x tokens of one DP replica / (TP x PP)) / (stated MFU x peak FLOP/s of the precision)
    recompute  = compute / 3 with activation checkpointing (one more forward; MFU does not count it)
    TP         = exposed all-reduces of one [b, s, h] activation per micro-step (costs.tp_all_reduces_per_micro_step)
    PP         = per micro-step one activation forward and its gradient backward across a stage boundary,
                 the full [b, s, h] from every TP rank (DeepSpeed's pipeline does not split it over TP)
    bubble     = (PP - 1) / m x (compute + recompute + TP) for m micro-batches per step (1F1B fill and drain)
    DP         = the ZeRO stage's gradient and weight traffic per step (costs.dp_bytes_per_step)

Each communication term runs at the NVLink bandwidth when its group lies inside one node and at
the InfiniBand bandwidth when it spans nodes (ranks are node-major; TP fastest, then DP, then PP:
``ParallelLayout.coords``). What overlaps: megatron's backward TP all-reduces hide behind the
weight-gradient GEMMs and are not counted; everything else is added, not overlapped: DeepSpeed's
``overlap_comm`` and ZeRO-3 prefetch can hide part of the DP traffic behind backward, so the
estimate is an upper bound for DP-heavy layouts. Not modelled: host overhead (ZeRO-3's Python
hooks, launches), the optimizer step itself, MFU falling at small micro-batches or narrow GEMMs.
Layouts that fit are ranked by this estimate (:func:`ranking_key`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, Optional

from igpt_ds.config import ModelConfig
from igpt_ds.parallel.layout import ParallelLayout
from igpt_ds.planning.costs import (
    DEFAULT_MFU,
    GIB,
    INTER_NODE_GBPS,
    INTRA_NODE_GBPS,
    activation_bytes_per_layer,
    bytes_per_activation,
    dp_bytes_per_step,
    gib,
    head_activation_bytes,
    largest_layer_parameters,
    model_state_bytes,
    ring_factor,
    stage_layers,
    stage_parameters,
    tp_all_reduces_per_micro_step,
)
from igpt_ds.train.metrics import PEAK_TFLOPS

CONTEXT_RESERVE_GIB = 2.0  # CUDA context, cuBLAS workspace
NCCL_RESERVE_GIB = 1.0
"""Per NCCL communicator: a plain one takes a few hundred MB, one with NVLink SHARP buffers on NVSwitch
about 1.6 GB (NVIDIA/nccl#864; NeMo sets NCCL_NVLS_ENABLE=0 to save it)."""
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
    """Gradient-accumulation steps (micro-batches per step); None: from ``global_batch``, else PP
    (1F1B fills the pipe)."""
    global_batch: Optional[int] = None
    """Samples per optimizer step (DeepSpeed's ``train_batch_size``) = micro-batch x accumulation x DP."""
    fp32_grad_accum: bool = False
    """``"data_types": {"grad_accum_dtype": "fp32"}``, as the shipped presets set it (tools/plan.py's
    default; False is DeepSpeed's default, the model's dtype): changes the memory and DP traffic of
    16-bit ZeRO-1 (``costs.model_state_bytes``, ``costs.dp_bytes_per_step``) and rules out 16-bit ZeRO-0."""

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step (validate() checks that the global batch splits)."""
        if self.grad_accum is not None:
            return self.grad_accum
        if self.global_batch is not None:
            return max(1, self.global_batch // (self.micro_batch * self.layout.data_parallel))
        return self.layout.pipeline_parallel

    @property
    def bf16_optimizer(self) -> bool:
        """DeepSpeed picks its BF16_Optimizer: bf16, ZeRO-1, fp32 gradient accumulation."""
        return self.precision == "bf16" and self.zero_stage == 1 and self.fp32_grad_accum

    def validate(self) -> "PlanInput":
        """Refuse an impossible request with the reason and the fix (reuses ParallelLayout.validate)."""
        if self.micro_batch < 1:
            raise ValueError(f"micro-batch {self.micro_batch} must be >= 1")
        if self.grad_accum is not None and self.grad_accum < 1:
            raise ValueError(f"gradient accumulation {self.grad_accum} must be >= 1")
        if self.global_batch is not None:
            per_step = self.micro_batch * self.layout.data_parallel
            if self.global_batch < 1 or self.global_batch % per_step:
                raise ValueError(f"global batch {self.global_batch} does not split into micro-batch {self.micro_batch} "
                                 f"x DP {self.layout.data_parallel} x accumulation: choose a micro-batch and DP "
                                 "whose product divides it")
            if self.grad_accum is not None and self.grad_accum * per_step != self.global_batch:
                raise ValueError(f"global batch {self.global_batch} != micro-batch {self.micro_batch} x DP "
                                 f"{self.layout.data_parallel} x accumulation {self.grad_accum}: give one of them")
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
        if self.zero_stage == 0 and self.precision != "fp32" and self.fp32_grad_accum:
            raise ValueError(f"ZeRO-0 {self.precision} with fp32 gradient accumulation: DeepSpeed refuses the mix "
                             "(NotImplementedError in its optimizer check); use ZeRO-1/2, or accumulate in "
                             f"{self.precision} (--grad-accum-dtype model)")
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
    estimate: Optional["StepEstimate"] = None
    """Estimated step time (:func:`estimate_step`); set by :func:`search`."""

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
            "accumulation": r.accumulation, "global_batch": r.global_batch,
            "grad_accum_dtype": "fp32" if r.fp32_grad_accum else r.precision,
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
            "estimate": self.estimate.to_dict() if self.estimate else None,
        }


def communicators(layout: ParallelLayout) -> list[str]:
    """The NCCL groups of more than one rank this layout communicates over (each holds buffers)."""
    sizes = {"TP": layout.tensor_parallel, "DP": layout.data_parallel, "PP": layout.pipeline_parallel}
    return [name for name, size in sizes.items() if size > 1]


def usable_bytes(gpu_memory_gib: float, n_communicators: int = 0) -> int:
    reserve = CONTEXT_RESERVE_GIB + NCCL_RESERVE_GIB * n_communicators
    return max(0, int((gpu_memory_gib - reserve) * (1 - FRAGMENTATION) * GIB))


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
    gas = req.accumulation

    best = None
    for i in range(pp):
        in_flight = max(1, min(pp - i, gas))
        extra = head if i == pp - 1 else 0
        # without checkpointing everything forward kept is live when backward starts at the loss;
        # with it, the head's logits are gone by the time a block is recomputed: the larger counts
        no_ckpt = in_flight * layers[i] * per_layer + max(per_layer_bwd, extra)
        ckpt = in_flight * layers[i] * layer_input + max(per_layer + per_layer_bwd, extra)
        acts = ckpt if req.activation_checkpointing else no_ckpt
        states = model_state_bytes(params[i], dp, req.zero_stage, req.precision, largest,
                                   fp32_grad_accum=req.fp32_grad_accum)
        total = sum(states.values()) + acts
        if best is None or total > best[0]:
            best = (total, i, states, acts, no_ckpt, ckpt, in_flight)
    _, i, states, acts, no_ckpt, ckpt, in_flight = best
    p = Plan(request=req, total_parameters=sum(stage_parameters(cfg, 1, 1)), stage=i,
             stage_parameters=params[i], largest_layer_parameters=largest, activations=acts,
             activations_no_checkpointing=no_ckpt, activations_checkpointing=ckpt,
             in_flight_micro_batches=in_flight, usable=usable_bytes(req.gpu_memory_gib, len(communicators(lo))),
             lines=[], **states)
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
    groups = communicators(lo)
    nccl = (f" - {len(groups)} x {NCCL_RESERVE_GIB:g} GiB NCCL communicators ({', '.join(groups)})" if groups else "")
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
    elif z == 1 and r.fp32_grad_accum:
        fp32_part = "fp32 master 4 + Adam 8" + ("" if r.precision == "bf16" else " + fp32 grads 4")
        out += [f"weights    16-bit 2 B x P = {G(p.weights)}",
                f"gradients  16-bit 2 B x P + fp32 accumulation buffer 4 B x P (grad_accum_dtype fp32) "
                f"= {G(p.gradients)}",
                f"optimizer  ({fp32_part}) B x P / N = {G(p.optimizer)}"
                + (" (BF16_Optimizer)" if r.precision == "bf16" else "")]
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
        f"usable ({r.gpu_memory_gib:g} GiB - {CONTEXT_RESERVE_GIB:g} GiB context{nccl}) x {1 - FRAGMENTATION:g} "
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


# --------------------------------------------------------------------------- step time (estimate)


@dataclass(frozen=True)
class StepModel:
    """What a step-time estimate assumes: the MFU, the GPU's peak and the link bandwidths (GB/s per GPU)."""

    mfu: float = DEFAULT_MFU
    peak_tflops: Optional[float] = None
    """Dense peak at the run's precision; None: ``PEAK_TFLOPS[gpu_kind]`` (vendors' datasheets)."""
    gpu_kind: str = "H100 SXM"
    intra_node_gbps: float = INTRA_NODE_GBPS
    inter_node_gbps: float = INTER_NODE_GBPS

    def validate(self) -> "StepModel":
        if not 0 < self.mfu <= 1:
            raise ValueError(f"MFU {self.mfu} must lie in (0, 1]: a fraction of the peak, e.g. 0.4")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak {self.peak_tflops} TFLOP/s must be > 0")
        for name, value in (("intra-node", self.intra_node_gbps), ("inter-node", self.inter_node_gbps)):
            if not value > 0:
                raise ValueError(f"{name} bandwidth {value} GB/s must be > 0")
        if self.peak_tflops is None and self.gpu_kind not in PEAK_TFLOPS:
            raise ValueError(f"GPU kind {self.gpu_kind!r}: choose one of {sorted(PEAK_TFLOPS)} "
                             "or give the peak TFLOP/s")
        return self

    def peak_flops(self, precision: str) -> float:
        if self.peak_tflops is not None:
            return self.peak_tflops * 1e12
        table = PEAK_TFLOPS[self.gpu_kind]
        if precision not in table:
            raise ValueError(f"no {precision} peak known for {self.gpu_kind}: give the peak TFLOP/s (--peak-tflops)")
        return table[precision] * 1e12


@dataclass
class StepEstimate:
    """Estimated seconds of one optimizer step on one GPU, by part (see the module docstring)."""

    compute: float
    recompute: float
    tp_comm: float
    pp_comm: float
    bubble: float
    dp_comm: float
    tokens_per_step: int
    world_size: int
    lines: list[str]

    @property
    def comm(self) -> float:
        return self.tp_comm + self.pp_comm + self.dp_comm

    @property
    def total(self) -> float:
        return self.compute + self.recompute + self.comm + self.bubble

    @property
    def tokens_per_second_per_gpu(self) -> float:
        return self.tokens_per_step / self.total / self.world_size

    def to_dict(self) -> dict:
        return {"estimated": True, "step_seconds": self.total, "tokens_per_second_per_gpu":
                self.tokens_per_second_per_gpu, "tokens_per_step": self.tokens_per_step,
                "seconds": {"compute": self.compute, "recompute": self.recompute, "tp_comm": self.tp_comm,
                            "pp_comm": self.pp_comm, "dp_comm": self.dp_comm, "comm": self.comm,
                            "bubble": self.bubble},
                "arithmetic": self.lines}


def groups_span_nodes(layout: ParallelLayout, gpus_per_node: int) -> dict[str, bool]:
    """Whether any TP, DP or PP group holds ranks of more than one node (ranks node-major)."""
    members: dict[str, dict[tuple, set]] = {"tp": {}, "dp": {}, "pp": {}}
    for rank in range(layout.world_size):
        dp, tp, pp = layout.coords(rank)
        node = rank // gpus_per_node
        for kind, key in (("tp", (dp, pp)), ("dp", (tp, pp)), ("pp", (dp, tp))):
            members[kind].setdefault(key, set()).add(node)
    return {kind: any(len(nodes) > 1 for nodes in groups.values()) for kind, groups in members.items()}


def estimate_step(p: Plan, hw: StepModel = StepModel()) -> StepEstimate:
    """Estimated time of one optimizer step of ``p``'s layout (an estimate, not a measurement)."""
    hw.validate()
    r, cfg = p.request, p.request.model
    lo, e, ckpt, m = r.layout, bytes_per_activation(r.precision), r.activation_checkpointing, r.accumulation
    tp, pp, dp = lo.tensor_parallel, lo.pipeline_parallel, lo.data_parallel
    spans = groups_span_nodes(lo, r.gpus_per_node)
    link = {kind: (hw.inter_node_gbps if spans[kind] else hw.intra_node_gbps) * 1e9 for kind in spans}
    where = {kind: "InfiniBand" if spans[kind] else "NVLink" for kind in spans}

    tokens_replica = r.micro_batch * m * cfg.seq_len
    rate = hw.mfu * hw.peak_flops(r.precision)
    compute = cfg.train_flops_per_token() * tokens_replica / (tp * pp) / rate
    recompute = compute / 3 if ckpt else 0.0
    act = cfg.seq_len * r.micro_batch * cfg.d_model * e  # one [b, s, h] activation
    n_layers = max(stage_layers(cfg.n_layer, pp))
    exposed, hidden = tp_all_reduces_per_micro_step(n_layers, ckpt)
    tp_comm = m * exposed * ring_factor("all_reduce", tp) * act / link["tp"]
    pp_comm = m * 2 * act / link["pp"] if pp > 1 else 0.0
    bubble = (pp - 1) / m * (compute + recompute + tp_comm)
    dp_bytes, dp_rule = dp_bytes_per_step(p.stage_parameters, dp, r.zero_stage, r.precision, m, ckpt,
                                          r.bf16_optimizer)
    dp_comm = dp_bytes / link["dp"]

    ms = lambda t: f"{t * 1e3:.1f} ms"  # noqa: E731
    peak = hw.peak_flops(r.precision) / 1e12
    lines = [
        f"step time (estimate): m = {m} micro-batches of {r.micro_batch} per step, "
        f"{tokens_replica:,} tokens per DP replica, {tokens_replica * dp:,} per step",
        f"compute    {cfg.train_flops_per_token() / 1e9:.2f} GFLOP/token x {tokens_replica:,} tokens"
        f" / (TP {tp} x PP {pp}) / ({hw.mfu:g} MFU x {peak:g} TFLOP/s {r.precision}) = {ms(compute)}",
        f"recompute  {'compute / 3 (activation checkpointing)' if ckpt else 'none (no checkpointing)'}"
        f" = {ms(recompute)}",
        f"TP         {m} x {exposed} exposed all-reduces ({n_layers} blocks; {hidden} backward ones hidden) x "
        f"2 (t-1)/t x sbh e {act / 2 ** 20:.1f} MiB, t={tp}, {where['tp']} {link['tp'] / 1e9:g} GB/s = {ms(tp_comm)}",
        "PP         " + (f"{m} x 2 x sbh e {act / 2 ** 20:.1f} MiB point-to-point, {where['pp']} "
                          f"{link['pp'] / 1e9:g} GB/s = {ms(pp_comm)}" if pp > 1 else "none (PP=1)"),
        f"bubble     (PP-1)/m = {pp - 1}/{m} x (compute + recompute + TP) = {ms(bubble)}",
        f"DP         {dp_rule}, e={e} B, P={p.stage_parameters:,}, N={dp}: {dp_bytes / 1e9:.2f} GB over "
        f"{where['dp'] if dp > 1 else 'no link'} {link['dp'] / 1e9:g} GB/s = {ms(dp_comm)}",
        f"not overlapped: step = {ms(compute + recompute + tp_comm + pp_comm + bubble + dp_comm)}, "
        f"{tokens_replica * dp / (compute + recompute + tp_comm + pp_comm + bubble + dp_comm) / lo.world_size:,.0f}"
        " tokens/s per GPU (estimate)",
    ]
    return StepEstimate(compute=compute, recompute=recompute, tp_comm=tp_comm, pp_comm=pp_comm, bubble=bubble,
                        dp_comm=dp_comm, tokens_per_step=tokens_replica * dp, world_size=lo.world_size, lines=lines)


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
    """Best first: the shortest estimated time per sample (at a fixed global batch, the shortest
    step; equal to a 1e-7 s per sample). On a tie the lower ZeRO stage, whose host-side machinery
    the estimate does not count (ZeRO-3's fetch/release hooks on every module in forward, backward
    and recompute; ZeRO-2's per-micro-step reduce hooks), then the most free memory."""
    est = p.estimate or estimate_step(p)
    samples = p.request.micro_batch * p.request.accumulation * p.request.layout.data_parallel
    return (round(est.total / samples, 7), p.request.zero_stage, -p.headroom)


RANKING_RULE = ("shortest estimated step time (compute at the stated MFU + communication + pipeline bubble), "
                "then the lower ZeRO stage, then most headroom")

MICRO_BATCHES = tuple(2 ** k for k in range(11))
"""Micro-batches :func:`search` tries when asked to pick one: powers of two up to 1024."""


def search(base: PlanInput, gpus: int, include_nonfitting: bool = False, hardware: Optional[StepModel] = None,
           micro_batches: Optional[Iterable[int]] = None) -> list[Plan]:
    """Plans for every layout, ZeRO stage and checkpointing choice on ``gpus`` GPUs, best first.

    ``base`` gives the model, micro-batch, precision, global batch and GPU; its layout and ZeRO
    stage are ignored. With ``micro_batches`` each choice gets the one of them (that fits and
    splits the global batch) with the shortest estimated step, the larger on a tie: a fuller GPU
    runs closer to the stated MFU, which the estimate itself does not model. Each plan carries its
    :class:`StepEstimate` under ``hardware``.
    """
    hardware = (hardware or StepModel()).validate()
    sizes = sorted(set(micro_batches)) if micro_batches is not None else [base.micro_batch]
    plans = []
    for layout, zero in candidate_layouts(base.model, gpus, base.gpus_per_node):
        for ckpt in (False, True):
            best = None
            if zero == 0 and base.precision != "fp32" and base.fp32_grad_accum:
                continue  # DeepSpeed refuses 16-bit ZeRO-0 with fp32 accumulation (PlanInput.validate)
            for micro in sizes:
                req = dataclasses.replace(base, micro_batch=micro, zero_stage=zero, layout=layout,
                                          activation_checkpointing=ckpt)
                if base.global_batch is not None and base.global_batch % (micro * layout.data_parallel):
                    continue
                p = plan(req)
                if not (p.fits or include_nonfitting):
                    break  # memory grows with the micro-batch: no larger one fits either
                p.estimate = estimate_step(p, hardware)
                if best is None or ranking_key(p)[0] <= ranking_key(best)[0]:
                    best = p
            if best is not None:
                plans.append(best)
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

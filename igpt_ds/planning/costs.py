"""The planner's per-GPU byte counts, term by term: parameters, model states, activations, and the
bytes each parallel dimension communicates per step (for the step-time estimate, at the end).

Everything is arithmetic on :class:`~igpt_ds.config.ModelConfig`; nothing is allocated.
:mod:`igpt_ds.planning.plan` adds the terms up per pipeline stage, compares them with a GPU,
estimates a step's time and searches layouts; :mod:`igpt_ds.planning.memory` measures the memory
terms on a real training step.

Model states (P = parameters held by this GPU's TP/PP shard, N = data-parallel size)
-------------------------------------------------------------------------------
Mixed precision (fp16/bf16) follows DeepSpeed's accounting, term by term as its estimators
(``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``, no offload):

    16-bit weights 2 B, 16-bit gradients 2 B, fp32 master weights 4 B, Adam m and v 8 B, and the
    fp32 gradient partition the optimizer steps on 4 B (ZeRO-0: the BF16/FP16 optimizer's fp32 grads).

    ZeRO-0: 20 P                     (nothing sharded)
    ZeRO-1: 4 P + 16 P / N           (master, Adam, fp32 grads sharded)
    ZeRO-2: 2 P + 18 P / N           (= DeepSpeed's ZeRO-2 estimate; 16-bit grads sharded too)
    ZeRO-3: 18 P / N + 4 P_layer     (= DeepSpeed's ZeRO-3 estimate: it reduce-scatters the 16-bit
                                      grads into the fp32 partition, so 2 + 4 + 4 + 8 = 18, plus the
                                      largest layer gathered for compute, 4 B/param of it)

fp32: weights 4 B, gradients 4 B, Adam 8 B = 16 P, sharded the same way by stage (DeepSpeed has no
estimator for it).

Activations (per layer and micro-batch; Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", Sec. 4, adapted to this model)
-------------------------------------------------------------------------------
With s = sequence length, b = micro-batch, h = width, a = heads, t = TP, e = bytes per activation
(2 for fp16/bf16, 4 for fp32). Korthikanti's GPT layer stores ``sbh(34 + 5as/h)`` bytes at e=2
(``sbh(10 + 24/t + 5as/(ht))`` with TP). This model has no dropout (drop its 2 sbh masks and the
as^2 b softmax-dropout terms) and attention runs through torch SDPA, whose fused kernels (flash /
memory-efficient on GPU, the flash kernel on CPU in torch >= 2.2) keep no s x s score matrix:

    replicated over TP:  block input (LN1 in), LN1 out (QKV in), LN2 in, LN2 out (FC in)   4 sbh e
    sharded over TP:     q, k, v 3, SDPA output = proj input 1, GELU in 4, MLP proj in 4   12 sbh e / t
    small:               LayerNorm mean/rstd (fp32) 16 sb; SDPA log-sum-exp (fp32) 4 asb / t
    math attention (``attention="math"``, no fused kernel): + softmax output e a s^2 b / t
                         + the head-merge copy sbh e / t

i.e. Korthikanti's ``sbh(8 + 24/t)`` at e = 2. The fused kernels return their output in
[b, s, heads, head_dim] memory order, so the head-merge reshape is a view and the projection's
saved input is the SDPA output itself; the math path's output is [b, heads, s, head_dim] and the
reshape copies. Full activation checkpointing (``torch.utils.checkpoint`` per block) keeps only
the block input, ``sbh e`` per layer, and recomputes one layer at a time in backward, so one full
layer is live on top. The head keeps the final norm's input and output (2 sbh e) and the loss's
logits: ``bsV/t`` at e, plus its fp32 copy (if e < 4) and the fp32 log-softmax.

Pipeline parallelism: with 1F1B scheduling (DeepSpeed's ``TrainSchedule``) stage ``i`` of ``p``
holds ``min(p - i, gradient accumulation steps)`` micro-batches in flight, so the first stage
stores ``p`` micro-batches of its ``L/p`` layers (Korthikanti Sec. 4.2.3): PP does not shrink
activation memory, it only splits the model states.
"""
from __future__ import annotations

from igpt_ds.config import ModelConfig

GIB = 2 ** 30
PRECISIONS = ("fp32", "fp16", "bf16")


def gib(n_bytes: float) -> float:
    return n_bytes / GIB


# --------------------------------------------------------------------------- parameters


def _norm_params(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" and cfg.bias else 1)


def block_parameters(cfg: ModelConfig, tp: int = 1) -> int:
    """Parameters of one transformer block on one TP rank (column/row weights split, rest replicated)."""
    d, f, b = cfg.d_model, cfg.d_ff, 1 if cfg.bias else 0
    qkv = 3 * d * d // tp + 3 * d * b // tp  # column-parallel: weight and bias split
    proj = d * d // tp + d * b  # row-parallel: weight split, bias replicated
    fc = f * d // tp + f * b // tp
    mlp_proj = d * f // tp + d * b
    return 2 * _norm_params(cfg) + qkv + proj + fc + mlp_proj


def embedding_parameters(cfg: ModelConfig, tp: int = 1) -> int:
    """Token embedding (vocab-parallel), positions and the AR start-of-sequence vector."""
    sos = cfg.d_model if cfg.objective == "ar" else 0
    return cfg.vocab_size * cfg.d_model // tp + cfg.seq_len * cfg.d_model + sos


def head_parameters(cfg: ModelConfig, tp: int = 1) -> int:
    """Final norm and the (vocab-parallel, bias-free) logit projection."""
    return _norm_params(cfg) + cfg.vocab_size * cfg.d_model // tp


def stage_layers(n_layer: int, pp: int) -> list[int]:
    """Blocks per pipeline stage: an even split, the first ``n_layer % pp`` stages one more."""
    return [n_layer // pp + (1 if i < n_layer % pp else 0) for i in range(pp)]


def stage_parameters(cfg: ModelConfig, tp: int = 1, pp: int = 1) -> list[int]:
    """Parameters held by one TP rank of each pipeline stage (embeddings first, head last)."""
    out = []
    for i, n in enumerate(stage_layers(cfg.n_layer, pp)):
        p = n * block_parameters(cfg, tp)
        p += embedding_parameters(cfg, tp) if i == 0 else 0
        p += head_parameters(cfg, tp) if i == pp - 1 else 0
        out.append(p)
    return out


def largest_layer_parameters(cfg: ModelConfig, tp: int = 1) -> int:
    """Largest module's own parameters, as DeepSpeed's ``model_to_params`` counts them (ZeRO-3)."""
    d, f, b = cfg.d_model, cfg.d_ff, 1 if cfg.bias else 0
    return max(3 * d * d // tp + 3 * d * b // tp, d * d // tp + d * b, f * d // tp + f * b // tp,
               d * f // tp + d * b, cfg.vocab_size * d // tp, cfg.seq_len * d, _norm_params(cfg))


# --------------------------------------------------------------------------- model states


def model_state_bytes(params: int, dp: int, zero_stage: int, precision: str,
                      largest_layer: int = 0, fp32_grad_accum: bool = False) -> dict[str, int]:
    """Per-GPU bytes of weights, gradients and optimizer states for ``params`` on this GPU.

    ``dp`` is the data-parallel (ZeRO sharding) degree. The optimizer entry holds the fp32 master
    weights, Adam's two moments and the fp32 gradient partition. ZeRO-3 adds ``4 * largest_layer``
    to the weights (the gathered layer, DeepSpeed's figure). Sum = DeepSpeed's estimate for
    ZeRO-2/3 in mixed precision (see the module docstring).

    ``fp32_grad_accum`` (``"data_types": {"grad_accum_dtype": "fp32"}``) changes ZeRO-1 in 16-bit
    precision only: gradients accumulate in a full-size fp32 buffer beside the 16-bit ones
    (+4 B x P, unsharded). For bf16 that is DeepSpeed's ``BF16_Optimizer``, whose fp32 gradient
    partition is a view of that buffer: gradients 6 P, optimizer 12 P / N. ZeRO-2/3 accumulate
    into their fp32 partitions already; ZeRO-0 in 16 bits refuses fp32 accumulation.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {PRECISIONS}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage {zero_stage}: choose 0, 1, 2 or 3")
    P, N = params, dp
    shard = lambda nbytes, stage: nbytes * P // N if zero_stage >= stage else nbytes * P  # noqa: E731
    if precision == "fp32":
        weights, grads, optim = shard(4, 3), shard(4, 2), shard(8, 1)
    elif zero_stage == 3:
        # DeepSpeed's 18 B/param: 16-bit weights 2, fp32 grads 4, master 4, Adam 8 (no 16-bit grad copy)
        weights, grads, optim = 2 * P // N, 4 * P // N, 12 * P // N
    elif zero_stage == 1 and fp32_grad_accum:
        weights, grads, optim = 2 * P, 6 * P, (12 if precision == "bf16" else 16) * P // N
    else:
        weights, grads, optim = 2 * P, shard(2, 2), shard(16, 1)
    if zero_stage == 3:
        weights += 4 * largest_layer
    return {"weights": weights, "gradients": grads, "optimizer": optim}


# --------------------------------------------------------------------------- activations


def activation_bytes_per_layer(cfg: ModelConfig, micro_batch: int, precision: str, tp: int = 1,
                               attention: str = "flash") -> int:
    """Bytes one block keeps for backward for one micro-batch (no checkpointing)."""
    s, b, h, a, e = cfg.seq_len, micro_batch, cfg.d_model, cfg.n_head, bytes_per_activation(precision)
    sbh = s * b * h
    n = 4 * sbh * e + 12 * sbh * e // tp + 16 * s * b + 4 * a * s * b // tp
    if attention == "math":
        n += e * a * s * s * b // tp + sbh * e // tp  # softmax output; head-merge copy
    elif attention != "flash":
        raise ValueError(f"attention={attention!r}: 'flash' (fused SDPA kernels) or 'math'")
    return n


def head_activation_bytes(cfg: ModelConfig, micro_batch: int, precision: str, tp: int = 1) -> int:
    """Final norm input/output and the loss's logits (16-bit or fp32, fp32 copy, fp32 log-softmax)."""
    s, b, e = cfg.seq_len, micro_batch, bytes_per_activation(precision)
    logits = s * b * cfg.vocab_size // tp
    return 2 * s * b * cfg.d_model * e + logits * (e + 4 + (4 if e < 4 else 0))


def bytes_per_activation(precision: str) -> int:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {PRECISIONS}")
    return 4 if precision == "fp32" else 2


# --------------------------------------------------------------------------- step time
#
# Estimates for ranking layouts, not measurements. Compute runs at a stated MFU of the GPU's peak;
# each collective moves the bytes of NCCL's ring algorithms at a stated bus bandwidth ("busbw" in
# nccl-tests' terms): all-reduce 2 (g-1)/g x n bytes, reduce-scatter and all-gather (g-1)/g x n
# (n = the full tensor, g = group size), a point-to-point send n. A group inside one node uses the
# NVLink figure, a group that spans nodes the InfiniBand one.

DEFAULT_MFU = 0.40
"""Stated model-FLOP utilisation: eager igpt-l on one H100 is estimated at 33-41% (review
gpu-readiness.md Part 2); Megatron-LM's 1.7B GPT reaches 41% on 48 H100 (its README)."""

INTRA_NODE_GBPS = 360.0
"""NVLink bus bandwidth per GPU, GB/s: 80% of H100 SXM's NVLink 4, 900 GB/s bidirectional = 450 GB/s
each way (NVIDIA H100 datasheet)."""

INTER_NODE_GBPS = 40.0
"""InfiniBand bus bandwidth per GPU, GB/s: 80% of one 400 Gb/s NDR ConnectX-7 port per GPU
(8 x 400 Gb/s per DGX/HGX H100 node) = 50 GB/s line rate."""


def ring_factor(kind: str, group: int) -> float:
    """Bytes each GPU sends per byte of the full tensor for a ring collective over ``group`` GPUs."""
    if group <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (group - 1) / group
    if kind in ("reduce_scatter", "all_gather"):
        return (group - 1) / group
    raise ValueError(f"collective {kind!r}: all_reduce, reduce_scatter or all_gather")


def dp_bytes_per_step(params: int, dp: int, zero_stage: int, precision: str, accumulation: int,
                      checkpointing: bool, bf16_optimizer: bool) -> tuple[int, str]:
    """Bytes one GPU sends over its DP group per optimizer step, and the formula in words.

    ``params`` = parameters on this GPU (its TP shard of its pipeline stage), e = bytes per
    communicated element (the model's 16-bit dtype, or 4 in fp32), m = micro-batches per step:

    - ZeRO-0: all-reduce the gradients once per step (at the accumulation boundary).
    - ZeRO-1: reduce-scatter the gradients once per step, all-gather the updated weights.
      bf16 with fp32 accumulation (DeepSpeed's ``BF16_Optimizer``) all-reduces instead: 1.5x.
    - ZeRO-2: the gradients are partitioned, so they are reduce-scattered after every
      micro-step's backward (m times), plus one all-gather of the updated weights.
    - ZeRO-3: every micro-step all-gathers the weights for forward and for backward (and once
      more for the recompute with activation checkpointing) and reduce-scatters the gradients.
    """
    e = bytes_per_activation(precision)
    n = e * params
    rs, ag, ar = (round(ring_factor(k, dp) * n) for k in ("reduce_scatter", "all_gather", "all_reduce"))
    if zero_stage == 0:
        return ar, "all-reduce gradients 2 (N-1)/N e P"
    if zero_stage == 1:
        if bf16_optimizer:
            return ar + ag, "all-reduce gradients 2 (N-1)/N e P + all-gather weights (N-1)/N e P (BF16_Optimizer)"
        return rs + ag, "reduce-scatter gradients + all-gather weights, (N-1)/N e P each"
    if zero_stage == 2:
        return (accumulation * rs + ag,
                f"m={accumulation} x reduce-scatter gradients + all-gather weights, (N-1)/N e P each")
    gathers = 3 if checkpointing else 2
    return (accumulation * (gathers * ag + rs),
            f"m={accumulation} x ({gathers} weight all-gathers (forward, backward"
            f"{', recompute' if checkpointing else ''}) + reduce-scatter gradients), (N-1)/N e P each")


def tp_all_reduces_per_micro_step(n_layers: int, checkpointing: bool) -> tuple[int, int]:
    """(exposed, overlapped) TP all-reduces of one [b, s, h] activation per micro-step on one stage.

    Megatron's row-parallel outputs (attention projection, MLP projection) are all-reduced in
    forward, 2 per block, and the column-parallel inputs' gradients in backward, 2 per block;
    the recompute repeats the forward's 2. The vocab-parallel embedding (forward) and the logit
    head (backward) add one each; counted once per micro-step whatever the stage. Forward ones
    block the next operator: exposed. Backward ones overlap the weight-gradient GEMMs (megatron's
    asynchronous all-reduce, CUDA_DEVICE_MAX_CONNECTIONS=1): hidden.
    """
    exposed = n_layers * (2 + (2 if checkpointing else 0)) + 1
    overlapped = 2 * n_layers + 1
    return exposed, overlapped

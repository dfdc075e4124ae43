"""The iGPT model: a GPT-2 pre-LN decoder over palette tokens, tensor-parallel by construction.

One definition serves TP = 1, 2, 4, ...: the linear layers and the token embedding are
megatron-core ``tensor_parallel`` layers, which allocate only this rank's shard and put the
communication inside autograd functions. Everything else (norms, position embeddings, SOS,
row-parallel biases) is replicated and receives identical gradients on every TP rank.

Activations are batch-first everywhere: ``[b, s, h]``.

Init follows OpenAI's released iGPT code (the Sparse Transformer scheme): q/k/v N(0, 1/sqrt(d)),
attention output N(0, 1/sqrt(d*L)) (layer-dependent), MLP N(0, 0.02), tokens and SOS N(0, 0.02),
positions N(0, 0.01), logit head zero, biases zero, norm gains one.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import tensor_parallel as mtp
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from igpt_ds.config import ModelConfig
from igpt_ds.parallel.layout import gather_last_dim, init_distributed

# How each tensor-parallel weight of the full state dict is split over TP ranks: name -> (dim, stride),
# the ``partition_dim`` / ``partition_stride`` the megatron-core layers below set on their parameters
# (the fused [q; k; v] has stride 3). Checkpoint files carry no attributes, so the one-process file
# reader (igpt_ds.checkpoint.deepspeed_files) splits by this table; tests/test_tensor_parallel.py checks
# that it agrees with the attributes of every parameter. Names not listed are replicated.
TP_SPLITS = {"embed.wte.weight": (0, 1), "attn.qkv.weight": (0, 3), "attn.qkv.bias": (0, 3),
             "attn.proj.weight": (1, 1), "mlp.fc.weight": (0, 1), "mlp.fc.bias": (0, 1),
             "mlp.proj.weight": (1, 1), "final.head.weight": (0, 1)}


def tp_split(name: str) -> Optional[tuple[int, int]]:
    """(partition dim, stride) of full-state-dict parameter ``name`` under TP, None if replicated."""
    if name.startswith("blocks."):
        name = name.split(".", 2)[2]
    return TP_SPLITS.get(name)


def cpu_normal_(tensor: torch.Tensor, std: float, mean: float = 0.0) -> torch.Tensor:
    """Fill ``tensor`` (any device, any dtype) with N(mean, std) drawn by the CPU generator in fp32.

    Under ZeRO-3's ``zero.Init`` the tensors being initialised are made on the GPU in bf16/fp16: drawing
    there would use the CUDA generator (another stream than the CPU's), in 16 bits, so a ZeRO-3 run and a
    ZeRO-0/1/2 run (built on the CPU in fp32 and cast later) would start from different weights. Every
    weight of the model is drawn here instead, so the initial weights are the same at every ZeRO stage,
    layout and device: a 16-bit copy is the rounding of the same fp32 draw.
    """
    with torch.no_grad():
        if tensor.device.type == "cpu" and tensor.dtype == torch.float32:
            return tensor.normal_(mean, std)
        # new_empty, not torch.empty: zero.Init redirects torch.empty to the GPU and the training dtype.
        draw = tensor.new_empty(tensor.shape, dtype=torch.float32, device="cpu").normal_(mean, std)
        return tensor.copy_(draw)


def _normal(std: float):
    return partial(cpu_normal_, std=std)


def resolve_tp_group(tp_group: Optional[dist.ProcessGroup]) -> dist.ProcessGroup:
    """The TP group to build on. Without one, a plain one-process run gets a 1-rank group.

    megatron-core's layers need a real process group even at TP=1; in a process with no
    launcher we create a 1-rank gloo group on an in-memory store, invisible to the caller.
    """
    if tp_group is not None:
        return tp_group
    init_distributed(backend="gloo")
    if dist.get_world_size() != 1:
        raise ValueError("a multi-rank run must pass tp_group (from igpt_ds.parallel.layout.initialize(...).tp_group)")
    return dist.group.WORLD


def megatron_config(tp_size: int):
    # CPU initialisation builds each full ("master") weight with the same RNG stream on every rank
    # and keeps this rank's slice: a model built with the same seed is identical at any TP size.
    return ModelParallelConfig(tensor_model_parallel_size=tp_size, use_cpu_initialization=True,
                               perform_initialization=True, params_dtype=torch.float32)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)  # x * rsqrt(mean(x^2) + eps) * g
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout`` that is the identity, drawing no random numbers, when ``p == 0`` or in evaluation."""
    return F.dropout(x, p, training=True) if p and training else x


def activation_fn(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    return partial(F.gelu, approximate="tanh")


class LayerKV:
    """One layer's cached keys and values ``[b, nh_local, max_len, hd]``, filled up to ``length``.

    Each TP rank caches only its own heads. Buffers are allocated on the first append.
    """

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` [b, nh_local, s, hd] after the cached ones; return all keys and values so far."""
        b, nh, s, hd = k.shape
        if self.k is None:
            self.k, self.v = k.new_empty(b, nh, self.max_len, hd), v.new_empty(b, nh, self.max_len, hd)
        end = self.length + s
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer for incremental AR decoding: ``model(tokens, cache=cache)``.

    ``length`` counts the input positions processed so far (SOS included).
    """

    def __init__(self, n_layer: int, max_len: int):
        self.layers = [LayerKV(max_len) for _ in range(n_layer)]
        self.max_len = max_len

    @property
    def length(self) -> int:
        return self.layers[0].length


class Attention(nn.Module):
    """Multi-head self-attention; this rank holds ``n_head / tp`` heads."""

    def __init__(self, cfg: ModelConfig, tp_group: dist.ProcessGroup):
        super().__init__()

        tp, mcfg = tp_group.size(), megatron_config(tp_group.size())
        self.n_head_local, self.head_dim, self.causal = cfg.n_head // tp, cfg.head_dim, cfg.objective == "ar"
        self.p_drop = cfg.dropout
        d = cfg.d_model
        # Fused q,k,v: the full weight is [q; k; v] (3d, d); stride=3 hands rank r the rows
        # [q_r; k_r; v_r], i.e. whole heads with their own q, k and v.
        self.qkv = mtp.ColumnParallelLinear(d, 3 * d, config=mcfg, init_method=_normal(1 / math.sqrt(d)),
                                            bias=cfg.bias, gather_output=False, stride=3, tp_group=tp_group)
        self.proj = mtp.RowParallelLinear(d, d, config=mcfg, init_method=_normal(1 / math.sqrt(d * cfg.n_layer)),
                                          bias=cfg.bias, input_is_parallel=True, skip_bias_add=False,
                                          tp_group=tp_group)

    def forward(self, x: torch.Tensor, kv: Optional[LayerKV] = None) -> torch.Tensor:
        b, s, _ = x.shape
        qkv, _ = self.qkv(x)  # [b, s, 3 * h_local]
        q, k, v = (t.view(b, s, self.n_head_local, self.head_dim).transpose(1, 2)
                   for t in qkv.chunk(3, dim=-1))  # [b, nh_local, s, hd]
        if kv is None:
            p = self.p_drop if self.training else 0.0  # on the attention probabilities
            a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, **({"dropout_p": p} if p else {}))
        else:  # AR decoding: the s new queries sit at positions past..past+s-1 and see keys 0..their own
            past = kv.length
            k, v = kv.append(k, v)  # [b, nh_local, past + s, hd]
            mask = None if s == 1 else torch.ones(s, past + s, dtype=torch.bool, device=x.device).tril(past)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        a = a.transpose(1, 2).reshape(b, s, self.n_head_local * self.head_dim)  # [b, s, h_local]
        out, _ = self.proj(a)  # [b, s, h], all-reduced over TP
        return out


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group: dist.ProcessGroup):
        super().__init__()

        mcfg = megatron_config(tp_group.size())
        self.fc = mtp.ColumnParallelLinear(cfg.d_model, cfg.d_ff, config=mcfg, init_method=_normal(0.02),
                                           bias=cfg.bias, gather_output=False, tp_group=tp_group)
        self.proj = mtp.RowParallelLinear(cfg.d_ff, cfg.d_model, config=mcfg, init_method=_normal(0.02),
                                          bias=cfg.bias, input_is_parallel=True, skip_bias_add=False,
                                          tp_group=tp_group)
        self.act = activation_fn(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc(x)  # [b, s, d_ff / tp]
        out, _ = self.proj(self.act(h))  # [b, s, h]
        return out


class Block(nn.Module):
    """Pre-LN block: ``a = h + attn(norm(h)); h' = a + mlp(norm(a))``."""

    def __init__(self, cfg: ModelConfig, tp_group: dist.ProcessGroup):
        super().__init__()
        self.ln_1, self.attn = make_norm(cfg), Attention(cfg, tp_group)
        self.ln_2, self.mlp = make_norm(cfg), MLP(cfg, tp_group)
        self.checkpointed, self.p_drop = cfg.activation_checkpointing, cfg.dropout

    def _forward(self, h: torch.Tensor, kv: Optional[LayerKV] = None) -> torch.Tensor:
        # Residual dropout on each branch (GPT-2). Recomputation under checkpoint() replays the default
        # generator's state, so the masks of the backward's forward are the forward's.
        a = h + dropout(self.attn(self.ln_1(h), kv), self.p_drop, self.training)
        return a + dropout(self.mlp(self.ln_2(a)), self.p_drop, self.training)

    def forward(self, h: torch.Tensor, kv: Optional[LayerKV] = None) -> torch.Tensor:
        if kv is None and self.checkpointed and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, h, use_reentrant=False)
        return self._forward(h, kv)


class PositionEmbedding(nn.Embedding):
    """Learned positions, N(0, 0.01) at construction.

    The init lives in ``reset_parameters`` (run inside ``__init__``), not after it: under ZeRO-3's
    ``zero.Init`` a parameter is partitioned as soon as its module's ``__init__`` returns, so an
    init applied afterwards would silently touch an empty shard.
    """

    def reset_parameters(self) -> None:
        cpu_normal_(self.weight, std=0.01)


class Embedding(nn.Module):
    """Token + position embeddings, with the AR start-of-sequence shift or the BERT mask.

    AR: the input at position t is pixel t-1 (SOS at t=0), so position t predicts pixel t.
    BERT: masked positions' content embeddings are zeroed; positions are kept.
    SOS is its own vector (OpenAI's layout); the HF layout's row 512 maps to it on conversion.
    """

    def __init__(self, cfg: ModelConfig, tp_group: dist.ProcessGroup):
        super().__init__()

        self.cfg = cfg
        self.wte = mtp.VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, init_method=_normal(0.02),
                                              config=megatron_config(tp_group.size()), tp_group=tp_group)
        self.wpe = PositionEmbedding(cfg.seq_len, cfg.d_model)
        if cfg.objective == "ar":
            self.sos = nn.Parameter(cpu_normal_(torch.empty(cfg.d_model), std=0.02))

    def forward(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, s = tokens.shape
        h = self.wte(tokens)  # [b, s, h]
        if self.cfg.objective == "ar":
            h = torch.cat([self.sos.to(h.dtype).expand(b, 1, -1), h[:, :-1]], dim=1)
        elif mask is not None:
            h = h * (~mask).unsqueeze(-1).to(h.dtype)
        # Call the module (not .weight): ZeRO-3 gathers a partitioned parameter in its module's forward.
        h = h + self.wpe(torch.arange(s, device=tokens.device)).to(h.dtype)
        return dropout(h, self.cfg.dropout, self.training)

    def extend(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """AR decoding: embed input pixels at positions ``start..``; at ``start == 0`` SOS comes first."""
        h = self.wte(tokens)  # [b, s, h]
        if start == 0:
            h = torch.cat([self.sos.to(h.dtype).expand(tokens.shape[0], 1, -1), h], dim=1)
        positions = torch.arange(start, start + h.shape[1], device=tokens.device)
        h = h + self.wpe(positions).to(h.dtype)  # through the module, as in forward (ZeRO-3)
        return dropout(h, self.cfg.dropout, self.training)


class Head(nn.Module):
    """Final norm, then the untied, zero-initialised logit projection (vocab-parallel)."""

    def __init__(self, cfg: ModelConfig, tp_group: dist.ProcessGroup):
        super().__init__()

        self.ln_f = make_norm(cfg)
        self.head = mtp.ColumnParallelLinear(cfg.d_model, cfg.vocab_size, config=megatron_config(tp_group.size()),
                                             init_method=nn.init.zeros_, bias=False, gather_output=False,
                                             tp_group=tp_group)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits, _ = self.head(self.ln_f(h))  # [b, s, vocab / tp]
        return logits


class IGPTModel(nn.Module):
    """iGPT: ``model(tokens)`` -> next-pixel (AR) or masked-pixel (BERT) logits ``[b, s, 512]``.

    ``tokens`` are palette ids 0..511, shape [b, s] with s <= resolution**2. For AR the SOS shift
    happens inside: position t predicts pixel t from pixels before it. For BERT pass ``mask``
    (bool [b, s], True = masked). ``tp_group`` is the tensor-parallel group (None: plain process).
    """

    def __init__(self, cfg: ModelConfig, tp_group: Optional[dist.ProcessGroup] = None,
                 seed: Optional[int] = None):
        super().__init__()
        tp_group = resolve_tp_group(tp_group)
        cfg.validate(tensor_parallel=tp_group.size())
        self.cfg, self.tp_group, self.tp_size = cfg, tp_group, tp_group.size()
        self.check_inputs = True  # the trainer may turn this off when its loader validates tokens

        def seeded(index: int, build):
            # Per-layer seeds (layer 0 = embedding, 1..L = blocks, L+1 = head), as DeepSpeed's
            # PipelineModule(seed_layers=True): weights do not depend on which stage builds a layer.
            if seed is not None:
                torch.manual_seed(seed + index)
            return build()

        self.embed = seeded(0, lambda: Embedding(cfg, tp_group))
        self.blocks = nn.ModuleList(seeded(1 + i, lambda: Block(cfg, tp_group)) for i in range(cfg.n_layer))
        self.final = seeded(cfg.n_layer + 1, lambda: Head(cfg, tp_group))

    def validate_inputs(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Refuse bad tokens before any compute, naming the value and the limit."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq] palette ids, got shape {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point:
            raise ValueError(f"tokens must be integer palette ids, got dtype {tokens.dtype}")
        s = tokens.shape[1]
        if s > self.cfg.seq_len:
            raise ValueError(f"sequence length {s} exceeds the model's {self.cfg.seq_len} "
                             f"(resolution {self.cfg.resolution}^2); quantize at resolution {self.cfg.resolution}")
        if tokens.numel():
            lo, hi = (int(v) for v in torch.aminmax(tokens))
            if lo < 0 or hi >= self.cfg.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} outside 0..{self.cfg.vocab_size - 1} (the palette size)")
        if self.cfg.objective == "bert" and mask is not None and mask.shape != tokens.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != tokens shape {tuple(tokens.shape)}")

    def hidden_states(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """[h^0 (embedding output), h^1, ..., h^L]: the residual stream after each block, [b, s, h]."""
        if self.check_inputs:
            self.validate_inputs(tokens, mask)
        h = self.embed(tokens, mask)
        out = [h]
        for block in self.blocks:
            h = block(h)
            out.append(h)
        return out

    def new_cache(self) -> KVCache:
        """An empty KV cache for :meth:`forward` (AR only): ``model(tokens, cache=cache)``."""
        if self.cfg.objective != "ar":
            raise ValueError(f"a KV cache needs an autoregressive model; this one is objective={self.cfg.objective!r}")
        return KVCache(self.cfg.n_layer, self.cfg.seq_len)

    def forward(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None,
                gather: bool = True, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Logits [b, s, 512]; with ``gather=False`` this rank's vocab shard [b, s, 512 / tp].

        With ``cache`` (from :meth:`new_cache`; AR decoding, no SOS shift): ``tokens`` are the next
        input pixels, appended after the cached positions (SOS first when the cache is empty), and
        the logits of each new position predict the pixel at that position: an empty cache and
        ``k`` pixels give ``k + 1`` logits (pixels 0..k), later calls one per token.
        """
        if self.check_inputs:
            self.validate_inputs(tokens, mask)
        if cache is not None:
            if self.cfg.objective != "ar":
                raise ValueError("cache= is for autoregressive decoding; this model is objective='bert'")
            end = cache.length + tokens.shape[1] + (cache.length == 0)
            if end > self.cfg.seq_len:
                raise ValueError(f"cache holds {cache.length} positions; {tokens.shape[1]} more token(s) would reach "
                                 f"position {end}, past the model's {self.cfg.seq_len} (the last pixel is never fed)")
            h = self.embed.extend(tokens, cache.length)
        else:
            h = self.embed(tokens, mask)
        for i, block in enumerate(self.blocks):
            h = block(h) if cache is None else block(h, cache.layers[i])
        logits = self.final(h)
        return gather_last_dim(logits, self.tp_group) if gather else logits

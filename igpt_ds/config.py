"""Model configuration: one typed dataclass and the paper's named presets.

Sizes follow Chen et al. (2020), Table/Section 3: iGPT-S/M/L/XL. The presets use the
paper's text (pre-LN LayerNorm, GELU, biases); the released OpenAI checkpoints differ
(RMS-style norm without bias, x*sigmoid(1.702x), no biases anywhere) and are expressed as
overrides: ``get_preset("igpt-s", **VARIANTS["openai"])`` (``--variant openai``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal

NUM_COLORS = 512  # palette size: token ids 0..511
SOS_TOKEN = NUM_COLORS  # start-of-sequence id in the HF / OpenAI 513-row embedding layout

Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "quick_gelu"]
Objective = Literal["ar", "bert"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an iGPT model. Frozen: derive variants with :meth:`replace`."""

    n_layer: int
    """Number of transformer blocks (L)."""
    d_model: int
    """Residual stream width (d)."""
    n_head: int
    """Attention heads; must divide ``d_model`` and be divisible by the tensor-parallel size."""
    resolution: int = 32
    """Model resolution side: an image becomes ``resolution**2`` tokens in raster order."""
    vocab_size: int = NUM_COLORS
    """Pixel-token vocabulary (the k-means palette size)."""
    mlp_ratio: int = 4
    """MLP hidden width = ``mlp_ratio * d_model``."""
    norm: Norm = "layernorm"
    """``layernorm`` (paper text) or ``rmsnorm`` (released checkpoints: no mean subtraction, no bias)."""
    activation: Activation = "gelu"
    """``gelu`` (tanh approximation, GPT-2) or ``quick_gelu`` (x*sigmoid(1.702x), released checkpoints)."""
    bias: bool = True
    """Biases on linear layers and LayerNorm. The released checkpoints have none."""
    norm_eps: float = 1e-5
    """Epsilon inside the norms."""
    objective: Objective = "ar"
    """``ar``: SOS + causal mask, loss on every pixel. ``bert``: i.i.d. masking, no attention mask."""
    bert_mask_prob: float = 0.15
    """Probability that a position is masked (BERT objective only)."""
    dropout: float = 0.0
    """GPT-2-style dropout in training (embeddings, attention probabilities, both residual branches). The paper
    uses none (Sec. 3.4); 0 computes exactly what a model without dropout does."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (saves memory, costs ~33% compute)."""
    name: str = "custom"
    """Preset this config came from (informational)."""

    @property
    def seq_len(self) -> int:
        return self.resolution * self.resolution

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def d_ff(self) -> int:
        return self.mlp_ratio * self.d_model

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def validate(self, tensor_parallel: int = 1) -> "ModelConfig":
        """Raise ValueError naming the offending value and its limit; returns self."""
        for field in ("n_layer", "d_model", "n_head", "resolution", "vocab_size", "mlp_ratio"):
            if getattr(self, field) < 1:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)} must be >= 1")
        if self.d_model % self.n_head:
            raise ValueError(
                f"n_head={self.n_head} does not divide d_model={self.d_model}: "
                f"choose a head count among the divisors of {self.d_model}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm={self.norm!r}: expected 'layernorm' or 'rmsnorm'")
        if self.activation not in ("gelu", "quick_gelu"):
            raise ValueError(f"activation={self.activation!r}: expected 'gelu' or 'quick_gelu'")
        if self.objective not in ("ar", "bert"):
            raise ValueError(f"objective={self.objective!r}: expected 'ar' or 'bert'")
        if not 0.0 < self.bert_mask_prob < 1.0:
            raise ValueError(f"bert_mask_prob={self.bert_mask_prob} must lie in (0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must lie in [0, 1)")
        if tensor_parallel < 1:
            raise ValueError(f"tensor_parallel={tensor_parallel} must be >= 1")
        if self.n_head % tensor_parallel:
            raise ValueError(
                f"tensor-parallel size {tensor_parallel} does not divide n_head={self.n_head}: "
                f"use a TP size that divides {self.n_head}")
        if self.vocab_size % tensor_parallel:
            raise ValueError(
                f"tensor-parallel size {tensor_parallel} does not divide vocab_size={self.vocab_size}: "
                f"use a TP size that divides {self.vocab_size}")
        return self

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count from the architecture alone (nothing is allocated).

        Matches ``sum(p.numel() for p in IGPTModel(cfg).parameters())`` at TP=1.
        """
        d, L, V, T = self.d_model, self.n_layer, self.vocab_size, self.seq_len
        b = 1 if self.bias else 0
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        attn = 3 * d * d + 3 * d * b + d * d + d * b
        mlp = d * self.d_ff + self.d_ff * b + self.d_ff * d + d * b
        blocks = L * (2 * norm + attn + mlp)
        embed = V * d + T * d + (d if self.objective == "ar" else 0)  # tokens, positions, SOS
        head = V * d  # untied, no bias
        total = blocks + norm + head
        return total + embed if include_embeddings else total

    def train_flops_per_token(self) -> float:
        """Training FLOPs per token: 6*N for the dense matmuls + 12*L*d*T for attention scores.

        The formula of the PaLM paper (Appendix B) and nanoGPT; N excludes embeddings, which are
        lookups. Used for TFLOP/s and MFU everywhere in the project.
        """
        n = self.num_parameters(include_embeddings=False)
        return 6.0 * n + 12.0 * self.n_layer * self.d_model * self.seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown model config field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# The paper's sizes (Section 3.1 / Table 1), head counts of OpenAI's released configs (S, M, L);
# XL uses 128-wide heads. Parameter counts: tiny 1.07M, S 76M, M 455M, L 1362M, XL 6801M.
PRESETS: dict[str, ModelConfig] = {
    # 4 layers x 128 wide: trains on 2 CPU cores in minutes at MR 32^2.
    "igpt-tiny": ModelConfig(n_layer=4, d_model=128, n_head=4, resolution=32, name="igpt-tiny"),
    "igpt-s": ModelConfig(n_layer=24, d_model=512, n_head=8, resolution=32, name="igpt-s"),
    "igpt-m": ModelConfig(n_layer=36, d_model=1024, n_head=8, resolution=32, name="igpt-m"),
    "igpt-l": ModelConfig(n_layer=48, d_model=1536, n_head=16, resolution=32, name="igpt-l"),
    "igpt-xl": ModelConfig(n_layer=60, d_model=3072, n_head=24, resolution=64, name="igpt-xl"),
}


# Architecture variants (``--variant``): the paper's text (the presets as they are) and OpenAI's released code.
VARIANTS: dict[str, dict] = {
    "paper": {"norm": "layernorm", "activation": "gelu", "bias": True},
    "openai": {"norm": "rmsnorm", "activation": "quick_gelu", "bias": False},
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """Return the named preset, optionally with fields overridden (e.g. ``resolution=48``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]

"""Pipeline adapters: the model's own layer classes as a ``deepspeed.pipe.PipelineModule``.

Layer list (global layer index = the per-layer seed offset, as in ``IGPTModel(seed=...)``):
    0: EmbeddingPipe (tokens[, mask]) -> h      1..L: Block  h -> h      L+1: HeadPipe h -> logits shard
Pipeline inputs are ``(tokens,)`` for AR and ``(tokens, mask)`` for BERT; labels the same tuple,
so the loss function knows which positions carry loss. Parameter names map to the plain model's
with :func:`pipe_to_model_name` (``"3.attn.qkv.weight"`` -> ``"blocks.2.attn.qkv.weight"``).
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.distributed as dist

from igpt_ds.config import ModelConfig
from igpt_ds.model.transformer import Block, Embedding, Head
from igpt_ds.model.losses import token_losses


class EmbeddingPipe(Embedding):
    def forward(self, inputs):
        if isinstance(inputs, (tuple, list)):
            tokens, mask = inputs[0], (inputs[1] if len(inputs) > 1 else None)
        else:
            tokens, mask = inputs, None
        return super().forward(tokens, mask)


class HeadPipe(Head):
    pass


class PipelineLoss:
    """Mean token loss on the last stage: every position for AR, masked positions for BERT."""

    def __init__(self, tp_size: int):
        self.tp_size = tp_size

    def __call__(self, logits: torch.Tensor, labels) -> torch.Tensor:
        tokens, mask = (labels[0], labels[1] if len(labels) > 1 else None) if isinstance(labels, (tuple, list)) \
            else (labels, None)
        losses = token_losses(logits, tokens, self.tp_size)
        if mask is None:
            return losses.mean()
        w = mask.to(losses.dtype)
        return (losses * w).sum() / w.sum().clamp(min=1)


def build_pipeline_module(cfg: ModelConfig, tp_group: dist.ProcessGroup, pipeline_parallel: int,
                          tensor_parallel: int, data_parallel: int, seed: int,
                          activation_checkpoint_interval: Optional[int] = None, head_cls=None, head_args: tuple = (),
                          loss_fn=None):
    """A PipelineModule over DP x TP x PP whose rank order equals megatron-core's (TP fastest, then DP, PP).

    ``head_cls(cfg, tp_group, *head_args)`` replaces :class:`HeadPipe` and ``loss_fn`` the
    pretraining loss (fine-tuning's class head; see :mod:`igpt_ds.model.classifier`).
    """
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    specs = [LayerSpec(EmbeddingPipe, cfg, tp_group)]
    # Blocks checkpoint themselves when cfg.activation_checkpointing is on; no second layer of it here.
    specs += [LayerSpec(Block, cfg, tp_group) for _ in range(cfg.n_layer)]
    specs.append(LayerSpec(head_cls or HeadPipe, cfg, tp_group, *head_args))
    topology = PipeModelDataParallelTopology(num_pp=pipeline_parallel, num_mp=tensor_parallel, num_dp=data_parallel)
    return PipelineModule(layers=specs, topology=topology, loss_fn=loss_fn or PipelineLoss(tensor_parallel),
                          partition_method="type:Block", seed_layers=True, seed_fn=torch.manual_seed,
                          base_seed=seed, activation_checkpoint_interval=activation_checkpoint_interval or 0)


_PIPE_NAME = re.compile(r"^(\d+)\.(.*)$")


def pipe_to_model_name(name: str, n_layer: int) -> str:
    """Map a PipelineModule parameter name to the plain IGPTModel's name."""
    m = _PIPE_NAME.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a pipeline parameter name (expected '<layer index>.<param>')")
    idx, rest = int(m.group(1)), m.group(2)
    if idx == 0:
        return f"embed.{rest}"
    if idx <= n_layer:
        return f"blocks.{idx - 1}.{rest}"
    if idx == n_layer + 1:
        return f"final.{rest}"
    raise ValueError(f"{name!r}: layer index {idx} is outside 0..{n_layer + 1}")


def model_to_pipe_name(name: str, n_layer: int) -> str:
    """Inverse of :func:`pipe_to_model_name`."""
    head, _, rest = name.partition(".")
    if head == "embed":
        return f"0.{rest}"
    if head == "final":
        return f"{n_layer + 1}.{rest}"
    if head == "blocks":
        idx, _, rest = rest.partition(".")
        return f"{int(idx) + 1}.{rest}"
    raise ValueError(f"{name!r} is not an IGPTModel parameter name")

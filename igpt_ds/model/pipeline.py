"""Pipeline adapters: the model's own layer classes as a ``deepspeed.pipe.PipelineModule``.

Layer list (global layer index = the per-layer seed offset, as in ``IGPTModel(seed=...)``):
    0: EmbeddingPipe (tokens[, mask]) -> h      1..L: Block  h -> h      L+1: HeadPipe h -> logits shard
Pipeline inputs are ``(tokens,)`` for AR and ``(tokens, mask)`` for BERT; labels the same tuple,
so the loss function knows which positions carry loss. Parameter names map to the plain model's
with :func:`pipe_to_model_name` (``"3.attn.qkv.weight"`` -> ``"blocks.2.attn.qkv.weight"``).
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Optional

import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from igpt_ds.config import ModelConfig
from igpt_ds.model.classifier import ZeroLinear, head_outputs
from igpt_ds.model.losses import RunningStats, finetune_loss, masked_mean, token_losses
from igpt_ds.model.transformer import Block, Embedding, Head


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
    """Mean token loss on the last stage: every position for AR, masked positions for BERT.

    ``stats`` keeps the micro-batches' sums (``loss``, ``micro_batches``) for the loop's metrics.
    """

    STATS = ("loss", "micro_batches")

    def __init__(self, tp_size: int):
        self.tp_size = tp_size
        self.stats = RunningStats(self.STATS)

    def __call__(self, logits: torch.Tensor, labels) -> torch.Tensor:
        tokens, mask = (labels[0], labels[1] if len(labels) > 1 else None) if isinstance(labels, (tuple, list)) \
            else (labels, None)
        loss = masked_mean(token_losses(logits, tokens, self.tp_size), mask)
        self.stats.add(loss=loss, micro_batches=1)
        return loss


class ClassifierHeadPipe(Head):
    """Last pipeline layer of fine-tuning: final norm, logit head and class head.

    Returns (token logits shard, class logits), as :meth:`IGPTClassifier.classify`.
    """

    def __init__(self, cfg: ModelConfig, tp_group: dist.ProcessGroup, num_classes: int):
        super().__init__(cfg, tp_group)
        self.clf = ZeroLinear(cfg.d_model, num_classes)

    def forward(self, h: torch.Tensor):
        return head_outputs(self, self.clf, h)


class PipelineFinetuneLoss:
    """Fine-tuning loss on the last stage. Labels: ``(tokens, class labels)`` or ``(tokens, class labels, mask)``.

    ``stats`` keeps the micro-batches' sums (``gen``, ``clf``, ``correct``, ``count``, ``micro_batches``).
    """

    STATS = ("gen", "clf", "correct", "count", "micro_batches")

    def __init__(self, tp_size: int, gen_weight: float):
        self.tp_size, self.gen_weight = tp_size, gen_weight
        self.stats = RunningStats(self.STATS)

    def __call__(self, outputs, labels) -> torch.Tensor:
        logits, clf_logits = outputs
        tokens, classes = labels[0], labels[1]
        mask = labels[2] if len(labels) > 2 else None
        out = finetune_loss(logits, clf_logits, tokens, classes, mask, self.gen_weight, self.tp_size)
        self.stats.add(gen=out.gen, clf=out.clf, correct=out.correct, count=out.count, micro_batches=1)
        return out.loss


def build_pipeline_module(cfg: ModelConfig, tp_group: dist.ProcessGroup, pipeline_parallel: int,
                          tensor_parallel: int, data_parallel: int, seed: int,
                          activation_checkpoint_interval: Optional[int] = None, head_cls=None, head_args: tuple = (),
                          loss_fn=None):
    """A PipelineModule over DP x TP x PP whose rank order equals megatron-core's (TP fastest, then DP, PP).

    ``head_cls(cfg, tp_group, *head_args)`` replaces :class:`HeadPipe` and ``loss_fn`` the
    pretraining loss (fine-tuning's class head; see :mod:`igpt_ds.model.classifier`).
    """
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


def model_param_name(name: str, n_layer: int, pipelined: bool) -> str:
    """The plain model's name of a (possibly pipeline) parameter: ``<L+1>.clf.weight`` -> ``clf.weight``."""
    if not pipelined:
        return name
    full = pipe_to_model_name(name, n_layer)
    return full[len("final."):] if full.startswith("final.clf.") else full


def model_param_names(n_layer: int, pipelined: bool) -> Callable[[str], str]:
    """:func:`model_param_name` for one model: the ``name_of`` of igpt_ds.parallel.weights' copies."""
    return functools.partial(model_param_name, n_layer=n_layer, pipelined=pipelined)

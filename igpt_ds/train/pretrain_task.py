"""Pretraining as a task of the one loop: AR or BERT on token shards (or synthetic images).

The paper's recipe (Chen et al. 2020, Sec. 3.3): Adam, one epoch of linear warm-up, cosine decay to
zero; the loss in nats per predicted token (bits/dim in the metrics). BERT masks are drawn with
:func:`igpt_ds.model.losses.bert_mask_seed` from (seed, step, micro-batch, DP rank): the same on every
TP/PP rank of a replica.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from igpt_ds.config import ModelConfig, get_preset
from igpt_ds.data.synthetic import SyntheticLoader
from igpt_ds.data.tokens import build_loader
from igpt_ds.model.losses import EVAL_STREAM, RunningStats, bert_mask, bert_mask_seed, bits_per_dim, compute_loss
from igpt_ds.model.pipeline import PipelineLoss
from igpt_ds.palette import load_palette, palette_sha256
from igpt_ds.train.engine import WarmupCosine, build_model


class PretrainTask:
    name = "pretrain"
    steps_hint = "give --train-steps N (or --train-epochs E with shard data whose size is known)"
    divergence_hint = "Lower --lr (the paper's search goes from large to small), or use bf16/fp32 instead of fp16"
    checkpoint_after_eval = False
    keep_only_latest = False

    def __init__(self, args):
        self.args = args
        self.palette = load_palette(args.palette) if args.palette else None
        self.palette_sha256: Optional[str] = None
        self.pipe_loss: Optional[PipelineLoss] = None
        self.val_loader = None  # a shard loader kept between evaluations: its workers persist
        self.stats = RunningStats(PipelineLoss.STATS)  # replaced by the pipeline loss's own when pipelined

    # ---- set-up ---------------------------------------------------------------------------------
    def setup(self, loop) -> ModelConfig:
        args = self.args
        overrides = {"objective": args.objective, "activation_checkpointing": args.activation_checkpointing}
        if args.resolution:
            overrides["resolution"] = args.resolution
        overrides.update(args.model_overrides())  # --variant, --norm, --activation, --bias, --bert-mask-prob, --dropout
        self.cfg = get_preset(args.model, **overrides)
        return self.cfg

    def prepare(self, loop) -> None:
        pass

    def loader(self, loop, train: bool):
        args, micro = self.args, loop.ds.micro_batch_size
        source = args.train_data if train else args.val_data
        dp, dps = loop.state.dp_rank, loop.layout.data_parallel
        if tuple(source) == ("synthetic",):
            return SyntheticLoader(batch_size=micro, dp_rank=dp, dp_world_size=dps, resolution=self.cfg.resolution,
                                   seed=args.seed + (0 if train else 10 ** 6))
        expected = palette_sha256(self.palette) if self.palette is not None else None
        if expected is None and not train:
            expected = self.palette_sha256  # validation shards must share the training palette
        src = source[0] if len(source) == 1 else list(source)
        loader = build_loader(src, batch_size=micro, dp_rank=dp, dp_world_size=dps, num_workers=args.num_workers,
                              seed=args.seed, shuffle=train, shuffle_buffer=args.shuffle_buffer,
                              epochs=None if train else 1, expected_palette_sha256=expected,
                              expected_resolution=self.cfg.resolution)
        if train:
            self.palette_sha256 = getattr(loader, "palette_sha256", None)
            if self.palette is None:  # no --palette: the shards' manifest carries it (None if an older one)
                self.palette = getattr(loader, "palette", None)
            if args.val_data:
                self.loader(loop, train=False)  # fail now, not at the first evaluation
        return loader

    def steps_per_epoch(self, loop) -> Optional[int]:
        samples = getattr(loop.train_loader, "num_samples", None)
        samples = loop.max_over_ranks(samples or 0)  # pipeline stages that read no data need it too
        return math.ceil(samples / loop.ds.train_batch_size) if samples else None

    def schedule(self, total_steps: int, steps_per_epoch: Optional[int]) -> WarmupCosine:
        args = self.args
        if args.warmup_steps is not None:
            warmup = args.warmup_steps
        elif steps_per_epoch:
            warmup = round(args.warmup_epochs * steps_per_epoch)  # the paper: one epoch of warm-up
        else:
            warmup = 0
        return WarmupCosine(min(warmup, total_steps), total_steps, args.min_lr_ratio, not args.no_decay)

    def build_model(self, loop):
        if loop.pipelined:
            self.pipe_loss = PipelineLoss(loop.layout.tensor_parallel)
            self.stats = self.pipe_loss.stats
        module = build_model(self.cfg, loop.state, loop.ds, self.args.seed,
                             pipeline_options={"loss_fn": self.pipe_loss} if loop.pipelined else None)
        if not loop.pipelined:
            module.check_inputs = tuple(self.args.train_data) == ("synthetic",)  # the shard loader validates tokens
        return module

    # ---- steps ----------------------------------------------------------------------------------
    def _inputs(self, loop, batch: dict, *mask_indices: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        tokens = batch["tokens"].to(loop.device, non_blocking=True)
        if self.cfg.objective != "bert":
            return tokens, None
        g = torch.Generator().manual_seed(bert_mask_seed(self.args.seed, *mask_indices))
        return tokens, bert_mask(tokens.shape, self.cfg.bert_mask_prob, g).to(loop.device)

    def loss(self, loop, batch: dict, micro: int) -> torch.Tensor:
        tokens, mask = self._inputs(loop, batch, loop.step, micro, loop.state.dp_rank)
        loss = compute_loss(loop.engine, tokens, mask).loss
        self.stats.add(loss=loss, micro_batches=1)
        return loss

    def pipe_item(self, loop, batch: dict, micro: int) -> tuple:
        tokens, mask = self._inputs(loop, batch, loop.step, micro, loop.state.dp_rank)
        inputs = (tokens,) if mask is None else (tokens, mask)
        return inputs, inputs

    def step_record(self, sums: dict) -> dict:
        loss = sums["loss"] / max(sums["micro_batches"], 1)
        return {"loss": loss, "bits_per_dim": bits_per_dim(loss)}

    # ---- evaluation -----------------------------------------------------------------------------
    def eval_due(self, loop) -> bool:
        interval = self.args.eval_interval
        return bool(interval) and (loop.step % interval == 0 or loop.step == loop.total_steps)

    @torch.no_grad()
    def evaluate(self, loop) -> dict:
        """Mean validation loss (nats/token): one pass over the validation shards (or --eval-batches)."""
        if not self.args.val_data:
            return {}
        loop.engine.eval()
        loader = None
        if loop.reads_data:  # one validation loader: its workers persist from one evaluation to the next
            if self.val_loader is None:
                self.val_loader = self.loader(loop, train=False)
            loader = self.val_loader
            loader.set_epoch(0)  # every evaluation is the same pass over the same batches
        total, count = 0.0, 0
        for i, batch in enumerate(loop.eval_batches(loader, self.args.eval_batches)):
            item = None
            if batch is not None:
                tokens, mask = self._inputs(loop, batch, EVAL_STREAM, i, loop.state.dp_rank)
                if not loop.pipelined:
                    total += float(compute_loss(loop.engine, tokens, mask).loss)
                    count += 1
                    continue
                inputs = (tokens,) if mask is None else (tokens, mask)
                item = (inputs, inputs)
            loss, _ = loop.pipe_eval(item)  # averaged over DP and broadcast to every stage
            total += float(loss)
            count += 1
        stats = torch.tensor([total, float(count)], dtype=torch.float64)
        if not loop.pipelined:  # pipelined, every rank already holds the same DP-averaged sum
            dist.all_reduce(stats, group=loop.state.dp_group)
        loop.engine.train()
        mean = float(stats[0] / stats[1].clamp(min=1))
        return {"val_loss": mean, "val_bits_per_dim": bits_per_dim(mean)}

    def after_evaluation(self, loop, record: dict) -> bool:
        return False

    # ---- checkpoints ----------------------------------------------------------------------------
    def meta(self) -> dict:
        return {}

    def load_state(self, meta: dict) -> None:
        pass

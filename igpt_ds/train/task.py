"""The seam between the one training loop and what a run trains for.

:class:`igpt_ds.train.loop.Trainer` owns everything every run needs: distributed set-up, the
layout and DeepSpeed config, the engine, the plain and the pipelined step with gradient
accumulation, signals and the wall-clock budget, metrics, checkpoints and resume. A task supplies
what differs, in this order (torchtitan's ``TrainSpec`` idea, cut down to two tasks):

    setup(loop)               -> ModelConfig   read --init / loop.resume / the data's sizes; before any group
    prepare(loop)                              checks that need the DS config (batch) and the layout
    loader(loop, train)                        this rank's loader (the loop calls it on data-reading ranks)
    steps_per_epoch(loop)     -> int | None    collective where some ranks read no data
    schedule(total, per_epoch)-> WarmupCosine  the learning-rate multiplier
    build_model(loop)         -> nn.Module     plain module or pipeline stage, weights in place
    loss(loop, batch, micro)  -> Tensor        plain path; adds its statistics to ``stats``
    pipe_item(loop, batch, micro) -> (inputs, labels)   pipelined path; ``pipe_loss`` adds to ``stats``
    step_record(sums)         -> dict          metrics of one step from the reduced statistics
    eval_due(loop)            -> bool          after loop.step: evaluate now?
    evaluate(loop)            -> dict          validation metrics ({} when there is no validation data)
    after_evaluation(loop, record) -> bool     best export, early stopping; True stops the run
    meta()                    -> dict          extra igpt_meta.json fields
    load_state(meta)                           restore what meta() saved

Implementations: :class:`igpt_ds.train.pretrain_task.PretrainTask` (AR/BERT pretraining) and
:class:`igpt_ds.train.classify_task.ClassifyTask` (fine-tuning with a class head).
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

import numpy as np
import torch
from torch import nn

from igpt_ds.config import ModelConfig
from igpt_ds.model.losses import RunningStats
from igpt_ds.train.engine import WarmupCosine


class Task(Protocol):
    name: str  # the progress bar's label: "pretrain" | "finetune"
    stats: RunningStats  # the step's named micro-batch sums (shared with pipe_loss)
    pipe_loss: Any  # the pipeline engine's loss_fn, built with the model (None when not pipelined)
    palette: Optional[np.ndarray]  # written to SAVE/palette.npy when not None
    palette_sha256: Optional[str]  # recorded in igpt_meta.json
    steps_hint: str  # the error when neither --train-steps nor a usable --train-epochs is given
    divergence_hint: str  # appended to the non-finite-loss error
    checkpoint_after_eval: bool  # save a resumable checkpoint after every evaluation
    keep_only_latest: bool  # remove older global_stepN after each save

    def setup(self, loop) -> ModelConfig: ...
    def prepare(self, loop) -> None: ...
    def loader(self, loop, train: bool): ...
    def steps_per_epoch(self, loop) -> Optional[int]: ...
    def schedule(self, total_steps: int, steps_per_epoch: Optional[int]) -> WarmupCosine: ...
    def build_model(self, loop) -> nn.Module: ...
    def loss(self, loop, batch: dict, micro: int) -> torch.Tensor: ...
    def pipe_item(self, loop, batch: dict, micro: int) -> tuple: ...
    def step_record(self, sums: dict) -> dict: ...
    def eval_due(self, loop) -> bool: ...
    def evaluate(self, loop) -> dict: ...
    def after_evaluation(self, loop, record: dict) -> bool: ...
    def meta(self) -> dict: ...
    def load_state(self, meta: dict) -> None: ...

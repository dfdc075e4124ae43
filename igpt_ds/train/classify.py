"""Fine-tuning on DeepSpeed: the whole network, L_GEN + L_CLF, early stopping on validation accuracy.

The paper (Section 3.4 / 4.3): a class head on the mean-pooled final norm (zero-initialised), the
objective L_GEN + L_CLF, the pretraining batch and Adam (betas 0.9, 0.95, no weight decay), no
cosine schedule (linear warm-up, then constant), early stopping; the best rate is often 10x lower
than pretraining's. BERT models: the pretraining masking during training; at evaluation K masks and
the modal prediction.

Composed from the pretraining pieces (:mod:`igpt_ds.train.loop`): the same layout checks, parallel
groups, ``build_model`` (with :class:`igpt_ds.model.classifier.IGPTClassifier` / its pipeline head),
``build_engine``, ``write_checkpoint``. Outputs under ``--save``:

    SAVE/global_stepN/, SAVE/latest   DeepSpeed checkpoint of the newest evaluation (resume with --load)
    SAVE/best -> exports/stepN        consolidated export (config.json + model.safetensors with clf.*,
                                      palette.npy) of the best validation accuracy so far; config.json
                                      "classifier" holds num_classes, label_names, step, val_accuracy
    SAVE/metrics.jsonl                one line per step (loss, gen_loss, clf_loss, train_acc, lr, val_acc)
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from igpt_ds.parallel import layout as parallel
from igpt_ds.model.classifier import (CLF_PARAMS, ClassifierHeadPipe, IGPTClassifier, PipelineFinetuneLoss, finetune_loss,
                         model_param_name)
from igpt_ds.config import ModelConfig
from igpt_ds.model.losses import bert_mask
from igpt_ds.train.schedule import WarmupCosine

BEST_LINK = "best"


@dataclass
class FinetuneArgs:
    """What a fine-tuning run needs besides the DeepSpeed config (see ``igpt_ds/finetune.py --help``)."""

    init: Optional[str] = None
    random_init: bool = False  # only --init's config and palette: the from-scratch baseline
    train_data: str = ""
    val_data: Optional[str] = None
    split: str = "train"
    val_split: str = "val"
    val_fraction: float = 0.0
    split_seed: int = 0
    palette: Optional[str] = None
    num_classes: Optional[int] = None
    deepspeed_config: str = "ds_configs/zero0_fp32.json"
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    lr: float = 3e-4
    train_steps: Optional[int] = None
    train_epochs: Optional[float] = None
    warmup_steps: int = 0
    gen_weight: float = 1.0
    patience: int = 0
    eval_interval: int = 0
    save: Optional[str] = None
    load: Optional[str] = None
    seed: int = 0
    augment: str = "none"
    bert_masks: int = 5
    activation_checkpointing: bool = False
    num_workers: int = 2
    log_interval: int = 1
    progress: bool = True


# ---- inputs -----------------------------------------------------------------------------------

def split_pretrained(sd: dict) -> tuple[dict, dict]:
    """(backbone weights, class-head weights ``clf.*``) of a full state dict."""
    return {k: v for k, v in sd.items() if k not in CLF_PARAMS}, {k: v for k, v in sd.items() if k in CLF_PARAMS}


def read_init(path: str) -> tuple[ModelConfig, dict, Optional[np.ndarray], dict]:
    """(config, full weights, palette, metadata) of any checkpoint ``read_checkpoint`` reads; a fine-tuned
    export's ``clf.*`` are kept (the backbone is checked against the config, the head by the caller)."""
    from igpt_ds.checkpoint.formats import check_state_dict, detect_format

    fmt = detect_format(path)
    cfg, sd, palette, meta = fmt.read(path, device="cpu")
    backbone, head = split_pretrained(sd)
    check_state_dict(cfg, backbone, source=str(path))
    return cfg, {**backbone, **head}, palette, (meta if isinstance(meta, dict) else {})


def is_shard_dir(path: str) -> bool:
    from igpt_ds.data.shards import MANIFEST_NAME

    return os.path.isfile(os.path.join(path, MANIFEST_NAME)) or os.path.basename(path) == MANIFEST_NAME


def open_images(path: str, split: str, val_fraction: float, split_seed: int):
    from igpt_ds.data.sources import open_source

    return open_source(path, split, val_fraction=val_fraction, split_seed=split_seed)


def check_labels(labels: np.ndarray, label_names: list, num_classes: Optional[int], where: str) -> int:
    """The class count of a labelled data set, refusing unlabeled data, out-of-range labels and a
    ``num_classes`` that contradicts the data."""
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{where}: {int((labels < 0).sum())} image(s) have no label; fine-tuning needs a "
                         f"labelled source (class sub-folders, CIFAR/STL train/test, an .npz with 'labels')")
    found = int(labels.max()) + 1 if len(labels) else 0
    named = len(label_names)
    if num_classes is not None and named and named != num_classes:
        raise ValueError(f"{where}: the data names {named} classes but --num-classes is {num_classes}; "
                         f"drop --num-classes or give {named}")
    if num_classes is None:
        num_classes = named or found
    if found > num_classes:
        raise ValueError(f"{where}: label {found - 1} is out of range for {num_classes} classes (--num-classes or "
                         f"the data's label names); labels must lie in 0..{num_classes - 1}")
    if num_classes < 2:
        raise ValueError(f"{where}: {num_classes} class(es); a classifier needs at least 2")
    return num_classes


def bert_eval_masks(tokens_shape, prob: float, k: int, seed: int, batch_index: int) -> list[torch.Tensor]:
    """K evaluation masks of a batch, the same on every TP/PP rank and in every run."""
    return [bert_mask(tokens_shape, prob, torch.Generator().manual_seed(
        (seed * 1_000_003 + batch_index * 1009 + j) % 2**63 + 7)) for j in range(k)]


def modal_prediction(clf_logits: list[torch.Tensor]) -> torch.Tensor:
    """The class predicted most often over K masks; ties go to the higher mean probability."""
    votes = torch.zeros_like(clf_logits[0], dtype=torch.float32)
    probs = torch.zeros_like(votes)
    for logits in clf_logits:
        votes += torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        probs += logits.float().softmax(-1) / len(clf_logits)
    return (votes + 0.5 * probs).argmax(-1)  # a mean probability is < 1, so it only breaks ties


@torch.no_grad()
def predict(classify: Callable, tokens: torch.Tensor, cfg: ModelConfig, bert_masks: int, seed: int,
            batch_index: int) -> torch.Tensor:
    """Class predictions [b] of a batch: argmax for AR; the mode over ``bert_masks`` masks for BERT."""
    if cfg.objective != "bert":
        return classify(tokens, None)[1].argmax(-1)
    masks = bert_eval_masks(tokens.shape, cfg.bert_mask_prob, bert_masks, seed, batch_index)
    return modal_prediction([classify(tokens, m.to(tokens.device))[1] for m in masks])


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """[true class, predicted class] counts."""
    return np.bincount(labels * num_classes + preds, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _atomic_symlink(target: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


# ---- the run ----------------------------------------------------------------------------------

class Finetuner:
    def __init__(self, args: FinetuneArgs):
        from igpt_ds.train.ds_config import load_ds_config
        from igpt_ds.train.loop import build_engine, build_model, check_compatible, read_checkpoint_meta

        self.args = args
        if not args.init and not args.load:
            raise ValueError("give --init CHECKPOINT (a pretrained model) or --load SAVE_DIR (resume)")
        if not args.train_data:
            raise ValueError("give --train-data (labelled images or shards)")
        parallel.init_distributed()
        world, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_rank0 = self.rank == 0

        # 1. The pretrained model (config, weights, palette). A DeepSpeed checkpoint is consolidated
        #    once (rank 0 re-creates its layout on the CPU) and broadcast.
        init_sd, init_meta = None, {}
        if args.load:
            tag, meta = read_checkpoint_meta(args.load)
            cfg = ModelConfig.from_dict(meta["model"])
            ft = meta.get("finetune")
            if not ft:
                raise ValueError(f"--load {args.load}: {tag} is not a fine-tuning checkpoint (no 'finetune' in its "
                                 f"igpt_meta.json); to start from a pretrained run use --init {args.load}")
            self.resume_meta = meta
            from igpt_ds.palette import load_palette

            palette = load_palette(Path(args.load) / "palette.npy") if (Path(args.load) / "palette.npy").is_file() \
                else None
        else:
            self.resume_meta = None
            cfg, init_sd, palette, init_meta = self._read_init(args.init)
            if args.random_init:  # the same architecture, trained from its fresh init (seeded by --seed)
                init_sd = None
        if args.activation_checkpointing:
            cfg = cfg.replace(activation_checkpointing=True)
        self.cfg = cfg
        self.palette = self._palette(palette)

        # 2. Layout and DeepSpeed config, before any group, data or model.
        layout = parallel.ParallelLayout(world, args.tensor_parallel, args.pipeline_parallel).validate(cfg)
        self.ds = load_ds_config(args.deepspeed_config, layout.data_parallel, args.pipeline_parallel)
        layout.validate(cfg, self.ds.zero_stage)
        if args.bert_masks < 1:
            raise ValueError(f"--bert-masks {args.bert_masks} must be >= 1")

        # 3. Data (sizes, labels, class count), checked on every rank before the model is built.
        self.train_source, self.train_labels_names, n_train = self._open(args.train_data, args.split, "train")
        self.num_classes = self._classes(args.train_data, self.train_source, args.num_classes)
        if args.val_data:
            self.val_source, _, _ = self._open(args.val_data, args.val_split, "val")
            val_classes = self._classes(args.val_data, self.val_source, self.num_classes)
            if val_classes != self.num_classes:
                raise ValueError(f"--val-data {args.val_data}: {val_classes} classes, training data {self.num_classes}")
        else:
            self.val_source = None
        if self.resume_meta is not None:
            saved = self.resume_meta["finetune"]["num_classes"]
            if saved != self.num_classes:
                raise ValueError(f"--load {args.load}: the checkpoint classifies {saved} classes, the data "
                                 f"{self.num_classes}")
            check_compatible(self.resume_meta, cfg.replace(activation_checkpointing=False), f"{args.load}")
        if init_sd is not None:
            head = {k: init_sd[k] for k in CLF_PARAMS if k in init_sd}
            if head and head["clf.weight"].shape != (self.num_classes, cfg.d_model):
                raise ValueError(f"--init {args.init}: its class head has {head['clf.weight'].shape[0]} classes, "
                                 f"the data {self.num_classes}")
        steps_per_epoch = max(1, n_train // self.ds.train_batch_size)
        self.steps_per_epoch = steps_per_epoch
        if args.train_steps:
            self.total_steps = args.train_steps
        elif args.train_epochs:
            self.total_steps = max(1, round(args.train_epochs * steps_per_epoch))
        else:
            raise ValueError("give --train-steps N or --train-epochs E")
        if not 0 <= args.warmup_steps <= self.total_steps:
            raise ValueError(f"--warmup-steps {args.warmup_steps} must lie in 0..{self.total_steps}")

        # 4. Groups, loaders, model, engine.
        self.state = parallel.initialize(args.tensor_parallel, args.pipeline_parallel, model=cfg,
                                         zero_stage=self.ds.zero_stage)
        parallel.init_deepspeed_comm()
        self.layout = self.state.layout
        self.pipelined = args.pipeline_parallel > 1
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        stage, last = self.state.pp_rank, args.pipeline_parallel - 1
        self.is_last_stage = stage == last
        self.reads_data = not self.pipelined or stage in (0, last)
        self.train_loader = self._loader(self.train_source, train=True) if self.reads_data else None

        tp = self.layout.tensor_parallel
        self.pipe_loss = PipelineFinetuneLoss(tp, args.gen_weight) if self.pipelined else None
        module = build_model(cfg, self.state, self.ds, args.seed,
                             model_cls=functools.partial(IGPTClassifier, num_classes=self.num_classes),
                             pipeline_options=dict(head_cls=ClassifierHeadPipe, head_args=(self.num_classes,),
                                                   loss_fn=self.pipe_loss))
        if not self.pipelined:
            module.check_inputs = False  # the loaders produce palette ids by construction
        if init_sd is not None:
            self._copy_weights(module, init_sd)
        schedule = WarmupCosine(args.warmup_steps, self.total_steps, 0.0, decay=False)  # paper: no cosine
        self.engine, self.scheduler = build_engine(module, self.state, self.ds, args.lr, schedule)
        self.step, self.best_acc, self.best_step, self.bad_evals = 0, -1.0, 0, 0
        from igpt_ds.train.metrics import MetricsWriter

        self.metrics = MetricsWriter(args.save, enabled=self.is_rank0)
        if self.is_rank0 and args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            if self.palette is not None:
                np.save(Path(args.save) / "palette.npy", self.palette)
        if args.load:
            self._resume(args.load)

    # ---- inputs ---------------------------------------------------------------------------------
    def _read_init(self, path: str):
        from igpt_ds.checkpoint.formats import detect_format

        fmt = detect_format(path)  # cheap; a clear error for a directory of another kind
        if fmt.name != "deepspeed":
            return read_init(path)
        box = [read_init(path) if self.is_rank0 else None]  # consolidation spawns the checkpoint's ranks
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _palette(self, from_checkpoint: Optional[np.ndarray]) -> Optional[np.ndarray]:
        from igpt_ds.palette import load_palette, palette_sha256

        if self.args.palette:
            given = load_palette(self.args.palette)
            if from_checkpoint is not None and palette_sha256(given) != palette_sha256(from_checkpoint):
                raise ValueError(f"--palette {self.args.palette} differs from the palette the checkpoint was trained "
                                 f"with; drop --palette to use the checkpoint's")
            return given
        return None if from_checkpoint is None else np.asarray(from_checkpoint, dtype=np.float32)

    def _open(self, path: str, split: str, role: str):
        """(source or shard manifest path, label names, sample count) of --train-data / --val-data."""
        if is_shard_dir(path):
            from igpt_ds.data.shards import check_manifest, read_manifest

            m = read_manifest(path)
            check_manifest(m, None if self.palette is None else self._palette_hash(), self.cfg.resolution)
            if role == "train" and self.args.augment != "none":
                raise ValueError(f"--train-data {path} holds quantized shards; augmentation happens before "
                                 f"quantization, so give the images (e.g. cifar-10-batches-py) or --augment none")
            return path, list(m.label_names), m.num_samples
        if self.palette is None:
            raise ValueError(f"--init has no palette and none was given: pass --palette palette.npy (the one the "
                             f"model was pretrained with) to quantize {path}")
        frac = self.args.val_fraction if split in ("train", "val") else 0.0
        source = open_images(path, split, frac, self.args.split_seed)
        return source, list(source.label_names), len(source)

    def _palette_hash(self) -> str:
        from igpt_ds.palette import palette_sha256

        return palette_sha256(self.palette)

    def _classes(self, path: str, source, num_classes: Optional[int]) -> int:
        from igpt_ds.data.images import source_labels

        if isinstance(source, str):  # shards: labels are checked per batch; names from the manifest
            from igpt_ds.data.shards import read_manifest

            m = read_manifest(source)
            if not m.data.get("has_labels", True):
                raise ValueError(f"{path}: the shards hold no labels; fine-tuning needs labelled data")
            return check_labels(np.zeros(0, np.int64), list(m.label_names), num_classes, path)
        return check_labels(source_labels(source), source.label_names, num_classes, path)

    def _loader(self, source, train: bool):
        micro, a = self.ds.micro_batch_size, self.args
        dp, dps = self.state.dp_rank, self.layout.data_parallel
        if isinstance(source, str):
            from igpt_ds.data.tokens import build_loader

            return build_loader(source, batch_size=micro, dp_rank=dp, dp_world_size=dps, num_workers=a.num_workers,
                                seed=a.seed, shuffle=train, epochs=None if train else 1, drop_last=train,
                                expected_resolution=self.cfg.resolution)
        from igpt_ds.data.images import ImageLoader

        return ImageLoader(source, self.palette, self.cfg.resolution, batch_size=micro, dp_rank=dp, dp_world_size=dps,
                           augment=a.augment if train else "none", seed=a.seed, shuffle=train, drop_last=train,
                           num_workers=a.num_workers, epochs=None if train else 1)

    def _batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        valid = batch.get("valid", torch.ones(len(labels), dtype=torch.bool)).to(self.device)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"a batch holds label {int(labels.min()) if int(labels.min()) < 0 else int(labels.max())}"
                             f" outside 0..{self.num_classes - 1} (keys {batch['keys'][:3]}...)")
        return tokens, labels, valid

    def _train_mask(self, shape, micro: int) -> Optional[torch.Tensor]:
        if self.cfg.objective != "bert":
            return None
        # The same mask on every TP/PP rank of a replica; different across replicas, steps, micro-batches.
        g = torch.Generator().manual_seed((self.args.seed * 1_000_003 + self.step * 7919 + micro * 31
                                           + self.state.dp_rank) % 2**63)
        return bert_mask(shape, self.cfg.bert_mask_prob, g).to(self.device)

    # ---- weights ----------------------------------------------------------------------------------
    def _copy_weights(self, module, full: dict) -> None:
        """Pretrained weights into this rank's (ZeRO-3 / TP / pipeline) module, before deepspeed.initialize.

        ``clf.*`` keep their zero init unless ``full`` has them (a fine-tuned export).
        """
        import deepspeed

        from igpt_ds.parallel.weights import is_tp_sharded, shard

        named = list(module.named_parameters())
        zero3 = any(hasattr(p, "ds_id") for _, p in named)
        ctx = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0) if zero3 \
            else contextlib.nullcontext()
        with ctx, torch.no_grad():
            for name, p in named:
                key = model_param_name(name, self.cfg.n_layer, self.pipelined)
                if key not in full:
                    if key in CLF_PARAMS:
                        continue
                    raise ValueError(f"--init {self.args.init}: no weight {key}")
                src = full[key]
                if is_tp_sharded(p):
                    src = shard(src, p.partition_dim, p.partition_stride, self.state.tp_rank, self.layout.tensor_parallel)
                if src.shape != p.shape:
                    raise ValueError(f"--init {self.args.init}: {key} {tuple(src.shape)} does not fit {tuple(p.shape)}")
                p.copy_(src.to(p.dtype))

    def full_state_dict(self) -> dict:
        """Full (TP = 1) weights under the plain model's names, on rank 0 (empty elsewhere). Collective."""
        import deepspeed

        from igpt_ds.parallel.weights import is_tp_sharded, unshard

        named = list(self.engine.module.named_parameters())
        zero3 = any(hasattr(p, "ds_id") for _, p in named)
        out = {}
        ctx = deepspeed.zero.GatheredParameters([p for _, p in named]) if zero3 else contextlib.nullcontext()
        with ctx:
            for name, p in named:
                t = p.detach().to("cpu", torch.float32).clone()
                if is_tp_sharded(p) and self.layout.tensor_parallel > 1:
                    parts = [torch.empty_like(p.detach()) for _ in range(self.layout.tensor_parallel)]
                    dist.all_gather(parts, p.detach().contiguous(), group=self.state.tp_group)
                    t = unshard([x.to("cpu", torch.float32) for x in parts], p.partition_dim, p.partition_stride)
                out[model_param_name(name, self.cfg.n_layer, self.pipelined)] = t
        if self.pipelined:  # every stage's (DP 0, TP 0) rank contributes its layers
            mine = out if self.state.dp_rank == 0 and self.state.tp_rank == 0 else {}
            parts = [None] * dist.get_world_size() if self.is_rank0 else None
            dist.gather_object(mine, parts, dst=0)
            out = {k: v for part in (parts or []) for k, v in part.items()}
        return out if self.is_rank0 else {}

    # ---- one step ---------------------------------------------------------------------------------
    def _train_step(self, it) -> dict:
        gas = self.ds.gradient_accumulation_steps
        stats = torch.zeros(5, dtype=torch.float64)  # gen sum, clf sum, correct, samples, micro-batches
        if self.pipelined:
            self.pipe_loss.reset()

            def pipe_iter():
                for m in range(gas):
                    tokens, labels, _ = self._batch(next(it))
                    mask = self._train_mask(tokens.shape, m)
                    inputs = (tokens,) if mask is None else (tokens, mask)
                    yield inputs, (tokens, labels) if mask is None else (tokens, labels, mask)

            self.engine.train_batch(data_iter=pipe_iter() if self.reads_data else None)
            if self.is_last_stage and self.state.tp_rank == 0:
                stats += self.pipe_loss.stats
            dist.all_reduce(stats)  # one contribution per DP replica, from its last stage
        else:
            for m in range(gas):
                tokens, labels, _ = self._batch(next(it))
                mask = self._train_mask(tokens.shape, m)
                logits, clf_logits = self._forward(tokens, mask)
                out = finetune_loss(logits, clf_logits, tokens, labels, mask, self.args.gen_weight,
                                    self.layout.tensor_parallel)
                self.engine.backward(out.loss)
                self.engine.step()
                stats += torch.tensor([float(out.gen), float(out.clf), float(out.correct), out.count, 1.0],
                                      dtype=torch.float64)
            if self.layout.data_parallel > 1:
                dist.all_reduce(stats, group=self.state.dp_group)
        gen, clf = stats[0] / stats[4], stats[1] / stats[4]
        return {"gen_loss": float(gen), "clf_loss": float(clf), "loss": float(self.args.gen_weight * gen + clf),
                "train_acc": float(stats[2] / stats[3].clamp(min=1))}

    def _forward(self, tokens, mask):
        # Through the engine's forward (ZeRO-3 gathers and releases parameters around it).
        return self.engine(tokens, mask, classify=True)

    # ---- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Validation accuracy over every validation image (BERT: modal prediction over --bert-masks masks)."""
        if self.val_source is None:
            return None
        self.engine.eval()
        loader = self._loader(self.val_source, train=False) if self.reads_data else None
        stats = torch.zeros(2, dtype=torch.float64)  # correct, count
        k = self.args.bert_masks if self.cfg.objective == "bert" else 1
        if self.pipelined:
            n = torch.tensor([loader.batches_per_epoch if loader is not None else 0])
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            batches = iter(loader) if loader is not None else None
            for b in range(int(n)):
                tokens = labels = valid = None
                if batches is not None:
                    tokens, labels, valid = self._batch(next(batches))
                masks = bert_eval_masks(tokens.shape, self.cfg.bert_mask_prob, k, self.args.seed, b) \
                    if self.cfg.objective == "bert" and tokens is not None else [None] * k
                outs = []
                for mask in masks:
                    data = None
                    if tokens is not None:
                        mask = None if mask is None else mask.to(self.device)
                        inputs = (tokens,) if mask is None else (tokens, mask)
                        data = iter([(inputs, (tokens, labels) if mask is None else (tokens, labels, mask))])
                    _, outputs = self.engine.eval_batch(data_iter=data, return_logits=True, num_micro_batches=1)
                    if self.is_last_stage:
                        outs.append(outputs[1])
                if self.is_last_stage and self.state.tp_rank == 0:
                    preds = modal_prediction(outs) if self.cfg.objective == "bert" else outs[0].argmax(-1)
                    stats += torch.tensor([float(((preds == labels) & valid).sum()), float(valid.sum())],
                                          dtype=torch.float64)
            dist.all_reduce(stats)
        else:
            for b, batch in enumerate(loader):
                tokens, labels, valid = self._batch(batch)
                preds = predict(self._forward, tokens, self.cfg, k, self.args.seed, b)
                stats += torch.tensor([float(((preds == labels) & valid).sum()), float(valid.sum())],
                                      dtype=torch.float64)
            if self.layout.data_parallel > 1:
                dist.all_reduce(stats, group=self.state.dp_group)
        self.engine.train()
        return float(stats[0] / stats[1].clamp(min=1))

    # ---- checkpoints ------------------------------------------------------------------------------
    def _finetune_state(self) -> dict:
        return {"num_classes": self.num_classes, "label_names": self._label_names(), "best_acc": self.best_acc,
                "best_step": self.best_step, "bad_evals": self.bad_evals, "gen_weight": self.args.gen_weight,
                "augment": self.args.augment, "init": self.args.init, "random_init": self.args.random_init}

    def _label_names(self) -> list:
        names = self.train_labels_names
        return list(names) if len(names) == self.num_classes else [str(i) for i in range(self.num_classes)]

    def save_resume(self) -> None:
        from igpt_ds.palette import palette_sha256
        from igpt_ds.train.loop import _rng_state, checkpoint_meta, write_checkpoint

        meta = checkpoint_meta(self.cfg, self.ds, self.layout,
                               None if self.palette is None else palette_sha256(self.palette),
                               finetune=self._finetune_state())
        rank_state = {"rng": _rng_state(),
                      "loader": self.train_loader.state_dict() if self.train_loader is not None else None}
        tag_dir = write_checkpoint(self.engine, self.args.save, self.step, meta, rank_state)
        if self.is_rank0:  # only the newest resume point is kept; the best weights live in SAVE/best
            for old in Path(self.args.save).glob("global_step*"):
                if old.name != tag_dir.name:
                    shutil.rmtree(old, ignore_errors=True)

    def save_best(self, acc: float) -> None:
        """Export the current weights (consolidated, with clf.*) and point SAVE/best at them. Collective."""
        from igpt_ds.checkpoint.consolidated import save_consolidated

        sd = self.full_state_dict()
        if self.is_rank0:
            exports = Path(self.args.save) / "exports"
            name = f"step{self.step}"
            target = exports / name
            if target.exists():
                shutil.rmtree(target)
            info = {"num_classes": self.num_classes, "label_names": self._label_names(), "step": self.step,
                    "val_accuracy": acc, "objective": self.cfg.objective, "head_parameters": list(CLF_PARAMS)}
            save_consolidated(target, self.cfg.replace(activation_checkpointing=False), sd, palette=self.palette,
                              extra={"step": self.step, "classifier": info})
            _atomic_symlink(f"exports/{name}", Path(self.args.save) / BEST_LINK)
            for old in exports.iterdir():  # keep only the best export
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def _resume(self, directory: str) -> None:
        from igpt_ds.train.loop import _set_rng_state, read_checkpoint_meta

        tag, meta = read_checkpoint_meta(directory)
        path, client = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"{directory}/{tag}: DeepSpeed found no loadable checkpoint files")
        self.step = int(meta["step"])
        ft = meta["finetune"]
        self.best_acc, self.best_step, self.bad_evals = ft["best_acc"], ft["best_step"], ft["bad_evals"]
        state_file = Path(directory) / tag / f"trainer_state_rank{self.rank:05d}.pt"
        if state_file.is_file():
            state = torch.load(state_file, weights_only=True)
            if state.get("rng") is not None:
                _set_rng_state(state["rng"])
            if self.train_loader is not None and state.get("loader") is not None:
                self.train_loader.load_state_dict(state["loader"])

    # ---- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict:
        args = self.args

        def endless(loader):
            while True:
                yield from loader

        it = endless(self.train_loader) if self.train_loader is not None else None
        bar = None
        if self.is_rank0 and args.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="finetune", unit="step", dynamic_ncols=True)
        interval = args.eval_interval or self.steps_per_epoch
        last: dict = {}
        self.stopped_early = False
        while self.step < self.total_steps:
            lr = self.scheduler.get_last_lr()[0]
            t0 = time.perf_counter()
            record = self._train_step(it)
            self.step += 1
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"loss became {record['loss']} at step {self.step}; lower --lr (fine-tuning "
                                         f"rates are often 10x below pretraining's)")
            record.update(step=self.step, lr=lr, step_time_s=time.perf_counter() - t0)
            evaluated = self.step % interval == 0 or self.step == self.total_steps
            if evaluated and self.val_source is not None:
                acc = self.evaluate()
                record["val_acc"] = acc
                if acc > self.best_acc:
                    self.best_acc, self.best_step, self.bad_evals = acc, self.step, 0
                    if args.save:
                        self.save_best(acc)
                else:
                    self.bad_evals += 1
                record.update(best_val_acc=self.best_acc, best_step=self.best_step)
            if self.step % args.log_interval == 0 or evaluated:
                self.metrics.write(record)
            last = record
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['train_acc']:.3f}")
            stop = bool(args.patience and self.bad_evals >= args.patience)
            if args.save and (evaluated or stop):
                self.save_resume()
            if stop:
                self.stopped_early = True
                if self.is_rank0:
                    print(f"early stop at step {self.step}: no better validation accuracy in {self.bad_evals} "
                          f"evaluations (best {self.best_acc:.4f} at step {self.best_step})", flush=True)
                break
        if bar is not None:
            bar.close()
        self.metrics.close()
        return last


# ---- evaluation of an export (a plain process) ---------------------------------------------------

def load_classifier(path: str, device: str = "cpu"):
    """(model, config, palette, classifier info) of a fine-tuned consolidated export (``SAVE/best``)."""
    from igpt_ds.checkpoint.consolidated import load_consolidated
    from igpt_ds.parallel.weights import load_full_state_dict

    cfg, sd, palette, meta = load_consolidated(path, device="cpu")
    info = meta.get("classifier")
    if not info or "clf.weight" not in sd:
        raise ValueError(f"{path}: not a fine-tuned classifier export (no 'classifier' in config.json / no "
                         f"clf.weight); fine-tune with igpt_ds/finetune.py --save DIR and pass DIR/best")
    backbone, _ = split_pretrained(sd)
    from igpt_ds.checkpoint.formats import check_state_dict

    check_state_dict(cfg, backbone, source=path)
    model = IGPTClassifier(cfg, num_classes=int(info["num_classes"]))
    load_full_state_dict(model, sd)
    return model.to(device).eval(), cfg, palette, info


@torch.no_grad()
def evaluate_export(model, cfg: ModelConfig, loader, bert_masks: int = 5, seed: int = 0) -> dict:
    """Accuracy and confusion matrix of ``model`` (IGPTClassifier) over one pass of ``loader``."""
    labels_all, preds_all = [], []
    device = next(model.parameters()).device
    for b, batch in enumerate(loader):
        tokens = batch["tokens"].to(device)
        preds = predict(model.classify, tokens, cfg, bert_masks, seed, b).cpu()
        valid = batch.get("valid", torch.ones(len(preds), dtype=torch.bool))
        labels_all.append(batch["labels"][valid].numpy())
        preds_all.append(preds[valid].numpy())
    labels, preds = np.concatenate(labels_all), np.concatenate(preds_all)
    if labels.min() < 0 or labels.max() >= model.num_classes:
        raise ValueError(f"the data has labels {labels.min()}..{labels.max()}; the model classifies "
                         f"0..{model.num_classes - 1}")
    cm = confusion_matrix(labels, preds, model.num_classes)
    return {"accuracy": float((labels == preds).mean()), "num_images": int(len(labels)), "confusion": cm}


def plot_confusion(cm: np.ndarray, names: list, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = len(cm)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * c + 2), max(4, 0.5 * c + 2)))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(c), names, rotation=90 if c > 10 else 45, ha="right")
    ax.set_yticks(range(c), names)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: dict, names: list, out_dir: str, title: str) -> dict:
    """``confusion_matrix.json`` and ``confusion_matrix.png`` in ``out_dir``; returns the JSON dict."""
    os.makedirs(out_dir, exist_ok=True)
    report = {"accuracy": result["accuracy"], "num_images": result["num_images"], "label_names": names,
              "confusion_matrix": result["confusion"].tolist(), "rows": "true class", "columns": "predicted class"}
    Path(out_dir, "confusion_matrix.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_confusion(result["confusion"], names, title, os.path.join(out_dir, "confusion_matrix.png"))
    return report

"""Fine-tuning as a task of the one loop: the whole network, L_GEN + L_CLF, early stopping on accuracy.

The paper (Section 3.4 / 4.3): a class head on the mean-pooled final norm (zero-initialised), the
objective L_GEN + L_CLF, the pretraining batch and Adam (betas 0.9, 0.95, no weight decay), no
cosine schedule (linear warm-up, then constant), early stopping; the best rate is often 10x lower
than pretraining's. BERT models: the pretraining masking during training; at evaluation K masks and
the modal prediction (:mod:`igpt_ds.evaluate.classifier`). Outputs under ``--save``:

    SAVE/global_stepN/, SAVE/latest   resumable checkpoint of the newest evaluation or stop (--load)
    SAVE/best -> exports/stepN        consolidated export (config.json + model.safetensors with clf.*,
                                      palette.npy) of the best validation accuracy so far; config.json
                                      "classifier" holds num_classes, label_names, step, val_accuracy
    SAVE/metrics.jsonl                one line per step (loss, gen_loss, clf_loss, train_acc, lr, val_acc, ...)
"""
from __future__ import annotations

import functools
import pickle
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from igpt_ds.checkpoint.atomic import atomic_symlink
from igpt_ds.checkpoint.consolidated import save_consolidated
from igpt_ds.checkpoint.formats import check_state_dict, detect_format
from igpt_ds.config import ModelConfig
from igpt_ds.data.images import ImageLoader, source_labels
from igpt_ds.data.manifest import check_manifest, is_shard_dir, read_manifest
from igpt_ds.data.sources import open_source
from igpt_ds.data.tokens import build_loader
from igpt_ds.evaluate.classifier import bert_eval_masks, modal_prediction, predict
from igpt_ds.model.classifier import CLF_PARAMS, IGPTClassifier, split_pretrained
from igpt_ds.model.losses import RunningStats, bert_mask, bert_mask_seed, finetune_loss
from igpt_ds.model.pipeline import ClassifierHeadPipe, PipelineFinetuneLoss, model_param_names
from igpt_ds.palette import load_palette, palette_sha256
from igpt_ds.parallel.weights import gather_full, load_full, merge_stages, placeholders, tensor_specs
from igpt_ds.train.engine import WarmupCosine, build_model

BEST_LINK = "best"


def read_init(path: str, lazy: bool = False) -> tuple[ModelConfig, dict, Optional[np.ndarray], dict]:
    """(config, full weights, palette, metadata) of any checkpoint ``detect_format`` reads; a fine-tuned
    export's ``clf.*`` are kept (the backbone is checked against the config, the head by the caller).
    ``lazy``: the weights are lazy tensors (``load()`` reads one; :mod:`igpt_ds.checkpoint.lazy_torch`)."""
    fmt = detect_format(path)
    cfg, sd, palette, meta = fmt.open(path) if lazy and fmt.open else fmt.read(path, device="cpu")
    backbone, head = split_pretrained(sd)
    check_state_dict(cfg, backbone, source=str(path))
    return cfg, {**backbone, **head}, palette, (meta if isinstance(meta, dict) else {})


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


class ClassifyTask:
    name = "finetune"
    steps_hint = "give --train-steps N or --train-epochs E"
    divergence_hint = "Lower --lr (fine-tuning rates are often 10x below pretraining's)"
    checkpoint_after_eval = True
    keep_only_latest = True  # the best weights live in SAVE/best; one resume point is enough

    def __init__(self, args):
        if not args.init and not args.load:
            raise ValueError("give --init CHECKPOINT (a pretrained model) or --load SAVE_DIR (resume)")
        if not args.train_data:
            raise ValueError("give --train-data (labelled images or shards)")
        self.args = args
        self.best_acc, self.best_step, self.bad_evals = -1.0, 0, 0
        self.stopped_early = False
        self.pipe_loss: Optional[PipelineFinetuneLoss] = None
        self.stats = RunningStats(PipelineFinetuneLoss.STATS)  # replaced by the pipeline loss's own
        self.init_weights: Optional[dict] = None
        self.val_loader = None

    # ---- set-up: the pretrained model, the palette, the data -------------------------------------
    def setup(self, loop) -> ModelConfig:
        args = self.args
        if loop.resume is not None:
            tag, meta = loop.resume
            if not meta.get("finetune"):
                raise ValueError(f"--load {args.load}: {tag} is not a fine-tuning checkpoint (no 'finetune' in its "
                                 f"igpt_meta.json); to start from a pretrained run use --init {args.load}")
            self.resume_meta = meta
            cfg = ModelConfig.from_dict(meta["model"])
            saved_palette = Path(args.load) / "palette.npy"
            palette = load_palette(saved_palette) if saved_palette.is_file() else None
        else:
            self.resume_meta = None
            cfg, self.init_weights, palette, _ = self._read_init(loop, args.init)
            if args.random_init:  # the same architecture, trained from its fresh init (seeded by --seed)
                self.init_weights = None
        cfg = self._knobs(cfg, resuming=loop.resume is not None)
        if args.activation_checkpointing:
            cfg = cfg.replace(activation_checkpointing=True)
        self.cfg = cfg
        self.palette = self._palette(palette)
        self.palette_sha256 = None if self.palette is None else palette_sha256(self.palette)

        self.train_source, self.label_names, self.num_train = self._open(args.train_data, args.split, "train")
        self.num_classes = self._classes(args.train_data, self.train_source, args.num_classes)
        self.val_source = None
        if args.val_data:
            self.val_source, _, _ = self._open(args.val_data, args.val_split, "val")
            val_classes = self._classes(args.val_data, self.val_source, self.num_classes)
            if val_classes != self.num_classes:
                raise ValueError(f"--val-data {args.val_data}: {val_classes} classes, training data {self.num_classes}")
        if self.resume_meta is not None and self.resume_meta["finetune"]["num_classes"] != self.num_classes:
            saved = self.resume_meta["finetune"]["num_classes"]
            raise ValueError(f"--load {args.load}: the checkpoint classifies {saved} classes, "
                             f"the data {self.num_classes}")
        head = {k: v for k, v in (self.init_weights or {}).items() if k in CLF_PARAMS}
        if head and head["clf.weight"].shape != (self.num_classes, cfg.d_model):
            raise ValueError(f"--init {args.init}: its class head has {head['clf.weight'].shape[0]} classes, "
                             f"the data {self.num_classes}")
        return cfg

    def _knobs(self, cfg: ModelConfig, resuming: bool) -> ModelConfig:
        """``cfg`` with --dropout applied; the architecture knobs (and, on resume, --dropout) must agree with it."""
        args, wanted = self.args, self.args.model_overrides()
        dropout = None if resuming else wanted.pop("dropout", None)
        clash = {k: v for k, v in wanted.items() if getattr(cfg, k) != v}
        if clash:
            where = f"--load {args.load}" if resuming else f"--init {args.init}"
            listed = ", ".join(f"{k}: checkpoint {getattr(cfg, k)!r} vs flags {v!r}" for k, v in clash.items())
            raise ValueError(f"{where}: the flags contradict the checkpoint's model ({listed}); fine-tuning takes the "
                             f"architecture from the checkpoint{'' if resuming else ' (only --dropout may differ)'}: "
                             f"drop those flags")
        return cfg if dropout is None else cfg.replace(dropout=dropout)

    def prepare(self, loop) -> None:
        if self.args.bert_masks < 1:
            raise ValueError(f"--bert-masks {self.args.bert_masks} must be >= 1")

    def _read_init(self, loop, path: str):
        """--init on rank 0 only: its tensors stay in the file until :meth:`build_model` broadcasts them
        one at a time; the other ranks get the names, shapes and dtypes (:func:`placeholders`)."""
        detect_format(path)  # cheap, on every rank: a clear error for a directory of another kind
        if dist.get_world_size() == 1:
            return read_init(path, lazy=True)
        box, error = [None], None
        if loop.is_rank0:
            try:
                cfg, weights, palette, meta = read_init(path, lazy=True)
                box = [(cfg, tensor_specs(weights), palette, meta)]
            except Exception as e:  # every rank fails with it, none waits for rank 0
                error = e
                try:
                    box = [pickle.loads(pickle.dumps(e))]
                except Exception:
                    box = [RuntimeError(f"rank 0: {type(e).__name__}: {e}")]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if isinstance(box[0], BaseException):
            raise box[0]
        cfg, specs, palette, meta = box[0]
        return cfg, (weights if loop.is_rank0 else placeholders(specs, 0)), palette, meta

    def _palette(self, from_checkpoint: Optional[np.ndarray]) -> Optional[np.ndarray]:
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
            m = read_manifest(path)
            check_manifest(m, self.palette_sha256, self.cfg.resolution)
            if self.palette is None and m.palette is not None:  # neither --init nor --palette has one
                self.palette, self.palette_sha256 = m.palette, m.palette_sha256
            if role == "train" and self.args.augment != "none":
                raise ValueError(f"--train-data {path} holds quantized shards; augmentation happens before "
                                 f"quantization, so give the images (e.g. cifar-10-batches-py) or --augment none")
            return path, list(m.label_names), m.num_samples
        if self.palette is None:
            raise ValueError(f"--init has no palette and none was given: pass --palette palette.npy (the one the "
                             f"model was pretrained with) to quantize {path}")
        frac = self.args.val_fraction if split in ("train", "val") else 0.0
        source = open_source(path, split, val_fraction=frac, split_seed=self.args.split_seed)
        return source, list(source.label_names), len(source)

    def _classes(self, path: str, source, num_classes: Optional[int]) -> int:
        if isinstance(source, str):  # shards: labels are checked per batch; names from the manifest
            m = read_manifest(source)
            if not m.data.get("has_labels", True):
                raise ValueError(f"{path}: the shards hold no labels; fine-tuning needs labelled data")
            return check_labels(np.zeros(0, np.int64), list(m.label_names), num_classes, path)
        return check_labels(source_labels(source), source.label_names, num_classes, path)

    def loader(self, loop, train: bool):
        a, micro = self.args, loop.ds.micro_batch_size
        source = self.train_source if train else self.val_source
        dp, dps = loop.state.dp_rank, loop.layout.data_parallel
        if isinstance(source, str):
            return build_loader(source, batch_size=micro, dp_rank=dp, dp_world_size=dps, num_workers=a.num_workers,
                                seed=a.seed, shuffle=train, epochs=None if train else 1, drop_last=train,
                                expected_resolution=self.cfg.resolution)
        return ImageLoader(source, self.palette, self.cfg.resolution, batch_size=micro, dp_rank=dp, dp_world_size=dps,
                           augment=a.augment if train else "none", seed=a.seed, shuffle=train, drop_last=train,
                           num_workers=a.num_workers, epochs=None if train else 1)

    def steps_per_epoch(self, loop) -> int:
        return max(1, self.num_train // loop.ds.train_batch_size)  # the loaders drop partial batches

    def schedule(self, total_steps: int, steps_per_epoch: Optional[int]) -> WarmupCosine:
        if not 0 <= self.args.warmup_steps <= total_steps:
            raise ValueError(f"--warmup-steps {self.args.warmup_steps} must lie in 0..{total_steps}")
        return WarmupCosine(self.args.warmup_steps, total_steps, 0.0, decay=False)  # paper: no cosine

    # ---- the model and its weights ------------------------------------------------------------
    def build_model(self, loop):
        tp = loop.layout.tensor_parallel
        if loop.pipelined:
            self.pipe_loss = PipelineFinetuneLoss(tp, self.args.gen_weight)
            self.stats = self.pipe_loss.stats
        module = build_model(self.cfg, loop.state, loop.ds, self.args.seed,
                             model_cls=functools.partial(IGPTClassifier, num_classes=self.num_classes),
                             pipeline_options=dict(head_cls=ClassifierHeadPipe, head_args=(self.num_classes,),
                                                   loss_fn=self.pipe_loss))
        if not loop.pipelined:
            module.check_inputs = False  # the loaders produce palette ids by construction
        if self.init_weights is not None:
            # clf.* keep their zero init unless --init has them (a fine-tuned export).
            # Rank 0 reads each tensor and broadcasts it; every rank keeps its shard (ZeRO-3: per module).
            load_full(module, self.init_weights, loop.state.tp_rank, tp,
                      name_of=model_param_names(self.cfg.n_layer, loop.pipelined), optional=CLF_PARAMS,
                      source=f"--init {self.args.init}", src=0, device=loop.device)
            self.init_weights = None  # the engine holds them now (and rank 0's file handles close)
        return module

    def full_state_dict(self, loop) -> dict:
        """Full (TP = 1) weights under the plain model's names, on rank 0 (empty elsewhere). Collective."""
        state = loop.state
        writer = state.dp_rank == 0 and state.tp_rank == 0  # pipelined, each stage's writer sends its layers
        keep = writer if loop.pipelined else loop.is_rank0  # the other ranks hold no full copy
        stage = gather_full(loop.engine.module, state.tp_group, loop.layout.tensor_parallel,
                            model_param_names(self.cfg.n_layer, loop.pipelined), keep=keep)
        if loop.pipelined:
            return merge_stages(stage, writer)
        return stage

    # ---- steps ----------------------------------------------------------------------------------
    def _batch(self, loop, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = batch["labels"]  # checked on the host, before the copy: no device sync per batch
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
            raise ValueError(f"a batch holds label {bad} outside 0..{self.num_classes - 1} "
                             f"(keys {batch['keys'][:3]}...)")
        tokens = batch["tokens"].to(loop.device, non_blocking=True)
        labels = labels.to(loop.device, non_blocking=True)
        valid = batch.get("valid", torch.ones(len(labels), dtype=torch.bool)).to(loop.device, non_blocking=True)
        return tokens, labels, valid

    def _train_mask(self, loop, shape, micro: int) -> Optional[torch.Tensor]:
        if self.cfg.objective != "bert":
            return None
        g = torch.Generator().manual_seed(bert_mask_seed(self.args.seed, loop.step, micro, loop.state.dp_rank))
        return bert_mask(shape, self.cfg.bert_mask_prob, g).to(loop.device)

    def loss(self, loop, batch: dict, micro: int) -> torch.Tensor:
        tokens, labels, _ = self._batch(loop, batch)
        mask = self._train_mask(loop, tokens.shape, micro)
        # Through the engine's forward (ZeRO-3 gathers and releases parameters around it).
        logits, clf_logits = loop.engine(tokens, mask, classify=True)
        out = finetune_loss(logits, clf_logits, tokens, labels, mask, self.args.gen_weight,
                            loop.layout.tensor_parallel)
        self.stats.add(gen=out.gen, clf=out.clf, correct=out.correct, count=out.count, micro_batches=1)
        return out.loss

    def pipe_item(self, loop, batch: dict, micro: int) -> tuple:
        tokens, labels, _ = self._batch(loop, batch)
        mask = self._train_mask(loop, tokens.shape, micro)
        inputs = (tokens,) if mask is None else (tokens, mask)
        return inputs, ((tokens, labels) if mask is None else (tokens, labels, mask))

    def step_record(self, sums: dict) -> dict:
        micro = max(sums["micro_batches"], 1)
        gen, clf = sums["gen"] / micro, sums["clf"] / micro
        return {"loss": self.args.gen_weight * gen + clf, "gen_loss": gen, "clf_loss": clf,
                "train_acc": sums["correct"] / max(sums["count"], 1)}

    # ---- evaluation, best export, early stopping ---------------------------------------------------
    def eval_due(self, loop) -> bool:
        interval = self.args.eval_interval or loop.steps_per_epoch
        return loop.step % interval == 0 or loop.step == loop.total_steps

    @torch.no_grad()
    def evaluate(self, loop) -> dict:
        """Validation accuracy over every validation image (BERT: modal prediction over --bert-masks masks)."""
        if self.val_source is None:
            return {}
        loop.engine.eval()
        loader = None
        if loop.reads_data:  # one validation loader: its workers persist from one evaluation to the next
            if self.val_loader is None:
                self.val_loader = self.loader(loop, train=False)
            loader = self.val_loader
            loader.set_epoch(0)
        stats = torch.zeros(2, dtype=torch.float64, device=loop.device)  # correct, count: summed on the device
        bert = self.cfg.objective == "bert"
        k = self.args.bert_masks if bert else 1
        for b, batch in enumerate(loop.eval_batches(loader)):
            tokens = labels = valid = None
            if batch is not None:
                tokens, labels, valid = self._batch(loop, batch)
            if not loop.pipelined:
                preds = predict(lambda t, m: loop.engine(t, m, classify=True), tokens, self.cfg, k, self.args.seed, b)
            else:
                masks = bert_eval_masks(tokens.shape, self.cfg.bert_mask_prob, k, self.args.seed, b) \
                    if bert and tokens is not None else [None] * k
                outs = []
                for mask in masks:
                    item = None
                    if tokens is not None:
                        mask = None if mask is None else mask.to(loop.device)
                        inputs = (tokens,) if mask is None else (tokens, mask)
                        item = (inputs, (tokens, labels) if mask is None else (tokens, labels, mask))
                    _, outputs = loop.pipe_eval(item, return_outputs=True)
                    if outputs is not None:
                        outs.append(outputs[1])
                if not (loop.is_last_stage and loop.state.tp_rank == 0):
                    continue  # one contribution per DP replica, from its last stage
                preds = modal_prediction(outs, self.args.seed, b) if bert else outs[0].argmax(-1)
            stats += torch.stack([((preds == labels) & valid).sum(), valid.sum()]).to(stats)
        if loop.pipelined:
            dist.all_reduce(stats)
        elif loop.layout.data_parallel > 1:
            dist.all_reduce(stats, group=loop.state.dp_group)
        loop.engine.train()
        return {"val_acc": float(stats[0] / stats[1].clamp(min=1))}

    def after_evaluation(self, loop, record: dict) -> bool:
        if "val_acc" not in record:
            return False
        acc = record["val_acc"]
        if acc > self.best_acc:
            self.best_acc, self.best_step, self.bad_evals = acc, loop.step, 0
            if self.args.save:
                self.save_best(loop, acc)
        else:
            self.bad_evals += 1
        record.update(best_val_acc=self.best_acc, best_step=self.best_step)
        stop = bool(self.args.patience and self.bad_evals >= self.args.patience)
        if stop and loop.is_rank0:
            print(f"early stop at step {loop.step}: no better validation accuracy in {self.bad_evals} "
                  f"evaluations (best {self.best_acc:.4f} at step {self.best_step})", flush=True)
        self.stopped_early = stop
        return stop

    def save_best(self, loop, acc: float) -> None:
        """Export the current weights (consolidated, with clf.*) and point SAVE/best at them. Collective."""
        sd = self.full_state_dict(loop)
        if loop.is_rank0:
            exports = Path(self.args.save) / "exports"
            name = f"step{loop.step}"
            if (exports / name).exists():
                shutil.rmtree(exports / name)
            info = {"num_classes": self.num_classes, "label_names": self._label_names(), "step": loop.step,
                    "val_accuracy": acc, "objective": self.cfg.objective, "head_parameters": list(CLF_PARAMS)}
            save_consolidated(exports / name, self.cfg.replace(activation_checkpointing=False), sd,
                              palette=self.palette, extra={"step": loop.step, "classifier": info})
            atomic_symlink(f"exports/{name}", Path(self.args.save) / BEST_LINK)
            for old in exports.iterdir():  # keep only the best export
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    # ---- checkpoints ----------------------------------------------------------------------------
    def _label_names(self) -> list:
        names = self.label_names
        return list(names) if len(names) == self.num_classes else [str(i) for i in range(self.num_classes)]

    def meta(self) -> dict:
        return {"finetune": {"num_classes": self.num_classes, "label_names": self._label_names(),
                             "best_acc": self.best_acc, "best_step": self.best_step, "bad_evals": self.bad_evals,
                             "gen_weight": self.args.gen_weight, "augment": self.args.augment,
                             "init": self.args.init, "random_init": self.args.random_init}}

    def load_state(self, meta: dict) -> None:
        ft = meta["finetune"]
        self.best_acc, self.best_step, self.bad_evals = ft["best_acc"], ft["best_step"], ft["bad_evals"]

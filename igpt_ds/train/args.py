"""Every run flag of ``pretrain.py`` and ``finetune.py``, declared once: a dataclass field with its default and help.

A field made by :func:`flag` carries its command line in its metadata: the spelling(s), the help text, the
argparse group and any argparse keywords (``nargs``, ``choices``, ``metavar``, ``action``, ``required``); the
argparse ``type`` is the annotation's (``Optional[int]`` -> ``int``). :func:`build_parser` makes the parser
from the fields, :func:`parse` makes the dataclass from the command line, so the loop reads the same object
a caller could build in code (torchtitan's ``JobConfig``, litgpt's ``args.py``).

:class:`RunArgs` holds the flags both commands share, with pretraining's defaults and help;
:class:`FinetuneArgs` restates (:func:`like`) only those whose default or help differ for fine-tuning.
In ``--help`` the groups come in ``GROUPS`` order and, within a group, flags in field order (shared first).

    args = parse(PretrainArgs, argv, prog="pretrain.py", description=__doc__)
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar, NoReturn, Optional

from igpt_ds.config import PRESETS, VARIANTS  # no torch behind it: --help and flag errors come back at once

_NOT_ARGPARSE = ("flags", "group")  # metadata keys of our own; the rest goes to add_argument as is


def flag(*names: str, default=None, help: str, group: str, **argparse_kw) -> dataclasses.Field:
    """A dataclass field that is also the command-line flag ``names`` in the help group ``group``."""
    return field(default=default, metadata={"flags": names, "group": group, "help": help, **argparse_kw})


def like(base: type, name: str, **changes) -> dataclasses.Field:
    """``base``'s field ``name`` with another default and/or help: the same flag, meaning differently here."""
    old = next(f for f in fields(base) if f.name == name)
    default = changes.pop("default", old.default)
    return field(default=default, metadata={**old.metadata, **changes})


@dataclass
class RunArgs:
    """What every run needs besides the DeepSpeed config (batch size and precision are read from it only)."""

    GROUPS: ClassVar[dict] = {"model": "model", "data": "data", "parallel": "parallelism and DeepSpeed",
                              "optimization": "optimization", "checkpoints": "checkpoints and logging"}

    activation_checkpointing: bool = flag("--activation-checkpointing", default=False, group="model",
                                          action="store_true", help="recompute blocks in backward")
    compile: bool = flag("--compile", default=False, group="model", action="store_true",
                         help="torch.compile each transformer block (inductor; ZeRO-3 through DeepSpeed's "
                              "engine.compile); graph breaks are printed and logged")
    variant: Optional[str] = flag(
        "--variant", default="paper", group="model", choices=sorted(VARIANTS),
        help="architecture: paper = the paper's text (LayerNorm, tanh GELU, biases); openai = OpenAI's released "
             "checkpoints (RMS norm, x*sigmoid(1.702x), no biases; exports to Hugging Face ImageGPT) (default paper)")
    norm: Optional[str] = flag("--norm", group="model", choices=["layernorm", "rmsnorm"],
                               help="normalization, overriding the --variant's")
    activation: Optional[str] = flag("--activation", group="model", choices=["gelu", "quick_gelu"],
                                     help="MLP activation (gelu: tanh approximation), overriding the --variant's")
    bias: Optional[bool] = flag("--bias", group="model", action=argparse.BooleanOptionalAction,
                                help="biases on the linear layers and LayerNorm, overriding the --variant's")
    bert_mask_prob: Optional[float] = flag("--bert-mask-prob", group="model", metavar="P",
                                           help="BERT: probability that a position is masked, in (0, 1) (default "
                                                "0.15, the paper's; it also tried 0.2 to 0.35)")
    dropout: Optional[float] = flag("--dropout", default=0.0, group="model", metavar="P",
                                    help="training dropout on embeddings, attention probabilities and residual "
                                         "branches, GPT-2 style, in [0, 1); TP and PP 1 only (default 0, the paper's)")
    palette: Optional[str] = flag("--palette", group="data",
                                  help="palette.npy the shards must have been built with (checked by hash)")
    num_workers: int = flag("--num-workers", default=2, group="data", help="data loader workers per rank (default 2)")
    deepspeed_config: str = flag(
        "--deepspeed_config", "--deepspeed-config", default="ds_configs/zero0_fp32.json", group="parallel",
        help="DeepSpeed JSON: batch size, precision, ZeRO stage (default ds_configs/zero0_fp32.json)")
    tensor_parallel: int = flag("--tensor-parallel", default=1, group="parallel",
                                help="TP size (divides heads and 512)")
    pipeline_parallel: int = flag("--pipeline-parallel", default=1, group="parallel",
                                  help="PP stages (ZeRO-0/1 only)")
    train_steps: Optional[int] = flag("--train-steps", group="optimization", help="optimizer steps")
    train_epochs: Optional[float] = flag("--train-epochs", group="optimization",
                                         help="epochs of the training shards (instead of --train-steps)")
    warmup_steps: Optional[int] = flag("--warmup-steps", group="optimization",
                                       help="linear warm-up steps (default: one epoch, as the paper)")
    lr: float = flag("--lr", default=3e-3, group="optimization",
                     help="peak Adam learning rate (paper: S/M 3e-3, L 1e-3)")
    seed: int = flag("--seed", default=0, group="optimization", help="seed for init, data order and masks")
    save: Optional[str] = flag("--save", group="checkpoints", help="checkpoint and metrics directory")
    save_interval: int = flag("--save-interval", default=0, group="checkpoints",
                              help="save every N steps (and always at the end)")
    load: Optional[str] = flag("--load", group="checkpoints",
                               help="resume from the newest checkpoint in this directory")
    eval_interval: int = flag("--eval-interval", default=0, group="checkpoints",
                              help="validate every N steps (and at the end)")
    log_interval: int = flag("--log-interval", default=1, group="checkpoints", help="write metrics every N steps")
    peak_tflops: Optional[float] = flag("--peak-tflops", group="checkpoints",
                                        help="device peak TFLOP/s for MFU (default: looked up by name)")
    max_minutes: Optional[float] = flag("--max-minutes", group="checkpoints",
                                        help="wall-clock budget: save a checkpoint and stop when it is spent "
                                             "(the schedule is not shortened)")
    progress: bool = flag("--no-progress", default=True, group="checkpoints", action="store_false",
                          help="no tqdm bar")
    verbose: bool = flag("--verbose", default=False, group="checkpoints", action="store_true",
                         help="show every warning, also the third-party notices filtered by default (igpt_ds/quiet.py)")

    def check_flags(self, error: Callable[[str], NoReturn]) -> None:
        """Rules between flags that argparse cannot state; ``error`` is ``parser.error`` (usage, exit 2)."""
        if self.bert_mask_prob is not None and not 0.0 < self.bert_mask_prob < 1.0:
            error(f"--bert-mask-prob {self.bert_mask_prob} must lie strictly between 0 and 1")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            error(f"--dropout {self.dropout} must lie in [0, 1)")

    def model_overrides(self) -> dict:
        """The ModelConfig fields these flags set: the --variant's, then --norm/--activation/--bias,
        --bert-mask-prob and --dropout where given (fine-tuning: only what was given)."""
        out = dict(VARIANTS[self.variant]) if self.variant else {}
        for name in ("norm", "activation", "bias", "bert_mask_prob", "dropout"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


@dataclass
class PretrainArgs(RunArgs):
    """``igpt_ds/pretrain.py``: AR or BERT pretraining on shards (or synthetic images)."""

    model: str = flag("--model", default="igpt-tiny", group="model", choices=sorted(PRESETS),
                      help="size preset (default igpt-tiny)")
    objective: str = flag("--objective", default="ar", group="model", choices=["ar", "bert"],
                          help="autoregressive or BERT (default ar)")
    resolution: Optional[int] = flag("--resolution", group="model",
                                     help="model resolution side (default: the preset's)")
    train_data: tuple[str, ...] = flag(
        "--train-data", default=("synthetic",), group="data", nargs="+", metavar="SHARDS",
        help="shard directory with dataset.json (tools/build_shards.py), brace pattern of .tar files, "
             "or a list of them; 'synthetic' for generated striped images (default)")
    val_data: Optional[tuple[str, ...]] = flag("--val-data", group="data", nargs="+", metavar="SHARDS",
                                               help="validation shards (same forms)")
    shuffle_buffer: int = flag("--shuffle-buffer", default=2000, group="data",
                               help="samples in the shuffle buffer (default 2000)")
    warmup_epochs: float = flag("--warmup-epochs", default=1.0, group="optimization",
                                help="warm-up in epochs when --warmup-steps is unset")
    min_lr_ratio: float = flag("--min-lr-ratio", default=0.0, group="optimization",
                               help="cosine floor as a fraction of --lr (paper: 0)")
    no_decay: bool = flag("--no-decay", default=False, group="optimization", action="store_true",
                          help="constant rate after warm-up (no cosine)")
    adam_eps: float = flag("--adam-eps", default=1e-8, group="optimization", help="Adam epsilon (default 1e-8)")
    eval_batches: Optional[int] = flag("--eval-batches", group="checkpoints",
                                       help="validation batches per evaluation (default: all)")

    def check_flags(self, error: Callable[[str], NoReturn]) -> None:
        super().check_flags(error)
        if self.bert_mask_prob is not None and self.objective != "bert":
            error("--bert-mask-prob is for --objective bert")


@dataclass
class FinetuneArgs(RunArgs):
    """``igpt_ds/finetune.py``: a pretrained (or, with --random-init, fresh) iGPT trained as a classifier."""

    GROUPS: ClassVar[dict] = {**RunArgs.GROUPS, "checkpoints": "evaluation, early stopping, checkpoints"}

    init: Optional[str] = flag("--init", group="model", metavar="CHECKPOINT",
                               help="pretrained model: consolidated export, HF ImageGPT dir or DeepSpeed checkpoint "
                                    "dir (its config decides the architecture)")
    random_init: bool = flag("--random-init", default=False, group="model", action="store_true",
                             help="take only the architecture and palette from --init and train from random "
                                  "(OpenAI-init) weights: the from-scratch baseline a fine-tuning run is compared with")
    num_classes: Optional[int] = flag("--num-classes", group="model",
                                      help="classes (default: from the data; an error if it contradicts it)")
    train_data: str = flag("--train-data", default="", group="data", required=True, metavar="PATH",
                           help="labelled images: cifar-10-batches-py, cifar-100-python, stl10_binary, an .npz or an "
                                "ImageNet-style folder; or a shard directory (already quantized: --augment none)")
    val_data: Optional[str] = flag("--val-data", group="data", metavar="PATH",
                                   help="validation images or shards (default: the --val-fraction hold-out of "
                                        "--train-data)")
    split: str = flag("--split", default="train", group="data", help="split of --train-data (default train)")
    val_split: Optional[str] = flag("--val-split", group="data",
                                    help="split of --val-data (default: 'val', the hold-out, when --val-fraction is "
                                         "set, else 'test')")
    val_fraction: float = flag("--val-fraction", default=0.0, group="data",
                               help="hold out this fraction of the train split for validation (paper: 0.04 on "
                                    "ImageNet)")
    split_seed: int = flag("--split-seed", default=0, group="data", help="seed of the held-out split")
    augment: str = flag("--augment", default="none", group="data", choices=["cifar", "random-resized-crop", "none"],
                        help="training augmentation before quantization: cifar = 4-px reflection pad, random crop, "
                             "horizontal flip; random-resized-crop = ImageNet-style (default none)")
    gen_weight: float = flag("--gen-weight", default=1.0, group="optimization",
                             help="weight of L_GEN; 0 switches it off (default 1)")
    bert_masks: int = flag("--bert-masks", default=5, group="optimization",
                           help="BERT models: masks per image at evaluation, modal prediction (default 5)")
    patience: int = flag("--patience", default=0, group="checkpoints",
                         help="stop after this many evaluations without a better validation accuracy (0: never)")

    # Shared flags whose default or meaning differ from pretraining's.
    palette: Optional[str] = like(RunArgs, "palette",
                                  help="palette.npy (needed when --init carries none; checked against it otherwise)")
    num_workers: int = like(RunArgs, "num_workers", help="loader processes per rank (default 2)")
    train_steps: Optional[int] = like(RunArgs, "train_steps", help="optimizer steps (upper bound when early stopping)")
    train_epochs: Optional[float] = like(RunArgs, "train_epochs",
                                         help="epochs of the training data (instead of --train-steps)")
    warmup_steps: int = like(RunArgs, "warmup_steps", default=0, help="linear warm-up steps (default 0)")
    lr: float = like(RunArgs, "lr", default=3e-4, help="Adam rate after warm-up, held constant (default 3e-4)")
    seed: int = like(RunArgs, "seed", help="seed for data order, augmentation and masks")
    save: Optional[str] = like(RunArgs, "save", help="output directory: best export in SAVE/best, resumable "
                                                     "checkpoint, metrics.jsonl")
    save_interval: int = like(RunArgs, "save_interval", help="save every N steps besides after each evaluation")
    load: Optional[str] = like(RunArgs, "load", help="resume a fine-tuning run from its --save directory")
    eval_interval: int = like(RunArgs, "eval_interval", help="validate every N steps (default: every epoch)")
    # The architecture comes from --init (or --load): these knobs only check it, except --dropout.
    variant: Optional[str] = like(RunArgs, "variant", default=None,
                                  help="refuse an --init whose architecture is not this variant's (paper or openai)")
    norm: Optional[str] = like(RunArgs, "norm", help="refuse an --init with another normalization")
    activation: Optional[str] = like(RunArgs, "activation", help="refuse an --init with another MLP activation")
    bias: Optional[bool] = like(RunArgs, "bias", help="refuse an --init with(out) biases")
    bert_mask_prob: Optional[float] = like(RunArgs, "bert_mask_prob",
                                           help="refuse an --init pretrained with another BERT masking rate")
    dropout: Optional[float] = like(RunArgs, "dropout", default=None,
                                    help="training dropout as in pretraining's --dropout, over any --init (the paper "
                                         "tried it in fine-tuning); TP and PP 1 only (default: the checkpoint's, 0 "
                                         "for the paper's models; a resume keeps it)")

    def __post_init__(self):
        # Derived defaults live here, not in the parser, so that FinetuneArgs built in code means what the
        # same command line means. Idempotent: dataclasses.replace() re-runs it on resolved values.
        if self.val_split is None:
            self.val_split = "val" if self.val_fraction and not self.val_data else "test"
        if self.val_fraction and not self.val_data:
            self.val_data = self.train_data

    def check_flags(self, error: Callable[[str], NoReturn]) -> None:
        super().check_flags(error)
        if not self.init and not self.load:
            error("give --init CHECKPOINT (or --load SAVE_DIR to resume)")
        if self.random_init and not self.init:
            error("--random-init needs --init CHECKPOINT (it gives the architecture and palette)")


def _argparse_type(hint):
    """The type argparse converts one value to: ``int`` for ``Optional[int]``, ``str`` for ``tuple[str, ...]``."""
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:  # a nargs list: the element type
        hint = typing.get_args(hint)[0]
    return hint


def build_parser(cls: type[RunArgs], prog: Optional[str] = None,
                 description: Optional[str] = None) -> argparse.ArgumentParser:
    """The command line of ``cls``: one option per field, in the groups of ``cls.GROUPS``."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {key: parser.add_argument_group(title) for key, title in cls.GROUPS.items()}
    hints = typing.get_type_hints(cls)
    order = list(groups)
    # Added group by group, so that the usage line lists the flags in the order --help does.
    for f in sorted(fields(cls), key=lambda f: order.index(f.metadata["group"])):
        kw = {k: v for k, v in f.metadata.items() if k not in _NOT_ARGPARSE}
        kind = _argparse_type(hints[f.name])
        if "action" not in kw and kind is not str:  # switches take no type; str is argparse's own
            kw["type"] = kind
        groups[f.metadata["group"]].add_argument(*f.metadata["flags"], dest=f.name, default=f.default, **kw)
    # Launcher plumbing, not run flags: DeepSpeed's examples pass --deepspeed, its launcher appends --local_rank=N
    # (torch's --local-rank); ranks take LOCAL_RANK from the environment, which the launchers also set.
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


def parse(cls: type[RunArgs], argv: Optional[list[str]] = None, prog: Optional[str] = None,
          description: Optional[str] = None) -> RunArgs:
    """``cls`` from the command line ``argv`` (default ``sys.argv[1:]``); bad flags exit 2 with the usage."""
    parser = build_parser(cls, prog, description)
    ns = parser.parse_args(argv)
    # nargs lists become tuples, like the ("synthetic",) default: hashable, and equal whichever way they came.
    args = cls(**{f.name: (tuple(v) if isinstance(v := getattr(ns, f.name), list) else v) for f in fields(cls)})
    args.check_flags(parser.error)
    return args

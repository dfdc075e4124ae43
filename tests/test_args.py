"""The command lines of pretrain.py and finetune.py, built from igpt_ds/train/args.py, against frozen behaviour.

The tables were checked against the argparse code the entry points had before they switched to train/args.py
(``parse_args`` in igpt_ds/pretrain.py and igpt_ds/finetune.py): same spellings, defaults, types, choices, nargs,
metavars, help texts, groups and parsed values. Changes on purpose: --adam-eps got a help text, and fine-tuning
gained --max-minutes, --peak-tflops and --save-interval with the unified loop; both gained --verbose (the
warning filter, igpt_ds/quiet.py) and --compile (torch.compile per block, igpt_ds/model/compile.py), and the
paper's knobs --variant, --norm, --activation, --bias/--no-bias, --bert-mask-prob, --dropout (issue #17). Any
other drift fails here.
"""
import argparse
import dataclasses
import re

import pytest

from igpt_ds.config import PRESETS
from igpt_ds.train.args import FinetuneArgs, PretrainArgs, RunArgs, build_parser, parse

MODEL, DATA, PAR, OPT = "model", "data", "parallelism and DeepSpeed", "optimization"
PT_CK, FT_CK = "checkpoints and logging", "evaluation, early stopping, checkpoints"
DS_CONFIG = dict(default="ds_configs/zero0_fp32.json", aliases=("--deepspeed-config",),
                 help="DeepSpeed JSON: batch size, precision, ZeRO stage (default ds_configs/zero0_fp32.json)")
SWITCH = dict(default=False, action="store_true", nargs=0)
NO_PROGRESS = dict(default=True, action="store_false", nargs=0, dest="progress", help="no tqdm bar")
VERBOSE = dict(SWITCH, help="show every warning, also the third-party notices filtered by default (igpt_ds/quiet.py)")
MAX_MINUTES = "wall-clock budget: save a checkpoint and stop when it is spent (the schedule is not shortened)"
PEAK_TFLOPS = "device peak TFLOP/s for MFU (default: looked up by name)"
COMPILE = dict(SWITCH, help="torch.compile each transformer block (inductor; ZeRO-3 through DeepSpeed's "
                            "engine.compile); graph breaks are printed and logged")
VARIANT = ("architecture: paper = the paper's text (LayerNorm, tanh GELU, biases); openai = OpenAI's released "
           "checkpoints (RMS norm, x*sigmoid(1.702x), no biases; exports to Hugging Face ImageGPT) (default paper)")
BIAS = dict(default=None, aliases=("--no-bias",), action="boolean_optional", nargs=0)
KNOBS_PRETRAIN = {
    "--variant": (MODEL, dict(default="paper", choices=["openai", "paper"], help=VARIANT)),
    "--norm": (MODEL, dict(default=None, choices=["layernorm", "rmsnorm"],
                           help="normalization, overriding the --variant's")),
    "--activation": (MODEL, dict(default=None, choices=["gelu", "quick_gelu"],
                                 help="MLP activation (gelu: tanh approximation), overriding the --variant's")),
    "--bias": (MODEL, dict(BIAS, help="biases on the linear layers and LayerNorm, overriding the --variant's")),
    "--bert-mask-prob": (MODEL, dict(default=None, type="float", metavar="P",
                                     help="BERT: probability that a position is masked, in (0, 1) (default 0.15, the "
                                          "paper's; it also tried 0.2 to 0.35)")),
    "--dropout": (MODEL, dict(default=0.0, type="float", metavar="P",
                              help="training dropout on embeddings, attention probabilities and residual branches, "
                                   "GPT-2 style, in [0, 1); TP and PP 1 only (default 0, the paper's)")),
}
KNOBS_FINETUNE = {
    "--variant": (MODEL, dict(default=None, choices=["openai", "paper"],
                              help="refuse an --init whose architecture is not this variant's (paper or openai)")),
    "--norm": (MODEL, dict(default=None, choices=["layernorm", "rmsnorm"],
                           help="refuse an --init with another normalization")),
    "--activation": (MODEL, dict(default=None, choices=["gelu", "quick_gelu"],
                                 help="refuse an --init with another MLP activation")),
    "--bias": (MODEL, dict(BIAS, help="refuse an --init with(out) biases")),
    "--bert-mask-prob": (MODEL, dict(default=None, type="float", metavar="P",
                                     help="refuse an --init pretrained with another BERT masking rate")),
    "--dropout": (MODEL, dict(default=None, type="float", metavar="P",
                              help="training dropout as in pretraining's --dropout, over any --init (the paper tried "
                                   "it in fine-tuning); TP and PP 1 only (default: the checkpoint's, 0 for the "
                                   "paper's models; a resume keeps it)")),
}

# flag -> (group title, what argparse knows about it); "type" is the converter's name, absent for str.
PRETRAIN_FLAGS = {
    "--model": (MODEL, dict(default="igpt-tiny", choices=sorted(PRESETS), help="size preset (default igpt-tiny)")),
    "--objective": (MODEL, dict(default="ar", choices=["ar", "bert"], help="autoregressive or BERT (default ar)")),
    "--resolution": (MODEL, dict(default=None, type="int", help="model resolution side (default: the preset's)")),
    "--activation-checkpointing": (MODEL, dict(SWITCH, help="recompute blocks in backward")),
    "--compile": (MODEL, COMPILE),
    **KNOBS_PRETRAIN,
    "--train-data": (DATA, dict(default=("synthetic",), nargs="+", metavar="SHARDS",
                                help="shard directory with dataset.json (tools/build_shards.py), brace pattern of .tar "
                                     "files, or a list of them; 'synthetic' for generated striped images (default)")),
    "--val-data": (DATA, dict(default=None, nargs="+", metavar="SHARDS", help="validation shards (same forms)")),
    "--palette": (DATA, dict(default=None,
                             help="palette.npy the shards must have been built with (checked by hash)")),
    "--num-workers": (DATA, dict(default=2, type="int", help="data loader workers per rank (default 2)")),
    "--shuffle-buffer": (DATA, dict(default=2000, type="int", help="samples in the shuffle buffer (default 2000)")),
    "--deepspeed_config": (PAR, DS_CONFIG),
    "--tensor-parallel": (PAR, dict(default=1, type="int", help="TP size (divides heads and 512)")),
    "--pipeline-parallel": (PAR, dict(default=1, type="int", help="PP stages (ZeRO-0/1 only)")),
    "--train-steps": (OPT, dict(default=None, type="int", help="optimizer steps")),
    "--train-epochs": (OPT, dict(default=None, type="float",
                                 help="epochs of the training shards (instead of --train-steps)")),
    "--warmup-steps": (OPT, dict(default=None, type="int",
                                 help="linear warm-up steps (default: one epoch, as the paper)")),
    "--warmup-epochs": (OPT, dict(default=1.0, type="float", help="warm-up in epochs when --warmup-steps is unset")),
    "--lr": (OPT, dict(default=3e-3, type="float", help="peak Adam learning rate (paper: S/M 3e-3, L 1e-3)")),
    "--min-lr-ratio": (OPT, dict(default=0.0, type="float", help="cosine floor as a fraction of --lr (paper: 0)")),
    "--no-decay": (OPT, dict(SWITCH, help="constant rate after warm-up (no cosine)")),
    "--adam-eps": (OPT, dict(default=1e-8, type="float", help="Adam epsilon (default 1e-8)")),
    "--seed": (OPT, dict(default=0, type="int", help="seed for init, data order and masks")),
    "--save": (PT_CK, dict(default=None, help="checkpoint and metrics directory")),
    "--save-interval": (PT_CK, dict(default=0, type="int", help="save every N steps (and always at the end)")),
    "--load": (PT_CK, dict(default=None, help="resume from the newest checkpoint in this directory")),
    "--eval-interval": (PT_CK, dict(default=0, type="int", help="validate every N steps (and at the end)")),
    "--eval-batches": (PT_CK, dict(default=None, type="int", help="validation batches per evaluation (default: all)")),
    "--log-interval": (PT_CK, dict(default=1, type="int", help="write metrics every N steps")),
    "--peak-tflops": (PT_CK, dict(default=None, type="float", help=PEAK_TFLOPS)),
    "--max-minutes": (PT_CK, dict(default=None, type="float", help=MAX_MINUTES)),
    "--no-progress": (PT_CK, NO_PROGRESS),
    "--verbose": (PT_CK, VERBOSE),
}
FINETUNE_FLAGS = {
    "--init": (MODEL, dict(default=None, metavar="CHECKPOINT",
                           help="pretrained model: consolidated export, HF ImageGPT dir or DeepSpeed checkpoint dir "
                                "(its config decides the architecture)")),
    "--random-init": (MODEL, dict(SWITCH, help="take only the architecture and palette from --init and train from "
                                               "random (OpenAI-init) weights: the from-scratch baseline a fine-tuning "
                                               "run is compared with")),
    "--num-classes": (MODEL, dict(default=None, type="int",
                                  help="classes (default: from the data; an error if it contradicts it)")),
    "--activation-checkpointing": (MODEL, dict(SWITCH, help="recompute blocks in backward")),
    "--compile": (MODEL, COMPILE),
    **KNOBS_FINETUNE,
    "--train-data": (DATA, dict(default="", required=True, metavar="PATH",
                                help="labelled images: cifar-10-batches-py, cifar-100-python, stl10_binary, an .npz "
                                     "or an ImageNet-style folder; or a shard directory (already quantized: --augment "
                                     "none)")),
    "--val-data": (DATA, dict(default=None, metavar="PATH",
                              help="validation images or shards (default: the --val-fraction hold-out of "
                                   "--train-data)")),
    "--split": (DATA, dict(default="train", help="split of --train-data (default train)")),
    "--val-split": (DATA, dict(default=None, help="split of --val-data (default: 'val', the hold-out, when "
                                                  "--val-fraction is set, else 'test')")),
    "--val-fraction": (DATA, dict(default=0.0, type="float", help="hold out this fraction of the train split for "
                                                                  "validation (paper: 0.04 on ImageNet)")),
    "--split-seed": (DATA, dict(default=0, type="int", help="seed of the held-out split")),
    "--palette": (DATA, dict(default=None,
                             help="palette.npy (needed when --init carries none; checked against it otherwise)")),
    "--augment": (DATA, dict(default="none", choices=["cifar", "random-resized-crop", "none"],
                             help="training augmentation before quantization: cifar = 4-px reflection pad, random "
                                  "crop, horizontal flip; random-resized-crop = ImageNet-style (default none)")),
    "--num-workers": (DATA, dict(default=2, type="int", help="loader processes per rank (default 2)")),
    "--deepspeed_config": (PAR, DS_CONFIG),
    "--tensor-parallel": (PAR, dict(default=1, type="int", help="TP size (divides heads and 512)")),
    "--pipeline-parallel": (PAR, dict(default=1, type="int", help="PP stages (ZeRO-0/1 only)")),
    "--lr": (OPT, dict(default=3e-4, type="float", help="Adam rate after warm-up, held constant (default 3e-4)")),
    "--train-steps": (OPT, dict(default=None, type="int", help="optimizer steps (upper bound when early stopping)")),
    "--train-epochs": (OPT, dict(default=None, type="float",
                                 help="epochs of the training data (instead of --train-steps)")),
    "--warmup-steps": (OPT, dict(default=0, type="int", help="linear warm-up steps (default 0)")),
    "--gen-weight": (OPT, dict(default=1.0, type="float", help="weight of L_GEN; 0 switches it off (default 1)")),
    "--bert-masks": (OPT, dict(default=5, type="int",
                               help="BERT models: masks per image at evaluation, modal prediction (default 5)")),
    "--seed": (OPT, dict(default=0, type="int", help="seed for data order, augmentation and masks")),
    "--eval-interval": (FT_CK, dict(default=0, type="int", help="validate every N steps (default: every epoch)")),
    "--patience": (FT_CK, dict(default=0, type="int", help="stop after this many evaluations without a better "
                                                           "validation accuracy (0: never)")),
    "--save": (FT_CK, dict(default=None, help="output directory: best export in SAVE/best, resumable checkpoint, "
                                              "metrics.jsonl")),
    "--load": (FT_CK, dict(default=None, help="resume a fine-tuning run from its --save directory")),
    "--log-interval": (FT_CK, dict(default=1, type="int", help="write metrics every N steps")),
    "--no-progress": (FT_CK, NO_PROGRESS),
    # New with the unified loop.
    "--max-minutes": (FT_CK, dict(default=None, type="float", help=MAX_MINUTES)),
    "--peak-tflops": (FT_CK, dict(default=None, type="float", help=PEAK_TFLOPS)),
    "--save-interval": (FT_CK, dict(default=0, type="int", help="save every N steps besides after each evaluation")),
    "--verbose": (FT_CK, VERBOSE),
}
GROUP_ORDER = {PretrainArgs: [MODEL, DATA, PAR, OPT, PT_CK], FinetuneArgs: [MODEL, DATA, PAR, OPT, FT_CK]}

# Every field after parsing the minimal command line; the keys are the names the loop reads.
SHARED_DEFAULTS = dict(activation_checkpointing=False, compile=False, palette=None, num_workers=2,
                       deepspeed_config="ds_configs/zero0_fp32.json", tensor_parallel=1, pipeline_parallel=1,
                       train_steps=None, train_epochs=None, seed=0, save=None, save_interval=0, load=None,
                       eval_interval=0, log_interval=1, peak_tflops=None, max_minutes=None, progress=True,
                       verbose=False, norm=None, activation=None, bias=None, bert_mask_prob=None)
PRETRAIN_DEFAULTS = dict(SHARED_DEFAULTS, model="igpt-tiny", objective="ar", resolution=None,
                         train_data=("synthetic",), val_data=None, shuffle_buffer=2000, warmup_steps=None,
                         warmup_epochs=1.0, lr=3e-3, min_lr_ratio=0.0, no_decay=False, adam_eps=1e-8,
                         eval_batches=None, variant="paper", dropout=0.0)
FT = ["--train-data", "d", "--init", "ck"]
FINETUNE_DEFAULTS = dict(SHARED_DEFAULTS, init="ck", random_init=False, num_classes=None, train_data="d",
                         val_data=None, split="train", val_split="test", val_fraction=0.0, split_seed=0,
                         augment="none", warmup_steps=0, lr=3e-4, gen_weight=1.0, bert_masks=5, patience=0,
                         variant=None, dropout=None)

PRETRAIN_CASES = [  # (argv, the fields that differ from PRETRAIN_DEFAULTS)
    ([], {}),
    (["--model", "igpt-s", "--objective", "bert", "--resolution", "32", "--activation-checkpointing", "--compile"],
     dict(model="igpt-s", objective="bert", resolution=32, activation_checkpointing=True, compile=True)),
    (["--train-data", "a", "b{0..3}.tar", "--val-data", "v", "--palette", "p.npy", "--num-workers", "0",
      "--shuffle-buffer", "5"],
     dict(train_data=("a", "b{0..3}.tar"), val_data=("v",), palette="p.npy", num_workers=0, shuffle_buffer=5)),
    (["--deepspeed_config", "x.json", "--tensor-parallel", "2", "--pipeline-parallel", "2", "--deepspeed",
      "--local_rank", "3"], dict(deepspeed_config="x.json", tensor_parallel=2, pipeline_parallel=2)),
    (["--deepspeed-config=y.json", "--local-rank=1"], dict(deepspeed_config="y.json")),
    (["--train-steps", "10", "--train-epochs", "1.5", "--warmup-steps", "3", "--warmup-epochs", "0.5", "--lr", "1",
      "--min-lr-ratio", "0.1", "--no-decay", "--adam-eps", "1e-6", "--seed", "7"],
     dict(train_steps=10, train_epochs=1.5, warmup_steps=3, warmup_epochs=0.5, lr=1.0, min_lr_ratio=0.1,
          no_decay=True, adam_eps=1e-6, seed=7)),
    (["--save", "s", "--save-interval", "5", "--load", "l", "--eval-interval", "2", "--eval-batches", "4",
      "--log-interval", "3", "--peak-tflops", "100", "--max-minutes", "1.5", "--no-progress"],
     dict(save="s", save_interval=5, load="l", eval_interval=2, eval_batches=4, log_interval=3, peak_tflops=100.0,
          max_minutes=1.5, progress=False)),
    (["--lr=2e-4", "--seed=3"], dict(lr=2e-4, seed=3)),
    (["--variant", "openai", "--norm", "layernorm", "--activation", "gelu", "--no-bias", "--objective", "bert",
      "--bert-mask-prob", "0.25", "--dropout", "0.1"],
     dict(variant="openai", norm="layernorm", activation="gelu", bias=False, objective="bert", bert_mask_prob=0.25,
          dropout=0.1)),
    (["--bias", "--dropout", "0"], dict(bias=True)),
]
FINETUNE_CASES = [
    (FT, {}),
    (["--train-data", "d", "--load", "s"], dict(init=None, load="s")),
    ([*FT, "--random-init"], dict(random_init=True)),
    ([*FT, "--val-fraction", "0.04"], dict(val_fraction=0.04, val_data="d", val_split="val")),  # the hold-out
    ([*FT, "--val-fraction", "0.04", "--val-data", "v"], dict(val_fraction=0.04, val_data="v")),
    ([*FT, "--val-data", "v"], dict(val_data="v")),
    ([*FT, "--val-fraction", "0.1", "--val-split", "x"], dict(val_fraction=0.1, val_data="d", val_split="x")),
    ([*FT, "--val-data", "v", "--val-split", "train", "--split", "test", "--split-seed", "4", "--palette", "p",
      "--augment", "cifar", "--num-workers", "1", "--num-classes", "10"],
     dict(val_data="v", val_split="train", split="test", split_seed=4, palette="p", augment="cifar", num_workers=1,
          num_classes=10)),
    ([*FT, "--deepspeed_config", "z", "--tensor-parallel", "2", "--pipeline-parallel", "4", "--deepspeed",
      "--local-rank", "0"], dict(deepspeed_config="z", tensor_parallel=2, pipeline_parallel=4)),
    ([*FT, "--lr", "1e-3", "--train-steps", "5", "--train-epochs", "2", "--warmup-steps", "1", "--gen-weight", "0",
      "--bert-masks", "3", "--seed", "9", "--activation-checkpointing", "--compile"],
     dict(lr=1e-3, train_steps=5, train_epochs=2.0, warmup_steps=1, gen_weight=0.0, bert_masks=3, seed=9,
          activation_checkpointing=True, compile=True)),
    ([*FT, "--eval-interval", "10", "--patience", "3", "--save", "o", "--load", "o", "--log-interval", "2",
      "--no-progress"], dict(eval_interval=10, patience=3, save="o", load="o", log_interval=2, progress=False)),
    ([*FT, "--max-minutes", "5", "--peak-tflops", "989", "--save-interval", "100"],
     dict(max_minutes=5.0, peak_tflops=989.0, save_interval=100)),
    ([*FT, "--variant", "openai", "--norm", "rmsnorm", "--activation", "quick_gelu", "--no-bias",
      "--bert-mask-prob", "0.2", "--dropout", "0.1"],
     dict(variant="openai", norm="rmsnorm", activation="quick_gelu", bias=False, bert_mask_prob=0.2, dropout=0.1)),
]
COMMANDS = [(PretrainArgs, "pretrain.py", PRETRAIN_FLAGS, PRETRAIN_DEFAULTS, PRETRAIN_CASES),
            (FinetuneArgs, "finetune.py", FINETUNE_FLAGS, FINETUNE_DEFAULTS, FINETUNE_CASES)]
IDS = ["pretrain", "finetune"]


def _visible(parser):
    """(group title, action) for each flag --help shows."""
    return [(g.title, a) for g in parser._action_groups for a in g._group_actions
            if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS]


def _spec(action) -> dict:
    """What argparse knows about a flag, in the vocabulary of the tables above."""
    kind = {argparse._StoreTrueAction: "store_true", argparse._StoreFalseAction: "store_false",
            argparse.BooleanOptionalAction: "boolean_optional"}
    spec = {"default": action.default, "help": action.help}
    if len(action.option_strings) > 1:
        spec["aliases"] = tuple(action.option_strings[1:])
    if action.dest != action.option_strings[0].lstrip("-").replace("-", "_"):
        spec["dest"] = action.dest
    if type(action) in kind:
        spec["action"] = kind[type(action)]
    if action.type is not None:
        spec["type"] = action.type.__name__
    spec.update({k: getattr(action, k) for k in ("nargs", "choices", "metavar") if getattr(action, k) is not None})
    if action.required:
        spec["required"] = True
    return spec


@pytest.mark.parametrize("cls, prog, flags, defaults, cases", COMMANDS, ids=IDS)
def test_flags_match_the_frozen_table(cls, prog, flags, defaults, cases):
    parser = build_parser(cls, prog, "doc")
    got = {a.option_strings[0]: (title, _spec(a)) for title, a in _visible(parser)}
    assert set(got) == set(flags), f"extra {set(got) - set(flags)}, missing {set(flags) - set(got)}"
    for name, want in flags.items():
        assert got[name] == want, name
    titles = [g.title for g in parser._action_groups[2:]]  # after argparse's own two (positionals, options)
    assert titles == GROUP_ORDER[cls]
    # one flag per field, nothing else visible; each default written with a type the loop can use
    assert sorted(a.dest for _, a in _visible(parser)) == sorted(f.name for f in dataclasses.fields(cls))
    for f in dataclasses.fields(cls):
        assert isinstance(f.metadata["help"], str) and f.metadata["help"].strip(), f"{f.name} has no help"
        assert f.metadata["group"] in cls.GROUPS


@pytest.mark.parametrize("cls, prog, flags, defaults, cases", COMMANDS, ids=IDS)
def test_parsed_values(cls, prog, flags, defaults, cases):
    assert {f.name for f in dataclasses.fields(cls)} == set(defaults)
    for argv, changes in cases:
        args = parse(cls, argv, prog=prog)
        assert type(args) is cls
        want, got = {**defaults, **changes}, dataclasses.asdict(args)
        assert got == want, argv
        for k, v in want.items():  # 1 is not 1.0 here: --lr 1 must give a float, --train-data a tuple
            assert type(got[k]) is type(v), (argv, k, got[k])


@pytest.mark.parametrize("cls, prog, flags, defaults, cases", COMMANDS, ids=IDS)
def test_help_lists_every_flag_and_hides_the_launcher_ones(cls, prog, flags, defaults, cases, capsys):
    with pytest.raises(SystemExit) as e:
        parse(cls, ["--help"], prog=prog, description=f"{prog} says\n    what it does\n")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {prog} ")
    assert f"{prog} says\n    what it does\n" in out  # RawDescriptionHelpFormatter keeps the docstring's layout
    for name, (title, spec) in flags.items():
        for spelling in (name, *spec.get("aliases", ())):
            assert re.search(rf"{spelling}(?![\w-])", out), spelling
        assert f"\n{title}:\n" in out
    assert not re.search(r"--deepspeed(?![\w-])|--local[_-]rank", out)


@pytest.mark.parametrize("cls, base", [(PretrainArgs, []), (FinetuneArgs, FT)], ids=IDS)
@pytest.mark.parametrize("launcher", [["--deepspeed", "--local_rank", "0"], ["--local_rank=3"], ["--local-rank", "1"]])
def test_deepspeed_launcher_flags_parse(cls, base, launcher):
    assert parse(cls, [*base, *launcher]) == parse(cls, base)


@pytest.mark.parametrize("argv, message", [
    (["--train-data", "d"], "give --init CHECKPOINT (or --load SAVE_DIR to resume)"),
    (["--train-data", "d", "--random-init", "--load", "s"],
     "--random-init needs --init CHECKPOINT (it gives the architecture and palette)"),
    (["--init", "ck"], "the following arguments are required: --train-data"),
    ([*FT, "--augment", "flip"], "argument --augment: invalid choice: 'flip'"),
    ([*FT, "--bogus"], "unrecognized arguments: --bogus"),
])
def test_finetune_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(FinetuneArgs, argv, prog="finetune.py")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: finetune.py ") and f"finetune.py: error: {message}" in err


@pytest.mark.parametrize("argv, message", [
    (["--model", "nope"], "argument --model: invalid choice: 'nope'"),
    (["--objective", "gpt"], "argument --objective: invalid choice: 'gpt' (choose from 'ar', 'bert')"),
    (["--lr", "x"], "argument --lr: invalid float value: 'x'"),
    (["--resolution", "1.5"], "argument --resolution: invalid int value: '1.5'"),
    (["--train-data"], "argument --train-data: expected at least one argument"),
])
def test_pretrain_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(PretrainArgs, argv, prog="pretrain.py")
    assert e.value.code == 2 and f"pretrain.py: error: {message}" in capsys.readouterr().err


def test_finetune_args_in_code_mean_what_the_command_line_means():
    held_out = FinetuneArgs(init="ck", train_data="d", val_fraction=0.04)
    assert (held_out.val_data, held_out.val_split) == ("d", "val")
    assert FinetuneArgs(init="ck", train_data="d", val_data="v").val_split == "test"
    assert dataclasses.replace(held_out, seed=1) == dataclasses.replace(held_out, seed=1, val_split="val")
    # Overriding a shared flag for fine-tuning leaves pretraining's declaration alone.
    lr = {f.name: f for f in dataclasses.fields(RunArgs)}["lr"]
    assert lr.default == 3e-3 and lr.metadata["help"] == "peak Adam learning rate (paper: S/M 3e-3, L 1e-3)"
    assert PretrainArgs().lr == 3e-3 and FinetuneArgs().lr == 3e-4

"""Load a trained model from any supported directory in a plain Python process, and convert.

    model, config, palette = igpt_ds.load_pretrained("runs/tiny/export", device="cpu")

Every format is a :class:`Format` in :data:`FORMATS`: a name, a detector (``path -> bool``), a
reader (``path, device -> (config, full state dict, palette or None, metadata)``), optionally a
writer (``path, config, state_dict, palette, dtype``) and a line saying what it looks for. The
first detector that accepts a directory decides its format; adding a format (e.g. DeepSpeed
checkpoints) is one more entry. ``tools/convert_checkpoint.py`` uses the same table.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from igpt_ds.checkpoint import consolidated as checkpoint
from igpt_ds.checkpoint import hf
from igpt_ds.checkpoint import reshard as ds_checkpoint
from igpt_ds.checkpoint.run import find_checkpoint
from igpt_ds.config import ModelConfig
from igpt_ds.model.compile import prefer_fast_attention
from igpt_ds.model.transformer import IGPTModel
from igpt_ds.parallel.weights import load_full_state_dict

PathLike = Union[str, os.PathLike]
Reader = Callable[..., tuple]
Writer = Callable[..., Path]


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[PathLike], bool]
    read: Reader
    write: Optional[Writer]
    looks_for: str
    open: Optional[Callable[[PathLike], tuple]] = None  # like read, but tensors are read on load() (lazy_torch)


def _write_consolidated(path, config, state_dict, palette=None, dtype=torch.float32, step=None, source=None, **_):
    extra = {k: v for k, v in (("step", step), ("converted_from", source)) if v is not None}
    return checkpoint.save_consolidated(path, config, state_dict, palette=palette, dtype=dtype, extra=extra)


FORMATS: list[Format] = [
    Format("consolidated", checkpoint.is_consolidated, checkpoint.load_consolidated, _write_consolidated,
           'an iGPT-DS consolidated export: config.json with "format": "igpt-ds-consolidated" and model.safetensors',
           checkpoint.open_consolidated),
    Format("hf", hf.is_hf_imagegpt, hf.load_hf, hf.save_hf,
           'a Hugging Face ImageGPT directory: config.json with "model_type": "imagegpt" and '
           'model.safetensors, model.safetensors.index.json or pytorch_model.bin', hf.open_hf),
    Format("deepspeed", ds_checkpoint.is_deepspeed_checkpoint, ds_checkpoint.load_deepspeed,
           ds_checkpoint.save_deepspeed,
           "an iGPT-DS DeepSpeed checkpoint of any DP/TP/PP/ZeRO layout: 'latest' and global_stepN/igpt_meta.json "
           "(igpt_ds/pretrain.py --save DIR); its files are read in this process", ds_checkpoint.open_deepspeed),
]


def get_format(name: str) -> Format:
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise ValueError(f"unknown checkpoint format {name!r}; known: {[f.name for f in FORMATS]}")


def detect_format(path: PathLike) -> Format:
    """The :class:`Format` of ``path``, or ValueError naming what was looked for and what was found."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt
    found = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else ["(a file, not a directory)"]
    wanted = "\n".join(f"  - {f.name}: {f.looks_for}" for f in FORMATS)
    raise ValueError(f"{path} is not a model directory iGPT-DS can read. Looked for:\n{wanted}\n"
                     f"Found: {found}")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the full (TP=1) state dict of ``IGPTModel(cfg)``, without building it."""
    d, f, V, T = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.seq_len
    norm_bias = cfg.norm == "layernorm" and cfg.bias

    def norm(prefix):
        return {f"{prefix}.weight": (d,), **({f"{prefix}.bias": (d,)} if norm_bias else {})}

    def linear(prefix, out_dim, in_dim):
        return {f"{prefix}.weight": (out_dim, in_dim), **({f"{prefix}.bias": (out_dim,)} if cfg.bias else {})}

    shapes = {"embed.wte.weight": (V, d), "embed.wpe.weight": (T, d)}
    if cfg.objective == "ar":
        shapes["embed.sos"] = (d,)
    for i in range(cfg.n_layer):
        p = f"blocks.{i}"
        shapes.update({**norm(f"{p}.ln_1"), **linear(f"{p}.attn.qkv", 3 * d, d), **linear(f"{p}.attn.proj", d, d),
                       **norm(f"{p}.ln_2"), **linear(f"{p}.mlp.fc", f, d), **linear(f"{p}.mlp.proj", d, f)})
    shapes.update({**norm("final.ln_f"), "final.head.weight": (V, d)})
    return shapes


def check_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Raise ValueError naming the first tensor whose presence or shape disagrees with ``cfg`` (tensors or
    lazy tensors: only shapes are looked at)."""
    expected = expected_shapes(cfg)
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) or callable(getattr(v, "load", None))}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: the weights do not match the config: missing {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)} but the config "
                             f"(n_layer={cfg.n_layer}, d_model={cfg.d_model}, resolution={cfg.resolution}, "
                             f"vocab_size={cfg.vocab_size}, mlp_ratio={cfg.mlp_ratio}) needs {shape}")


def read_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu", weights: str = "master"
                    ) -> tuple[ModelConfig, dict[str, torch.Tensor], Optional[np.ndarray], Format]:
    """(config, full state dict checked against the config, palette or None, format) of any supported directory.

    ``weights`` picks, for a DeepSpeed checkpoint, the fp32 masters ("master") or the forward's copy
    ("module"); the other formats hold one set of weights.
    """
    fmt = detect_format(path)
    options = {"weights": weights} if fmt.name == "deepspeed" else {}
    config, sd, palette, _ = fmt.read(path, device=device, **options)
    check_state_dict(config, sd, source=str(path))
    if palette is not None and len(palette) != config.vocab_size:
        raise ValueError(f"{path}: the palette has {len(palette)} colours but the model {config.vocab_size} tokens")
    return config, sd, palette, fmt


def training_step(path: PathLike) -> int:
    """The optimizer step a checkpoint was taken at (DeepSpeed meta or a consolidated export's), else 0."""
    found = find_checkpoint(path)
    if found is not None:
        return int(found[2].get("step", 0))
    if checkpoint.is_consolidated(path):
        return int(checkpoint.read_consolidated_config(path).get("step", 0))
    return 0


def load_pretrained(path: PathLike, device: Union[str, torch.device] = "cpu",
                    dtype: Optional[torch.dtype] = None, weights: str = "master"):
    """``(model, config, palette)`` from a consolidated export, a Hugging Face ImageGPT directory or a
    DeepSpeed checkpoint of any layout (its files read in this process, tensor by tensor; ``weights``:
    the fp32 masters or the 16-bit "module" copy of a bf16/fp16 run).

    Runs in a plain Python process (no launcher; TP = 1). The model is in eval mode on ``device``
    (fp32 unless ``dtype`` is given): ``model(tokens)`` gives next-pixel logits ``[b, s, 512]``
    (AR; the SOS shift is inside), ``model.hidden_states(tokens)`` the per-layer residual stream.
    ``palette`` is float32 (512, 3) in [-1, 1], or None when the source has none.
    """
    config, sd, palette, _ = read_checkpoint(path, weights=weights)
    model = IGPTModel(config)
    load_full_state_dict(model, sd)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    prefer_fast_attention(torch.device(device))  # sampling and features: cuDNN, then Flash attention on sm90
    return model.eval(), config, palette


def write_checkpoint(path: PathLike, to: str, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                     palette: Optional[np.ndarray] = None, dtype: torch.dtype = torch.float32, **options) -> Path:
    """Write ``state_dict`` in format ``to`` (atomically: a temporary directory, then a rename).

    ``options`` go to the format's writer (``deepspeed``: tensor_parallel, pipeline_parallel,
    data_parallel, ds_config, step, source).
    """
    fmt = get_format(to)
    if fmt.write is None:
        raise ValueError(f"writing format {to!r} is not supported yet")
    return fmt.write(path, config, state_dict, palette=palette, dtype=dtype, **options)

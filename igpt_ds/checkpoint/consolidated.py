"""Consolidated, layout-independent model export: what every tool reads.

A consolidated checkpoint is a directory:

    config.json        {"format": "igpt-ds-consolidated", "version": 1, "model": {...ModelConfig...},
                        "palette_sha256": "..." | null, "dtype": "float32" | "bfloat16", ...extra}
    model.safetensors  the full (TP = 1) state dict under the model's own parameter names
                       (embed.wte.weight [512, d], embed.sos [d], blocks.N.attn.qkv.weight [3d, d] as
                       [q; k; v], ...); no code, no pickle
    palette.npy        optional: the palette the model was trained with

Written to a temporary directory and renamed, so a crash never leaves a half-written export.
:func:`save_consolidated_stream` writes ``model.safetensors`` one tensor at a time (the header is
laid out from the names and shapes first), so exporting a model needs memory for one tensor, not
for the model; :func:`save_consolidated` is the same writer over a state dict.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from safetensors.torch import load_file

from igpt_ds.checkpoint.atomic import atomic_directory
from igpt_ds.checkpoint.lazy_torch import LazyTensor, SafetensorsFile
from igpt_ds.config import ModelConfig
from igpt_ds.palette import load_palette, palette_sha256

FORMAT = "igpt-ds-consolidated"
VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, PALETTE_FILE = "config.json", "model.safetensors", "palette.npy"

PathLike = Union[str, os.PathLike]


def is_consolidated(path: PathLike) -> bool:
    cfg = Path(path) / CONFIG_FILE
    if not cfg.is_file() or not (Path(path) / WEIGHTS_FILE).is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_safetensors_stream(file: PathLike, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                             produce: Callable[[str], torch.Tensor], metadata: Optional[dict] = None) -> None:
    """Write a safetensors file tensor by tensor: ``produce(name)`` is called once per name, in order,
    and its result (cast to ``dtype``) is written before the next is asked for."""
    item = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n * item]}
        offset += n * item
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in shapes.items():
            t = produce(name).detach().to("cpu", dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{file}: {name} has shape {tuple(t.shape)}, the header promised {tuple(shape)}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)  # no copy of the tensor


def save_consolidated_stream(path: PathLike, config: ModelConfig, shapes: dict[str, tuple[int, ...]],
                             produce: Callable[[str], torch.Tensor], palette: Optional[np.ndarray] = None,
                             dtype: torch.dtype = torch.float32, extra: Optional[dict] = None) -> Path:
    """Write a consolidated checkpoint atomically, one tensor at a time (see the module docstring)."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        write_safetensors_stream(tmp / WEIGHTS_FILE, shapes, dtype, produce, metadata={"format": "pt"})
        # the data pipeline's hash: the one shard manifests carry
        palette_hash = palette_sha256(palette) if palette is not None else None
        meta = {"format": FORMAT, "version": VERSION, "model": config.to_dict(), "palette_sha256": palette_hash,
                "dtype": str(dtype).replace("torch.", "")}
        meta.update(extra or {})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if palette is not None:
            np.save(tmp / PALETTE_FILE, np.asarray(palette, dtype=np.float32))
    return path


def save_consolidated(path: PathLike, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                      palette: Optional[np.ndarray] = None, dtype: torch.dtype = torch.float32,
                      extra: Optional[dict] = None) -> Path:
    """Write a consolidated checkpoint atomically; returns its path."""
    # megatron layers add `_extra_state: None` entries to state_dict(); keep tensors only.
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    return save_consolidated_stream(path, config, {k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__,
                                    palette=palette, dtype=dtype, extra=extra)


def read_consolidated_config(path: PathLike) -> dict:
    """The parsed config.json of a consolidated checkpoint, with a clear error if it is not one."""
    file = Path(path) / CONFIG_FILE
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no such file; {path} is not a consolidated iGPT-DS checkpoint") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{file}: version {meta['version']} is newer than this code reads ({VERSION}); "
                         f"upgrade iGPT-DS")
    return meta


def open_consolidated(path: PathLike) -> tuple[ModelConfig, dict[str, LazyTensor], Optional[np.ndarray], dict]:
    """Like :func:`load_consolidated`, but the weights are :class:`LazyTensor` s: each is read from the
    file when its ``load()`` is called, so a reader holds one tensor at a time."""
    meta = read_consolidated_config(path)
    config = ModelConfig.from_dict(meta["model"], source=str(Path(path) / CONFIG_FILE))
    weights = SafetensorsFile(Path(path) / WEIGHTS_FILE).tensors
    palette = load_palette(Path(path) / PALETTE_FILE) if (Path(path) / PALETTE_FILE).is_file() else None
    return config, weights, palette, meta


def load_consolidated(path: PathLike, device: Union[str, torch.device] = "cpu"
                      ) -> tuple[ModelConfig, dict[str, torch.Tensor], Optional[np.ndarray], dict]:
    """(config, full state dict, palette or None, metadata) of a consolidated checkpoint."""
    meta = read_consolidated_config(path)
    config = ModelConfig.from_dict(meta["model"], source=str(Path(path) / CONFIG_FILE))
    weights = load_file(str(Path(path) / WEIGHTS_FILE), device=str(device))
    palette = None
    if (Path(path) / PALETTE_FILE).is_file():
        palette = load_palette(Path(path) / PALETTE_FILE)
    return config, weights, palette, meta

"""Consolidated, layout-independent model export: what every tool reads.

A consolidated checkpoint is a directory:

    config.json        {"format": "igpt-ds-consolidated", "version": 1, "model": {...ModelConfig...},
                        "palette_sha256": "..." | null, "dtype": "float32" | "bfloat16", ...extra}
    model.safetensors  the full (TP = 1) state dict under the model's own parameter names
                       (embed.wte.weight [512, d], embed.sos [d], blocks.N.attn.qkv.weight [3d, d] as
                       [q; k; v], ...); no code, no pickle
    palette.npy        optional: the palette the model was trained with

Written to a temporary directory and renamed, so a crash never leaves a half-written export.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch

from igpt_ds.config import ModelConfig

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


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it becomes ``path`` only if the block succeeds.

    ``path`` must not exist or be an empty directory. On any error the temporary directory is
    removed, so a failed write never leaves a partial output.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not empty; choose a new output directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_consolidated(path: PathLike, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                      palette: Optional[np.ndarray] = None, dtype: torch.dtype = torch.float32,
                      extra: Optional[dict] = None) -> Path:
    """Write a consolidated checkpoint atomically; returns its path."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_directory(path) as tmp:
        # megatron layers add `_extra_state: None` entries to state_dict(); keep tensors only.
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()
                   if isinstance(v, torch.Tensor)}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        palette_hash = None
        if palette is not None:
            from igpt_ds.palette import palette_sha256  # the data pipeline's hash: the one manifests carry

            palette_hash = palette_sha256(palette)
        meta = {"format": FORMAT, "version": VERSION, "model": config.to_dict(), "palette_sha256": palette_hash,
                "dtype": str(dtype).replace("torch.", "")}
        meta.update(extra or {})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if palette is not None:
            np.save(tmp / PALETTE_FILE, np.asarray(palette, dtype=np.float32))
    return path


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
        raise ValueError(f"{file}: version {meta['version']} is newer than this code reads ({VERSION}); upgrade iGPT-DS")
    return meta


def load_consolidated(path: PathLike, device: Union[str, torch.device] = "cpu"
                      ) -> tuple[ModelConfig, dict[str, torch.Tensor], Optional[np.ndarray], dict]:
    """(config, full state dict, palette or None, metadata) of a consolidated checkpoint."""
    from safetensors.torch import load_file

    meta = read_consolidated_config(path)
    config = ModelConfig.from_dict(meta["model"], source=str(Path(path) / CONFIG_FILE))
    weights = load_file(str(Path(path) / WEIGHTS_FILE), device=str(device))
    palette = None
    if (Path(path) / PALETTE_FILE).is_file():
        from igpt_ds.palette import load_palette

        palette = load_palette(Path(path) / PALETTE_FILE)
    return config, weights, palette, meta

"""Hugging Face ``ImageGPT*`` directories <-> our full state dict and :class:`ModelConfig`.

A Hugging Face ImageGPT directory (what ``ImageGPTForCausalImageModeling.save_pretrained`` writes,
and how OpenAI's iGPT-S/M/L are published) holds ``config.json`` (``model_type: imagegpt``) and
``model.safetensors`` (or a sharded ``model.safetensors.index.json``, or a pickled
``pytorch_model.bin``, read with ``torch.load(weights_only=True)``: never code), and optionally
``preprocessor_config.json`` whose ``clusters`` are the palette.

The two layouts, as the installed transformers' modeling_imagegpt.py computes them:

    HF                                        ours
    transformer.wte.weight (V+1, d), SOS = V  embed.wte.weight (V, d) = rows :V; embed.sos (d,) = row V
    transformer.wpe.weight (T, d)             embed.wpe.weight
    h.i.ln_1.weight  (x / sqrt(mean x^2 + eps) * g, no bias)   blocks.i.ln_1.weight (norm="rmsnorm")
    h.i.attn.c_attn.{weight (d, 3d), bias}    blocks.i.attn.qkv.{weight (3d, d) = transpose, bias}; [q; k; v]
    h.i.attn.c_proj, h.i.mlp.c_fc, h.i.mlp.c_proj (Conv1D: y = x W + b)   attn.proj, mlp.fc, mlp.proj (W^T)
    transformer.ln_f.weight                   final.ln_f.weight
    lm_head.weight (V, d), no bias            final.head.weight

Attention is scaled by 1/sqrt(head_dim) (``scale_attn_weights``); the HF options that scale by the
layer index or add cross-attention have no counterpart here and are refused. HF's Conv1D layers
always carry biases: when every one of them is zero (as in OpenAI's released weights) the import
gives ``bias=False``, otherwise ``bias=True``; export writes zeros for a ``bias=False`` model.

Logits: HF takes ``input_ids = [SOS, p_0, ..., p_{T-2}]`` and its position t predicts p_t, which
is exactly what ``model(p)`` does with the SOS shift inside; both give V (= 512) logits.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from igpt_ds.checkpoint.atomic import atomic_directory
from igpt_ds.checkpoint.lazy_torch import DerivedTensor, SafetensorsFile, materialize, rows
from igpt_ds.config import ModelConfig

PathLike = Union[str, os.PathLike]
MODEL_TYPE = "imagegpt"
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
SAFETENSORS_FILE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, PICKLE_FILE)

# HF activation names <-> ours. HF "gelu" is the exact erf GELU, which no config of ours computes.
_ACT_FROM_HF = {"quick_gelu": "quick_gelu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu_pytorch_tanh"}
# ImageGPTConfig defaults, for keys a config.json leaves out.
_HF_DEFAULTS = {"vocab_size": 513, "n_positions": 1024, "n_embd": 512, "n_layer": 24, "n_head": 8, "n_inner": None,
                "activation_function": "quick_gelu", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
                "tie_word_embeddings": False}
# (our name, HF name, transposed): per block, with "{i}" the layer index.
_CONV1D = [("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
           ("mlp.proj", "mlp.c_proj")]
# Buffers older transformers versions saved with the weights; not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def is_hf_imagegpt(path: PathLike) -> bool:
    """True when ``path`` is a directory with an ImageGPT ``config.json`` and a weights file."""
    path = Path(path)
    cfg = path / CONFIG_FILE
    if not cfg.is_file() or not any((path / f).is_file() for f in WEIGHT_FILES):
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == MODEL_TYPE
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def config_from_hf(hf: dict, bias: bool = True, source: str = CONFIG_FILE) -> ModelConfig:
    """Our :class:`ModelConfig` for an ImageGPT ``config.json`` dict; refuses what we cannot compute."""
    get = lambda key: hf.get(key, _HF_DEFAULTS.get(key))  # noqa: E731
    if hf.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{source}: model_type is {hf.get('model_type')!r}, expected {MODEL_TYPE!r}")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if bool(get(key)) != want:
            raise ValueError(f"{source}: {key}={get(key)} is not supported (iGPT-DS computes {key}={want})")
    act = get("activation_function")
    if act not in _ACT_FROM_HF:
        raise ValueError(f"{source}: activation_function={act!r} is not supported; "
                         f"supported: {sorted(_ACT_FROM_HF)}")
    d, n_pos = int(get("n_embd")), int(get("n_positions"))
    side = math.isqrt(n_pos)
    if side * side != n_pos:
        raise ValueError(f"{source}: n_positions={n_pos} is not a square image (resolution**2)")
    n_inner = get("n_inner") or 4 * d
    if n_inner % d:
        raise ValueError(f"{source}: n_inner={n_inner} is not a multiple of n_embd={d}")
    vocab = int(get("vocab_size"))
    if vocab < 2:
        raise ValueError(f"{source}: vocab_size={vocab}; ImageGPT's includes SOS, so it is palette size + 1")
    cfg = ModelConfig(n_layer=int(get("n_layer")), d_model=d, n_head=int(get("n_head")), resolution=side,
                      vocab_size=vocab - 1, mlp_ratio=n_inner // d, norm="rmsnorm", activation=_ACT_FROM_HF[act],
                      bias=bias, norm_eps=float(get("layer_norm_epsilon")), objective="ar",
                      name=str(hf.get("igpt_ds_name") or "hf-imagegpt"))
    return cfg.validate()


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The ImageGPT ``config.json`` dict of ``cfg``; refuses a model HF cannot represent."""
    if cfg.objective != "ar":
        raise ValueError(f"Hugging Face ImageGPT is autoregressive; this model is objective={cfg.objective!r}")
    if cfg.norm != "rmsnorm":
        raise ValueError(f"Hugging Face ImageGPT's norm is RMS-style (no mean subtraction, no bias); this model "
                         f"has norm={cfg.norm!r}, which it cannot represent")
    return {"architectures": ["ImageGPTForCausalImageModeling"], "model_type": MODEL_TYPE,
            "vocab_size": cfg.vocab_size + 1, "n_positions": cfg.seq_len, "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.d_ff,
            "activation_function": _ACT_TO_HF[cfg.activation], "layer_norm_epsilon": cfg.norm_eps,
            # HF drops where we do (embeddings, attention probabilities, both residual branches). Import ignores
            # these: OpenAI's published configs carry GPT-2's 0.1, with which the paper did not train.
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "add_cross_attention": False, "tie_word_embeddings": False,
            "use_cache": True, "dtype": str(dtype).replace("torch.", ""),
            "igpt_ds_name": cfg.name}  # informational; HF keeps unknown keys


def _hf_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """Shapes of the ImageGPTForCausalImageModeling parameters that ``hf`` (config.json) implies."""
    get = lambda key: hf.get(key, _HF_DEFAULTS.get(key))  # noqa: E731
    d, V1, T = int(get("n_embd")), int(get("vocab_size")), int(get("n_positions"))
    f = int(get("n_inner") or 4 * d)
    shapes = {"transformer.wte.weight": (V1, d), "transformer.wpe.weight": (T, d),
              "transformer.ln_f.weight": (d,), "lm_head.weight": (V1 - 1, d)}
    for i in range(int(get("n_layer"))):
        p = f"transformer.h.{i}."
        shapes.update({p + "ln_1.weight": (d,), p + "ln_2.weight": (d,),
                       p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
                       p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                       p + "mlp.c_fc.weight": (d, f), p + "mlp.c_fc.bias": (f,),
                       p + "mlp.c_proj.weight": (f, d), p + "mlp.c_proj.bias": (d,)})
    return shapes


def _check_hf_tensors(hf: dict, weights: dict[str, torch.Tensor], source: str) -> None:
    expected = _hf_shapes(hf)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(k for k in set(weights) - set(expected) if not k.endswith(_IGNORED_SUFFIXES))
    if "lm_head.weight" in missing and len(missing) == 1:
        raise ValueError(f"{source}: no lm_head.weight: this is a bare ImageGPTModel (or a classifier) without "
                         f"the next-pixel head; export ImageGPTForCausalImageModeling instead")
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not match config.json: missing {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(weights[name].shape)} but config.json "
                             f"(n_embd={hf.get('n_embd')}, n_layer={hf.get('n_layer')}, "
                             f"n_positions={hf.get('n_positions')}, vocab_size={hf.get('vocab_size')}) "
                             f"needs {shape}")


def state_dict_from_hf(hf: dict, weights: dict[str, torch.Tensor], bias: Optional[bool] = None,
                       source: str = "weights") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(our config, our full state dict) from an ImageGPT config dict and its tensors.

    ``bias=None`` drops the Conv1D biases when all are zero (``bias=False``), else keeps them.
    """
    cfg, lazy = lazy_state_dict_from_hf(hf, weights, bias, source)
    return cfg, {k: v.load() for k, v in lazy.items()}


def lazy_state_dict_from_hf(hf: dict, weights: dict, bias: Optional[bool] = None, source: str = "weights"
                            ) -> tuple[ModelConfig, dict[str, DerivedTensor]]:
    """:func:`state_dict_from_hf` over tensors or lazy tensors (:class:`LazyTensor`): each of our tensors is
    a :class:`DerivedTensor`, read and converted when loaded (only the Conv1D biases are read now)."""
    # An ImageGPTModel saved alone has no "transformer." prefix.
    weights = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in weights.items()}
    if "lm_head.weight" not in weights and hf.get("tie_word_embeddings") and "transformer.wte.weight" in weights:
        wte = weights["transformer.wte.weight"]
        n = wte.shape[0] - 1
        weights["lm_head.weight"] = DerivedTensor((n, *wte.shape[1:]), wte.dtype, lambda: rows(wte, 0, n))
    _check_hf_tensors(hf, weights, source)
    n_layer = int(hf.get("n_layer", _HF_DEFAULTS["n_layer"]))
    biases = [weights[f"transformer.h.{i}.{h}.bias"] for i in range(n_layer) for _, h in _CONV1D]
    if bias is None:
        bias = any(bool(materialize(b).count_nonzero()) for b in biases)
    elif not bias and any(bool(materialize(b).count_nonzero()) for b in biases):
        raise ValueError(f"{source}: bias=False requested but the Conv1D biases are not all zero")
    cfg = config_from_hf(hf, bias=bias, source=source)

    def same(t):
        return DerivedTensor(tuple(t.shape), t.dtype, lambda: materialize(t).contiguous())

    def transposed(t):
        return DerivedTensor(tuple(t.shape)[::-1], t.dtype, lambda: materialize(t).t().contiguous())

    wte = weights["transformer.wte.weight"]
    v = wte.shape[0] - 1
    sd = {"embed.wte.weight": DerivedTensor((v, *wte.shape[1:]), wte.dtype, lambda: rows(wte, 0, v)),
          "embed.sos": DerivedTensor(tuple(wte.shape[1:]), wte.dtype, lambda: rows(wte, v, v + 1)[0]),
          "embed.wpe.weight": same(weights["transformer.wpe.weight"]),
          "final.ln_f.weight": same(weights["transformer.ln_f.weight"]),
          "final.head.weight": same(weights["lm_head.weight"])}
    for i in range(n_layer):
        src, dst = f"transformer.h.{i}.", f"blocks.{i}."
        sd[dst + "ln_1.weight"], sd[dst + "ln_2.weight"] = same(weights[src + "ln_1.weight"]), \
            same(weights[src + "ln_2.weight"])
        for ours, theirs in _CONV1D:
            sd[f"{dst}{ours}.weight"] = transposed(weights[f"{src}{theirs}.weight"])
            if bias:
                sd[f"{dst}{ours}.bias"] = same(weights[f"{src}{theirs}.bias"])
    return cfg, sd


def state_dict_to_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(ImageGPT config.json dict, ImageGPTForCausalImageModeling tensors) of our config and full state dict."""
    hf = config_to_hf(cfg)
    out = {"transformer.wte.weight": torch.cat([sd["embed.wte.weight"], sd["embed.sos"][None]], dim=0),
           "transformer.wpe.weight": sd["embed.wpe.weight"], "transformer.ln_f.weight": sd["final.ln_f.weight"],
           "lm_head.weight": sd["final.head.weight"]}
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        out[dst + "ln_1.weight"], out[dst + "ln_2.weight"] = sd[src + "ln_1.weight"], sd[src + "ln_2.weight"]
        for ours, theirs in _CONV1D:
            w = sd[f"{src}{ours}.weight"]
            out[f"{dst}{theirs}.weight"] = w.t()
            b = sd.get(f"{src}{ours}.bias")
            out[f"{dst}{theirs}.bias"] = b if b is not None else w.new_zeros(w.shape[0])
    return hf, {k: v.contiguous() for k, v in out.items()}


def read_hf_weights(path: PathLike, lazy: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of an HF directory: safetensors (single or sharded), else ``pytorch_model.bin``.

    The pickle is read with ``torch.load(weights_only=True)``: a file that would run code on
    load is refused with an error instead. ``lazy``: safetensors tensors are :class:`LazyTensor` s
    (read on ``load()``), the pickle's are memory-mapped.
    """
    path = Path(path)
    read = (lambda file: SafetensorsFile(file).tensors) if lazy else (lambda file: load_file(str(file)))
    if (path / SAFETENSORS_FILE).is_file():
        return read(path / SAFETENSORS_FILE)
    if (path / SAFETENSORS_INDEX).is_file():
        index = json.loads((path / SAFETENSORS_INDEX).read_text())
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            if Path(shard).name != shard:
                raise ValueError(f"{path / SAFETENSORS_INDEX}: shard name {shard!r} must be a plain file name")
            out.update(read(path / shard))
        return out
    file = path / PICKLE_FILE
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=lazy)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no {' / '.join(WEIGHT_FILES)}") from None
    except Exception as e:  # UnpicklingError for a payload; torch wraps it with advice we do not want followed
        raise ValueError(f"{file}: refused to load: it is not a plain tensor file that loads with "
                         f"torch.load(weights_only=True) ({type(e).__name__}: {str(e).splitlines()[0]}). "
                         f"Pickles can run code; convert it to safetensors with a trusted tool, or "
                         f"obtain the model.safetensors version") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{file}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return obj


def read_hf_palette(path: PathLike) -> Optional[np.ndarray]:
    """The palette from ``preprocessor_config.json`` ``clusters`` (float32 (K, 3) in [-1, 1]), or None."""
    file = Path(path) / PREPROCESSOR_FILE
    if not file.is_file():
        return None
    clusters = json.loads(file.read_text()).get("clusters")
    if clusters is None:
        return None
    palette = np.asarray(clusters, dtype=np.float32)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"{file}: clusters have shape {palette.shape}, expected (K, 3)")
    return palette


def _read_hf_config(path: Path) -> dict:
    try:
        return json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / CONFIG_FILE}: not valid JSON ({e})") from None


def load_hf(path: PathLike, device: Union[str, torch.device] = "cpu", bias: Optional[bool] = None
            ) -> tuple[ModelConfig, dict[str, torch.Tensor], Optional[np.ndarray], dict]:
    """(config, full state dict, palette or None, HF config dict) of an ImageGPT directory."""
    path = Path(path)
    hf = _read_hf_config(path)
    weights = read_hf_weights(path)
    cfg, sd = state_dict_from_hf(hf, weights, bias=bias, source=str(path))
    sd = {k: v.to(device) for k, v in sd.items()}
    return cfg, sd, read_hf_palette(path), hf


def open_hf(path: PathLike, bias: Optional[bool] = None
            ) -> tuple[ModelConfig, dict[str, DerivedTensor], Optional[np.ndarray], dict]:
    """Like :func:`load_hf`, but each tensor is read and converted when its ``load()`` is called."""
    path = Path(path)
    hf = _read_hf_config(path)
    cfg, sd = lazy_state_dict_from_hf(hf, read_hf_weights(path, lazy=True), bias=bias, source=str(path))
    return cfg, sd, read_hf_palette(path), hf


def save_hf(path: PathLike, config: ModelConfig, state_dict: dict[str, torch.Tensor],
            palette: Optional[np.ndarray] = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write an ImageGPT directory (config.json, model.safetensors, and preprocessor_config.json
    with the palette as ``clusters`` when given) atomically; returns its path."""
    path = Path(path)
    hf, tensors = state_dict_to_hf(config, state_dict)  # refuses before anything is written
    hf["dtype"] = str(dtype).replace("torch.", "")
    with atomic_directory(path) as tmp:
        save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()},
                  str(tmp / SAFETENSORS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        if palette is not None:
            pre = {"image_processor_type": "ImageGPTImageProcessor", "clusters": np.asarray(palette).tolist(),
                   "do_color_quantize": True, "do_normalize": True, "do_resize": True, "resample": 2,
                   "size": {"height": config.resolution, "width": config.resolution}}
            (tmp / PREPROCESSOR_FILE).write_text(json.dumps(pre) + "\n")
    return path

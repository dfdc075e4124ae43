"""iGPT-DS: Image GPT (Chen et al., 2020) trained with DeepSpeed and megatron-core."""
from igpt_ds.config import PRESETS, ModelConfig, get_preset

__version__ = "0.1.0"
__all__ = ["ModelConfig", "PRESETS", "get_preset", "load_pretrained", "__version__"]


def load_pretrained(path, device="cpu", dtype=None, weights="master"):
    """``model, config, palette = load_pretrained(path, device="cpu")``: a consolidated export, a Hugging
    Face ImageGPT directory or a DeepSpeed checkpoint of any layout, in eval mode, in a plain process
    (see :mod:`igpt_ds.checkpoint.formats`)."""
    from igpt_ds.checkpoint.formats import load_pretrained as load  # torch and megatron load only when needed

    return load(path, device=device, dtype=dtype, weights=weights)

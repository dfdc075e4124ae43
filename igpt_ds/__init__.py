"""iGPT-DS: Image GPT (Chen et al., 2020) trained with DeepSpeed and megatron-core."""
from .config import PRESETS, ModelConfig, get_preset

__version__ = "0.1.0"
__all__ = ["ModelConfig", "PRESETS", "get_preset", "__version__"]

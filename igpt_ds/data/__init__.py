"""Data: image sources, pre-quantized WebDataset shards, the streaming token loader, images
quantized on the fly (fine-tuning) and synthetic token images. The palette contract itself is
:mod:`igpt_ds.palette`."""
from igpt_ds.data.tokens import build_loader

__all__ = ["build_loader"]

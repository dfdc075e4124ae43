"""Every on-disk model format: run checkpoints (``latest``, ``igpt_meta.json``), consolidated
exports, Hugging Face ImageGPT directories, resharding, and atomic writes."""

"""What the network is: the iGPT transformer, its classifier variant, losses and pipeline stages.

No DeepSpeed engine, no data, no files: every module here is a ``torch.nn`` definition or a pure
function of tensors (``megatron-core``'s tensor-parallel layers are the only parallel code).
"""
from igpt_ds.model.transformer import IGPTModel

__all__ = ["IGPTModel"]

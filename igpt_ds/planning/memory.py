"""Measured memory of one training step, to check the planner (:mod:`igpt_ds.planning.plan`) against.

On CUDA the figure is ``torch.cuda.max_memory_allocated``. On CPU there is no allocator
statistic, so :class:`LiveTensorBytes` counts it: a ``TorchDispatchMode`` that sees every tensor
an operator returns, adds its storage's bytes once, and subtracts them when the storage is freed
(a weak reference's callback). Its peak is the largest sum of live tensor storages, what
``max_memory_allocated`` reports minus the caching allocator's rounding.

    from igpt_ds.planning.memory import measure_train_step
    m = measure_train_step(get_preset("igpt-tiny"), micro_batch=2, activation_checkpointing=True)
    m["peak"], m["activations"]     # bytes
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from igpt_ds.config import ModelConfig
from igpt_ds.model.losses import bert_mask, compute_loss
from igpt_ds.model.transformer import IGPTModel


class LiveTensorBytes(TorchDispatchMode):
    """Live tensor bytes (current and peak) of everything created or registered in the context."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()  # storage -> bytes, for storages we count
        self._refs: list = []

    def register(self, *tensors: Optional[torch.Tensor]) -> None:
        """Count tensors created outside the context (parameters, optimizer state, inputs)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        st = t.untyped_storage()
        if st in self._seen:
            return
        n = st.nbytes()
        self._seen[st] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        self._refs.append(weakref.ref(st, lambda _, n=n: self._free(n)))

    def _free(self, n: int) -> None:
        self.current -= n

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def _state_bytes(tensors) -> int:
    seen, n = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            n += t.untyped_storage().nbytes()
    return n


def measure_train_step(cfg: ModelConfig, micro_batch: int, activation_checkpointing: bool = False,
                       device: str = "cpu", attention: str = "flash", seed: int = 0) -> dict:
    """Peak memory of one AR/BERT training step (forward, backward, Adam step) at TP = 1, fp32.

    A warm-up step first allocates Adam's state, then gradients are set to None (as DeepSpeed
    and ``zero_grad()`` leave them) and the measured step runs. ``attention="math"`` forces
    SDPA's unfused path (stores the s x s scores), ``"flash"`` leaves torch's default (fused
    kernels on CPU and GPU). Returns bytes: ``weights``, ``gradients``, ``optimizer`` (after the
    step), ``activations`` (growth of live memory over the forward pass, i.e. what forward keeps
    for backward, plus the loss) and ``peak`` (the largest live total during the step).
    On CUDA ``peak`` is ``torch.cuda.max_memory_allocated``.
    """
    torch.manual_seed(seed)
    cfg = cfg.replace(activation_checkpointing=activation_checkpointing)
    model = IGPTModel(cfg).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.seq_len), generator=gen).to(device)
    mask = bert_mask(tokens.shape, cfg.bert_mask_prob, gen).to(device) if cfg.objective == "bert" else None
    backends = [SDPBackend.MATH] if attention == "math" else [
        SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]

    def step():
        # backward too: checkpointing recomputes the forward there and must pick the same kernel
        with sdpa_kernel(backends):
            loss = compute_loss(model, tokens, mask).loss
            after_forward = tracker.current if tracker else None
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return after_forward

    tracker = None
    step()  # warm-up: Adam's state exists from here on
    params = list(model.parameters())
    opt_state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    result = {"weights": _state_bytes(params), "optimizer": _state_bytes(opt_state),
              "gradients": _state_bytes(params)}  # fp32 grads: one per parameter, same size
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with sdpa_kernel(backends):
            loss = compute_loss(model, tokens, mask).loss
            result["activations"] = torch.cuda.memory_allocated() - before
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        result["peak"] = torch.cuda.max_memory_allocated()
        return result
    tracker = LiveTensorBytes()
    tracker.register(*params, *opt_state, tokens, mask)
    before = tracker.current
    with tracker:
        after_forward = step()
    result["activations"] = after_forward - before
    result["peak"] = tracker.peak
    return result

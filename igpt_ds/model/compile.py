"""``--compile``: every transformer block through ``torch.compile`` (inductor), and graph breaks counted.

Only :class:`~igpt_ds.model.transformer.Block` layers are compiled, in place (``nn.Module.compile``):
parameter names and state_dict keys stay as they are, so checkpoints, ZeRO hooks and the HF export
do not change. The embedding, the head and ``IGPTModel.validate_inputs`` (an ``aminmax`` + ``int()``
host sync) stay eager, outside the compiled code. One Block type means one compiled graph for all
layers (torch inlines built-in modules, so it guards on the module structure, not on each layer).

Where it applies (:func:`check_compile` refuses the rest before ``deepspeed.initialize``):
    ZeRO-0/1/2, PP = 1 or a pipeline stage   the Block layers of the module, before deepspeed.initialize
    ZeRO-3                                   DeepSpeed's own path, ``engine.compile()`` on the whole
                                             module: its parameter hooks are compiler-disabled and the
                                             input check is compiled code there, so the graph breaks
                                             many times (50 for igpt-tiny on CPU); losses still match
:class:`GraphBreaks` counts the breaks after the first step. At TP 1 there are none (igpt-tiny on CPU,
ZeRO-0 and PP 2). At TP > 1 megatron-core's autograd functions break it: their all-reduce with
``async_op=True`` and a warn-once ``setattr`` on a function (13 breaks for igpt-tiny at TP 2).

On an sm90 GPU (H100/H200) :func:`prefer_fast_attention` makes SDPA try cuDNN, then Flash,
then memory-efficient, then math attention (set once per process, before anything is traced).
"""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from typing import Optional

import torch
from torch import nn

# nn.Module.compile (in place, names unchanged) is torch 2.2's; this project is tested with 2.13.
MIN_TORCH = (2, 2)
SM90_SDPA_ORDER = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


class CompileUnavailable(ValueError):
    """``--compile`` cannot work here; the message names the reason and the fix."""


def _torch_version(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_compile(zero_stage: int, device: torch.device, torch_version: Optional[str] = None,
                  deepspeed_compile: Optional[bool] = None) -> None:
    """Refuse ``--compile`` where it cannot work, with the reason; return quietly where it can.

    ``torch_version`` and ``deepspeed_compile`` (whether the DeepSpeed engine has ``compile()``)
    default to the installed packages'; tests pass others.
    """
    version = torch_version or torch.__version__
    if _torch_version(version) < MIN_TORCH or not hasattr(nn.Module, "compile"):
        raise CompileUnavailable(f"--compile needs torch >= {'.'.join(map(str, MIN_TORCH))} (nn.Module.compile); "
                                 f"this is torch {version}. Upgrade torch or drop --compile")
    if zero_stage == 3:
        if deepspeed_compile is None:
            from deepspeed.runtime.engine import DeepSpeedEngine
            deepspeed_compile = hasattr(DeepSpeedEngine, "compile")
        if not deepspeed_compile:
            import deepspeed

            raise CompileUnavailable(f"--compile at ZeRO-3 needs DeepSpeed's engine.compile(), which this DeepSpeed "
                                     f"({deepspeed.__version__}) lacks: ZeRO-3 fetches partitioned parameters in "
                                     f"hooks that plain torch.compile cannot trace. Upgrade DeepSpeed (0.19.8 is "
                                     f"tested), use a ZeRO-0/1/2 config, or drop --compile")
    if device.type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as e:  # inductor's own search (CXX, then g++): InvalidCxxCompiler when none runs
            raise CompileUnavailable(f"--compile on CPU needs a C++ compiler for inductor's kernels, and none was "
                                     f"found ({type(e).__name__}: {e}). Install g++ (or set CXX), or drop "
                                     f"--compile") from None
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise CompileUnavailable("--compile on a GPU needs Triton for inductor's kernels, and it is not "
                                     "installed (pip install triton, the version your torch names), or drop "
                                     "--compile")


def _drop_megatron_warnings() -> None:
    # megatron's RowParallelLinear calls warnings.warn(..., DeprecationWarning) (tp_group=None) on every
    # forward once its parallel_state is set up: a graph break in every block. Inside compiled code the
    # call is dropped instead (its category argument rules out dynamo's reordering); it is a notice
    # igpt_ds/quiet.py filters anyway, and Block code issues no warning of its own.
    torch._dynamo.config.ignore_logging_functions.add(warnings.warn)


def compile_blocks(module: nn.Module) -> int:
    """Compile every Block of ``module`` (an IGPTModel, a classifier or a pipeline stage) in place.

    Returns how many were compiled (compilation itself happens at the first forward).
    """
    from igpt_ds.model.transformer import Block

    _drop_megatron_warnings()
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)


def compile_engine(engine) -> None:
    """ZeRO-3: DeepSpeed's own compile path (the whole module; DeepCompile if the config enables it)."""
    _drop_megatron_warnings()
    engine.compile()


def _dynamo_counts() -> tuple[Counter, int]:
    """(graph breaks so far in this process: reason -> frames that broke there, graphs compiled so far)."""
    counters = torch._dynamo.utils.counters
    return Counter(counters["graph_break"]), int(counters["stats"]["unique_graphs"])


class GraphBreaks:
    """The graph breaks of a compiled run, for its step records; printed once, after the first step.

    Made before the first forward: dynamo's counters are per process, so it counts from where they
    stood then (one process may train several models, e.g. the benchmark's eager and compiled runs).
    """

    def __init__(self, enabled: bool, announce: bool = True, top: int = 3):
        self.enabled, self.announce, self.top = enabled, announce, top
        self.reported = False
        self._breaks, self._graphs = _dynamo_counts() if enabled else (Counter(), 0)  # eager: dynamo stays unloaded

    def counts(self) -> tuple[Counter, int]:
        """(graph-break reasons with their counts, graphs compiled) since this object was made."""
        breaks, graphs = _dynamo_counts()
        return breaks - self._breaks, graphs - self._graphs

    def __call__(self) -> Optional[int]:
        """The number of graph breaks (None when not compiled); the first call prints the report."""
        if not self.enabled:
            return None
        reasons, graphs = self.counts()
        if self.announce and not self.reported:
            print(self.describe(reasons, graphs), flush=True)
        self.reported = True
        return sum(reasons.values())

    def describe(self, reasons: Counter, graphs: int) -> str:
        count = sum(reasons.values())
        line = f"--compile: {count} graph break(s), {graphs} graph(s) compiled"
        if not count:
            return line
        top = "; ".join(f"{n} x {_short(reason)}" for reason, n in reasons.most_common(self.top))
        return f"{line}; top reasons: {top}"


def _short(reason: str, limit: int = 160) -> str:
    line = " ".join(reason.split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def sdpa_priority(device: torch.device, capability: Optional[tuple[int, int]] = None) -> Optional[list]:
    """The SDPA backends to prefer on ``device``, in order, or None for torch's default choice.

    sm90 (H100/H200): cuDNN attention is about twice FlashAttention-2's rate at long sequences
    (pytorch/pytorch#142132); math stays last, so every input (a KV-prefill mask, fp32) still has a
    kernel: SDPA takes the first backend in the list that supports it.
    """
    if device.type != "cuda":
        return None
    capability = capability or torch.cuda.get_device_capability(device)
    if tuple(capability) != (9, 0):
        return None
    from torch.nn.attention import SDPBackend

    return [getattr(SDPBackend, name) for name in SM90_SDPA_ORDER]


_ATTENTION = contextlib.ExitStack()  # the process-wide SDPA choice made by prefer_fast_attention


def prefer_fast_attention(device: torch.device, capability: Optional[tuple[int, int]] = None) -> Optional[list]:
    """Set the process's SDPA priority to :func:`sdpa_priority` (once; no-op elsewhere). Returns it.

    Set before the first forward, so compiled blocks trace the same choice as eager ones.
    """
    order = sdpa_priority(device, capability)
    if order is not None:
        from torch.nn.attention import sdpa_kernel

        _ATTENTION.close()  # undo an earlier choice before stacking a new one
        _ATTENTION.enter_context(sdpa_kernel(order, set_priority=True))
    return order


def restore_attention() -> None:
    """Undo :func:`prefer_fast_attention`: torch's default SDPA backends and priority."""
    _ATTENTION.close()

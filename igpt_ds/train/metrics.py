"""Training metrics: throughput, MFU, memory, GPU telemetry, JSON lines + TensorBoard on rank 0.

MFU = achieved model FLOP/s per device / the device's peak dense FLOP/s at the run's precision,
with model FLOPs per token from ``ModelConfig.train_flops_per_token()`` (6N + 12 L d T) — the
same formula on every device, and no recompute counted (activation checkpointing lowers MFU).
"""
from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Optional

import torch

# Peak dense tensor-core TFLOP/s (no sparsity) from the vendors' datasheets. fp32 means plain
# FP32 (TF32 is not used by default for matmuls in PyTorch).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # SXM; PCIe is lower: pass --peak-tflops
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "A10G": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def peak_flops(precision: str, override_tflops: Optional[float] = None, name: Optional[str] = None) -> Optional[float]:
    """Peak FLOP/s of this device at ``precision``; None when unknown (MFU is then not reported)."""
    if override_tflops:
        return override_tflops * 1e12
    name = name or device_name()
    for key, table in PEAK_TFLOPS.items():
        if key in name and precision in table:
            return table[precision] * 1e12
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it started (its exec).

    Linux's ``VmHWM``: ``getrusage``'s ``ru_maxrss`` also counts the parent's peak when the process was
    started by vfork + exec (Python's subprocess does that), so a small command started from a large
    process would report the large one's memory.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def peak_memory_bytes() -> int:
    """Peak accelerator memory allocated by this process (GPU), else peak resident set size (CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return peak_rss_bytes()


class GPUMonitor:
    """Utilisation, memory and power of this rank's GPU via NVML; empty on CPU-only hosts."""

    def __init__(self):
        self.handle = None
        if not torch.cuda.is_available():
            return
        try:
            import pynvml  # optional: only CUDA runs read GPU telemetry

            pynvml.nvmlInit()
            index = torch.cuda.current_device()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible:
                index = int(visible.split(",")[index])
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # NVML missing or restricted in a container: telemetry is optional
            self.handle = None

    def read(self) -> dict:
        if self.handle is None:
            return {}
        n = self.nvml
        util = n.nvmlDeviceGetUtilizationRates(self.handle)
        mem = n.nvmlDeviceGetMemoryInfo(self.handle)
        return {"gpu_util_pct": util.gpu, "gpu_mem_used_gb": mem.used / 2**30,
                "gpu_power_w": n.nvmlDeviceGetPowerUsage(self.handle) / 1000.0}


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl``; mirrors scalars to TensorBoard."""

    def __init__(self, directory: Optional[str], enabled: bool = True):
        self.enabled = enabled and directory is not None
        self.path = Path(directory) / "metrics.jsonl" if self.enabled else None
        self.tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package

                self.tb = SummaryWriter(str(Path(directory) / "tensorboard"))
            except ImportError:  # tensorboard is optional for the JSON lines
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file (skipping a torn last line from a killed run)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records

"""Training metrics: throughput, MFU, memory, GPU telemetry, JSON lines + TensorBoard on rank 0.

MFU = achieved model FLOP/s per device / the device's peak dense FLOP/s at the run's precision,
with model FLOPs per token from ``ModelConfig.train_flops_per_token()`` (6N + 12 L d T) — the
same formula on every device, and no recompute counted (activation checkpointing lowers MFU).
"""
from __future__ import annotations

import json
import re
import resource
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

# Peak dense TFLOP/s (no sparsity) per GPU kind and precision, from the vendors' datasheets (the sparsity
# figures halved where only those are printed). "tf32" is an fp32 run whose matmuls use TF32 tensor cores
# (igpt_ds.train.engine.matmul_precision turns that on for fp32 configs on CUDA); "fp32" is plain FP32.
PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM: H100 SXM's compute
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "GH200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},  # SXM4 and PCIe, 40 and 80 GB
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "V100 SXM2": {"fp16": 125.0, "fp32": 15.7},
    "V100 PCIe": {"fp16": 112.0, "fp32": 14.0},
}

# torch.cuda.get_device_name() -> kind, matched against the whole name ("NVIDIA " dropped), first rule first.
# Only names whose part is certain: an unlisted GPU (A10G, H800, B200, a MIG slice, ...) has no peak, and MFU
# is reported as unknown unless --peak-tflops states it, never computed against another part's peak.
_GPU_KINDS = [
    (r"H100 PCIe", "H100 PCIe"),
    (r"H100 NVL", "H100 NVL"),
    (r"H100( SXM5?)?( (64|80|94)GB)?( HBM3)?", "H100 SXM"),
    (r"H200 NVL", "H200 NVL"),
    (r"H200( SXM)?( 141GB)?( HBM3e)?", "H200"),
    (r"GH200( \d+GB| 144G HBM3e)?", "GH200"),
    (r"A100[- ](SXM4?[- ])?(PCIE[- ])?(40|80)GB( PCIe)?|A100", "A100"),
    (r"L40S", "L40S"),
    (r"A10", "A10"),
    (r"(Tesla )?V100[- ]SXM2[- ](16|32)GB", "V100 SXM2"),
    (r"(Tesla )?V100[- ]PCIE[- ](16|32)GB", "V100 PCIe"),
]


def gpu_kind(name: str) -> Optional[str]:
    """The :data:`PEAK_TFLOPS` kind of a CUDA device name (``"NVIDIA H100 80GB HBM3"`` -> ``"H100 SXM"``)."""
    if name in PEAK_TFLOPS:
        return name
    bare = re.sub(r"^NVIDIA ", "", name.strip())
    for pattern, kind in _GPU_KINDS:
        if re.fullmatch(pattern, bare, flags=re.IGNORECASE):
            return kind
    return None


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
    """Peak FLOP/s of this device (or of GPU ``name``, a device name or a kind) at ``precision``.

    None when it is not known exactly: MFU is then reported as unknown (``--peak-tflops`` states it).
    """
    if override_tflops:
        return override_tflops * 1e12
    kind = gpu_kind(name or device_name())
    table = PEAK_TFLOPS.get(kind, {}) if kind else {}
    return table[precision] * 1e12 if precision in table else None


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
    """Utilisation, memory and power of this rank's GPU via NVML; empty on CPU-only hosts.

    Telemetry never ends a run: a failure to start NVML or to read a value (NotSupported on some VMs, vGPU
    and MIG) is logged once and telemetry is then off. The NVML handle is found by the device's UUID, which
    is what CUDA and NVML agree on: CUDA's ordinals follow CUDA_VISIBLE_DEVICES (which may hold UUIDs or
    MIG ids) and CUDA's order need not be NVML's PCI order.
    """

    def __init__(self, device: Optional[torch.device] = None, log: Optional[Callable[[str], None]] = None):
        self.handle, self.nvml = None, None
        self.log = log or (lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
        if not torch.cuda.is_available():
            return
        try:
            import pynvml  # optional: only CUDA runs read GPU telemetry

            pynvml.nvmlInit()
            index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        except Exception as e:  # NVML missing or restricted in a container: telemetry is optional
            self._off(f"could not start ({type(e).__name__}: {e})")

    def _off(self, why: str) -> None:
        self.handle = None
        self.log(f"GPU telemetry (NVML) is off for this run: {why}. Training is unaffected.")

    def read(self) -> dict:
        if self.handle is None:
            return {}
        n = self.nvml
        try:
            util = n.nvmlDeviceGetUtilizationRates(self.handle)
            mem = n.nvmlDeviceGetMemoryInfo(self.handle)
            power = n.nvmlDeviceGetPowerUsage(self.handle)
        except Exception as e:  # NotSupported, GPU lost, driver reset: logged once, then off
            self._off(f"a read failed ({type(e).__name__}: {e})")
            return {}
        return {"gpu_util_pct": util.gpu, "gpu_mem_used_gb": mem.used / 2**30, "gpu_power_w": power / 1000.0}


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

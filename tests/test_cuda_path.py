"""The CUDA code path, checked on a CPU machine (issue 13, item 1).

No GPU here: the CUDA side is mocked where the code only asks questions (is there a GPU, how many,
what is its name or UUID) and the real code runs behind the mock: the process group's backend and
device, NVML telemetry that fails, the exact peak lookup, TF32 for fp32 runs, the fp16 step accounting
of the training loop against its schedule, and weights drawn the same way whatever dtype zero.Init
builds them in.
"""
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from igpt_ds.parallel import layout
from igpt_ds.train import engine as engine_mod
from igpt_ds.train import metrics
from igpt_ds.train.loop import LOSS_SCALE_AT_MINIMUM, Trainer, TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]


# ---- process group and device ---------------------------------------------------------------

@pytest.fixture
def fake_cuda(monkeypatch):
    """A machine that says it has ``count`` GPUs; records set_device and init_process_group calls."""
    calls = {"set_device": [], "init": []}

    def install(count=2):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls["set_device"].append(i))
        monkeypatch.setattr(dist, "is_initialized", lambda: False)
        monkeypatch.setattr(dist, "init_process_group",
                            lambda backend, **kw: calls["init"].append((backend, kw)))
        return calls

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                "IGPT_DS_LAUNCHER_LOCAL_RANK"):
        monkeypatch.setenv(var, "")  # recorded, so that what init_distributed writes is undone afterwards
        monkeypatch.delenv(var)
    return install


def test_cuda_group_has_a_cpu_backend_and_the_device_wraps_local_rank(fake_cuda, monkeypatch):
    calls = fake_cuda(count=2)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    layout.init_distributed()
    (backend, kw), = calls["init"]
    assert backend == "cpu:gloo,cuda:nccl"  # CPU collectives (stop flags, sizes) go over gloo
    assert calls["set_device"] == [1]  # 3 % 2, before the group exists
    assert kw["device_id"] == torch.device("cuda", 1)  # eager NCCL start: errors at start-up
    # DeepSpeed takes its device from LOCAL_RANK: it must name a visible GPU; the launcher's value is kept
    assert os.environ["LOCAL_RANK"] == "1"
    assert os.environ["IGPT_DS_LAUNCHER_LOCAL_RANK"] == "3"


def test_one_gpu_per_task_under_slurm(fake_cuda, monkeypatch):
    calls = fake_cuda(count=1)  # --gpus-per-task 1: every task sees device 0 only
    monkeypatch.setenv("SLURM_PROCID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "5")
    layout.init_distributed()
    assert calls["set_device"] == [0]
    assert calls["init"][0][0] == "cpu:gloo,cuda:nccl"
    assert os.environ["RANK"] == "7" and os.environ["LOCAL_RANK"] == "0"


def test_one_process_on_a_gpu_machine(fake_cuda):
    calls = fake_cuda(count=4)
    layout.init_distributed()  # no launcher: a 1-rank group on an in-memory store, device 0
    (backend, kw), = calls["init"]
    assert backend == "cpu:gloo,cuda:nccl" and kw["world_size"] == 1 and kw["device_id"].index == 0


def test_cpu_machine_keeps_gloo(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert layout.default_backend() == "gloo"
    assert layout.select_cuda_device() is None


def test_no_project_code_asks_for_a_plain_nccl_group():
    """A group made with the bare string "nccl" has no CPU backend: the first CPU collective fails."""
    offenders = []
    for path in list((ROOT / "igpt_ds").rglob("*.py")) + list((ROOT / "tools").glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "init_process_group" in line and ('"nccl"' in line or "'nccl'" in line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert not offenders, offenders


# ---- NVML telemetry -------------------------------------------------------------------------

class NVMLError(Exception):
    pass


def fake_nvml(monkeypatch, *, init_fails=False, read_fails=False):
    seen = {"uuid": []}

    def init():
        if init_fails:
            raise NVMLError("NVML Shared Library Not Found")

    def by_uuid(uuid):
        seen["uuid"].append(uuid)
        return "handle"

    def util(handle):
        if read_fails:
            raise NVMLError("Not Supported")
        return types.SimpleNamespace(gpu=87)

    module = types.SimpleNamespace(
        nvmlInit=init, nvmlDeviceGetHandleByUUID=by_uuid, nvmlDeviceGetUtilizationRates=util,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**30),
        nvmlDeviceGetPowerUsage=lambda h: 512_000)  # no GetHandleByIndex: ordinals are not NVML's order
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid="58f9bbc1-7e21-5c4e-a3b9-0123456789ab"))
    return seen


def test_nvml_handle_by_uuid_and_reads(monkeypatch):
    seen = fake_nvml(monkeypatch)
    logged = []
    gpu = metrics.GPUMonitor(torch.device("cuda", 0), log=logged.append)
    assert seen["uuid"] == ["GPU-58f9bbc1-7e21-5c4e-a3b9-0123456789ab"]
    assert gpu.read() == {"gpu_util_pct": 87, "gpu_mem_used_gb": 3.0, "gpu_power_w": 512.0}
    assert logged == []


@pytest.mark.parametrize("failure", ["init_fails", "read_fails"])
def test_nvml_failure_is_logged_once_then_off(monkeypatch, failure):
    fake_nvml(monkeypatch, **{failure: True})
    logged = []
    gpu = metrics.GPUMonitor(torch.device("cuda", 0), log=logged.append)
    assert gpu.read() == {} and gpu.read() == {}  # never raises: training goes on
    assert len(logged) == 1 and "Not" in logged[0] and "Training is unaffected" in logged[0]


# ---- peaks and precision --------------------------------------------------------------------

@pytest.mark.parametrize("name, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
    ("NVIDIA H100 PCIe", "bf16", 756.5),  # not the SXM part's 989
    ("NVIDIA H100 NVL", "bf16", 835.5),
    ("NVIDIA H200", "bf16", 989.4),
    ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
    ("NVIDIA A100 80GB PCIe", "bf16", 312.0),
    ("NVIDIA H100 80GB HBM3", "fp32", 66.9),
    ("Tesla V100-SXM2-16GB", "bf16", None),  # V100 has no bf16 tensor cores
    ("NVIDIA A10G", "bf16", None),  # not an A10: unknown rather than wrong
    ("NVIDIA H800", "bf16", None),
    ("NVIDIA B200", "bf16", None),
])
def test_peak_lookup_is_exact(name, precision, tflops):
    peak = metrics.peak_flops(precision, name=name)
    assert (peak is None) if tflops is None else peak == pytest.approx(tflops * 1e12)


def test_peak_override_wins():
    assert metrics.peak_flops("bf16", 123.0, name="NVIDIA B200") == 123e12


def test_fp32_on_cuda_runs_tf32_and_says_so(monkeypatch):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert engine_mod.matmul_precision("fp32") == "fp32"  # CPU: plain fp32
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert engine_mod.matmul_precision("bf16") == "bf16"
        monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
        assert engine_mod.matmul_precision("fp32") == "fp32"
        monkeypatch.delenv("NVIDIA_TF32_OVERRIDE")
        torch.backends.cuda.matmul.allow_tf32 = False
        assert engine_mod.matmul_precision("fp32") == "tf32"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_bf16_configs_accumulate_gradients_in_fp32():
    """bf16 ZeRO-0/1/2 and pipeline configs: DeepSpeed accumulates in the model dtype unless told."""
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        cfg = json.loads(path.read_text())
        if not cfg.get("bf16", {}).get("enabled"):
            continue
        if cfg.get("zero_optimization", {}).get("stage", 0) < 3 or "pipe" in path.name:
            assert cfg.get("data_types", {}).get("grad_accum_dtype") == "fp32", path.name


# ---- fp16 step accounting in the loop --------------------------------------------------------

class FakeEngine:
    """DeepSpeed's bookkeeping of a step: an overflowing fp16 step counts as skipped and does not step
    the schedule (engine.py ``_take_model_step``); otherwise the LR scheduler steps."""

    def __init__(self, scheduler, overflow_at=(), raise_at=None):
        self.scheduler, self.overflow_at, self.raise_at = scheduler, set(overflow_at), raise_at
        self.skipped_steps = self.global_steps = 0
        self.optimizer = types.SimpleNamespace(cur_scale=65536.0)

    def step(self):
        if self.global_steps == self.raise_at:
            raise Exception("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.")
        if self.global_steps in self.overflow_at:
            self.skipped_steps += 1
            self.optimizer.cur_scale /= 2
        else:
            self.scheduler.step()
        self.global_steps += 1

    def get_global_grad_norm(self):
        return 1.0

    def graph_breaks(self):  # not compiled
        return None


class FakeTask:
    name, divergence_hint, checkpoint_after_eval, keep_only_latest = "fake", "", False, False

    def eval_due(self, trainer):
        return False


def loop_under_test(tmp_path, total, overflow_at=(), raise_at=None):
    """A Trainer whose step is the fake engine's, on the real loop (``Trainer.train``) and its metrics."""
    if not dist.is_initialized():
        layout.init_distributed(backend="gloo")
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = engine_mod.WarmupCosine(warmup_steps=2, total_steps=total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    t = Trainer.__new__(Trainer)
    t.args = types.SimpleNamespace(save=None, progress=False, log_interval=1, save_interval=0, max_minutes=None)
    t.task, t.total_steps, t.step, t._saved_step, t.stop_reason = FakeTask(), total, 0, None, None
    t.started, t.is_rank0, t.device, t.peak, t.train_loader = 0.0, True, torch.device("cpu"), None, None
    t.ds = types.SimpleNamespace(train_batch_size=4, precision="fp16", gradient_accumulation_steps=1, zero_stage=1)
    t.cfg = types.SimpleNamespace(seq_len=16, train_flops_per_token=lambda: 1.0)
    t.layout = layout.ParallelLayout(1)
    t.engine, t.scheduler = FakeEngine(scheduler, overflow_at, raise_at), scheduler
    t.metrics, t.gpu = metrics.MetricsWriter(str(tmp_path)), metrics.GPUMonitor()
    calls = []

    def one_step(it):
        calls.append(t.engine.global_steps)
        t.engine.step()
        return {"loss": math.nan if t.engine.global_steps - 1 in t.engine.overflow_at else 1.0}, 0.0

    t._train_step = one_step
    return t, schedule, calls


def test_a_skipped_fp16_step_does_not_advance_the_schedule(tmp_path, capsys):
    total, overflow_at = 6, (0, 1, 4)  # the first steps at 2^16 overflow, and one later
    t, schedule, calls = loop_under_test(tmp_path, total, overflow_at)
    t.train()
    assert len(calls) == total + len(overflow_at)  # every skipped step is redone with the next batch
    assert t.step == total and t.scheduler.last_epoch == total  # the run = total real updates, on schedule
    records = metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, total + 1))  # one record per update, no NaN loss
    assert [r["lr"] for r in records] == pytest.approx([schedule(s) for s in range(total)])
    assert [r["skipped_steps"] for r in records] == [2, 2, 3, 3, 3, 3]  # engine steps 0, 1 and 4 overflowed
    assert all(math.isfinite(r["loss"]) for r in records)
    out = capsys.readouterr().out
    assert out.count("the fp16 loss scaler skipped the update") == len(overflow_at)


def test_loss_scale_at_minimum_ends_the_run_as_a_divergence(tmp_path):
    assert LOSS_SCALE_AT_MINIMUM in "Current loss scale already at minimum - cannot decrease scale anymore."
    t, _, _ = loop_under_test(tmp_path, total=5, overflow_at=(0, 1), raise_at=3)
    with pytest.raises(TrainingDiverged, match="loss scale is at its minimum.*bf16"):
        t.train()


def test_a_nonfinite_loss_on_an_applied_step_is_a_divergence(tmp_path):
    t, _, _ = loop_under_test(tmp_path, total=3)
    t._train_step = lambda it: (t.engine.step(), ({"loss": math.inf}, 0.0))[1]
    with pytest.raises(TrainingDiverged, match="loss became inf at step 1"):
        t.train()


# ---- weights: the same draw at every ZeRO stage ---------------------------------------------

ZERO3_INIT = """
import json, sys, torch, deepspeed
from igpt_ds.config import get_preset
from igpt_ds.model.transformer import IGPTModel
from igpt_ds.parallel import layout
layout.init_deepspeed_comm()
cfg = get_preset("igpt-tiny", resolution=8)
ds = {"train_batch_size": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
draws = []  # (device, dtype) of every tensor a normal draw fills
normal_ = torch.Tensor.normal_
def recorded(t, *a, **k):
    draws.append((t.device.type, str(t.dtype)))
    return normal_(t, *a, **k)
torch.Tensor.normal_ = recorded
torch.manual_seed(0)
with deepspeed.zero.Init(config_dict_or_path=ds):  # ZeRO-3 builds every tensor in bf16 (on the GPU there)
    model = IGPTModel(cfg, seed=0)
torch.Tensor.normal_ = normal_
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    zero3 = {k: v.detach().clone() for k, v in model.named_parameters()}
torch.manual_seed(0)
plain = IGPTModel(cfg, seed=0)  # ZeRO-0/1/2: built in fp32, cast to bf16 by DeepSpeed
bad = [k for k, v in plain.named_parameters() if not torch.equal(zero3[k], v.detach().to(torch.bfloat16))]
print(json.dumps({"dtypes": sorted({str(v.dtype) for v in zero3.values()}), "differ": bad, "n": len(zero3),
                  "draws": sorted(set(draws)), "n_draws": len(draws)}))
"""


def test_zero3_bf16_init_is_the_fp32_init_rounded():
    """zero.Init makes the tensors in the training dtype, and on a GPU on the GPU: weights drawn there would
    come from the CUDA generator and differ from the ZeRO-0/1/2 run's. Every draw must therefore fill a CPU
    fp32 tensor (then copied in); on a CPU both generators are the CPU's, so the equality alone would not
    show the GPU case, the draws' (device, dtype) do."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", ZERO3_INIT], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["dtypes"] == ["torch.bfloat16"] and result["n"] > 10
    assert result["draws"] == [["cpu", "torch.float32"]] and result["n_draws"] > 10
    assert result["differ"] == []

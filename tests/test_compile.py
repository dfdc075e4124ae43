"""``--compile``: compiled blocks train like eager ones, graph breaks are reported, and it is refused where it
cannot work. Also the SDPA backend order chosen for sm90.

The runs are ``igpt_ds/pretrain.py`` as users start it: igpt-tiny at 8x8 (64 tokens), fp32, batch 8, 5 steps,
one process on CPU (inductor's C++ kernels). Tolerance: relative 1e-4 per step loss. Inductor fuses the
elementwise work and reorders fp32 sums (LayerNorm, softmax, GELU), so single values differ from eager's in the
last bits (~1e-7 relative); five Adam steps at lr 3e-3 grow that to at most ~1e-6 (measured: 0 to 1.1e-6). A
wrong kernel, a missed update or a layer left out is off by orders of magnitude more. No test here is skipped:
a machine without a C++ compiler fails them, loudly.
"""
import json
import re
from pathlib import Path

import pytest
import torch

from igpt_ds.model import compile as compiling
from igpt_ds.testing import launch
from igpt_ds.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "igpt_ds" / "pretrain.py")
COMMON = ["--resolution", "8", "--no-progress", "--lr", "3e-3", "--num-workers", "0", "--train-steps", "5"]
RTOL = 1e-4
REPORT = re.compile(r"--compile: (\d+) graph break\(s\), (\d+) graph\(s\) compiled")


def ds_config(tmp_path, stage: int) -> str:
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0,
                                "zero_optimization": {"stage": stage}}))
    return str(path)


def pretrain(tmp_path, name: str, stage: int, *flags: str, env=None):
    run = tmp_path / name
    (result,) = launch([PRETRAIN, *COMMON, "--deepspeed_config", ds_config(tmp_path, stage), "--save", str(run),
                        *flags], 1, timeout=600, cwd=str(ROOT), env={"DS_ACCELERATOR": "cpu", **(env or {})})
    return result, run


def records(result, run) -> list:
    assert result.returncode == 0, f"exited {result.returncode}:\n{result.stderr[-4000:]}"
    return read_metrics(str(run / "metrics.jsonl"))


def assert_same_losses(compiled: list, eager: list) -> None:
    assert len(compiled) == len(eager) == 5
    for step, (c, e) in enumerate(zip(compiled, eager), 1):
        assert c["loss"] == pytest.approx(e["loss"], rel=RTOL), f"step {step}: compiled {c['loss']}, eager {e['loss']}"


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eager")
    out = records(*pretrain(tmp, "eager", 0))
    assert all(r["graph_breaks"] is None for r in out)  # not compiled: no count, rather than a zero
    return out


def test_compile_matches_eager_losses_over_5_steps(eager, tmp_path):
    result, run = pretrain(tmp_path, "compiled", 0, "--compile")
    compiled = records(result, run)
    assert_same_losses(compiled, eager)
    # The report: printed once by rank 0, and the count in every step record. At TP 1 each block is one graph.
    reports = REPORT.findall(result.stdout)
    assert len(reports) == 1, result.stdout
    breaks, graphs = map(int, reports[0])
    assert graphs >= 1, "nothing was compiled"
    assert breaks == 0, result.stdout
    assert [r["graph_breaks"] for r in compiled] == [0] * 5


def test_compile_at_zero3_goes_through_deepspeed_and_matches(eager, tmp_path):
    # DeepSpeed's engine.compile() on the whole module: its parameter hooks and the input check
    # (aminmax + int()) break the graph, so the count is positive, and losses still match ZeRO-0 eager.
    result, run = pretrain(tmp_path, "zero3", 3, "--compile")
    compiled = records(result, run)
    assert_same_losses(compiled, eager)
    (report,) = REPORT.findall(result.stdout)
    assert int(report[0]) > 0 and int(report[1]) >= 1
    assert all(isinstance(r["graph_breaks"], int) for r in compiled)


def test_compile_without_a_cpp_compiler_is_refused_with_the_reason(monkeypatch, tmp_path):
    # inductor's own compiler search, pointed at a compiler that is not there. (Not CXX in a subprocess:
    # DeepSpeed's CPU comm op would try to rebuild itself with it.)
    from torch._inductor import config

    monkeypatch.setattr(config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))
    with pytest.raises(compiling.CompileUnavailable, match=r"--compile on CPU needs a C\+\+ compiler for inductor's "
                                                           r"kernels, and none was found .*Install g\+\+ \(or set "
                                                           r"CXX\), or drop --compile"):
        compiling.check_compile(0, torch.device("cpu"))
    # A ValueError: the entry points print it as one "error: ..." line and exit 2 (igpt_ds/train/launch.py).
    assert issubclass(compiling.CompileUnavailable, ValueError)


def test_refusals_name_the_flag_and_the_fix(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(compiling.CompileUnavailable, match=r"--compile needs torch >= 2\.2 .*this is torch 2\.1\.2"):
        compiling.check_compile(0, cpu, torch_version="2.1.2+cu121")
    with pytest.raises(compiling.CompileUnavailable,
                       match=r"--compile at ZeRO-3 needs DeepSpeed's engine.compile\(\).*use a ZeRO-0/1/2 config"):
        compiling.check_compile(3, cpu, deepspeed_compile=False)
    compiling.check_compile(3, cpu)  # this DeepSpeed (0.19.8) has engine.compile()
    for stage in (0, 1, 2):
        compiling.check_compile(stage, cpu)

    from torch.utils import _triton

    monkeypatch.setattr(_triton, "has_triton", lambda: False)
    with pytest.raises(compiling.CompileUnavailable, match="--compile on a GPU needs Triton"):
        compiling.check_compile(0, torch.device("cuda", 0))


def test_compiled_blocks_keep_their_names():
    from igpt_ds.config import get_preset
    from igpt_ds.model.transformer import IGPTModel

    cfg = get_preset("igpt-tiny", resolution=8)
    eager, compiled = IGPTModel(cfg, seed=0), IGPTModel(cfg, seed=0)
    assert compiling.compile_blocks(compiled) == cfg.n_layer
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints and HF export unchanged
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)
    assert compiled.embed._compiled_call_impl is None  # the embedding and its input check stay eager


def test_sdpa_prefers_cudnn_then_flash_on_sm90_only():
    from torch.nn.attention import SDPBackend

    gpu = torch.device("cuda", 0)
    want = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    assert compiling.sdpa_priority(gpu, capability=(9, 0)) == want  # H100, H200
    for other in [(8, 0), (8, 9), (10, 0)]:  # A100, L40S, B200: torch's own choice
        assert compiling.sdpa_priority(gpu, capability=other) is None
    assert compiling.sdpa_priority(torch.device("cpu")) is None
    assert compiling.prefer_fast_attention(torch.device("cpu")) is None


def test_sm90_priority_is_set_process_wide_and_leaves_cpu_attention_working():
    from igpt_ds.config import get_preset
    from igpt_ds.model.transformer import IGPTModel

    before = torch._C._get_sdp_priority_order()
    cfg = get_preset("igpt-tiny", resolution=4)
    model = IGPTModel(cfg, seed=0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    with torch.no_grad():
        full = model(tokens)
        try:
            order = compiling.prefer_fast_attention(torch.device("cuda", 0), capability=(9, 0))
            assert torch._C._get_sdp_priority_order()[:4] == [int(b) for b in order]
            assert torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
            # CPU attention under it: the causal path, and KV-cache decoding with its prefill mask
            assert torch.equal(model(tokens), full)
            cache = model.new_cache()
            prefill = model(tokens[:, :5], cache=cache)  # SOS + 5 pixels in one call: the boolean mask
            step = model(tokens[:, 5:6], cache=cache)
        finally:
            compiling.restore_attention()
    assert torch.allclose(prefill[:, :6], full[:, :6], atol=1e-5) and torch.allclose(step[:, 0], full[:, 6], atol=1e-5)
    assert torch._C._get_sdp_priority_order() == before

"""tools/benchmark.py data, end to end on tiny synthetic data."""
import importlib.util
import os
import subprocess
import sys

import numpy as np

from igpt_ds.palette import save_palette
from igpt_ds.planning.bench_data import gpu_consumption

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "benchmark.py")


def test_benchmark_data_cli_writes_its_section(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8),
             labels=np.arange(20) % 2)
    save_palette(tmp_path / "p.npy", rng.uniform(-1, 1, (512, 3)).astype(np.float32))
    markdown = tmp_path / "B.md"
    markdown.write_text("# Benchmarks\n\nintro\n")
    result = subprocess.run([sys.executable, TOOL, "--markdown", str(markdown), "data", "--data",
                             str(tmp_path / "d.npz"), "--palette", str(tmp_path / "p.npy"), "--resolution", "8",
                             "--batch-size", "4", "--loader-samples", "40"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "1,280 tokens identical" in result.stdout and "samples/s" in result.stdout
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and "53.2 samples/s per GPU" in text

    spec = importlib.util.spec_from_file_location("benchmark_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.write_section(str(markdown), "data", "## data: replaced")
    text = markdown.read_text()
    assert text.count("benchmark:data:begin") == 1 and "## data: replaced" in text and "intro" in text


def test_gpu_consumption_arithmetic():
    gpu = gpu_consumption("igpt-l", mfu=0.5)
    assert gpu["seq_len"] == 1024
    assert abs(gpu["samples_per_s"] - 989e12 * 0.5 / gpu["flops_per_sample"]) < 1e-9
    assert 40 < gpu["samples_per_s"] < 70

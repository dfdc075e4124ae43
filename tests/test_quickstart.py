"""The README's main command in its smoke mode: every stage runs and every promised output exists."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = [sys.executable, str(ROOT / "tools" / "quickstart.py")]


def test_quickstart_tiny_produces_every_output(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([*QUICKSTART, "--tiny", "--out", str(out)], capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for name, rel in summary["outputs"].items():
        assert (out / rel).exists(), f"{name}: {rel} missing"
    for png in ("training.png", "probe.png", "samples.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["steps"] == 4 and 0.0 <= summary["probe_accuracy"] <= 1.0
    assert 0.0 <= summary["raw_pixel_accuracy"] <= 1.0 and 0.0 <= summary["random_weights_accuracy"] <= 1.0
    assert (out / "export" / "palette.npy").is_file()  # the export carries the training palette
    # The summary says how many images the probe accuracies rest on and their binomial standard error.
    n, acc = summary["probe_test_images"], summary["probe_accuracy"]
    assert n == json.loads((out / "probe.json").read_text())["num_test"] > 0
    assert summary["probe_standard_error"] == pytest.approx(math.sqrt(acc * (1 - acc) / n), abs=1e-6)
    assert f"Linear probe ({n} held-out images, standard error about" in proc.stdout and "raw pixels" in proc.stdout
    # ... and whether the pretrained features beat raw pixels beyond noise
    assert summary["gap_vs_raw_pixels"] == pytest.approx(acc - summary["raw_pixel_accuracy"])
    assert isinstance(summary["gap_significant"], bool) and summary["gap_standard_error"] > 0
    assert "Pretrained best layer vs raw pixels:" in proc.stdout


def load_quickstart():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "tools" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("probe_acc, raw_acc, significant", [
    (0.45, 0.38, True),   # gap 7.0 points, SE of the gap sqrt(.45*.55/1000 + .38*.62/1000) = 2.19: 3.2 SE
    (0.41, 0.38, False),  # gap 3.0 points, SE 2.18: 1.4 SE
    (0.33, 0.38, False),  # below raw pixels
])
def test_summary_reports_the_gap_its_standard_error_and_the_verdict(probe_acc, raw_acc, significant):
    quickstart = load_quickstart()
    got = quickstart.compare_to_raw({"best_test_accuracy": probe_acc, "num_test": 1000},
                                    {"best_test_accuracy": raw_acc, "num_test": 1000})
    se = math.sqrt(probe_acc * (1 - probe_acc) / 1000 + raw_acc * (1 - raw_acc) / 1000)
    assert got["gap"] == pytest.approx(probe_acc - raw_acc) and got["standard_error"] == pytest.approx(se)
    assert got["significant"] is significant
    assert ("not significant" in got["text"]) is (not significant)
    assert f"{100 * (probe_acc - raw_acc):+.1f} points" in got["text"] and f"{100 * se:.1f} points" in got["text"]


def test_quickstart_names_what_it_expected_for_a_bad_dataset(tmp_path):
    for data, words in ((tmp_path / "missing", "does not exist. Expected an image source"),
                        (tmp_path, "")):
        proc = subprocess.run([*QUICKSTART, "--tiny", "--data", str(data), "--out", str(tmp_path / "o")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        assert f"--data {data}" in proc.stderr and words in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "o").exists()

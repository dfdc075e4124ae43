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
    assert "Layers 1-4 concatenated: vs raw pixels" in proc.stdout
    # --tiny runs on the first batch file (1017 images: 203 held out); the blocks are probed concatenated too
    assert n == 203 and summary["data"].endswith(os.path.join("data", "cifar10-sample"))
    assert summary["concat_layers"] == [1, 2, 3, 4] and acc == summary["concat_accuracy"]
    # the gap's standard error is the paired one (same images), the independent one beside it
    assert "(paired, the same 203 images;" in proc.stdout and summary["gap_standard_error_independent"] > 0
    assert summary["probe_features"] == "layers 1-4 concatenated" and "Best single layer alone:" in proc.stdout


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


def test_the_claim_stands_on_the_concatenation_whatever_the_accuracies():
    quickstart = load_quickstart()
    probe = {"best_layer": 3, "best_test_accuracy": 0.40, "num_test": 1000,
             "layers": {"3": {"val_accuracy": 0.45, "test_accuracy": 0.40}},
             "concat": {"layers": [1, 2, 3, 4], "val_accuracy": 0.41, "test_accuracy": 0.39}}
    got = quickstart.pretrained_probe(probe)  # a fixed rule: neither held-out nor test accuracy chooses
    assert got["label"] == "layers 1-4 concatenated" and got["best_test_accuracy"] == 0.39
    del probe["concat"]
    got = quickstart.pretrained_probe(probe)
    assert got["label"] == "best layer 3" and got["best_test_accuracy"] == 0.40


def test_the_gap_of_two_probes_on_the_same_images_has_the_paired_standard_error():
    import numpy as np

    quickstart = load_quickstart()
    rng = np.random.default_rng(0)
    n = 1000
    raw = rng.random(n) < 0.38
    flip = rng.random(n) < 0.12  # the pretrained probe differs from raw pixels on ~12% of the images ...
    model = np.where(flip, rng.random(n) < 0.75, raw)  # ... and is right on most of those
    p, r = model.mean(), raw.mean()
    got = quickstart.compare_to_raw({"best_test_accuracy": p, "num_test": n}, {"best_test_accuracy": r, "num_test": n},
                                    correct=(model, raw))
    d = model.astype(float) - raw.astype(float)
    assert got["standard_error"] == pytest.approx(d.std(ddof=1) / math.sqrt(n))
    assert got["independent_standard_error"] == pytest.approx(math.sqrt(p * (1 - p) / n + r * (1 - r) / n))
    assert got["standard_error"] < got["independent_standard_error"] and got["paired"]
    assert got["significant"] is bool(p - r >= 2 * got["standard_error"])
    assert f"(paired, the same {n} images;" in got["text"]
    with pytest.raises(ValueError, match="are not those of the two probes"):  # results of other probes
        quickstart.compare_to_raw({"best_test_accuracy": p, "num_test": n}, {"best_test_accuracy": r, "num_test": n},
                                  correct=(raw, model))


def test_quickstart_names_what_it_expected_for_a_bad_dataset(tmp_path):
    for data, words in ((tmp_path / "missing", "does not exist. Expected an image source"),
                        (tmp_path, "")):
        proc = subprocess.run([*QUICKSTART, "--tiny", "--data", str(data), "--out", str(tmp_path / "o")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        assert f"--data {data}" in proc.stderr and words in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "o").exists()

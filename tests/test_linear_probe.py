"""Linear probes: planted signal, the low-data subsets, bad input, and checkpoint -> features -> probe end to end."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from testdata import synthetic_images

from igpt_ds.evaluate import probe as P
from igpt_ds.evaluate.feature_files import FeatureFile, FeatureFileError, FeatureWriter

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_features(path, layers: dict, labels=None, meta=None):
    """A feature file as extract_features writes it, from in-memory arrays."""
    n = len(next(iter(layers.values())))
    arrays = {f"layer{l}": (x.shape, x.dtype) for l, x in layers.items()}
    if labels is not None:
        arrays["labels"] = ((n,), np.int64)
    with FeatureWriter(path, arrays) as w:
        w.write(0, {f"layer{l}": x for l, x in layers.items()})
        if labels is not None:
            w.write(0, {"labels": np.asarray(labels, np.int64)})
        return w.finish(meta or {"kind": "test"})


def planted(n, d=16, classes=4, seed=0):
    """Layer 1 carries a linear signal (labels = argmax of a fixed linear map); layers 0 and 2 are noise."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(99).normal(size=(d, classes))
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ w).argmax(1)
    noise = lambda: rng.normal(size=(n, d)).astype(np.float32)  # noqa: E731
    return {0: noise(), 1: x * 3 + 5, 2: noise()}, y  # scaled and shifted: standardisation must undo it


def test_probe_recovers_planted_linear_signal(tmp_path):
    layers, y = planted(400)
    test_layers, y_test = planted(200, seed=1)
    r = P.probe(layers[1], y, test_layers[1], y_test)
    assert r["test_accuracy"] > 0.9 and r["C"] in P.C_GRID and r["converged"]
    noise = P.probe(layers[0], y, test_layers[0], y_test)
    assert noise["test_accuracy"] < 0.45  # chance is ~0.25
    # Through the tool: the best layer is the signal layer; JSON and PNG written.
    write_features(tmp_path / "train.npz", layers, y)
    write_features(tmp_path / "test.npz", test_layers, y_test)
    tool = load_tool("linear_probe")
    out = tmp_path / "probe.json"
    assert tool.main(["--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz"),
                      "--out", str(out), "--concat", "3", "--low-data", "8,40", "--seeds", "2",
                      "--c-grid", "0.01,1,100", "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["best_layer"] == 1 and result["best_test_accuracy"] > 0.9
    assert set(result["layers"]) == {"0", "1", "2"}
    for entry in result["layers"].values():
        assert {"test_accuracy", "val_accuracy", "C", "width"} <= set(entry)
    assert result["concat"]["layers"] == [0, 1, 2] and result["concat"]["width"] == 48
    low = result["low_data"]
    assert low["layer"] == 1 and low["results"]["8"]["per_class"] == 2 and low["results"]["40"]["per_class"] == 10
    assert len(low["results"]["40"]["test_accuracy"]["values"]) == 2
    assert result["protocol"]["c_grid"] == [0.01, 1, 100]
    assert low["results"]["40"]["test_accuracy"]["mean"] > low["results"]["8"]["test_accuracy"]["mean"] - 0.05
    assert (tmp_path / "probe.png").stat().st_size > 1000


def test_concat_layers_probes_a_fixed_set_and_refuses_bad_ones(tmp_path, capsys):
    layers, y = planted(300)
    test_layers, y_test = planted(150, seed=1)
    write_features(tmp_path / "train.npz", layers, y)
    write_features(tmp_path / "test.npz", test_layers, y_test)
    tool = load_tool("linear_probe")
    files = ["--train", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz"), "--quiet"]
    grid = ["--c-grid", "0.01,1"]
    out = tmp_path / "probe.json"
    preds = tmp_path / "preds.npz"
    assert tool.main([*files, "--out", str(out), "--concat-layers", "1-2", *grid,
                      "--save-predictions", str(preds)]) == 0
    result = json.loads(out.read_text())
    got = result["concat"]
    # --save-predictions: every probe's class per test row, beside the rows' labels; accuracies agree
    with np.load(preds) as f:
        assert sorted(f.files) == ["concat", "labels", "layer0", "layer1", "layer2"]
        np.testing.assert_array_equal(f["labels"], y_test)
        assert (f["concat"] == y_test).mean() == got["test_accuracy"]
        assert (f["layer1"] == y_test).mean() == result["layers"]["1"]["test_accuracy"]
    assert result["predictions"] == str(preds) and "test_predictions" not in result["layers"]["1"]
    assert got["layers"] == [1, 2] and got["width"] == 32  # not the window around the best layer (0-2)
    want = P.probe(np.concatenate([layers[1], layers[2]], 1), y,
                   np.concatenate([test_layers[1], test_layers[2]], 1), y_test, (0.01, 1))
    assert got["test_accuracy"] == want["test_accuracy"] and got["val_accuracy"] == want["val_accuracy"]
    # The torch solver takes the same set.
    sgd = tmp_path / "sgd.json"
    assert tool.main([*files, "--out", str(sgd), "--concat-layers", "0,2", "--solver", "sgd", "--epochs", "1",
                      "--lr-grid", "1", "--device", "cpu", "--threads", "1"]) == 0
    assert json.loads(sgd.read_text())["concat"]["layers"] == [0, 2]
    # A layer that is not probed, a single layer, and both concat flags at once are refused.
    assert tool.main([*files, "--out", str(tmp_path / "x.json"), "--layers", "0,1", "--concat-layers", "1-2"]) == 2
    assert "--concat-layers 1-2: layer(s) [2] are not probed" in capsys.readouterr().err
    assert tool.main([*files, "--out", str(tmp_path / "x.json"), "--concat-layers", "1"]) == 2
    assert "a concatenation needs two or more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main([*files, "--out", str(tmp_path / "x.json"), "--concat", "2", "--concat-layers", "1-2"])
    assert "choose one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main([*files, "--out", str(tmp_path / "x.json"), "--solver", "sgd", "--save-predictions", str(preds)])
    assert "--save-predictions is for --solver lbfgs" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_low_data_subsets_are_class_balanced_and_differ_across_seeds():
    labels = np.repeat(np.arange(10), [50 + 7 * c for c in range(10)])  # unbalanced pool
    np.random.default_rng(0).shuffle(labels)
    subsets = [P.balanced_subset(labels, 40, seed) for seed in range(5)]
    for idx in subsets:
        assert len(idx) == 40 and len(np.unique(idx)) == 40
        assert np.array_equal(np.bincount(labels[idx], minlength=10), np.full(10, 4))
    assert len({tuple(s) for s in subsets}) == 5  # a different subset per seed
    np.testing.assert_array_equal(P.balanced_subset(labels, 40, 3), subsets[3])  # reproducible
    assert np.array_equal(np.bincount(labels[P.balanced_subset(labels, 250, 0)]), np.full(10, 25))
    with pytest.raises(ValueError, match="fewer than one example per class"):
        P.balanced_subset(labels, 5, 0)
    with pytest.raises(ValueError, match="class 0 has 50"):
        P.balanced_subset(labels, 600, 0)


def test_concat_window():
    assert P.concat_window(5, 5, range(11)) == [3, 4, 5, 6, 7]
    assert P.concat_window(0, 5, range(11)) == [0, 1, 2, 3, 4]
    assert P.concat_window(10, 3, range(11)) == [8, 9, 10]
    assert P.concat_window(2, 4, range(5)) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="choose 1..5"):
        P.concat_window(2, 6, range(5))


def test_standardize_uses_fit_statistics_only():
    fit = np.array([[0.0, 1.0], [2.0, 1.0]], np.float32)
    other = np.array([[4.0, 7.0]], np.float32)
    a, b = P.standardize(fit, other)
    np.testing.assert_allclose(a, [[-1, 0], [1, 0]])
    np.testing.assert_allclose(b, [[3, 6]])  # constant feature: std 1, mean from fit


def test_bad_inputs(tmp_path, capsys):
    tool = load_tool("linear_probe")
    rng = np.random.default_rng(0)
    y = np.arange(40) % 4
    f = lambda d=8: rng.normal(size=(40, d)).astype(np.float32)  # noqa: E731
    write_features(tmp_path / "a.npz", {0: f(), 1: f()}, y, {"model": {"n_layer": 1}})
    write_features(tmp_path / "layers.npz", {0: f(), 2: f()}, y)
    write_features(tmp_path / "width.npz", {0: f(), 1: f(6)}, y)
    write_features(tmp_path / "nolabels.npz", {0: f(), 1: f()})
    write_features(tmp_path / "unlabeled.npz", {0: f(), 1: f()}, np.full(40, -1))

    def run(test, *extra):
        code = tool.main(["--train", str(tmp_path / "a.npz"), "--test", str(tmp_path / test),
                          "--out", str(tmp_path / "o.json"), "--quiet", *extra])
        return code, capsys.readouterr().err

    write_features(tmp_path / "other.npz", {2: f(), 3: f()}, y)
    for test, needle in [("other.npz", "none in common"), ("width.npz", "disagree on feature widths"),
                         ("nolabels.npz", "no 'labels' array"), ("unlabeled.npz", "have no label"),
                         ("missing.npz", "no such feature file")]:
        code, err = run(test)
        assert code == 2 and needle in err, (test, err)
    code, err = run("a.npz", "--layers", "5")
    assert code == 2 and "valid layers are 0..1" in err
    code, err = run("layers.npz", "--layers", "1")  # asked for a layer the test file lacks
    assert code == 2 and "layer(s) [1] are not in" in err and "layers.npz" in err
    # By default the layers both hold are probed (--layers auto may keep fewer layers of a large train split).
    code, _ = run("layers.npz")
    assert code == 0 and set(json.loads((tmp_path / "o.json").read_text())["layers"]) == {"0"}
    (tmp_path / "o.json").unlink()
    code, err = run("a.npz", "--low-data", "2")
    assert code == 2 and "fewer than one example per class" in err
    code, err = run("a.npz", "--baseline", "nonsense")
    assert code == 2 and "NAME=PROBE.json" in err
    assert not (tmp_path / "o.json").exists()
    with pytest.raises(FeatureFileError, match="no layer 3"):
        FeatureFile(tmp_path / "a.npz").layer(3)



def test_end_to_end_checkpoint_to_probe_json_and_png(tmp_path):
    """A checkpoint -> features (model, raw pixels) -> probe JSON + PNG, every step a CLI in a subprocess."""
    import torch

    from igpt_ds.checkpoint.consolidated import save_consolidated
    from igpt_ds.config import get_preset
    from igpt_ds.model.transformer import IGPTModel
    from igpt_ds.parallel.weights import full_state_dict

    torch.set_num_threads(1)
    palette = np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)
    cfg = get_preset("igpt-tiny", resolution=8, n_layer=2, d_model=32, n_head=2)
    save_consolidated(tmp_path / "ckpt", cfg, full_state_dict(IGPTModel(cfg, seed=0)), palette=palette)
    for split, n, seed in (("train", 240, 0), ("test", 90, 1)):
        images, labels = synthetic_images(n, seed)
        np.savez(tmp_path / f"{split}_images.npz", images=images, labels=labels)
    # A launcher's variables without its rendezvous (as under srun): each extraction stays its own process.
    env = dict(os.environ, OMP_NUM_THREADS="1", SLURM_PROCID="0", SLURM_NTASKS="2", RANK="0", WORLD_SIZE="2")
    env.pop("MASTER_ADDR", None)

    def cli(*argv):
        r = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    extract = ROOT / "tools" / "extract_features.py"
    for split in ("train", "test"):
        out = cli(extract, "--checkpoint", tmp_path / "ckpt", "--data", tmp_path / f"{split}_images.npz",
                  "--layers", "all", "--out", tmp_path / f"{split}.npz", "--no-progress", "--num-workers", "0",
                  "--threads", "1", "--batch-size", "64")
        assert "images (model, layers 0..2" in out
        # The raw-pixel baseline in-process: the same main(), one interpreter start less per file.
        assert load_tool("extract_features").main([
            "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / f"{split}_images.npz"), "--raw-pixels",
            "--out", str(tmp_path / f"raw_{split}.npz"), "--no-progress", "--num-workers", "0"]) == 0
    out = cli(ROOT / "tools" / "linear_probe.py", "--train", tmp_path / "train.npz", "--test", tmp_path / "test.npz",
              "--out", tmp_path / "probe.json", "--baseline", f"raw pixels={tmp_path / 'raw_train.npz'},"
              f"{tmp_path / 'raw_test.npz'}")
    assert "best layer" in out
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["best_layer"] in (0, 1, 2) and set(result["layers"]) == {"0", "1", "2"}
    assert result["best_test_accuracy"] > 0.8  # colour classes: far above chance (1/3)
    assert result["features"]["kind"] == "model" and result["num_train"] == 240 and result["num_test"] == 90
    assert result["baselines"]["raw pixels"]["best_test_accuracy"] > 0.8
    png = tmp_path / "probe.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

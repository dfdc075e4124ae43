"""The SGD (ImageNet) linear probe: agreement with L-BFGS on real-image features, streaming memory,
all layers in one pass, two gloo ranks against one process, the BERT modal vote, bad input."""
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from igpt_ds.evaluate.feature_files import FeatureWriter
from igpt_ds.evaluate.probe import modal_vote

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "cifar10-sample"
ACC_TOL = 0.015  # the bound: SGD within 1.5 points of L-BFGS


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_features(path, layers: dict, labels, meta=None):
    n = len(next(iter(layers.values())))
    arrays = {(k if isinstance(k, str) else f"layer{k}"): (x.shape, x.dtype) for k, x in layers.items()}
    arrays["labels"] = ((n,), np.int64)
    with FeatureWriter(path, arrays) as w:
        w.write(0, {(k if isinstance(k, str) else f"layer{k}"): x for k, x in layers.items()})
        w.write(0, {"labels": np.asarray(labels, np.int64)})
        return w.finish(meta or {"kind": "test"})


@pytest.fixture(scope="module")
def cifar_features(tmp_path_factory):
    """Features of the 1017 embedded real CIFAR-10 images from a tiny random-weights iGPT (16x16, 2 layers).

    Half train, half test; a 64-colour palette fitted on the images. Built in-process: ~5 s.
    """
    from igpt_ds.planning.bench_probe import cifar_tiny_features

    out = tmp_path_factory.mktemp("cifar_features")
    cifar_tiny_features(str(SAMPLE), out)
    return out


def probe(tmp, *argv):
    tool = load_tool("linear_probe")
    out = tmp / f"probe{len(list(tmp.glob('probe*.json')))}.json"
    # One torch thread: these heads are tiny, and two threads on a busy 2-core machine spin (30x slower).
    import torch

    threads, before = (["--threads", "1"] if "sgd" in argv else []), torch.get_num_threads()
    try:
        code = tool.main([*map(str, argv), *threads, "--out", str(out), "--quiet"])
    finally:
        torch.set_num_threads(before)
    assert code == 0
    return json.loads(out.read_text())


def per_layer(result):
    return np.array([result["layers"][l]["test_accuracy"] for l in sorted(result["layers"], key=int)])


def test_sgd_matches_lbfgs_on_real_image_features(cifar_features, tmp_path):
    train, test = cifar_features / "train.npz", cifar_features / "test.npz"
    files = ("--train", train, "--test", test)
    # The same objective: scikit-learn minimises ||w||^2 / 2 + C sum(loss), SGD mean(loss) + wd ||w||^2 / 2,
    # equal at wd = 1 / (C N). Then SGD must reach L-BFGS's optimum: every layer within 1.5 points.
    n = 508
    lbfgs = probe(tmp_path, *files, "--c-grid", "1")
    sgd = probe(tmp_path, *files, "--solver", "sgd", "--lr-grid", "0.3", "--weight-decay", str(1 / n),
                "--epochs", "50", "--batch-size", "64", "--holdout", "0.1")
    assert lbfgs["num_train"] == n
    assert np.abs(per_layer(sgd) - per_layer(lbfgs)).max() <= ACC_TOL, (per_layer(sgd), per_layer(lbfgs))
    # Each protocol with its own search (C grid; the paper's SGD with a rate grid and no decay): the
    # per-layer accuracies agree on average within 1.5 points (one layer's choice alone is noisier
    # than that on 509 test images of features this weak).
    lbfgs = probe(tmp_path, *files)
    sgd = probe(tmp_path, *files, "--solver", "sgd", "--holdout", "0.1", "--epochs", "30", "--batch-size", "128")
    assert abs(per_layer(sgd).mean() - per_layer(lbfgs).mean()) <= ACC_TOL, (per_layer(sgd), per_layer(lbfgs))
    assert sgd["protocol"]["solver"] == "sgd" and sgd["best_layer"] in (0, 1, 2)
    for entry in sgd["layers"].values():
        assert entry["lr"] in (30, 10, 3, 1, 0.3, 0.1) and set(entry["lr_search"]) == {"30", "10", "3", "1", "0.3",
                                                                                        "0.1"}
    assert sgd["peak_rss_bytes"] > 0 and sgd["throughput"]["rows_per_second"] > 0
    assert Path(sgd["plot"]).stat().st_size > 1000


STREAM_CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from igpt_ds.evaluate.feature_files import FeatureFile
    from igpt_ds.evaluate.sgd_probe import SGDSettings, sgd_probe
    from igpt_ds.train.metrics import peak_rss_bytes
    import torch
    torch.set_num_threads(1)
    train, test = FeatureFile(sys.argv[2]), FeatureFile(sys.argv[3])
    before = peak_rss_bytes()
    r = sgd_probe(train, test, [0, 1], SGDSettings(lr_grid=(1.0, 0.1), holdout=0.1, epochs=1, batch_size=512,
                                                 memory_budget_mb=float(sys.argv[4]), progress=False,
                                                 log=lambda *a: None))
    print(json.dumps({"before": before, "after": peak_rss_bytes(), "stream": r["stream"],
                      "acc": r["layers"]["1"]["test_accuracy"]}))
""")


def test_streaming_keeps_memory_bounded(tmp_path):
    """A 147 MB float16 file probed with a 16 MB budget: peak RSS grows by far less than the file."""
    rng = np.random.default_rng(0)
    n, d, classes = 72_000, 512, 10
    w = rng.normal(size=(d, classes)).astype(np.float32)
    path = tmp_path / "big.npz"
    arrays = {"layer0": ((n, d), np.float16), "layer1": ((n, d), np.float16), "labels": ((n,), np.int64)}
    with FeatureWriter(path, arrays) as writer:  # written in chunks: the test itself stays small
        for s in range(0, n, 8000):
            x = rng.normal(size=(min(8000, n - s), d)).astype(np.float32)
            writer.write(s, {"layer0": rng.normal(size=x.shape).astype(np.float16), "layer1": x.astype(np.float16),
                             "labels": (x @ w).argmax(1)})
        writer.finish({"kind": "test"})
    test = tmp_path / "test.npz"
    x = rng.normal(size=(2000, d)).astype(np.float32)
    write_features(test, {0: x.astype(np.float16), 1: x.astype(np.float16)}, (x @ w).argmax(1))
    file_bytes = path.stat().st_size
    budget_mb = 16
    child = subprocess.run([sys.executable, "-c", STREAM_CHILD, str(ROOT), str(path), str(test), str(budget_mb)],
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    r = json.loads(child.stdout.strip().splitlines()[-1])
    growth = r["after"] - r["before"]
    # Stated bound: the buffer (the budget) + the statistics chunk (the budget) + batches and heads (32 MB).
    bound = 2 * budget_mb * 2**20 + 32 * 2**20
    assert r["stream"]["buffer_bytes"] <= budget_mb * 2**20
    assert growth <= bound and growth < file_bytes / 2, (growth, bound, file_bytes)
    assert r["acc"] > 0.5  # it learned the planted signal while streaming


def test_all_layers_in_one_pass_equal_each_layer_alone(cifar_features, tmp_path):
    files = ("--train", cifar_features / "train.npz", "--test", cifar_features / "test.npz", "--solver", "sgd",
             "--holdout", "0.1", "--epochs", "3", "--batch-size", "64", "--memory-budget", "0.05")
    together = probe(tmp_path, *files)
    for layer in ("0", "2"):
        alone = probe(tmp_path, *files, "--layers", layer)
        a, b = alone["layers"][layer], together["layers"][layer]
        # Same mini-batches, independent heads: equal up to float summation (1e-6 on the loss).
        assert a["lr_search"] == b["lr_search"] and a["test_accuracy"] == b["test_accuracy"]
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-6
    assert together["stream"]["chunk_rows"] < 508  # the small budget made it stream in chunks


def test_two_gloo_ranks_equal_one_process(cifar_features, tmp_path):
    from igpt_ds.testing import launch

    args = ["--train", str(cifar_features / "train.npz"), "--test", str(cifar_features / "test.npz"), "--solver",
            "sgd", "--holdout", "0.1", "--epochs", "4", "--batch-size", "64", "--device", "cpu", "--concat", "2",
            "--quiet"]
    one = probe(tmp_path, *args[:-1])
    ranks = launch([str(ROOT / "tools" / "linear_probe.py"), *args, "--out", str(tmp_path / "dp.json")], 2,
                   timeout=300, env={"OMP_NUM_THREADS": "1"})
    for r in ranks:
        assert r.returncode == 0, r.stderr[-3000:]
    dp = json.loads((tmp_path / "dp.json").read_text())
    assert dp["world_size"] == 2 and one["world_size"] == 1
    for layer, a in one["layers"].items():
        b = dp["layers"][layer]
        assert a["lr"] == b["lr"] and a["test_accuracy"] == b["test_accuracy"], (layer, a, b)
        for rate, acc in a["lr_search"].items():
            assert acc == pytest.approx(b["lr_search"][rate], abs=1e-9)
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)  # summation order only
    assert one["concat"]["test_accuracy"] == dp["concat"]["test_accuracy"]


def test_modal_vote_ties_are_random_and_majorities_win():
    preds = np.array([[2, 0], [2, 1], [1, 1]])  # row 0: 2 wins 2-1; row 1: 1 wins 2-1
    for seed in range(10):
        np.testing.assert_array_equal(modal_vote(preds, 3, seed, np.array([5, 6])), [2, 1])
    tie = np.array([[0], [1], [2], [0], [1]])  # 0 and 1 tie at 2 votes, 2 has one
    picks = {int(modal_vote(tie, 3, seed, np.array([7]))[0]) for seed in range(40)}
    assert picks == {0, 1}
    # A row's vote does not depend on the other rows scored with it (batching, ranks).
    rows = np.arange(50)
    many = np.random.default_rng(0).integers(0, 4, (5, 50))
    whole = modal_vote(many, 4, 3, rows)
    np.testing.assert_array_equal(np.concatenate([modal_vote(many[:, :20], 4, 3, rows[:20]),
                                                  modal_vote(many[:, 20:], 4, 3, rows[20:])]), whole)


@pytest.mark.parametrize("solver", ["lbfgs", "sgd"])
def test_bert_vote_differs_from_feature_average(tmp_path, solver):
    """Two of three masks say the right class mildly, one says the wrong one strongly: the vote is
    right, the feature average (what --bert-eval average stores) wrong."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 1)).astype(np.float32)
    noise = rng.normal(size=(400, 1)).astype(np.float32)
    write_features(tmp_path / "train.npz", {0: np.concatenate([x, noise], 1)}, (x[:, 0] > 0).astype(int))
    y = np.arange(60) % 2
    sign = np.where(y == 1, 1.0, -1.0)[:, None].astype(np.float32)
    zeros = np.zeros((60, 1), np.float32)
    views = [np.concatenate([v * sign, zeros], 1) for v in (1.0, 1.0, -10.0)]
    bert = {"kind": "model", "model": {"objective": "bert"}, "bert_eval": "vote", "bert_masks": 3}
    write_features(tmp_path / "test_vote.npz", {0: views[0], "layer0_mask1": views[1], "layer0_mask2": views[2]}, y,
                   bert)
    write_features(tmp_path / "test_avg.npz", {0: sum(views) / 3}, y, dict(bert, bert_eval="average"))
    extra = ["--solver", "sgd", "--lr-grid", "1", "--epochs", "5", "--batch-size", "64", "--holdout", "0.1"] \
        if solver == "sgd" else []
    vote = probe(tmp_path, "--train", tmp_path / "train.npz", "--test", tmp_path / "test_vote.npz", "--bert-eval",
                 "vote", *extra)
    average = probe(tmp_path, "--train", tmp_path / "train.npz", "--test", tmp_path / "test_avg.npz", *extra)
    assert vote["layers"]["0"]["test_accuracy"] == 1.0 and vote["layers"]["0"]["test_accuracy_single_mask"] == 1.0
    assert average["layers"]["0"]["test_accuracy"] == 0.0
    assert vote["bert_eval"].startswith("modal vote of 3") and "average" in average["bert_eval"]


def test_bad_input(cifar_features, tmp_path, capsys):
    tool = load_tool("linear_probe")
    train, test = str(cifar_features / "train.npz"), str(cifar_features / "test.npz")

    def run(*argv):
        code = tool.main([*map(str, argv), "--out", str(tmp_path / "o.json"), "--quiet"])
        return code, capsys.readouterr().err

    code, err = run("--train", train, "--test", test, "--solver", "sgd", "--lr-grid", "1e7,1e6", "--epochs", "2")
    assert code == 2 and "every rate of --lr-grid diverged" in err and "1e+07" in err
    code, err = run("--train", train, "--test", test, "--bert-eval", "vote")
    assert code == 2 and "--bert-eval vote is for BERT models" in err and "ar model" in err
    y = np.arange(40) % 4
    write_features(tmp_path / "bert_avg.npz", {0: np.ones((40, 2), np.float32)}, y,
                   {"model": {"objective": "bert"}, "bert_eval": "average", "bert_masks": 5})
    code, err = run("--train", tmp_path / "bert_avg.npz", "--test", tmp_path / "bert_avg.npz", "--bert-eval", "vote")
    assert code == 2 and "needs the features of several BERT masks" in err and "--bert-eval vote --bert-masks 5" in err
    rng = np.random.default_rng(0)
    write_features(tmp_path / "narrow.npz", {0: rng.normal(size=(40, 8)).astype(np.float32),
                                             1: rng.normal(size=(40, 8)).astype(np.float32),
                                             2: rng.normal(size=(40, 8)).astype(np.float32)}, np.arange(40) % 4)
    code, err = run("--train", train, "--test", tmp_path / "narrow.npz", "--solver", "sgd")
    assert code == 2 and "disagree on feature widths" in err
    with pytest.raises(SystemExit):
        tool.parse_args(["--train", train, "--test", test, "--out", "x", "--solver", "sgd", "--low-data", "40"])
    assert "--low-data is the L-BFGS protocol" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_probe_benchmark_target_measures_both_modes(tmp_path, capsys):
    """``tools/benchmark.py probe`` at a tiny size: the section has both rows (the accuracy part, --data,
    runs the two probes the other tests run)."""
    spec = importlib.util.spec_from_file_location("tool_benchmark", ROOT / "tools" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    md = tmp_path / "BENCH.md"
    bench.main(["--markdown", str(md), "probe", "--rows", "3000", "--test-rows", "400", "--width", "32",
                "--layers", "2", "--classes", "10", "--iterations", "4", "--batch-size", "128", "--memory-budget",
                "8", "--scratch", str(tmp_path)])
    text = md.read_text()
    assert "| 2 layers in one pass | 1 |" in text and "| 2 runs of one layer | 2 |" in text
    assert "features/s per layer" in text and "<!-- benchmark:probe:end -->" in text
    assert not list(tmp_path.glob("igpt-bench-probe-*"))  # its scratch files are gone

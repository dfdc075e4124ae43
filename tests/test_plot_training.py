"""tools/plot_training.py: pretraining and fine-tuning metrics, several runs with a reference line, bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLOT = [sys.executable, str(ROOT / "tools" / "plot_training.py")]
PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(path: Path, records: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def pretrain_records(n=20):
    return [{"step": s, "loss": 6.0 - 0.1 * s, "lr": 1e-3, "tokens_per_s": 1000.0 + s, "mfu": None,
             **({"val_loss": 6.1 - 0.1 * s} if s % 5 == 0 else {})} for s in range(1, n + 1)]


def finetune_records(n=20, slope=0.01):
    # As igpt_ds/finetune.py logs them: no throughput fields; val_acc on evaluation steps only.
    return [{"step": s, "loss": 4.0 - 0.05 * s, "gen_loss": 2.5, "clf_loss": 1.5, "train_acc": 0.3, "lr": 3e-4,
             **({"val_acc": 0.2 + slope * s, "best_val_acc": 0.2 + slope * s} if s % 5 == 0 else {})}
            for s in range(1, n + 1)]


def run(*args):
    return subprocess.run([*PLOT, *map(str, args)], capture_output=True, text=True, cwd=str(ROOT), timeout=300)


def test_one_pretraining_run_defaults_beside_its_metrics(tmp_path):
    metrics = write_metrics(tmp_path / "run" / "metrics.jsonl", pretrain_records())
    out = run(metrics)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "run" / "training.png").read_bytes()[:8] == PNG
    assert not list((tmp_path / "run").glob("*.tmp*"))


def test_fine_tuning_runs_compared_against_a_probe(tmp_path):
    # Fine-tuning metrics carry no tokens/s: the third panel becomes validation accuracy.
    a = write_metrics(tmp_path / "ft" / "metrics.jsonl", finetune_records())
    b = write_metrics(tmp_path / "scratch" / "metrics.jsonl", finetune_records(slope=0.005))
    png = tmp_path / "compare.png"
    out = run(a, b, "--label", "fine-tuned", "--label", "from scratch", "--reference", "linear probe=0.427",
              "--out", png)
    assert out.returncode == 0, out.stderr[-2000:]
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000


def test_plot_runs_draws_every_run_and_the_reference(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plot_training

    saved = {}
    real_savefig = plt.Figure.savefig

    def capture(fig, path, **kw):
        saved["axes"] = fig.axes
        return real_savefig(fig, path, **kw)

    plt.Figure.savefig = capture
    try:
        plot_training.plot_runs([("a", finetune_records()), ("b", finetune_records(slope=0.005))],
                                str(tmp_path / "p.png"),
                                references=(("probe", 0.427),))
    finally:
        plt.Figure.savefig = real_savefig
    acc = saved["axes"][2]
    assert acc.get_title() == "validation accuracy"
    labels = [line.get_label() for line in acc.get_lines()]
    assert labels == ["a", "b", "probe 42.7%"]
    a_line = acc.get_lines()[0]
    assert list(a_line.get_xdata()) == [5, 10, 15, 20]
    assert list(a_line.get_ydata()) == pytest.approx([25.0, 30.0, 35.0, 40.0])
    assert list(acc.get_lines()[2].get_ydata()) == pytest.approx([42.7, 42.7])


@pytest.mark.parametrize("args, message", [
    (["MISSING"], "no such file"),
    (["EMPTY"], "holds no metrics records"),
    (["FT", "--label", "a", "--label", "b"], "2 --label for 1 metrics files"),
    (["FT", "--reference", "probe"], "expected NAME=ACCURACY"),
    (["FT", "--reference", "probe=42.7"], "expected NAME=ACCURACY"),
    (["PRE", "--reference", "probe=0.4"], "no metrics file has val_acc"),
])
def test_bad_input_is_named(tmp_path, args, message):
    files = {"MISSING": tmp_path / "nope" / "metrics.jsonl",
             "EMPTY": write_metrics(tmp_path / "empty" / "metrics.jsonl", []),
             "FT": write_metrics(tmp_path / "ft" / "metrics.jsonl", finetune_records()),
             "PRE": write_metrics(tmp_path / "pre" / "metrics.jsonl", pretrain_records())}
    out = run(*[files.get(a, a) for a in args], "--out", tmp_path / "x.png")
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "x.png").exists()

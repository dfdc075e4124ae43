"""Every command block in README.md, docs/ and slurm/README.md is run by a test or marked.

A ```bash block must follow one of these markers (on the line before it):
  <!-- run -->                         this test runs it (blocks of one file in order, in one sandbox)
  <!-- exercised-by: tests/x.py::t --> the named test runs the same command on small data
  <!-- cluster-only: reason -->        needs GPUs, Slurm or the internet; the reason says what covers it
  <!-- main-command --> / <!-- test-command -->   README's two commands (quickstart test / CI)
The sandbox is a temporary directory with the repository's folders linked in and a small synthetic
CIFAR-10 at ./cifar-10-batches-py, so the documented commands run as written.
"""
import os
import pickle
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "slurm" / "README.md"]
MARKER = re.compile(r"<!--\s*(run|exercised-by|cluster-only|main-command|test-command)\s*:?\s*(.*?)\s*-->")


def command_blocks(path: Path):
    """(marker, argument, code, line) for each ```bash block of a markdown file."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            prev = lines[i - 1] if i else ""
            m = MARKER.search(prev)
            blocks.append((m.group(1) if m else None, m.group(2) if m else "", "\n".join(lines[i + 1:j]), i + 1))
            i = j
        i += 1
    return blocks


def test_every_command_block_is_run_or_marked():
    seen = 0
    for path in DOCS:
        for marker, arg, _code, line in command_blocks(path):
            seen += 1
            where = f"{path.relative_to(ROOT)}:{line}"
            assert marker, f"{where}: a bash block without a marker (run / exercised-by / cluster-only)"
            if marker == "cluster-only":
                assert len(arg) > 10, f"{where}: cluster-only needs a reason"
            if marker == "exercised-by":
                for ref in arg.split(","):
                    file, _, name = ref.strip().partition("::")
                    assert (ROOT / file).is_file(), f"{where}: {file} does not exist"
                    if name:
                        assert f"def {name}(" in (ROOT / file).read_text(), f"{where}: no test {name} in {file}"
    assert seen >= 8


def _synthetic_cifar(directory: Path, n: int = 64) -> None:
    directory.mkdir()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    batch = {b"data": data, b"labels": list(rng.integers(0, 10, n)), b"filenames": [b"x"] * n,
             b"batch_label": b"synthetic"}
    (directory / "data_batch_1").write_bytes(pickle.dumps(batch))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)]}
    (directory / "batches.meta").write_bytes(pickle.dumps(meta))


def _runnable():
    for path in DOCS:
        blocks = [(code, line) for marker, _, code, line in command_blocks(path) if marker == "run"]
        if blocks:
            yield pytest.param(path, blocks, id=str(path.relative_to(ROOT)))


@pytest.mark.parametrize("path, blocks", list(_runnable()))
def test_run_blocks(path, blocks, tmp_path):
    for name in ("igpt_ds", "tools", "ds_configs", "slurm", "data"):
        (tmp_path / name).symlink_to(ROOT / name)
    _synthetic_cifar(tmp_path / "cifar-10-batches-py")
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    for code, line in blocks:
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{path.name}:{line} failed:\n{code}\n--- stderr ---\n{out.stderr[-3000:]}"


def test_readme_map_lists_every_module():
    """README's Layout section names every module of the package, so a newcomer finds any part from it."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout"):]
    section = section[:section.index("```", section.index("```") + 3)]
    missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "igpt_ds").rglob("*.py"))
               if p.name != "__init__.py" and not re.search(rf"\b{re.escape(p.name)}\b", section)]
    missing += [f"igpt_ds/{d.name}/" for d in sorted((ROOT / "igpt_ds").iterdir())
                if d.is_dir() and (d / "__init__.py").is_file() and f"{d.name}/" not in section]
    assert not missing, f"README.md's Layout section does not list: {missing}"

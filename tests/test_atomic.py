"""The one atomic-write helper: complete under the final name or absent, temporaries gone, no torch."""
import os
import subprocess
import sys

import numpy as np
import pytest

from igpt_ds.checkpoint.atomic import atomic_directory, atomic_file, atomic_symlink, atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_atomic_write_text_and_bytes_replace_the_old_file(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write(target, '{"a": 1}\n')
    assert target.read_text() == '{"a": 1}\n'
    atomic_write(target, b"\x00\x01", fsync=True, mode=0o640)
    assert target.read_bytes() == b"\x00\x01" and (target.stat().st_mode & 0o777) == 0o640
    assert os.listdir(tmp_path) == ["summary.json"]


def test_a_failed_block_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "probe.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["probe.json"]
    with pytest.raises(TypeError):
        atomic_write(target, 3)  # neither str nor bytes: refused, nothing changed
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["probe.json"]


def test_atomic_file_temporary_keeps_the_suffix_and_a_fixed_name_on_request(tmp_path):
    with atomic_file(tmp_path / "palette.npy") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.suffix == ".npy"
        np.save(tmp, np.arange(3))  # np.save would append .npy to a name without it
    np.testing.assert_array_equal(np.load(tmp_path / "palette.npy"), np.arange(3))
    with atomic_file(tmp_path / "a.tar", temp=tmp_path / "a.tar.tmp") as tmp:
        assert tmp == tmp_path / "a.tar.tmp"
        tmp.write_bytes(b"tar")
    assert sorted(os.listdir(tmp_path)) == ["a.tar", "palette.npy"]


def test_atomic_symlink_and_directory(tmp_path):
    link = tmp_path / "best"
    atomic_symlink("exports/step-1", link)
    atomic_symlink("exports/step-2", link)
    assert os.readlink(link) == "exports/step-2" and os.listdir(tmp_path) == ["best"]
    with atomic_directory(tmp_path / "export") as tmp:
        (tmp / "config.json").write_text("{}")
    assert os.listdir(tmp_path / "export") == ["config.json"]
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_directory(tmp_path / "export"):
            pass


def test_the_helper_imports_no_torch():
    code = "import sys, igpt_ds.checkpoint.atomic, igpt_ds.evaluate.probe; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=300).returncode == 0

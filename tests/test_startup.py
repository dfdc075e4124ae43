"""A stale torch-extensions build lock makes the start give up with the fix instead of hanging.

torch's JIT ``load`` takes ``<build dir>/lock`` on every start, built or not (``_jit_compile``), so a
lock alone, with nothing built, is exactly what a start killed mid-build leaves behind.
"""
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from igpt_ds.parallel import startup

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "igpt_ds" / "pretrain.py")


def stale_lock(build_dir: Path, hours: float = 3.0) -> Path:
    build_dir.mkdir(parents=True)
    lock = build_dir / "lock"
    lock.touch()
    old = time.time() - hours * 3600
    os.utime(lock, (old, old))
    return lock


@pytest.fixture(autouse=True)
def local_rank_0(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # the rank that prints


def watch(block_s: float, build_dir: Path, until: str = "", **kw):
    """Run a fake blocking block (a sleep loop like FileBaton.wait) under the watchdog; (codes, output).

    The block ends after ``block_s``, when the watchdog gives up, or once its output contains ``until``.
    """
    out, codes, gave_up = io.StringIO(), [], threading.Event()

    def on_give_up(code):
        codes.append(code)
        gave_up.set()

    with startup.watch_extension_build("the test op", "test_op", build_dir=str(build_dir), stream=out,
                                       on_give_up=on_give_up, **kw):
        end = time.monotonic() + block_s
        while time.monotonic() < end and not gave_up.is_set() and not (until and until in out.getvalue()):
            time.sleep(0.05)
    return codes, out.getvalue()


def test_fast_block_prints_nothing(tmp_path):
    stale_lock(tmp_path / "test_op")
    codes, out = watch(0.2, tmp_path / "test_op", timeout_s=1.0, notice_after_s=0.5)
    time.sleep(1.2)  # the watchdog has stopped: nothing more arrives after the block
    assert codes == [] and out == ""


def test_stale_lock_gives_up_with_the_fix(tmp_path):
    lock = stale_lock(tmp_path / "test_op")
    t0 = time.monotonic()
    codes, out = watch(30, tmp_path / "test_op", timeout_s=1.0, notice_after_s=0.2)
    assert time.monotonic() - t0 < 10
    assert codes == [startup.STALE_LOCK_EXIT]
    first, rest = out.split("\n", 1)
    assert first.startswith("waiting for the test op (test_op): building or loading it")
    assert startup.TIMEOUT_ENV in first
    assert "error:" in rest and "3.0 h old" in rest and f"rm {lock}" in rest


def test_live_lock_holder_is_waited_for(tmp_path):
    """A build in progress (a process has the lock open) is not killed, and the message names it."""
    build_dir = tmp_path / "test_op"
    build_dir.mkdir()
    fd = os.open(build_dir / "lock", os.O_CREAT | os.O_EXCL)  # what FileBaton.try_acquire does
    try:
        codes, out = watch(10, build_dir, until="still waiting", timeout_s=0.5, notice_after_s=0.2)
    finally:
        os.close(fd)
    assert codes == []
    assert f"pid {os.getpid()} (this process) holds the build lock {build_dir / 'lock'}" in out


def test_no_lock_keeps_waiting(tmp_path):
    codes, out = watch(10, tmp_path / "test_op", until="still waiting", timeout_s=0.5, notice_after_s=0.2)
    assert codes == [] and "there is no build lock" in out


def test_timeout_from_environment(monkeypatch):
    monkeypatch.setenv(startup.TIMEOUT_ENV, "12.5")
    assert startup.build_timeout_s() == 12.5
    monkeypatch.setenv(startup.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=startup.TIMEOUT_ENV):
        startup.build_timeout_s()


def test_build_dir_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert startup.extension_build_dir("deepspeed_shm_comm") == str(tmp_path / "deepspeed_shm_comm")


def test_pretrain_start_on_stale_lock_exits_with_the_fix(tmp_path):
    """The real start: DeepSpeed's CPU comm init waits on the lock; without the watchdog this hangs."""
    deepspeed = pytest.importorskip("deepspeed")
    if not deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm", False):
        pytest.skip("DeepSpeed does not build its shm comm op here (not Linux, or no compiler)")
    lock = stale_lock(tmp_path / "ext" / "deepspeed_shm_comm")
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_batch_size": 2, "zero_optimization": {"stage": 0}}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), **{startup.TIMEOUT_ENV: "5"})
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, PRETRAIN, "--resolution", "8", "--train-steps", "1", "--no-progress",
                          "--num-workers", "0", "--deepspeed_config", str(config), "--save", str(tmp_path / "run")],
                         cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == startup.STALE_LOCK_EXIT, out.stderr[-3000:]
    assert "waiting for DeepSpeed's CPU communication op (deepspeed_shm_comm)" in out.stderr
    assert str(lock) in out.stderr and f"Remove it: rm {lock}" in out.stderr
    assert lock.exists()  # never removed for the user: another build might own it
    print(f"gave up {time.monotonic() - t0:.1f} s after the start")

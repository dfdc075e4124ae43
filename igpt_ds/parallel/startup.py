"""Start-up waits that say what they wait for: a watchdog around DeepSpeed's JIT-built ops.

On a CPU, ``deepspeed.init_distributed`` builds (first start) or loads (later starts) the
``deepspeed_shm_comm`` op: ``deepspeed.comm.torch.build_shm_op`` -> ``ShareMemCommBuilder.load`` ->
``torch.utils.cpp_extension.load`` -> ``_jit_compile``, which takes a ``FileBaton`` on
``<build dir>/lock`` on *every* start, built or not. The build dir is ``$TORCH_EXTENSIONS_DIR/<op>``,
else ``~/.cache/torch_extensions/py<major><minor>_<cpu|cuXY|rocmXY>/<op>`` (torch's
``_get_build_directory``). A start killed while holding the baton leaves the lock behind, and every
later start polls it forever (``FileBaton.wait``: ``while exists: sleep(0.1)``), silently.

:func:`watch_extension_build` runs the block under a watchdog thread:

- after ``notice_after_s`` (5 s) local rank 0 prints one line saying what it is waiting for;
- after the timeout (``IGPT_DS_BUILD_TIMEOUT`` seconds, default 300; 0 = never give up), if the lock
  exists and no process on this machine has it open (``/proc/*/fd``; FileBaton keeps the fd open
  while it builds), the lock is stale: it prints an ``error:`` naming the lock file, its age and the
  fix (``rm <lock>``) and ends the process with exit code :data:`STALE_LOCK_EXIT` (``os._exit``: the
  main thread is in torch's sleep loop and cannot be interrupted from here);
- if a live process holds the lock (a slow build, e.g. another job on this machine), or there is
  no lock (the op is built; DeepSpeed waits for something else, e.g. the other local ranks'
  shared-memory set-up), it says so once and keeps waiting: killing a build that is making progress
  would only leave another stale lock.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Callable, Iterator, Optional

import torch

TIMEOUT_ENV = "IGPT_DS_BUILD_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
STALE_LOCK_EXIT = 3  # distinct from Python's 1 (traceback) and 2 (argparse), for scripts that retry
_POLL_S = 5.0  # how often the lock is re-checked after the timeout (scanning /proc costs a little)


def build_timeout_s(default: float = DEFAULT_TIMEOUT_S) -> float:
    """Seconds to wait on a build lock before giving up: ``$IGPT_DS_BUILD_TIMEOUT`` or ``default``."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"error: {TIMEOUT_ENV}={raw!r} is not a number of seconds "
                         f"(e.g. {TIMEOUT_ENV}=600; 0 waits forever)") from None


def extension_build_dir(name: str) -> str:
    """The directory torch's JIT ``load`` builds op ``name`` in (and puts its ``lock`` in)."""
    from torch.utils import cpp_extension

    # torch's own function is the truth (it also creates the directory, as load() does anyway);
    # the fallback mirrors it for torch versions where the private name has moved.
    get_dir = getattr(cpp_extension, "_get_build_directory", None)
    if get_dir is not None:
        try:
            return get_dir(name, False)
        except Exception:  # noqa: BLE001 - a diagnostic must not fail the start
            pass
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        if torch.version.hip is not None:
            accel = "rocm" + torch.version.hip.replace(".", "")
        elif torch.version.cuda is not None:
            accel = "cu" + torch.version.cuda.replace(".", "")
        else:
            accel = "cpu"
        tag = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accel}"
        root = os.path.join(cpp_extension.get_default_build_root(), tag)
    return os.path.join(root, name)


def lock_holders(path: str) -> Optional[list[int]]:
    """PIDs of this machine's processes that have ``path`` open; ``None`` where /proc cannot tell."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    target = os.path.realpath(path)
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or another user's process (their cache is not ours anyway)
            continue
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) == target:
                    holders.append(int(pid))
                    break
            except OSError:
                continue
    return holders


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
    except OSError:
        return "?"


class _Watchdog(threading.Thread):
    def __init__(self, what: str, op_name: str, timeout_s: float, notice_after_s: float,
                 build_dir: Optional[str], local_rank: int, stream, on_give_up: Callable[[int], None]):
        super().__init__(name=f"watch-{op_name}", daemon=True)
        self.what, self.op_name, self.timeout_s, self.notice_after_s = what, op_name, timeout_s, notice_after_s
        self.build_dir, self.local_rank, self.stream, self.on_give_up = build_dir, local_rank, stream, on_give_up
        self.done = threading.Event()
        self.gave_up = False

    def _say(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(text + "\n")
        stream.flush()

    def run(self) -> None:
        start = time.monotonic()
        notice = min(self.notice_after_s, self.timeout_s) if self.timeout_s > 0 else self.notice_after_s
        if self.done.wait(notice):
            return
        if self.local_rank == 0:
            limit = f"gives up after {self.timeout_s:g} s on a stale lock" if self.timeout_s > 0 else "no time limit"
            self._say(f"waiting for {self.what} ({self.op_name}): building or loading it, the first start on a "
                      f"machine takes about a minute ({limit}; {TIMEOUT_ENV} sets it)")
        if self.timeout_s <= 0:
            return
        # Ranks other than local rank 0 give up a little later, so that a launcher that kills the
        # whole job on the first non-zero exit does not kill rank 0 before it has printed the fix.
        deadline = start + self.timeout_s + (0 if self.local_rank == 0 else 5)
        said = None
        while not self.done.wait(max(0.0, deadline - time.monotonic())):
            try:
                state, text = self._check(time.monotonic() - start)
            except Exception as e:  # noqa: BLE001 - the diagnosis failed; the start itself may still finish
                self._say(f"warning: could not check the build lock of {self.op_name}: {e!r}")
                return
            if state == "stale":
                self.gave_up = True
                self._say(text)
                self.on_give_up(STALE_LOCK_EXIT)
                return
            if state != said and text:  # each state once, not every poll
                if self.local_rank == 0:
                    self._say(text)
                said = state
            deadline = time.monotonic() + _POLL_S

    def _check(self, waited: float) -> tuple[str, str]:
        build_dir = self.build_dir or extension_build_dir(self.op_name)
        lock = os.path.join(build_dir, "lock")
        try:
            age = time.time() - os.stat(lock).st_mtime
        except FileNotFoundError:
            return "no-lock", (f"still waiting for {self.what} after {waited:.0f} s; there is no build lock "
                               f"({lock}), so the op is built and DeepSpeed waits for something else "
                               f"(other ranks of this machine?); waiting on")
        holders = lock_holders(lock)
        if holders == []:
            # A builder releases by close() then remove(): in between, a live lock has no holder.
            # Look again a moment later before calling it stale.
            time.sleep(1.0)
            if not os.path.exists(lock) or self.done.is_set():
                return "no-lock", ""
            holders = lock_holders(lock)
        if holders:
            who = ", ".join(f"pid {p}" + (" (this process)" if p == os.getpid() else f" ({_cmdline(p)})")
                            for p in holders)
            return "held", (f"still waiting for {self.what} after {waited:.0f} s: {who} holds the build "
                            f"lock {lock} and is building it; waiting on")
        if self.local_rank != 0:
            return "stale", (f"error: local rank {self.local_rank} gave up waiting for the stale "
                             f"build lock {lock} (local rank 0 prints the fix)")
        nobody = ("no process on this machine has it open" if holders is not None
                  else "this system cannot tell whether a build has it open (ps aux | grep ninja)")
        return "stale", (
            f"error: gave up after {waited:.0f} s waiting for {self.what} ({self.op_name}): its build lock\n"
            f"  {lock}\n"
            f"  is {_age(age)} old and {nobody}: left by a start killed while building the op.\n"
            f"  No other build running? Remove it: rm {lock}\n"
            f"  (then start again; a build slower than {self.timeout_s:g} s needs {TIMEOUT_ENV}=<seconds>)")


@contextlib.contextmanager
def watch_extension_build(what: str, op_name: str, timeout_s: Optional[float] = None, notice_after_s: float = 5.0,
                          build_dir: Optional[str] = None, stream=None,
                          on_give_up: Callable[[int], None] = os._exit) -> Iterator[_Watchdog]:
    """Run the block (which JIT-builds or loads op ``op_name``) under a watchdog; see the module docstring.

    ``timeout_s`` defaults to ``$IGPT_DS_BUILD_TIMEOUT`` or 300 s (0: never give up). ``build_dir``
    defaults to torch's build directory of the op. ``stream`` (stderr) and ``on_give_up`` (called with
    the exit code; ``os._exit``) are for tests.
    """
    timeout_s = build_timeout_s() if timeout_s is None else timeout_s
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)

    def give_up(code: int) -> None:
        with contextlib.suppress(Exception):  # os._exit skips atexit: flush what the run printed so far
            sys.stdout.flush()
            sys.stderr.flush()
        on_give_up(code)

    dog = _Watchdog(what, op_name, timeout_s, notice_after_s, build_dir, local_rank, stream, give_up)
    dog.start()
    try:
        yield dog
    finally:
        dog.done.set()
        dog.join(timeout=1.0)

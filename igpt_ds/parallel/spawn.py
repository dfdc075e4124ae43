"""Run a function or a script as N real ranks on this machine (gloo), and collect the results.

Used by tools that must re-create a multi-rank layout on one host (checkpoint consolidation and
resharding) and, through :mod:`igpt_ds.testing`, by every multi-rank test.

    def body(rank, world, x):            # module-level: spawned children import it by name
        return some_result
    results = run_ranks(body, 2, x)      # [result of rank 0, result of rank 1]
"""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world, port, args, env, queue):
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    # Lazy: ``env`` (CUDA_VISIBLE_DEVICES, DS_ACCELERATOR, OMP_NUM_THREADS) must be set before torch loads.
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share few cores; oversubscription makes gloo crawl
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # report everything, including SystemExit from argparse
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            if "megatron.core" in sys.modules:  # importing megatron-core just to tear down costs seconds
                from igpt_ds.parallel import layout as parallel

                parallel.destroy()
            elif dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_ranks(fn: Callable[..., Any], world_size: int, *args, timeout: float = 300.0,
              env: Optional[dict] = None) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank.

    Raises RuntimeError with the failing rank's traceback, or on a hang after ``timeout`` s
    (all ranks are killed, so a deadlock fails the test instead of stalling CI).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    env = {k: str(v) for k, v in (env or {}).items()}
    # Not daemonic: a rank may start DataLoader workers. Every rank is killed below on failure or timeout.
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, env, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            break
        if queue.empty():
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.05)
            continue
        rank, ok, payload = queue.get()
        if ok:
            results[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
            break  # the other ranks are likely blocked in a collective with the dead one
    for p in procs:
        p.join(timeout=5 if not errors else 0.5)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    missing = sorted(set(range(world_size)) - set(results))
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        raise RuntimeError(f"ranks {missing} of {world_size} returned nothing within {timeout:.0f}s "
                           f"(exit codes {codes}): hang or crash")
    return [results[r] for r in range(world_size)]


def launch(argv: Sequence[str], nprocs: int, timeout: float = 600.0, env: Optional[dict] = None,
           cwd: Optional[str] = None) -> list[subprocess.CompletedProcess]:
    """Run ``python argv...`` as ``nprocs`` ranks with launcher env vars (as torchrun sets them).

    Returns each rank's CompletedProcess (stdout/stderr captured as text). Kills every rank on
    timeout and raises, so a hung collective cannot stall the test suite.
    """
    port = free_port()
    procs, logs = [], []
    for rank in range(nprocs):
        penv = dict(os.environ)
        penv.update({k: str(v) for k, v in (env or {}).items()})
        penv.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nprocs),
                    LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nprocs), OMP_NUM_THREADS="1")
        # Files, not pipes: a rank blocked on a full pipe would stall the others in a collective.
        out_f, err_f = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        logs.append((out_f, err_f))
        procs.append(subprocess.Popen([sys.executable, *argv], env=penv, cwd=cwd, text=True,
                                      stdout=out_f, stderr=err_f))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as e:
        for p in procs:
            p.kill()
            p.wait()
        tails = []
        for rank, (_out_f, err_f) in enumerate(logs):
            err_f.seek(0)
            tails.append(f"--- rank {rank} stderr tail ---\n{err_f.read()[-3000:]}")
        raise RuntimeError(f"{argv} on {nprocs} ranks did not finish within {timeout:.0f}s\n"
                           + "\n".join(tails)) from e
    results = []
    for p, (out_f, err_f) in zip(procs, logs):
        out_f.seek(0)
        err_f.seek(0)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out_f.read(), err_f.read()))
        out_f.close()
        err_f.close()
    return results

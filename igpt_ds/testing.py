"""Multi-rank test harness: real processes on gloo, results returned to the caller.

Every multi-rank test uses :func:`run_ranks` (a Python function on N spawned ranks; the failing
rank's traceback is raised, a hang is killed after ``timeout``) or :func:`launch` (a script under
torchrun-style environment variables). The implementation is :mod:`igpt_ds.parallel.spawn`, which tools
use too.
"""
from igpt_ds.parallel.spawn import free_port, launch, run_ranks

__all__ = ["free_port", "launch", "run_ranks"]

"""The only code that knows about ranks and processes: the DP x TP x PP layout and its process groups,
full <-> sharded weights, job signals, the DeepSpeed start-up watchdog, and spawning real ranks on one host.

``igpt_ds.parallel.ParallelLayout`` / ``ParallelState`` are loaded on first use: the entry points import
:mod:`igpt_ds.parallel.signals` before torch, and this package must not pull torch in with it.
"""
__all__ = ["ParallelLayout", "ParallelState"]


def __getattr__(name):
    if name in __all__:
        from igpt_ds.parallel import layout

        return getattr(layout, name)
    raise AttributeError(f"module 'igpt_ds.parallel' has no attribute {name!r}")

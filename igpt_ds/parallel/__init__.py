"""The only code that knows about ranks: the DP x TP x PP layout and its process groups, full <->
sharded weights, and spawning real ranks on one host."""
from igpt_ds.parallel.layout import ParallelLayout, ParallelState

__all__ = ["ParallelLayout", "ParallelState"]

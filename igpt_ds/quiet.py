"""The one place where third-party warnings a user cannot act on are silenced, at start-up.

    from igpt_ds import quiet
    quiet.install(sys.argv)        # first thing in every command, before torch is imported

Each entry of :data:`NOISE` is a warning category and the start of its message, said by a package
we depend on about itself. Everything else still shows. ``--verbose`` anywhere on the command line
(or ``IGPT_DS_VERBOSE=1`` in the environment) shows everything. The filter also goes into
``PYTHONWARNINGS``, so the processes a command starts (ranks, loader workers, the quickstart's
steps) filter the same; ``--verbose`` goes into ``IGPT_DS_VERBOSE`` for them likewise.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Sequence

NOISE: list[tuple[type[Warning], str]] = [
    # torch.cuda imports pynvml, whose package was renamed nvidia-ml-py; installing either is fine
    (FutureWarning, "The pynvml package is deprecated"),
    # megatron-core says it falls back to its own kernels when NVIDIA's optional libraries are absent
    (UserWarning, "Transformer Engine and Apex are not installed"),
    # torch 2.13 deprecates collectives DeepSpeed calls (all_gather_into_tensor, reduce_scatter_tensor, ...)
    (FutureWarning, "`torch.distributed."),
]
VERBOSE_FLAG, VERBOSE_ENV = "--verbose", "IGPT_DS_VERBOSE"
HELP = "show every warning, also the third-party notices filtered by default (igpt_ds/quiet.py)"


def verbose(argv: Sequence[str] = ()) -> bool:
    return VERBOSE_FLAG in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def install(argv: Sequence[str] = ()) -> bool:
    """Silence :data:`NOISE` here and in child processes unless verbose; returns whether it did."""
    if verbose(argv):
        os.environ[VERBOSE_ENV] = "1"
        return False
    for category, message in NOISE:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    ours = [f"ignore:{message}:{category.__name__}" for category, message in NOISE]
    existing = [e for e in os.environ.get("PYTHONWARNINGS", "").split(",") if e and e not in ours]
    os.environ["PYTHONWARNINGS"] = ",".join(existing + ours)
    return True

"""The third-party warning filter (igpt_ds/quiet.py): filtered notices stay quiet, every other warning
shows, --verbose (or IGPT_DS_VERBOSE=1) shows all, and child processes inherit the choice."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYNVML = "The pynvml package is deprecated"


def run(code: str, *argv: str, env: dict = None) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "IGPT_DS_VERBOSE")}
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
                         cwd=str(ROOT), env={**clean, "PYTHONPATH": str(ROOT), **(env or {})})
    assert out.returncode == 0, out.stderr
    return out.stderr


PLANTED = """
import sys, warnings
from igpt_ds import quiet
quiet.install(sys.argv[1:])
# as third-party code would say them (module and file are theirs, not ours)
warnings.warn_explicit("Transformer Engine and Apex are not installed. Falling back to local implementations",
                       UserWarning, "megatron/core/fsdp.py", 114, module="megatron.core")
warnings.warn_explicit("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning,
                       "torch/distributed/c10d_logger.py", 83, module="torch.distributed")
warnings.warn_explicit("a warning worth reading", UserWarning, "deepspeed/runtime/engine.py", 1, module="deepspeed")
import subprocess
subprocess.run([sys.executable, "-c", "import warnings; warnings.warn('Transformer Engine and Apex are not "
                "installed (child)', UserWarning); warnings.warn('child warning worth reading')"], check=True)
"""


def test_filtered_notices_are_quiet_and_others_show():
    err = run(PLANTED)
    assert "a warning worth reading" in err and "child warning worth reading" in err
    assert "Transformer Engine" not in err and "torch.distributed.all_gather_into_tensor" not in err


@pytest.mark.parametrize("how", ["flag", "env"])
def test_verbose_shows_everything_here_and_in_children(how):
    err = run(PLANTED, "--verbose") if how == "flag" else run(PLANTED, env={"IGPT_DS_VERBOSE": "1"})
    for message in ("Transformer Engine and Apex are not installed. Falling back",
                    "torch.distributed.all_gather_into_tensor", "a warning worth reading",
                    "Transformer Engine and Apex are not installed (child)", "child warning worth reading"):
        assert message in err, message


def test_a_real_command_drops_the_pynvml_notice_unless_verbose():
    if PYNVML not in run("import torch"):
        pytest.skip("this environment's torch says nothing about pynvml")
    tool = [str(ROOT / "tools" / "plan.py"), "--model", "igpt-tiny", "--micro-batch", "2", "--gpus", "1",
            "--gpu-memory", "80"]
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "IGPT_DS_VERBOSE")}
    quiet = subprocess.run([sys.executable, *tool], capture_output=True, text=True, timeout=300, env=clean)
    loud = subprocess.run([sys.executable, *tool, "--verbose"], capture_output=True, text=True, timeout=300, env=clean)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert PYNVML not in quiet.stderr and PYNVML in loud.stderr

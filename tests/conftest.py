"""Shared test setup: import the package from this checkout, quiet third-party noise, CPU only."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Spawned ranks inherit the environment: make them find the package too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch CPU thread for a test module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    tiny matmuls and one-position forwards on a shared 2-core machine are many times slower with
    torch's thread pool (contention), and nothing those tests check depends on the thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Fine-tuning's --init on several ranks: rank 0 reads the checkpoint, tensor by tensor, and broadcasts
each tensor; every rank keeps its TP shard / ZeRO partition (ZeRO-3: gathered one module at a time).

Measured on real gloo ranks with the trainer's own code (ClassifyTask._read_init and build_model):
the weights equal the single-process load bit for bit, and each rank's peak resident memory during
the load (VmHWM, reset just before it) grows far less than the model's size.
"""
import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from igpt_ds.testing import run_ranks

MIB = 2 ** 20


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A 6-layer, 512-wide iGPT (19M parameters, 76 MB fp32) as a consolidated export, and an HF copy."""
    from igpt_ds.checkpoint.consolidated import save_consolidated
    from igpt_ds.checkpoint.hf import save_hf
    from igpt_ds.config import get_preset
    from igpt_ds.model.transformer import IGPTModel

    root = tmp_path_factory.mktemp("init")
    torch.set_num_threads(1)
    cfg = get_preset("igpt-tiny", resolution=8, n_layer=6, d_model=512, n_head=8)
    sd = IGPTModel(cfg, seed=0).state_dict()
    palette = np.random.default_rng(1).uniform(-1, 1, (512, 3)).astype(np.float32)
    save_consolidated(root / "export", cfg, sd, palette=palette)
    hf_cfg = cfg.replace(norm="rmsnorm", activation="quick_gelu", bias=False)
    save_hf(root / "hf", hf_cfg, IGPTModel(hf_cfg, seed=1).state_dict(), palette=palette)
    return root


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _init_rank(rank, world, init, ds_file, tp):
    """Build the fine-tuning model as the trainer does and load --init; (load's RSS growth, digests)."""
    from igpt_ds.parallel import layout as parallel
    from igpt_ds.parallel.weights import gather_full
    from igpt_ds.train import classify_task
    from igpt_ds.train.engine import load_ds_config
    from igpt_ds.train.metrics import peak_rss_bytes

    layout = parallel.ParallelLayout(world, tp)
    args = SimpleNamespace(init=init, load=None, train_data="unused", seed=0, gen_weight=1.0,
                           activation_checkpointing=False)
    task = classify_task.ClassifyTask(args)
    loop = SimpleNamespace(is_rank0=rank == 0, pipelined=False, device=torch.device("cpu"))
    cfg, task.init_weights, _, _ = task._read_init(loop, init)
    task.cfg, task.num_classes = cfg, 4
    loop.state = parallel.initialize(tp, 1, layout=layout)
    parallel.init_deepspeed_comm()
    loop.layout, loop.ds = loop.state.layout, load_ds_config(ds_file, layout.data_parallel)

    measured = {}
    real_load_full = classify_task.load_full

    def load_full(*a, **kw):  # the load alone: the model's own parameters exist already
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS now
        before = _vm("VmRSS")
        real_load_full(*a, **kw)
        measured["growth"] = peak_rss_bytes() - before

    classify_task.load_full = load_full
    module = task.build_model(loop)
    full = gather_full(module, loop.state.tp_group, tp)
    size = sum(t.numel() * t.element_size() for t in full.values())
    return measured["growth"], size, {k: _digest(v) for k, v in full.items()}


def _ds_config(path, stage):
    path.write_text(json.dumps({"train_batch_size": 4, "zero_optimization": {"stage": stage}}))
    return str(path)


def _file_digests(path):
    from safetensors.torch import load_file

    return {k: _digest(v) for k, v in load_file(str(path)).items()}


ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def live_memory_rss(monkeypatch):
    """Ranks whose RSS follows their live memory: glibc's dynamic mmap threshold otherwise keeps freed
    multi-MiB buffers in the heap, where ZeRO-3's gather/release pattern fragments it (measured: ~60
    MiB of RSS with 37 MiB of live tensors). Set here, before the ranks start: glibc reads it at exec."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(2 ** 16))
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")


@pytest.mark.parametrize("stage, tp", [(0, 1), (3, 1), (1, 2)], ids=["zero0", "zero3", "tp2"])
def test_init_on_two_ranks_matches_one_process_and_no_rank_holds_the_model(export, tmp_path, stage, tp):
    init, ds_file = str(export / "export"), _ds_config(tmp_path / "ds.json", stage)
    (ref_growth, size, reference), = run_ranks(_init_rank, 1, init, _ds_config(tmp_path / "ds1.json", 0), 1,
                                               timeout=300, env=ENV)
    on_file = _file_digests(export / "export" / "model.safetensors")
    assert {k: v for k, v in reference.items() if not k.startswith("clf.")} == on_file
    results = run_ranks(_init_rank, 2, init, ds_file, tp, timeout=300, env=ENV)
    for rank, (growth, got_size, digests) in enumerate(results):
        assert got_size == size and digests == reference, f"rank {rank}: weights differ from one process"
        print(f"ZeRO-{stage} TP {tp} rank {rank}: model {size / MIB:.1f} MiB, load's peak RSS growth "
              f"{growth / MIB:.1f} MiB (one process: {ref_growth / MIB:.1f} MiB)")
        # One full tensor (the largest is 4 MiB) and its shard, or one module gathered under ZeRO-3.
        assert growth < 0.2 * size, f"rank {rank}: the load grew RSS by {growth / MIB:.1f} MiB of {size / MIB:.1f}"


def test_hf_init_on_two_ranks_matches_one_process(export, tmp_path):
    init = str(export / "hf")
    (_, _, reference), = run_ranks(_init_rank, 1, init, _ds_config(tmp_path / "ds1.json", 0), 1, timeout=300, env=ENV)
    results = run_ranks(_init_rank, 2, init, _ds_config(tmp_path / "ds.json", 3), 1, timeout=300, env=ENV)
    assert all(digests == reference for _, _, digests in results)
    from igpt_ds.checkpoint.hf import load_hf

    _, sd, _, _ = load_hf(init)  # the eager reader agrees with the lazy one
    assert {k: _digest(v) for k, v in sd.items()} == {k: v for k, v in reference.items() if not k.startswith("clf.")}


def test_deepspeed_init_on_two_ranks_reads_on_rank_0_only(export, tmp_path):
    """A DeepSpeed checkpoint (here TP 2, written from the export) as --init: rank 0 assembles each
    full tensor from the files, and both ranks get exactly the export's weights (the head: zeros)."""
    from igpt_ds.checkpoint.consolidated import load_consolidated
    from igpt_ds.checkpoint.formats import write_checkpoint

    cfg, sd, palette, _ = load_consolidated(export / "export")
    write_checkpoint(tmp_path / "ds_run", "deepspeed", cfg, sd, palette=palette, tensor_parallel=2, data_parallel=1)
    results = run_ranks(_init_rank, 2, str(tmp_path / "ds_run"), _ds_config(tmp_path / "ds.json", 0), 1,
                        timeout=300, env=ENV)
    expected = {**_file_digests(export / "export" / "model.safetensors"),
                "clf.weight": _digest(torch.zeros(4, cfg.d_model)), "clf.bias": _digest(torch.zeros(4))}
    for rank, (growth, size, digests) in enumerate(results):
        assert digests == expected, f"rank {rank}"
        if rank:
            assert growth < 0.2 * size, f"rank {rank}: the load grew RSS by {growth / MIB:.1f} MiB of {size / MIB:.1f}"

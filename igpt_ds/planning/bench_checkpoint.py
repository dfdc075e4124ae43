"""Measurements behind ``tools/benchmark.py checkpoint``: exporting a DeepSpeed checkpoint, new path vs old.

The checkpoint is written the way the training loop writes one (``write_checkpoint`` after a real
optimizer step, so Adam's moments are in the files) at DP ``world`` under the given ZeRO stage, on
CPU ranks. Then, each in a fresh process:

- new: ``tools/convert_checkpoint.py CKPT OUT --to consolidated`` (one process, the file reader);
  its own report of time and peak RSS is parsed;
- old: :func:`igpt_ds.checkpoint.engine_reader.read_with_engines` (``world`` engine ranks, what the
  converter did before) plus writing the same export; time and the sum of the ranks' peak RSS.

The projection for a larger model and world uses what each path holds by construction: the old
path at least a full fp32 model in every rank (``gather_full``), a lower bound (the measured ranks
hold more: their engine, their ZeRO share, the loaded files); the new path its process's own
memory plus 3x the largest fp32 parameter.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from igpt_ds.config import ModelConfig, get_preset

REPO = Path(__file__).resolve().parents[2]


def _write_rank(rank, world, cfg_dict, ds_file, out):
    from igpt_ds.checkpoint.run import checkpoint_meta, write_checkpoint
    from igpt_ds.model.losses import compute_loss
    from igpt_ds.parallel import layout as parallel
    from igpt_ds.train.engine import WarmupCosine, build_engine, build_model, load_ds_config

    cfg = ModelConfig.from_dict(cfg_dict)
    state = parallel.initialize(1, 1, model=cfg, backend="gloo")
    parallel.init_deepspeed_comm()
    ds = load_ds_config(ds_file, world)
    engine, _ = build_engine(build_model(cfg, state, ds, seed=0), state, ds, lr=1e-4, schedule=WarmupCosine(0, 1))
    tokens = torch.randint(0, cfg.vocab_size, (ds.micro_batch_size, cfg.seq_len),
                           generator=torch.Generator().manual_seed(rank))
    engine.backward(compute_loss(engine, tokens).loss)
    engine.step()
    write_checkpoint(engine, out, 1, checkpoint_meta(cfg, ds, state.layout, None), {"rng": None, "loader": None})
    return 0


def write_benchmark_checkpoint(preset: str, resolution: int, world: int, zero_stage: int, out: Path) -> ModelConfig:
    from igpt_ds.parallel.spawn import run_ranks

    cfg = get_preset(preset, resolution=resolution)
    out.mkdir(parents=True, exist_ok=True)
    ds_file = out.parent / f"{out.name}-ds.json"
    zero = {"stage": zero_stage, "reduce_bucket_size": 10**7, "allgather_bucket_size": 10**7}
    if zero_stage == 3:  # small live/prefetch buffers: two ranks of igpt-m must fit a 24 GB host
        zero.update(stage3_max_live_parameters=10**7, stage3_prefetch_bucket_size=10**7)
    ds_file.write_text(json.dumps({"train_batch_size": world, "zero_optimization": zero}))
    run_ranks(_write_rank, world, cfg.to_dict(), str(ds_file), str(out), timeout=3600,
              env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    return cfg


def measure_new(ckpt: Path, out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), str(ckpt), str(out), "--to", "consolidated"]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    wall = time.monotonic() - started
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    m = re.search(r"time ([\d.]+) s; peak RSS (\d+) MB \(([+-]\d+) MB over the (\d+) MB", done.stdout)
    return {"wall_s": wall, "convert_s": float(m.group(1)), "peak_rss_mb": int(m.group(2)),
            "over_baseline_mb": int(m.group(3)), "baseline_mb": int(m.group(4))}


_OLD = """
import json, sys, time
from igpt_ds.checkpoint.engine_reader import read_with_engines
from igpt_ds.checkpoint.consolidated import save_consolidated
from igpt_ds.checkpoint.deepspeed_files import locate
from igpt_ds.config import ModelConfig
from igpt_ds.train.metrics import peak_rss_bytes
if __name__ == "__main__":
    started, stats = time.monotonic(), {}
    sd = read_with_engines(sys.argv[1], ("module",), stats)["module"]
    save_consolidated(sys.argv[2], ModelConfig.from_dict(locate(sys.argv[1])[2]["model"]), sd)
    print(json.dumps({"convert_s": time.monotonic() - started, "rank_peak_rss_mb": stats["rank_peak_rss_mb"],
                      "parent_peak_rss_mb": peak_rss_bytes() / 2**20}))
"""


def measure_old(ckpt: Path, out: Path) -> dict:
    script = out.parent / "old_path.py"
    script.write_text(_OLD)
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script), str(ckpt), str(out)], capture_output=True, text=True,
                          env=dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO)), cwd=str(REPO))
    wall = time.monotonic() - started
    if done.returncode:
        raise RuntimeError(f"the old path failed:\n{done.stderr[-3000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    r["wall_s"] = wall
    r["host_peak_rss_mb"] = sum(r["rank_peak_rss_mb"]) + r["parent_peak_rss_mb"]  # the ranks run at the same time
    return r


def largest_param(cfg: ModelConfig) -> int:
    from igpt_ds.checkpoint.formats import expected_shapes

    return max(int(torch.Size(s).numel()) for s in expected_shapes(cfg).values())


def project(cfg: ModelConfig, world: int, process_base_mb: float) -> dict:
    """Projected host RAM (GB) of exporting ``cfg`` from a ``world``-rank checkpoint: the old path's
    lower bound (a full fp32 model per rank) and the new path's bound."""
    old = world * 4 * cfg.num_parameters()
    new = process_base_mb * 2**20 + 3 * 4 * largest_param(cfg)
    return {"old_gb": old / 1e9, "new_gb": new / 1e9}


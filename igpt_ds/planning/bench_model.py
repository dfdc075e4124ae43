"""Measurements behind ``tools/benchmark.py model``: train-step throughput, TFLOP/s, MFU, memory.

Ours is the real thing users run: :class:`igpt_ds.train.loop.Trainer` (DeepSpeed engine, the given
DeepSpeed config and layout) on synthetic token images, timed per optimizer step by the trainer
itself; the first ``warmup`` steps are dropped and the median of the rest is reported.
The reference is Hugging Face's ``ImageGPTForCausalImageModeling`` of the same size (same
layers, width, heads, sequence length, batch, dtype, thread count), trained with the same Adam on
the same batches in the same process. With ``compile=True`` the trainer runs with ``--compile``
(:mod:`igpt_ds.model.compile`); its first step, which compiles, is reported apart as ``first_step_s``.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from typing import Optional

import torch

from igpt_ds.config import ModelConfig
from igpt_ds.data.synthetic import synthetic_sample
from igpt_ds.train.args import PretrainArgs
from igpt_ds.train.loop import Trainer
from igpt_ds.train.metrics import read_metrics
from igpt_ds.train.pretrain_task import PretrainTask


def ours(model: str, resolution: int, ds_config: str, steps: int, warmup: int, tensor_parallel: int = 1,
         pipeline_parallel: int = 1, activation_checkpointing: bool = False, peak_tflops: Optional[float] = None,
         seed: int = 0, compile: bool = False) -> dict:
    """Median per-step metrics of ``steps`` timed training steps after ``warmup`` untimed ones."""
    with tempfile.TemporaryDirectory(prefix="igpt-bench-") as tmp:
        args = PretrainArgs(model=model, resolution=resolution, activation_checkpointing=activation_checkpointing,
                         deepspeed_config=ds_config, tensor_parallel=tensor_parallel,
                         pipeline_parallel=pipeline_parallel, train_steps=warmup + steps, warmup_steps=0,
                         save=tmp, save_interval=0, seed=seed, peak_tflops=peak_tflops, progress=False,
                         num_workers=0, compile=compile)
        trainer = Trainer(args, PretrainTask(args))
        trainer.args.save = None  # metrics only: no checkpoint at the end
        trainer.train()
        records = read_metrics(f"{tmp}/metrics.jsonl") if trainer.is_rank0 else []
    timed = records[warmup:]
    out = {"config": trainer.cfg, "ds": trainer.ds, "layout": trainer.layout, "steps": len(timed),
           "is_rank0": trainer.is_rank0, "first_step_s": records[0]["step_time_s"] if records else None,
           "graph_breaks": records[-1].get("graph_breaks") if records else None}
    for key in ("step_time_s", "tokens_per_s", "samples_per_s", "tflops", "mfu", "peak_mem_gb", "data_wait_pct"):
        values = [r[key] for r in timed if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def hugging_face(cfg: ModelConfig, batch_size: int, steps: int, warmup: int, lr: float = 1e-3,
                 seed: int = 0) -> dict:
    """Median step time of HF ImageGPT of the same size, fp32, on the same synthetic batches."""
    # Lazy: transformers takes seconds to import and only the reference run needs it.
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    hf_cfg = ImageGPTConfig(vocab_size=cfg.vocab_size + 1, n_positions=cfg.seq_len, n_embd=cfg.d_model,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="quick_gelu",
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = ImageGPTForCausalImageModeling(hf_cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.95))
    sos = torch.full((batch_size, 1), cfg.vocab_size)
    times = []
    for step in range(warmup + steps):
        idx = range(step * batch_size, (step + 1) * batch_size)
        tokens = torch.stack([synthetic_sample(seed, i, cfg.resolution) for i in idx])
        t0 = time.perf_counter()
        # HF's input carries SOS in front and the model shifts labels itself: T positions, like ours.
        inputs = torch.cat([sos, tokens[:, :-1]], dim=1)
        out = model(input_ids=inputs, labels=inputs)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step_time = statistics.median(times[warmup:])
    return {"step_time_s": step_time, "tokens_per_s": batch_size * cfg.seq_len / step_time,
            "parameters": sum(p.numel() for p in model.parameters())}

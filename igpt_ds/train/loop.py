"""The pretraining loop on DeepSpeed: DP (ZeRO-0..3) x TP (megatron-core) x PP (DeepSpeed pipe).

Components, each built once in :meth:`Trainer.__init__`: parallel groups, the DeepSpeed config,
data loaders (sharded by DP rank), the model (under ``zero.Init`` for ZeRO-3, a PipelineModule
for PP > 1), Adam + warm-up/cosine, and the DeepSpeed engine. :meth:`Trainer.train` runs steps,
validation, metrics and checkpoints.

Checkpoints: ``SAVE/global_stepN/`` holds DeepSpeed's model/optimizer/schedule files, one
``trainer_state_rankR.pt`` per rank (data position, RNG states) and ``igpt_meta.json`` (model
config, objective, palette hash, layout). ``SAVE/latest`` names the newest tag and is replaced
atomically only after every rank finished writing, so a crash mid-save leaves the previous
checkpoint as the one that loads.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from igpt_ds.parallel import layout as parallel
from igpt_ds.config import ModelConfig, get_preset
from igpt_ds.train.ds_config import DSSettings, load_ds_config
from igpt_ds.train.metrics import GPUMonitor, MetricsWriter, peak_flops, peak_memory_bytes
from igpt_ds.model.losses import bert_mask, bits_per_dim, compute_loss
from igpt_ds.train.schedule import WarmupCosine

META_FILE = "igpt_meta.json"


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class TrainArgs:
    """What a run needs besides the DeepSpeed config (see ``igpt_ds/pretrain.py --help``)."""

    model: str = "igpt-tiny"
    objective: str = "ar"
    resolution: Optional[int] = None
    activation_checkpointing: bool = False
    train_data: tuple = ("synthetic",)
    val_data: Optional[tuple] = None
    palette: Optional[str] = None
    deepspeed_config: str = "ds_configs/zero0_fp32.json"
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    train_steps: Optional[int] = None
    train_epochs: Optional[float] = None
    warmup_steps: Optional[int] = None
    warmup_epochs: float = 1.0
    lr: float = 3e-3
    min_lr_ratio: float = 0.0
    no_decay: bool = False
    adam_eps: float = 1e-8
    save: Optional[str] = None
    save_interval: int = 0
    load: Optional[str] = None
    seed: int = 0
    eval_interval: int = 0
    eval_batches: Optional[int] = None
    log_interval: int = 1
    num_workers: int = 2
    shuffle_buffer: int = 2000
    peak_tflops: Optional[float] = None
    max_minutes: Optional[float] = None
    progress: bool = True


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_checkpoint_meta(directory: str) -> tuple[str, dict]:
    """(tag, meta) of the latest complete checkpoint in ``directory``, with clear errors."""
    latest = Path(directory) / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"--load {directory}: no checkpoint there (expected {latest}, written by a run "
                                f"with --save {directory})")
    tag = latest.read_text().strip()
    meta_file = Path(directory) / tag / META_FILE
    try:
        return tag, json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{meta_file}: missing; {directory}/{tag} is not an iGPT-DS checkpoint") from None


def check_compatible(meta: dict, cfg: ModelConfig, source: str) -> None:
    """Refuse to resume a checkpoint of another architecture or objective."""
    saved = ModelConfig.from_dict(meta["model"], source=source)
    ignore = {"activation_checkpointing", "name"}
    diffs = {k: (getattr(saved, k), getattr(cfg, k)) for k in cfg.to_dict()
             if k not in ignore and getattr(saved, k) != getattr(cfg, k)}
    if diffs:
        listed = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(f"{source}: checkpoint does not match this run's model ({listed}); "
                         f"use the same --model/--objective/--resolution as the run that wrote it")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_model(cfg: ModelConfig, state: parallel.ParallelState, ds: DSSettings, seed: int,
                model_cls=None, pipeline_options: Optional[dict] = None):
    """The model for this rank: a PipelineModule stage for PP > 1, else IGPTModel (under zero.Init for ZeRO-3).

    Per-layer seeds make the weights independent of the layout (see ``IGPTModel(seed=...)``).
    Variants (fine-tuning) pass ``model_cls`` (called as ``model_cls(cfg, tp_group, seed=seed)``) and
    ``pipeline_options`` (extra keyword arguments of ``build_pipeline_module``).
    """
    import deepspeed

    torch.manual_seed(seed)
    layout = state.layout
    if layout.pipeline_parallel > 1:
        from igpt_ds.model.pipeline import build_pipeline_module

        return build_pipeline_module(cfg, state.tp_group, layout.pipeline_parallel, layout.tensor_parallel,
                                     layout.data_parallel, seed=seed, **(pipeline_options or {}))
    from igpt_ds.model.transformer import IGPTModel

    init = deepspeed.zero.Init(data_parallel_group=state.dp_group, config_dict_or_path=ds.config,
                               mpu=parallel.DeepSpeedMPU(state)) if ds.zero_stage == 3 else contextlib.nullcontext()
    with init:
        return (model_cls or IGPTModel)(cfg, state.tp_group, seed=seed)


def build_engine(module, state: parallel.ParallelState, ds: DSSettings, lr: float, schedule: WarmupCosine,
                 adam_eps: float = 1e-8):
    """Adam (betas 0.9, 0.95, no weight decay, as the paper) + LambdaLR(schedule) inside a DeepSpeed engine."""
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.95), eps=adam_eps, weight_decay=0.0,
                                 fused=torch.cuda.is_available() or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds.config,
        mpu=None if state.layout.pipeline_parallel > 1 else parallel.DeepSpeedMPU(state))
    return engine, scheduler


def write_checkpoint(engine, directory: str, step: int, meta: dict, rank_state: dict) -> Path:
    """Collective: DeepSpeed's files + this rank's state + (rank 0) ``igpt_meta.json``, then ``latest``.

    ``latest`` is replaced atomically after a barrier, i.e. only once every rank has finished.
    """
    directory = Path(directory)
    rank = dist.get_rank()
    tag = f"global_step{step}"
    tag_dir = directory / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    tmp = tag_dir / f".trainer_state_rank{rank:05d}.pt.tmp"
    torch.save({"step": step, **rank_state}, tmp)
    os.replace(tmp, tag_dir / f"trainer_state_rank{rank:05d}.pt")
    engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step, "model": meta["model"]},
                           save_latest=False)
    dist.barrier()
    if rank == 0:
        _atomic_write(tag_dir / META_FILE, json.dumps({**meta, "step": step}, indent=2, sort_keys=True) + "\n")
        _atomic_write(directory / "latest", tag)  # only now does this checkpoint become the one to load
    dist.barrier()
    return tag_dir


def checkpoint_meta(cfg: ModelConfig, ds: DSSettings, layout: parallel.ParallelLayout,
                    palette_sha256: Optional[str], **extra) -> dict:
    """What ``igpt_meta.json`` records: enough to rebuild the engine that wrote the checkpoint."""
    return {"model": cfg.to_dict(), "objective": cfg.objective, "palette_sha256": palette_sha256,
            "zero_stage": ds.zero_stage, "precision": ds.precision, "world_size": layout.world_size,
            "tensor_parallel": layout.tensor_parallel, "pipeline_parallel": layout.pipeline_parallel,
            "data_parallel": layout.data_parallel, "train_batch_size": ds.train_batch_size,
            "ds_config": ds.config, **extra}


def set_schedule_step(scheduler, step: int) -> None:
    """Put a LambdaLR at ``step`` without replaying it (for checkpoints that carry no schedule state)."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


class Trainer:
    def __init__(self, args: TrainArgs):
        self.args = args
        overrides = {"objective": args.objective, "activation_checkpointing": args.activation_checkpointing}
        if args.resolution:
            overrides["resolution"] = args.resolution
        self.cfg = cfg = get_preset(args.model, **overrides)

        # 1. Layout and config checks, before any group, model or data is built.
        parallel.init_distributed()
        world = dist.get_world_size()
        layout = parallel.ParallelLayout(world, args.tensor_parallel, args.pipeline_parallel).validate(cfg)
        self.ds: DSSettings = load_ds_config(args.deepspeed_config, layout.data_parallel, args.pipeline_parallel)
        layout.validate(cfg, self.ds.zero_stage)
        if args.load:
            tag, meta = read_checkpoint_meta(args.load)
            check_compatible(meta, cfg, f"{args.load}/{tag}/{META_FILE}")
        self.state = parallel.initialize(args.tensor_parallel, args.pipeline_parallel, model=cfg,
                                         zero_stage=self.ds.zero_stage)
        parallel.init_deepspeed_comm()
        self.rank, self.layout = dist.get_rank(), self.state.layout
        self.is_rank0 = self.rank == 0
        self.pipelined = args.pipeline_parallel > 1
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")

        # 2. Data. Middle pipeline stages read none; the first and last stages read the same batches.
        stage = self.state.pp_rank
        self.reads_data = not self.pipelined or stage in (0, args.pipeline_parallel - 1)
        self.train_loader = self._loader(args.train_data, train=True) if self.reads_data else None
        self.palette_sha256 = getattr(self.train_loader, "palette_sha256", None)
        if args.val_data and self.reads_data:
            self._loader(args.val_data, train=False)  # fail now, not at the first evaluation
        self.total_steps, self.warmup_steps = self._schedule_lengths()

        # 3. Model, optimizer, schedule, engine.
        module = build_model(cfg, self.state, self.ds, args.seed)
        if not self.pipelined:
            module.check_inputs = args.train_data == ("synthetic",)  # the shard loader validates tokens
        schedule = WarmupCosine(self.warmup_steps, self.total_steps, args.min_lr_ratio, not args.no_decay)
        self.engine, self.scheduler = build_engine(module, self.state, self.ds, args.lr, schedule, args.adam_eps)
        if self.is_rank0 and args.save and args.palette:
            Path(args.save).mkdir(parents=True, exist_ok=True)  # exports then carry the palette
            shutil.copyfile(args.palette, Path(args.save) / "palette.npy")
        self.step = 0
        self.stop_signal = None
        self.metrics = MetricsWriter(args.save, enabled=self.is_rank0)
        self.gpu = GPUMonitor()
        self.peak = peak_flops(self.ds.precision, args.peak_tflops)
        if args.load:
            self.load(args.load)

    # ---- data -------------------------------------------------------------------------------
    def _loader(self, source: tuple, train: bool):
        args, micro = self.args, self.ds.micro_batch_size
        if tuple(source) == ("synthetic",):
            from igpt_ds.data.synthetic import SyntheticLoader

            return SyntheticLoader(batch_size=micro, dp_rank=self.state.dp_rank,
                                   dp_world_size=self.layout.data_parallel, resolution=self.cfg.resolution,
                                   seed=args.seed + (0 if train else 10 ** 6))
        from igpt_ds.data.tokens import build_loader

        expected = None
        if args.palette:
            from igpt_ds.palette import load_palette, palette_sha256

            expected = palette_sha256(load_palette(args.palette))
        elif not train:
            expected = self.palette_sha256  # validation shards must share the training palette
        src = source[0] if len(source) == 1 else list(source)
        return build_loader(src, batch_size=micro, dp_rank=self.state.dp_rank,
                            dp_world_size=self.layout.data_parallel, num_workers=args.num_workers, seed=args.seed,
                            shuffle=train, shuffle_buffer=args.shuffle_buffer, epochs=None if train else 1,
                            expected_palette_sha256=expected, expected_resolution=self.cfg.resolution)

    def _schedule_lengths(self) -> tuple[int, int]:
        args = self.args
        samples = getattr(self.train_loader, "num_samples", None)
        # All ranks need the epoch size, including pipeline stages that read no data.
        t = torch.tensor([samples or 0], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        samples = int(t.item()) or None
        steps_per_epoch = math.ceil(samples / self.ds.train_batch_size) if samples else None
        if args.train_steps:
            total = args.train_steps
        elif args.train_epochs and steps_per_epoch:
            total = max(1, round(args.train_epochs * steps_per_epoch))
        else:
            raise ValueError("give --train-steps N (or --train-epochs E with shard data whose size is known)")
        if args.warmup_steps is not None:
            warmup = args.warmup_steps
        elif steps_per_epoch:
            warmup = round(args.warmup_epochs * steps_per_epoch)  # the paper: one epoch of warm-up
        else:
            warmup = 0
        return total, min(warmup, total)

    def _batches(self, loader):
        """Endless batches (a finite loader restarts at its next epoch), with time spent waiting."""
        while True:
            for batch in loader:
                yield batch

    def _micro(self, batch: dict, micro_index: int):
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        mask = None
        if self.cfg.objective == "bert":
            # Same mask on every TP/PP rank of a replica, different across replicas and steps.
            g = torch.Generator().manual_seed(
                hash((self.args.seed, self.step, micro_index, self.state.dp_rank)) % 2**63)
            mask = bert_mask(tokens.shape, self.cfg.bert_mask_prob, g).to(self.device)
        return tokens, mask

    # ---- one optimizer step -----------------------------------------------------------------
    def _train_step(self, it) -> tuple[float, float]:
        """Returns (mean loss over the global batch, seconds spent waiting for data)."""
        wait = 0.0
        gas = self.ds.gradient_accumulation_steps
        if self.pipelined:
            def pipe_iter():
                nonlocal wait
                for m in range(gas):
                    t0 = time.perf_counter()
                    batch = next(it)
                    wait += time.perf_counter() - t0
                    tokens, mask = self._micro(batch, m)
                    inputs = (tokens,) if mask is None else (tokens, mask)
                    yield inputs, inputs

            loss = self.engine.train_batch(data_iter=pipe_iter() if self.reads_data else None).float()
        else:
            total = torch.zeros((), device=self.device)
            for m in range(gas):
                t0 = time.perf_counter()
                batch = next(it)
                wait += time.perf_counter() - t0
                tokens, mask = self._micro(batch, m)
                out = compute_loss(self.engine, tokens, mask)
                self.engine.backward(out.loss)
                if m == gas - 1 and self.engine.get_global_grad_norm() is None and self.ds.zero_stage == 0:
                    self._grad_norm = self._compute_grad_norm()
                self.engine.step()
                total += out.loss.detach().float()
            loss = total / gas
        # The pipeline engine already averages over DP; the plain engine's loss is this replica's.
        if not self.pipelined and self.layout.data_parallel > 1:
            dist.all_reduce(loss, group=self.state.dp_group)
            loss = loss / self.layout.data_parallel
        return float(loss), wait

    def _compute_grad_norm(self) -> float:
        """Global L2 gradient norm for ZeRO-0 (DeepSpeed reports none there).

        TP-sharded parameters' squares are summed over the TP group; replicated ones (identical on
        every TP rank) are counted once.
        """
        sharded, replicated = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for p in self.engine.module.parameters():
            if p.grad is None:
                continue
            sq = p.grad.detach().double().pow(2).sum().cpu()
            if getattr(p, "tensor_model_parallel", False):
                sharded += sq
            else:
                replicated += sq
        if self.layout.tensor_parallel > 1:
            dist.all_reduce(sharded, group=self.state.tp_group)
        return float((sharded + replicated).sqrt())

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean validation loss (nats/token): one pass over the validation shards (or --eval-batches)."""
        if not self.args.val_data:
            return None
        self.engine.eval()
        loader = self._loader(self.args.val_data, train=False) if self.reads_data else None
        limit = self.args.eval_batches
        if self.pipelined:
            # Every stage runs the same number of schedules, including stages that read no data.
            n = torch.tensor([loader.batches_per_epoch if loader is not None else 0])
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            n = int(n) if limit is None else min(int(n), limit)
            batches = iter(loader) if loader is not None else None
            total = 0.0
            for m in range(n):
                data = None
                if batches is not None:
                    tokens, mask = self._micro(next(batches), m)
                    inputs = (tokens,) if mask is None else (tokens, mask)
                    data = iter([(inputs, inputs)])
                # eval_batch averages over DP and broadcasts the loss to every stage.
                total += float(self.engine.eval_batch(data_iter=data, num_micro_batches=1))
            mean = total / max(n, 1)
        else:
            stats = torch.zeros(2, dtype=torch.float64)
            for i, batch in enumerate(loader):
                if limit is not None and i >= limit:
                    break
                tokens, mask = self._micro(batch, i)
                stats += torch.tensor([float(compute_loss(self.engine, tokens, mask).loss), 1.0], dtype=torch.float64)
            dist.all_reduce(stats, group=self.state.dp_group)
            mean = float(stats[0] / stats[1].clamp(min=1))
        self.engine.train()
        return mean

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self) -> str:
        meta = checkpoint_meta(self.cfg, self.ds, self.layout, self.palette_sha256)
        rank_state = {"rng": _rng_state(),
                      "loader": self.train_loader.state_dict() if self.train_loader is not None else None}
        return str(write_checkpoint(self.engine, self.args.save, self.step, meta, rank_state))

    def load(self, directory: str) -> None:
        tag, meta = read_checkpoint_meta(directory)
        restarted = bool(meta.get("optimizer_restarted"))  # written by tools/convert_checkpoint.py --to deepspeed
        # A converted checkpoint holds a fresh Adam state built around its weights, but no schedule.
        path, client = self.engine.load_checkpoint(directory, tag=tag, load_lr_scheduler_states=not restarted)
        if path is None:
            raise FileNotFoundError(f"{directory}/{tag}: DeepSpeed found no loadable checkpoint files")
        self.step = int(client["step"]) if client else int(meta["step"])
        if restarted:
            set_schedule_step(self.scheduler, self.step)
            if self.is_rank0:
                print(f"{directory}/{tag} was converted from another layout: weights loaded, Adam state restarts "
                      f"at step {self.step}", flush=True)
        state_file = Path(directory) / tag / f"trainer_state_rank{self.rank:05d}.pt"
        if state_file.is_file():
            state = torch.load(state_file, weights_only=True)
            if state["rng"] is not None:
                _set_rng_state(state["rng"])
            if self.train_loader is not None and state["loader"] is not None:
                self.train_loader.load_state_dict(state["loader"])
        if (not state_file.is_file() or state["loader"] is None) and self.is_rank0:
            print(f"note: {directory}/{tag} holds no data position for this layout: the data restarts its epoch")

    # ---- the loop ---------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self.stop_signal = signum

    def _should_stop(self) -> bool:
        out_of_time = self.args.max_minutes is not None and \
            time.monotonic() - self.started > 60 * self.args.max_minutes
        if out_of_time and self.stop_signal is None:
            self.stop_signal = "time"
        flag = torch.tensor([1 if self.stop_signal is not None else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())

    def train(self) -> dict:
        args = self.args
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        self.started = time.monotonic()
        it = self._batches(self.train_loader) if self.reads_data else None
        bar = None
        if self.is_rank0 and args.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True)
        tokens_per_step = self.ds.train_batch_size * self.cfg.seq_len
        flops_per_token = self.cfg.train_flops_per_token()
        last = {}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        while self.step < self.total_steps:
            skipped_before = self.engine.skipped_steps
            self._grad_norm = None
            lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
            t0 = time.perf_counter()
            loss, wait = self._train_step(it)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            self.step += 1
            overflow = self.engine.skipped_steps > skipped_before
            if not math.isfinite(loss) and not overflow:
                last_ckpt = None
                if args.save and (Path(args.save) / "latest").is_file():
                    last_ckpt = f"{args.save}/{(Path(args.save) / 'latest').read_text().strip()}"
                raise TrainingDiverged(
                    f"loss became {loss} at step {self.step}; stopping without saving. Last good checkpoint: "
                    f"{last_ckpt or 'none'}. Lower --lr (the paper's search goes from large to small), or use "
                    f"bf16/fp32 instead of fp16")
            record = {"step": self.step, "loss": loss, "bits_per_dim": bits_per_dim(loss),
                      "lr": lr, "grad_norm": self._grad_norm_value(),
                      "loss_scale": self._loss_scale(), "skipped_steps": self.engine.skipped_steps,
                      "step_time_s": elapsed, "tokens_per_s": tokens_per_step / elapsed,
                      "samples_per_s": self.ds.train_batch_size / elapsed,
                      "data_wait_pct": 100.0 * wait / elapsed, "peak_mem_gb": peak_memory_bytes() / 2**30}
            achieved = flops_per_token * record["tokens_per_s"] / self.layout.world_size
            record["tflops"] = achieved / 1e12
            record["mfu"] = achieved / self.peak if self.peak else None
            record.update(self.gpu.read())
            if args.eval_interval and (self.step % args.eval_interval == 0 or self.step == self.total_steps):
                val = self.evaluate()
                if val is not None:
                    record.update(val_loss=val, val_bits_per_dim=bits_per_dim(val))
            if self.step % args.log_interval == 0 or "val_loss" in record or self.step == self.total_steps:
                self.metrics.write(record)
            last = record
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            stop = self._should_stop()
            if args.save and (stop or self.step == self.total_steps
                              or (args.save_interval and self.step % args.save_interval == 0)):
                self.save()
            if stop:
                if self.is_rank0:
                    why = f"--max-minutes {args.max_minutes} reached" if self.stop_signal == "time" else \
                        f"received signal {self.stop_signal or 'on another rank'}"
                    print(f"{why}: checkpoint saved at step {self.step}, exiting", flush=True)
                break
        if bar is not None:
            bar.close()
        self.metrics.close()
        return last

    def _grad_norm_value(self) -> Optional[float]:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._grad_norm
        return float(norm) if norm is not None else None

    def _loss_scale(self) -> Optional[float]:
        if self.ds.precision != "fp16":
            return None
        opt = self.engine.optimizer
        scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
        return float(scale) if scale is not None else None


"""The one training loop on DeepSpeed: DP (ZeRO-0..3) x TP (megatron-core) x PP (DeepSpeed pipe).

    trainer = Trainer(args, PretrainTask(args))      # or ClassifyTask(args): fine-tuning
    last_record = trainer.train()

Built once in :meth:`Trainer.__init__`: the task's model config, the layout (validated once) and
DeepSpeed config, megatron-core's groups, the training loader (sharded by DP rank), the schedule,
the task's model (under ``zero.Init`` for ZeRO-3, a PipelineModule stage for PP > 1) with its
weights, Adam and the engine; then ``--load`` resumes. :meth:`Trainer.train` runs steps, the
task's evaluation, metrics and checkpoints (:mod:`igpt_ds.checkpoint.run`). SIGTERM/SIGUSR1 and
``--max-minutes`` end the run at the same step on every rank, with a checkpoint, exit code 0; a
signal during start-up ends it before step 1 without one (:mod:`igpt_ds.parallel.signals`).
The task interface is :mod:`igpt_ds.train.task`.
"""
from __future__ import annotations

import math
import time
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from igpt_ds.checkpoint import run as run_checkpoint
from igpt_ds.model.compile import check_compile
from igpt_ds.palette import save_palette
from igpt_ds.parallel import layout as parallel
from igpt_ds.parallel import signals
from igpt_ds.train.engine import DSSettings, build_engine, load_ds_config, matmul_precision, set_schedule_step
from igpt_ds.train.metrics import GPUMonitor, MetricsWriter, device_name, peak_flops, peak_memory_bytes


class TrainingDiverged(FloatingPointError):
    """The loss became non-finite on a step the fp16 loss scaler did not skip, or the loss scale hit its floor."""


# DeepSpeed's DynamicLossScaler ends an fp16 run with a bare Exception of this message (fp16/loss_scaler.py).
LOSS_SCALE_AT_MINIMUM = "loss scale already at minimum"


class Trainer:
    def __init__(self, args, task):
        self.args, self.task = args, task
        signals.install()  # idempotent: the entry points did it before any import; library callers get it here
        self.started = time.monotonic()  # --max-minutes counts start-up too: it is wall-clock time of the job
        parallel.init_distributed()
        self.rank = dist.get_rank()
        self.is_rank0 = self.rank == 0
        # (tag, igpt_meta.json) of --load, read once: the task, the compatibility check and load() use it.
        self.resume = run_checkpoint.read_checkpoint_meta(args.load) if args.load else None

        # 1. What the task trains (config, init weights, data sizes), then the layout and DS config,
        #    all before any group, loader or model exists, so bad input fails fast on every rank.
        self.cfg = cfg = task.setup(self)
        layout = parallel.ParallelLayout(dist.get_world_size(), args.tensor_parallel, args.pipeline_parallel)
        layout.validate(cfg)  # once; the ZeRO stage x PP rule is checked with the DS config, which states the stage
        self.ds: DSSettings = load_ds_config(args.deepspeed_config, layout.data_parallel, args.pipeline_parallel)
        if self.resume is not None:
            tag, meta = self.resume
            run_checkpoint.check_compatible(meta, cfg, f"{args.load}/{tag}/{run_checkpoint.META_FILE}")
        if getattr(args, "compile", False):  # refused here, before any group, loader or model exists
            check_compile(self.ds.zero_stage, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        task.prepare(self)

        # 2. Groups and devices. Middle pipeline stages read no data; the first and last read the same.
        self.state = parallel.initialize(args.tensor_parallel, args.pipeline_parallel, layout=layout)
        parallel.init_deepspeed_comm()
        self.layout = self.state.layout
        self.pipelined = self.layout.pipeline_parallel > 1
        self.is_last_stage = self.state.pp_rank == self.layout.pipeline_parallel - 1
        self.reads_data = not self.pipelined or self.state.pp_rank == 0 or self.is_last_stage
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.train_loader = task.loader(self, train=True) if self.reads_data else None

        # 3. Schedule, model, engine.
        self.steps_per_epoch = task.steps_per_epoch(self)
        self.total_steps = self._total_steps()
        schedule = task.schedule(self.total_steps, self.steps_per_epoch)
        module = task.build_model(self)
        self.engine, self.scheduler = build_engine(module, self.state, self.ds, args.lr, schedule,
                                                   getattr(args, "adam_eps", 1e-8), compile=args.compile)
        self.step = 0  # optimizer updates applied (fp16 steps the loss scaler skipped are not counted)
        self._saved_step: Optional[int] = None
        self.stop_reason = None  # a signal number, or "time"
        self._grad_norm: Optional[float] = None
        self.metrics = MetricsWriter(args.save, enabled=self.is_rank0)
        self.gpu = GPUMonitor(self.device)
        self.compute_precision = matmul_precision(self.ds.precision)  # "tf32" for fp32 configs on CUDA
        self.peak = peak_flops(self.compute_precision, args.peak_tflops)
        if self.is_rank0:
            self._say_precision()
        if self.is_rank0 and args.save and task.palette is not None:
            save_palette(f"{args.save}/palette.npy", task.palette)  # exports then carry the palette
        if self.resume is not None:
            self.load(args.load)

    def _say_precision(self) -> None:
        """Rank 0, once: TF32 in an fp32 run, and an MFU that cannot be computed (never a wrong one)."""
        if self.compute_precision == "tf32":
            print(f"{self.ds.path} is fp32: matmuls run in TF32 on this GPU (MFU against the TF32 peak); "
                  f"NVIDIA_TF32_OVERRIDE=0 keeps plain FP32, a bf16 config is faster still", flush=True)
        if self.peak is None and self.device.type == "cuda":
            print(f"MFU unknown: no {self.compute_precision} peak is known for '{device_name()}' "
                  f"(igpt_ds/train/metrics.py PEAK_TFLOPS); pass --peak-tflops to state it", flush=True)

    def _total_steps(self) -> int:
        args = self.args
        if args.train_steps:
            return args.train_steps
        if args.train_epochs and self.steps_per_epoch:
            return max(1, round(args.train_epochs * self.steps_per_epoch))
        raise ValueError(self.task.steps_hint)

    def max_over_ranks(self, value: int) -> int:
        """The largest ``value`` of any rank (sizes known only where data is read)."""
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    # ---- one optimizer step -----------------------------------------------------------------
    def _train_step(self, it: Optional[Iterator]) -> tuple[dict, float]:
        """(the task's metrics of this step over the global batch, seconds spent waiting for data)."""
        wait = 0.0
        gas = self.ds.gradient_accumulation_steps
        task = self.task
        task.stats.reset()

        def next_batch():
            nonlocal wait
            t0 = time.perf_counter()
            batch = next(it)
            wait += time.perf_counter() - t0
            return batch

        if self.pipelined:
            def pipe_iter():
                for m in range(gas):
                    yield task.pipe_item(self, next_batch(), m)

            self.engine.train_batch(data_iter=pipe_iter() if self.reads_data else None)
            # The loss is computed on the last stage, once per TP group: those ranks contribute.
            contributes = self.is_last_stage and self.state.tp_rank == 0
            if not contributes:
                task.stats.reset()  # zeros: this rank computed no loss
            sums = task.stats.tensor(self.device)
            dist.all_reduce(sums)
        else:
            for m in range(gas):
                loss = task.loss(self, next_batch(), m)
                self.engine.backward(loss)
                if m == gas - 1 and self.ds.zero_stage == 0 and self.engine.get_global_grad_norm() is None:
                    self._grad_norm = self._compute_grad_norm()
                self.engine.step()
            sums = task.stats.tensor(self.device)  # collectives on the compute device (NCCL has no CPU tensors)
            if self.layout.data_parallel > 1:
                dist.all_reduce(sums, group=self.state.dp_group)
        return task.step_record(task.stats.named(sums.cpu())), wait

    def _train_step_or_diverge(self, it: Optional[Iterator]) -> tuple[dict, float]:
        """:meth:`_train_step`, with DeepSpeed's end of an fp16 run whose loss scale hit its floor
        (a bare ``Exception``) turned into :class:`TrainingDiverged` with the way out."""
        try:
            return self._train_step(it)
        except Exception as e:
            if LOSS_SCALE_AT_MINIMUM not in str(e):
                raise
            raise TrainingDiverged(
                f"fp16 loss scale is at its minimum and the gradients still overflow at step {self.step + 1}: the "
                f"run diverged ({self.engine.skipped_steps} steps skipped). Last good checkpoint: "
                f"{run_checkpoint.last_good(self.args.save) or 'none'}. Resume it with a lower --lr, or use a bf16 "
                f"config (no loss scaling). {self.task.divergence_hint}") from e

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

    # ---- evaluation helpers for tasks -------------------------------------------------------
    def eval_batches(self, loader, limit: Optional[int] = None) -> Iterator[Optional[dict]]:
        """Batches of one validation pass; pipelined, every stage runs the same number of schedules
        (the MAX over ranks) and stages that read no data get None."""
        if not self.pipelined:
            for i, batch in enumerate(loader):
                if limit is not None and i >= limit:
                    return
                yield batch
            return
        n = self.max_over_ranks(loader.batches_per_epoch if loader is not None else 0)
        n = n if limit is None else min(n, limit)
        batches = iter(loader) if loader is not None else None
        for _ in range(n):
            yield next(batches) if batches is not None else None

    def pipe_eval(self, item: Optional[tuple], return_outputs: bool = False):
        """One pipelined evaluation micro-batch: the loss (averaged over DP, on every stage) and, with
        ``return_outputs``, the last stage's outputs (None elsewhere)."""
        data = iter([item]) if item is not None else None
        if not return_outputs:
            return self.engine.eval_batch(data_iter=data, num_micro_batches=1), None
        loss, outputs = self.engine.eval_batch(data_iter=data, return_logits=True, num_micro_batches=1)
        return loss, outputs if self.is_last_stage else None

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self) -> str:
        task = self.task
        meta = run_checkpoint.checkpoint_meta(self.cfg, self.ds, self.layout, task.palette_sha256, **task.meta())
        rank_state = {"rng": run_checkpoint.rng_state(),
                      "loader": self.train_loader.state_dict() if self.train_loader is not None else None}
        tag_dir = run_checkpoint.write_checkpoint(self.engine, self.args.save, self.step, meta, rank_state)
        self._saved_step = self.step  # a stop on a skipped fp16 step does not rewrite this step's checkpoint
        if task.keep_only_latest and self.is_rank0:
            run_checkpoint.prune(self.args.save, keep=tag_dir.name)
        return str(tag_dir)

    def load(self, directory: str) -> None:
        """Resume from ``directory`` (``--load``), whose meta ``__init__`` read into ``self.resume``."""
        tag, meta = self.resume
        restarted = bool(meta.get("optimizer_restarted"))  # written by tools/convert_checkpoint.py --to deepspeed
        # A converted checkpoint holds a fresh Adam state built around its weights, but no schedule.
        path, client = self.engine.load_checkpoint(directory, tag=tag, load_lr_scheduler_states=not restarted)
        if path is None:
            raise FileNotFoundError(f"{directory}/{tag}: DeepSpeed found no loadable checkpoint files")
        self.step = int(client["step"]) if client else int(meta["step"])
        self._saved_step = self.step  # this step's checkpoint exists: a stop before the next update keeps it
        if restarted:
            set_schedule_step(self.scheduler, self.step)
            if self.is_rank0:
                print(f"{directory}/{tag} was converted from another layout: weights loaded, Adam state restarts "
                      f"at step {self.step}", flush=True)
        self.task.load_state(meta)
        state = run_checkpoint.read_rank_state(directory, tag, self.rank)
        if state is not None and state.get("rng") is not None:
            run_checkpoint.set_rng_state(state["rng"])
        if state is not None and state.get("loader") is not None and self.train_loader is not None:
            self.train_loader.load_state_dict(state["loader"])
        if (state is None or state.get("loader") is None) and self.is_rank0:
            print(f"note: {directory}/{tag} holds no data position for this layout: the data restarts its epoch")

    # ---- the loop ---------------------------------------------------------------------------
    def _should_stop(self) -> bool:
        """Collective: a job signal (here or on any rank, since start-up) or the spent --max-minutes."""
        if self.stop_reason is None and signals.received() is not None:
            self.stop_reason = signals.received()
        out_of_time = self.args.max_minutes is not None and \
            time.monotonic() - self.started > 60 * self.args.max_minutes
        # [a signal somewhere, the budget spent somewhere]: every rank stops at the same step, for the same reason
        flags = torch.tensor([int(isinstance(self.stop_reason, int)), int(out_of_time or self.stop_reason == "time")])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if self.stop_reason is None and flags[1] and not flags[0]:
            self.stop_reason = "time"  # another rank's clock crossed the budget first
        return bool(flags.any())

    def _why_stopped(self) -> str:
        if self.stop_reason == "time":
            return f"--max-minutes {self.args.max_minutes} reached"
        if self.stop_reason is None:
            return "a stop signal reached another rank"
        return f"received signal {signals.describe(self.stop_reason)}"

    def _batches(self) -> Optional[Iterator[dict]]:
        """Endless training batches (a finite loader restarts at its next epoch)."""
        if self.train_loader is None:
            return None

        def endless():
            while True:
                yield from self.train_loader

        return endless()

    def train(self) -> dict:
        args, task = self.args, self.task
        if self._should_stop():  # a signal during start-up: nothing new to save; --load resumes where we were
            if self.is_rank0:
                where = run_checkpoint.last_good(args.save)
                resume = f"--load {args.save} resumes from {where}" if where else "no checkpoint yet"
                print(f"{self._why_stopped()} before step {self.step + 1}: nothing new to save, exiting ({resume})",
                      flush=True)
            self.metrics.close()
            return {}
        it = self._batches()
        bar = None
        if self.is_rank0 and args.progress:
            bar = tqdm(total=self.total_steps, initial=self.step, desc=task.name, unit="step", dynamic_ncols=True)
        tokens_per_step = self.ds.train_batch_size * self.cfg.seq_len
        flops_per_token = self.cfg.train_flops_per_token()
        last: dict = {}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        while self.step < self.total_steps:
            skipped_before = self.engine.skipped_steps
            self._grad_norm = None
            lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
            t0 = time.perf_counter()
            record, wait = self._train_step_or_diverge(it)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            # fp16: a step whose gradients overflowed is skipped by DeepSpeed (no update, no schedule step):
            # the run counts optimizer updates, so it still ends after total_steps of them, on the schedule.
            applied = self.engine.skipped_steps == skipped_before
            evaluated = task_stop = False
            if applied:
                self.step += 1
                if not math.isfinite(record["loss"]):
                    raise TrainingDiverged(
                        f"loss became {record['loss']} at step {self.step}; stopping without saving. Last good "
                        f"checkpoint: {run_checkpoint.last_good(args.save) or 'none'}. {task.divergence_hint}")
                record = {"step": self.step, **record, "lr": lr,
                          **self._step_metrics(elapsed, wait, tokens_per_step, flops_per_token)}
                evaluated = task.eval_due(self)
                if evaluated:
                    record.update(task.evaluate(self))
                    task_stop = task.after_evaluation(self, record)
                if evaluated or self.step % args.log_interval == 0 or self.step == self.total_steps:
                    self.metrics.write(record)
                last = record
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            elif self.is_rank0:
                note = (f"step {self.step + 1}: the fp16 loss scaler skipped the update (gradient overflow); loss "
                        f"scale now {self._loss_scale()}, {self.engine.skipped_steps} skipped so far")
                (bar.write if bar is not None else print)(note)
            stop = self._should_stop()
            due = stop or (applied and (task_stop or self.step == self.total_steps
                                        or (args.save_interval and self.step % args.save_interval == 0)
                                        or (evaluated and task.checkpoint_after_eval)))
            if args.save and due and self._saved_step != self.step:
                self.save()
            if stop:
                if self.is_rank0:
                    saved = f"checkpoint saved at step {self.step}" if args.save else \
                        f"no --save, nothing saved at step {self.step}"
                    print(f"{self._why_stopped()}: {saved}, exiting", flush=True)
                break
            if task_stop:
                break
        if bar is not None:
            bar.close()
        self.metrics.close()
        return last

    def _step_metrics(self, elapsed: float, wait: float, tokens_per_step: int, flops_per_token: float) -> dict:
        record = {"grad_norm": self._grad_norm_value(), "loss_scale": self._loss_scale(),
                  "skipped_steps": self.engine.skipped_steps, "graph_breaks": self.engine.graph_breaks(),
                  "step_time_s": elapsed,
                  "tokens_per_s": tokens_per_step / elapsed, "samples_per_s": self.ds.train_batch_size / elapsed,
                  "data_wait_pct": 100.0 * wait / elapsed, "peak_mem_gb": peak_memory_bytes() / 2**30}
        achieved = flops_per_token * record["tokens_per_s"] / self.layout.world_size
        record["tflops"] = achieved / 1e12
        record["mfu"] = achieved / self.peak if self.peak else None
        record.update(self.gpu.read())
        return record

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

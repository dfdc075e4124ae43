"""Parallel layout and process groups: the one module that knows about ranks.

world = DP x TP x PP. TP is the fastest-varying rank index, then DP, then PP: the order of
megatron-core ``parallel_state`` (``order="tp-cp-ep-dp-pp"``) and of DeepSpeed's
``PipeModelDataParallelTopology``. Every rank of one DP replica reads the same samples.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from igpt_ds.config import ModelConfig
from igpt_ds.parallel.startup import watch_extension_build

# DeepSpeed's pipeline engine runs with ZeRO-0/1 only: the one statement of that rule (the DS config check
# and the planner ask it here).
PIPELINE_ZERO_STAGES = (0, 1)


@dataclass(frozen=True)
class ParallelLayout:
    """DP x TP x PP over ``world_size`` ranks; DP is derived."""

    world_size: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.pipeline_parallel)

    def validate(self, model: Optional[ModelConfig] = None, zero_stage: int = 0) -> "ParallelLayout":
        """Refuse an impossible layout with a message that names the fix. Returns self."""
        tp, pp, world = self.tensor_parallel, self.pipeline_parallel, self.world_size
        if tp < 1 or pp < 1 or world < 1:
            raise ValueError(f"layout sizes must be >= 1 (world={world}, TP={tp}, PP={pp})")
        if world % (tp * pp):
            raise ValueError(
                f"world size {world} is not divisible by TP x PP = {tp} x {pp} = {tp * pp}: "
                f"launch a multiple of {tp * pp} processes or change --tensor-parallel/--pipeline-parallel")
        if pp > 1 and zero_stage not in PIPELINE_ZERO_STAGES:
            raise ValueError(
                f"ZeRO stage {zero_stage} cannot be combined with pipeline parallelism (PP={pp}): "
                f"DeepSpeed's pipeline engine supports ZeRO-0/1 only. Use a zero1_pipe_*.json config, "
                f"or --pipeline-parallel 1 to keep ZeRO-{zero_stage}")
        if model is not None:
            model.validate(tensor_parallel=tp)
            if pp > model.n_layer:
                raise ValueError(
                    f"pipeline-parallel size {pp} exceeds n_layer={model.n_layer}: "
                    f"use at most {model.n_layer} stages")
            if model.dropout and (tp > 1 or pp > 1):
                # TP ranks hold replicated residual streams, whose masks would have to agree, and each draws
                # its heads' attention masks; that needs megatron's RNG tracker, not wired in (nor tested
                # for PP). Refused rather than trained with masks that silently differ.
                raise ValueError(
                    f"dropout={model.dropout} is not supported with tensor or pipeline parallelism (TP={tp}, "
                    f"PP={pp}): use --tensor-parallel 1 --pipeline-parallel 1 (ZeRO and data parallelism work), "
                    f"or --dropout 0")
        return self

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp, tp, pp) coordinates of a global rank: TP fastest, then DP, then PP."""
        tp = rank % self.tensor_parallel
        dp = (rank // self.tensor_parallel) % self.data_parallel
        pp = rank // (self.tensor_parallel * self.data_parallel)
        return dp, tp, pp


@dataclass
class ParallelState:
    """Process groups of this rank (``None`` groups mean size 1 in a plain process)."""

    layout: ParallelLayout
    rank: int
    tp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    pp_group: Optional[dist.ProcessGroup]

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.rank)[0]

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank)[1]

    @property
    def pp_rank(self) -> int:
        return self.layout.coords(self.rank)[2]


def default_backend() -> str:
    """gloo on a CPU machine; on a GPU machine one group with both backends, ``"cpu:gloo,cuda:nccl"``.

    The loop's small collectives (stop flags, sizes known per rank) are CPU tensors and the model's are
    CUDA tensors: a group made with the plain string ``"nccl"`` has no CPU backend and fails the first
    CPU collective ("No backend type associated with device type cpu").
    """
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def cuda_device_index() -> int:
    """This rank's GPU: ``LOCAL_RANK`` modulo the GPUs this process can see.

    Clusters that show each task only its own GPU (``--gpus-per-task``, ``--gpu-bind``, cgroups) give
    every rank ``CUDA_VISIBLE_DEVICES`` of one device: LOCAL_RANK 3 then means device 0.
    """
    count = torch.cuda.device_count()
    if count < 1:
        raise RuntimeError("CUDA is available but no device is visible (check CUDA_VISIBLE_DEVICES)")
    return int(os.environ.get("LOCAL_RANK", "0") or 0) % count


def select_cuda_device() -> Optional[torch.device]:
    """Set this rank's CUDA device before any group exists; None on a CPU machine.

    DeepSpeed takes its device from ``LOCAL_RANK`` itself (the engine's ``set_device``, ``zero.Init``), so
    where the launcher's LOCAL_RANK is not a visible device it is rewritten to the wrapped index (the
    launcher's value stays in ``IGPT_DS_LAUNCHER_LOCAL_RANK``).
    """
    if not torch.cuda.is_available():
        return None
    index = cuda_device_index()
    launched = os.environ.get("LOCAL_RANK", "0") or "0"
    if int(launched) != index:
        os.environ.setdefault("IGPT_DS_LAUNCHER_LOCAL_RANK", launched)
        os.environ["LOCAL_RANK"] = str(index)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(backend: Optional[str] = None, timeout_minutes: int = 30) -> None:
    """Initialise ``torch.distributed`` from the launcher's environment if not done yet.

    Reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (deepspeed, torchrun) or the Slurm
    equivalents (SLURM_PROCID/SLURM_NTASKS). Without any of them this is a one-process group
    on an in-memory store, so tools and notebooks need no launcher. On a GPU machine the device is
    set first (:func:`select_cuda_device`) and handed to the group, so NCCL starts eagerly and a bad
    device or network fails here, at start-up, not at the first collective.
    """
    if dist.is_initialized():
        return
    backend = backend or default_backend()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    launched = "RANK" in os.environ
    # zero.Init reads LOCAL_RANK even in one process. Not RANK/WORLD_SIZE: child processes
    # inheriting those would believe they were started by a launcher.
    os.environ.setdefault("LOCAL_RANK", "0")
    kwargs = {"timeout": timeout}
    device = select_cuda_device() if "nccl" in backend else None
    if device is not None:
        kwargs["device_id"] = device
    if launched:
        dist.init_process_group(backend, **kwargs)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)


def initialize(tensor_parallel: int = 1, pipeline_parallel: int = 1, backend: Optional[str] = None,
               model: Optional[ModelConfig] = None, zero_stage: int = 0,
               layout: Optional[ParallelLayout] = None) -> ParallelState:
    """Validate the layout against the world, then build megatron-core's groups.

    Validation happens before any group is created, so an impossible layout fails fast on
    every rank with the same message. A caller that validated ``layout`` itself (the training
    loop, which needs DP before it can read the DeepSpeed config) passes it and is not checked twice.
    """
    init_distributed(backend)
    if layout is None:
        layout = ParallelLayout(dist.get_world_size(), tensor_parallel, pipeline_parallel)
        layout.validate(model, zero_stage)
    elif (layout.world_size, layout.tensor_parallel, layout.pipeline_parallel) != \
            (dist.get_world_size(), tensor_parallel, pipeline_parallel):
        raise ValueError(f"layout {layout} does not describe this world ({dist.get_world_size()} ranks, "
                         f"TP={tensor_parallel}, PP={pipeline_parallel})")
    # Lazy here and below: megatron-core and DeepSpeed take seconds to import, and ParallelLayout's
    # arithmetic (tools/plan.py, the Slurm scripts' checks) needs neither; DeepSpeed must also see
    # DS_ACCELERATOR, which the entry points set first.
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        create_gloo_process_groups=False,
        order="tp-cp-ep-dp-pp",
    )
    state = ParallelState(
        layout=layout,
        rank=dist.get_rank(),
        tp_group=mpu.get_tensor_model_parallel_group(),
        dp_group=mpu.get_data_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
    )
    # Our arithmetic and megatron's must agree, or data would be split by the wrong rank.
    expected = layout.coords(state.rank)
    actual = (mpu.get_data_parallel_rank(), mpu.get_tensor_model_parallel_rank(),
              mpu.get_pipeline_model_parallel_rank())
    if expected != actual:
        raise RuntimeError(f"rank {state.rank}: layout coords {expected} != megatron-core {actual}")
    return state


def destroy() -> None:
    """Tear down megatron-core groups and the default process group (tests, tools)."""
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dim; backward keeps this rank's slice of the gradient.

    megatron-core's gather allocates on the current CUDA device; this one works on any device.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.size = group, x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rank = dist.get_rank(ctx.group)
        return grad[..., rank * ctx.size:(rank + 1) * ctx.size].contiguous(), None


def gather_last_dim(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dim (differentiable); identity at size 1."""
    if group is None or group.size() == 1:
        return x
    return _GatherLastDim.apply(x, group)


class DeepSpeedMPU:
    """Our groups in the ``mpu`` interface DeepSpeed calls (megatron-core no longer provides it).

    DeepSpeed uses it to all-reduce gradients over the DP group only, to shard ZeRO state over
    DP, and to sum TP-sharded parameters' norms over the TP group when clipping gradients.
    """

    def __init__(self, state: ParallelState):
        self.state = state

    # tensor ("model") parallel
    def get_model_parallel_group(self):
        return self.state.tp_group

    def get_model_parallel_rank(self) -> int:
        return self.state.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.state.layout.tensor_parallel

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.state.rank - self.state.tp_rank

    # data parallel
    def get_data_parallel_group(self):
        return self.state.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.state.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.state.layout.data_parallel

    # pipeline parallel
    def get_pipeline_model_parallel_group(self):
        return self.state.pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.state.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.state.layout.pipeline_parallel

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size


def init_deepspeed_comm() -> None:
    """Point ``deepspeed.comm`` at the already-initialised torch.distributed default group."""
    import deepspeed

    init_distributed()
    # On a CPU this builds or loads DeepSpeed's shared-memory op (ShareMemCommBuilder), behind a
    # lock file that a killed earlier start can leave behind: say what we wait for, and give up on
    # a stale lock with the fix instead of hanging (igpt_ds/parallel/startup.py).
    with watch_extension_build("DeepSpeed's CPU communication op", "deepspeed_shm_comm"):
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)

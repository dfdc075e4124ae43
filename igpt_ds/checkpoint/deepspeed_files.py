"""DeepSpeed checkpoints of any layout, read from their files in one process, tensor by tensor.

    ckpt = DeepSpeedCheckpoint("runs/igpt-l")            # a run directory (its ``latest``) or a global_stepN
    for name in ckpt.names():                            # the plain model's parameter names, in order
        w = ckpt.tensor(name, "master")                  # full (TP = 1) fp32 weight; or "module", "exp_avg", ...

No engine is built and no rank is started: each full tensor is assembled from exactly the bytes
that hold it (:mod:`igpt_ds.checkpoint.lazy_torch`), so memory is bounded by the tensor being
assembled (its TP shards plus the result: at most ~3x the largest parameter in fp32), whatever
the world size or model size. Where each piece lives, by ZeRO stage (``mp`` = the model-parallel
rank DeepSpeed names files by: the TP rank, or ``stage * TP + TP rank`` under a pipeline):

- ZeRO-1/2: ``[bf16_]zero_pp_rank_{dp}_mp_rank_{mp}_optim_states.pt`` holds DP rank ``dp``'s slice of
  the flat fp32 master vector (``single_partition_of_fp32_groups``) and of Adam's moments
  (``base_optimizer_state``); ``param_slice_mappings`` says which parameter fragment it holds.
  The 16-bit (module) weights are in ``mp_rank_{mp}_model_states.pt`` ``module``.
- ZeRO-3: every parameter is split into DP equal parts (``ceil(numel / DP)``, the last padded);
  ``fp32_flat_groups`` and the inner optimizer's state hold them in ``param_shapes`` order. ZeRO-3
  files hold no 16-bit copy: ``module`` weights are the masters cast to the run's precision, which
  is what DeepSpeed's forward used.
- ZeRO-0: ``mp_rank_{mp}_model_states.pt`` holds the module and the optimizer: torch Adam's state
  per parameter (fp32), plus ``fp32_groups`` (bf16: per parameter) or ``fp32_groups_flat`` (fp16,
  read by the same rule but never run here: DeepSpeed's CPU accelerator has no fp16). Under a
  pipeline, bf16 ZeRO-0 uses DeepSpeed's bf16 optimizer, whose ``bf16_zero_pp_rank_*`` files have the
  ZeRO-1 layout (without ``param_shapes``; shapes come from the module files).
- Pipeline: module weights are per layer, ``layer_{idx}-model_{tp}-model_states.pt``; parameter
  names are ``{idx}.{name in layer}`` and are mapped to the plain model's.
- TP shards are joined by :data:`igpt_ds.model.transformer.TP_SPLITS` (dim and stride).

A missing or truncated file is named in the error (:class:`CheckpointFileError`) before or when it
is first needed; readers write to temporary names, so nothing half-written is left behind.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union

import torch

from igpt_ds.checkpoint.lazy_torch import CheckpointFileError, LazyTensor, TorchFile
from igpt_ds.checkpoint.run import META_FILE, read_rank_state
from igpt_ds.checkpoint.run import locate_checkpoint as locate  # re-exported: (root, tag, meta), strict
from igpt_ds.config import ModelConfig
from igpt_ds.model.pipeline import model_param_name, model_to_pipe_name
from igpt_ds.model.transformer import tp_split

PathLike = Union[str, os.PathLike]
KINDS = ("master", "module", "exp_avg", "exp_avg_sq")
ADAM_KINDS = ("exp_avg", "exp_avg_sq")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Flat:
    """Segments (lazy 1-D tensors) read as one flat vector."""

    def __init__(self, segments: list[LazyTensor]):
        self.segments = segments
        self.starts = [0]
        for s in segments:
            self.starts.append(self.starts[-1] + s.numel())

    def read(self, start: int, numel: int) -> torch.Tensor:
        parts, end = [], start + numel
        for seg, lo, hi in zip(self.segments, self.starts, self.starts[1:]):
            if hi > start and lo < end:
                a, b = max(start, lo), min(end, hi)
                parts.append(seg.read(a - lo, b - a))
        out = torch.cat(parts) if len(parts) != 1 else parts[0]
        if out.numel() != numel:
            raise CheckpointFileError(f"{self.segments[0].storage.file.path}: flat partition ends before element "
                                      f"{end}; the checkpoint's files do not belong together")
        return out


@dataclass
class _Entry:
    """One TP-local parameter of one model-parallel cell: its shape and how to read each kind."""

    shape: tuple[int, ...]
    pipe_name: Optional[str]
    readers: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)


class DeepSpeedCheckpoint:
    """The files of one iGPT-DS DeepSpeed checkpoint, read lazily (see the module docstring)."""

    def __init__(self, path: PathLike):
        self.root, self.tag, self.meta = locate(path)
        self.dir = self.root / self.tag
        meta = self.meta
        if "ds_config" not in meta:
            raise CheckpointFileError(f"{self.dir / META_FILE}: no 'ds_config'; not written by iGPT-DS's "
                                      f"DeepSpeed loop")
        self.config = ModelConfig.from_dict(meta["model"], source=str(self.dir / META_FILE))
        self.zero_stage, self.precision = int(meta["zero_stage"]), meta["precision"]
        self.tp, self.pp = int(meta["tensor_parallel"]), int(meta["pipeline_parallel"])
        self.world_size = int(meta["world_size"])
        self.dp = self.world_size // (self.tp * self.pp)
        self._files: dict[str, TorchFile] = {}
        # DeepSpeed's bf16 optimizer (bf16 + ZeRO-0 under a pipeline) keeps ZeRO-1-like flat partitions
        self.flat_optimizer = self.zero_stage in (1, 2) or (
            self.zero_stage == 0 and any(self.dir.glob("bf16_zero_pp_rank_*_optim_states.pt")))
        self._check_files()
        self._cells: dict[tuple[int, int], dict[str, _Entry]] = {}
        self._stage_of: dict[str, int] = {}
        for s in range(self.pp):
            for name in self._cell(s, 0):
                self._stage_of[name] = s

    # ---- files -------------------------------------------------------------------------------
    def mp_rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank if self.pp > 1 else tp_rank

    def _optim_name(self, dp: int, mp: int) -> str:
        names = [f"{p}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt" for p in ("bf16_", "")]
        if self.precision != "bf16":
            names.reverse()
        return next((n for n in names if (self.dir / n).is_file()), names[0])

    def expected_files(self) -> list[str]:
        files = []
        for s in range(self.pp):
            for t in range(self.tp):
                mp = self.mp_rank(s, t)
                if self.zero_stage == 3:
                    files += [f"zero_pp_rank_{d}_mp_rank_{mp:02d}_model_states.pt" for d in range(self.dp)]
                else:
                    files.append(f"mp_rank_{mp:02d}_model_states.pt")
                if self.zero_stage == 3 or self.flat_optimizer:
                    files += [self._optim_name(d, mp) for d in range(self.dp)]
        if self.pp > 1:
            files += [f"layer_{i:02d}-model_{t:02d}-model_states.pt"
                      for i in range(self.config.n_layer + 2) for t in range(self.tp)]
        return files

    def _check_files(self) -> None:
        for name in self.expected_files():
            if not (self.dir / name).is_file():
                raise CheckpointFileError(
                    f"{self.dir / name}: missing. A ZeRO-{self.zero_stage} checkpoint of DP {self.dp} x TP {self.tp} "
                    f"x PP {self.pp} has one such file per rank; this save is incomplete (a rank did not finish "
                    f"or files were removed). Use an earlier global_stepN of {self.root}")

    def file(self, name: str) -> TorchFile:
        if name not in self._files:
            self._files[name] = TorchFile(self.dir / name)
        return self._files[name]

    def _obj(self, name: str, *keys):
        obj = self.file(name).obj
        for k in keys:
            try:
                obj = obj[k]
            except (KeyError, IndexError, TypeError):
                raise CheckpointFileError(f"{self.dir / name}: no {'/'.join(map(str, keys))}; not a DeepSpeed "
                                          f"ZeRO-{self.zero_stage} file of this layout") from None
        return obj

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "DeepSpeedCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- layout ------------------------------------------------------------------------------
    def _model_name(self, pipe_or_model_name: str) -> str:
        return model_param_name(pipe_or_model_name, self.config.n_layer, self.pp > 1)

    def _pipe_name(self, name: str) -> Optional[str]:
        if self.pp == 1:
            return None
        if name.startswith("clf."):  # fine-tuning's head lives in the last pipeline layer
            return f"{self.config.n_layer + 1}.{name}"
        return model_to_pipe_name(name, self.config.n_layer)

    def _cell(self, stage: int, tp_rank: int) -> dict[str, _Entry]:
        key = (stage, tp_rank)
        if key not in self._cells:
            if self.zero_stage not in (0, 1, 2, 3):
                raise CheckpointFileError(f"{self.dir / META_FILE}: unknown zero_stage {self.zero_stage}")
            build = self._zero3_cell if self.zero_stage == 3 else \
                self._zero12_cell if self.flat_optimizer else self._zero0_cell
            cell = build(stage, tp_rank, self.mp_rank(stage, tp_rank))
            if self.zero_stage < 3:
                for name, entry in cell.items():
                    entry.readers["module"] = self._module_reader(name, entry, tp_rank)
            self._cells[key] = cell
        return self._cells[key]

    def _module_tensor(self, name: str, pipe_name: Optional[str], tp_rank: int) -> LazyTensor:
        if self.pp > 1:
            idx, rest = pipe_name.split(".", 1)
            return self._obj(f"layer_{int(idx):02d}-model_{tp_rank:02d}-model_states.pt", rest)
        return self._obj(f"mp_rank_{tp_rank:02d}_model_states.pt", "module", name)

    def _module_reader(self, name: str, entry: _Entry, tp_rank: int) -> Callable[[], torch.Tensor]:
        return lambda: self._module_tensor(name, entry.pipe_name, tp_rank).load()

    def _zero12_cell(self, stage: int, tp_rank: int, mp: int) -> dict[str, _Entry]:
        pieces: dict[str, list] = {}
        pipe_names: dict[str, str] = {}
        for d in range(self.dp):
            file = self._optim_name(d, mp)
            osd = self._obj(file, "optimizer_state_dict")
            base = osd["base_optimizer_state"]
            for g, mapping in enumerate(osd["param_slice_mappings"]):
                sid = base["param_groups"][g]["params"][0]
                sources = {"master": osd["single_partition_of_fp32_groups"][g],
                           **{k: base["state"][sid][k] for k in ADAM_KINDS if sid in base["state"]}}
                for pname, frag in mapping.items():
                    name = self._model_name(pname)
                    pipe_names[name] = pname
                    pieces.setdefault(name, []).append((sources, int(frag.start), int(frag.numel)))
        shapes = self._obj(f"mp_rank_{mp:02d}_model_states.pt", "param_shapes")
        if shapes:  # ZeRO-1/2 record the shapes; the bf16 optimizer does not: read them from the module files
            cell = {self._model_name(n): _Entry(tuple(shape), n if self.pp > 1 else None)
                    for group in shapes for n, shape in group.items()}
        else:
            cell = {}
            for name in pieces:
                pipe_name = pipe_names[name] if self.pp > 1 else None
                cell[name] = _Entry(self._module_tensor(name, pipe_name, tp_rank).shape, pipe_name)
        for name, entry in cell.items():
            if name not in pieces:
                raise CheckpointFileError(f"{self.dir}: no optimizer partition of model-parallel rank {mp} "
                                          f"holds {name}")
            for kind in ("master", *ADAM_KINDS):
                entry.readers[kind] = self._join(pieces[name], kind, entry.shape, name)
        return cell

    def _join(self, pieces: list, kind: str, shape: tuple, name: str) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            if any(kind not in sources for sources, _, _ in pieces):
                raise CheckpointFileError(f"{self.dir}: no Adam state '{kind}' for {name} (saved before the "
                                          f"first step?)")
            flat = torch.cat([sources[kind].read(start, n) for sources, start, n in pieces])
            if flat.numel() != math.prod(shape):
                raise CheckpointFileError(f"{self.dir}: the DP fragments of {name} hold {flat.numel()} elements, its "
                                          f"shape {shape} needs {math.prod(shape)}: the files do not belong together")
            return flat.view(shape)
        return read

    def _zero3_cell(self, stage: int, tp_rank: int, mp: int) -> dict[str, _Entry]:
        shapes = self._obj(f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt", "param_shapes")
        cell = {n: _Entry(tuple(shape), None) for group in shapes for n, shape in group.items()}
        flats: dict[str, list[_Flat]] = {kind: [] for kind in ("master", *ADAM_KINDS)}
        for d in range(self.dp):
            osd = self._obj(self._optim_name(d, mp), "optimizer_state_dict")
            inner = osd["optimizer_state_dict"]
            groups = osd["fp32_flat_groups"]
            flats["master"].append(_Flat(list(groups)))
            sids = [inner["param_groups"][g]["params"][0] for g in range(len(groups))]
            for k in ADAM_KINDS:
                if all(s in inner["state"] for s in sids):
                    flats[k].append(_Flat([inner["state"][s][k] for s in sids]))
        offset = 0
        for name, entry in cell.items():
            numel = math.prod(entry.shape)
            part = -(-numel // self.dp)
            for kind, per_rank in flats.items():
                entry.readers[kind] = self._zero3_reader(per_rank, offset, part, entry.shape, name, kind)
            entry.readers["module"] = (lambda master: lambda: master().to(DTYPES[self.precision]))(
                entry.readers["master"])
            offset += part
        return cell

    def _zero3_reader(self, per_rank: list[_Flat], offset: int, part: int, shape: tuple, name: str, kind: str):
        def read() -> torch.Tensor:
            if len(per_rank) != self.dp:
                raise CheckpointFileError(f"{self.dir}: no Adam state '{kind}' for {name} (saved before the "
                                          f"first step?)")
            return torch.cat([flat.read(offset, part) for flat in per_rank])[:math.prod(shape)].view(shape)
        return read

    def _zero0_cell(self, stage: int, tp_rank: int, mp: int) -> dict[str, _Entry]:
        file = f"mp_rank_{mp:02d}_model_states.pt"
        opt = self._obj(file, "optimizer")
        if opt is None:
            raise CheckpointFileError(f"{self.dir / file}: holds no optimizer state")
        torch_sd = opt if "param_groups" in opt else opt["optimizer_state_dict"]
        order = [(g, j, idx) for g, group in enumerate(torch_sd["param_groups"])
                 for j, idx in enumerate(group["params"])]
        names, shapes = self._zero0_names(stage, tp_rank, len(order))
        cell = {}
        offsets = [0] * len(torch_sd["param_groups"])
        for (g, j, idx), name, shape in zip(order, names, shapes):
            pipe_name = self._pipe_name(name)
            entry = cell[name] = _Entry(shape, pipe_name)
            state = torch_sd["state"].get(idx, {})
            numel = math.prod(shape)
            if "fp32_groups_flat" in opt:  # fp16 FP16_Optimizer: one flat master and moment vector per group
                start = offsets[g]
                entry.readers["master"] = _flat_view(opt["fp32_groups_flat"][g], start, shape)
                state = torch_sd["state"].get(g, {})
                for k in ADAM_KINDS:
                    if k in state:
                        entry.readers[k] = _flat_view(state[k], start, shape)
                offsets[g] += numel
                continue
            if "fp32_groups" in opt:  # bf16 ZeRO-0: an fp32 master per parameter
                entry.readers["master"] = opt["fp32_groups"][g][j].load
            else:  # fp32: the module weights are the masters
                entry.readers["master"] = None
            for k in ADAM_KINDS:
                if k in state:
                    entry.readers[k] = state[k].load
        for name, entry in cell.items():
            if entry.readers["master"] is None:
                entry.readers["master"] = self._module_reader(name, entry, tp_rank)
        return cell

    def _zero0_names(self, stage: int, tp_rank: int, count: int) -> tuple[list[str], list[tuple]]:
        """The cell's parameters in optimizer order: the module's (or, under a pipeline, this stage's
        layers', which follow each other: stage s has the ``count`` parameters after stage s-1's)."""
        if self.pp == 1:
            file = f"mp_rank_{self.mp_rank(stage, tp_rank):02d}_model_states.pt"
            module = self._obj(file, "module")
            buffers = set(self._obj(file, "buffer_names") or ())
            named = [(k, tuple(v.shape)) for k, v in module.items() if isinstance(v, LazyTensor) and k not in buffers]
        else:
            named = []
            for i in range(self.config.n_layer + 2):
                layer = self._obj(f"layer_{i:02d}-model_{tp_rank:02d}-model_states.pt")
                named += [(self._model_name(f"{i}.{k}"), tuple(v.shape)) for k, v in layer.items()
                          if isinstance(v, LazyTensor)]
            before = sum(len(self._cell(s, tp_rank)) for s in range(stage))
            named = named[before:before + count]
        if len(named) != count:
            raise CheckpointFileError(f"{self.dir}: the optimizer of model-parallel rank "
                                      f"{self.mp_rank(stage, tp_rank)} "
                                      f"holds {count} parameters but the module files list {len(named)}")
        return [n for n, _ in named], [s for _, s in named]

    # ---- reading -----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The plain model's parameter names, in model order."""
        return [name for s in range(self.pp) for name in self._cell(s, 0)]

    def local_shape(self, name: str, tp_rank: int = 0) -> tuple[int, ...]:
        return self._cell(self._stage(name), tp_rank)[name].shape

    def full_shape(self, name: str) -> tuple[int, ...]:
        shape = list(self.local_shape(name))
        split = tp_split(name)
        if split is not None:
            shape[split[0]] *= self.tp
        return tuple(shape)

    def _stage(self, name: str) -> int:
        try:
            return self._stage_of[name]
        except KeyError:
            raise KeyError(f"{self.dir}: no parameter {name!r} in this checkpoint") from None

    def tensor(self, name: str, kind: str = "master") -> torch.Tensor:
        """The full (TP = 1) tensor ``kind`` of parameter ``name``: "master" (fp32 weights the optimizer
        holds), "module" (the weights the forward used, in the run's precision), "exp_avg", "exp_avg_sq"."""
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
        stage, split = self._stage(name), tp_split(name)
        if split is None or self.tp == 1:
            return self._cell(stage, 0)[name].readers[kind]()
        from igpt_ds.parallel.weights import unshard

        parts = [self._cell(stage, t)[name].readers[kind]() for t in range(self.tp)]
        return unshard(parts, split[0], split[1])

    def tensors(self, kind: str = "master") -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.tensor(name, kind)

    # ---- the rest of the training state ------------------------------------------------------
    def _model_states_file(self) -> str:
        return "zero_pp_rank_0_mp_rank_00_model_states.pt" if self.zero_stage == 3 else "mp_rank_00_model_states.pt"

    def engine_state(self) -> dict:
        """What DeepSpeed's model-states file records besides weights: lr_scheduler, global_steps,
        global_samples, skipped_steps."""
        obj = self._obj(self._model_states_file())
        return {k: obj.get(k) for k in ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")}

    def _torch_optimizer(self) -> dict:
        """The torch Adam ``state_dict()`` of model-parallel rank 0, DP rank 0 (its param groups and state)."""
        if not self.flat_optimizer and self.zero_stage == 0:
            opt = self._obj(self._model_states_file(), "optimizer")
            return opt if "param_groups" in opt else opt["optimizer_state_dict"]
        osd = self._obj(self._optim_name(0, 0), "optimizer_state_dict")
        return osd["base_optimizer_state"] if self.zero_stage < 3 else osd["optimizer_state_dict"]

    def optimizer_hyperparameters(self) -> dict:
        """The first param group's lr (the next step's), initial_lr, betas, eps, weight_decay."""
        group = self._torch_optimizer()["param_groups"][0]
        return {k: group[k] for k in ("lr", "initial_lr", "betas", "eps", "weight_decay") if k in group}

    def adam_step(self) -> int:
        """Adam's step count (the same for every parameter)."""
        state = self._torch_optimizer()["state"]
        if not state:
            raise CheckpointFileError(f"{self.dir}: Adam holds no state (the checkpoint precedes the first step)")
        step = next(iter(state.values()))["step"]
        return int(step.load().item() if isinstance(step, LazyTensor) else step)

    def rank_state(self, rank: int) -> Optional[dict]:
        return read_rank_state(self.root, self.tag, rank)


def _flat_view(flat: LazyTensor, start: int, shape: tuple) -> Callable[[], torch.Tensor]:
    return lambda: flat.read(start, math.prod(shape)).view(shape)

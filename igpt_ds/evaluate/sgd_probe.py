"""The ImageNet linear probe of the paper (Sec. 3.4): SGD, momentum 0.9, a high-rate search, cosine decay.

    from igpt_ds.evaluate.sgd_probe import SGDSettings, sgd_probe
    result = sgd_probe(train, test, layers=[8, 12, 16], settings=SGDSettings(epochs=10))

Protocol (``tools/linear_probe.py --solver sgd``):
- Classifier: one multinomial logistic regression head per layer (d -> classes, with bias), mean
  cross-entropy, zero init, SGD with momentum 0.9 in PyTorch's form (``v = 0.9 v + g``,
  ``w -= lr_t v``), no weight decay unless asked, ``lr_t = lr * (1 + cos(pi t / T)) / 2`` over the
  T steps of ``--epochs`` (or ``--iterations``).
- Rate: on the training features minus a stratified ``--holdout`` fraction (paper: 4% of ImageNet
  train), one head per (layer, rate of ``--lr-grid``), every head on the same mini-batches; the rate
  with the highest held-out accuracy wins (ties: the smaller rate). A head whose loss turns
  non-finite, or whose mean training loss over its last epoch is over twice the loss it started
  from (ln classes, zero weights), is ``diverged`` and cannot win (logistic regression's gradient is
  bounded, so a too-high rate oscillates at a huge loss rather than reaching NaN); a layer whose
  every rate diverged is an error that says so. Then one head per layer, at its rate, is trained
  on all of train and scored once on test. The best layer is the one with the highest held-out
  accuracy (no test label chooses it).
- Standardisation: per-feature mean and std (ddof 0) of the rows a head trains on (the fit part
  while searching, all of train for the final heads), both from ONE streaming pass (Chan's
  parallel update in float64 over chunks).
- ``--concat K``: a head over the K layers around the best one, concatenated per mini-batch (never
  in memory as a whole), with its own rate search; ``--concat-layers SPEC`` the same over a fixed set.

Data: rows are read from the ``.npz`` members with ``pread`` (``FeatureFile.read_rows``), never a
whole layer: each epoch visits every row once; the order is seeded by (seed, epoch): the file's
row chunks are shuffled, a buffer of chunks (``--memory-budget``) is filled and its rows shuffled,
the remainder carried into the next buffer. A file that fits the budget is shuffled as a whole.
Every requested layer (all rates) trains in the same pass over the data, so L layers cost one read.

Several processes (``torchrun --nproc-per-node N tools/linear_probe.py --solver sgd ...``): every
rank reads the same stream and takes a contiguous share of each global batch; gradients and
counts are summed across ranks (gloo on CPU, NCCL on GPU), so the result equals one process's up
to float summation order. Only rank 0 writes.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from igpt_ds.evaluate.feature_files import FeatureFile, FeatureFileError
from igpt_ds.evaluate.feature_files import feature_key as member  # layer<l>, layer<l>_mask<k>
from igpt_ds.evaluate.probe import modal_vote, stratified_holdout
from igpt_ds.parallel.layout import default_backend

LR_GRID = (30.0, 10.0, 3.0, 1.0, 0.3, 0.1)
HOLDOUT = 0.04
MOMENTUM = 0.9
DIVERGED = 2.0  # a head whose last-epoch loss exceeds this x ln(classes) (its zero-weight loss) diverged


@dataclass
class SGDSettings:
    lr_grid: Sequence[float] = LR_GRID
    holdout: float = HOLDOUT          # fraction of train that chooses the rate (paper: 0.04)
    epochs: Optional[float] = 10      # passes over the data per training run (or iterations)
    iterations: Optional[int] = None  # steps per training run; overrides epochs
    batch_size: int = 256             # global mini-batch (split across ranks)
    momentum: float = MOMENTUM
    weight_decay: float = 0.0
    memory_budget_mb: float = 1024.0  # host buffer of the shuffled stream
    seed: int = 0
    device: str = "auto"
    concat: int = 0
    concat_layers: tuple = ()         # a fixed set of layers to concatenate (instead of concat's window)
    bert_eval: str = "single"         # single | vote (modal vote over the test file's BERT masks)
    threads: Optional[int] = None     # torch CPU threads (None: torch's default)
    progress: bool = True
    log: object = field(default=print, repr=False)


# ---------------------------------------------------------------------------------------------
# Processes and devices
# ---------------------------------------------------------------------------------------------

def _setup(device_arg: str) -> tuple[torch.device, int, int]:
    """(device, rank, world): joins the torchrun group when WORLD_SIZE > 1 (device chosen first)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device = torch.device("cuda", local % torch.cuda.device_count()) if torch.cuda.is_available() \
            else torch.device("cpu")
    else:
        device = torch.device(device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # On a GPU both backends (the heads' tensors over NCCL, anything on the host over gloo), as training's.
        dist.init_process_group(default_backend() if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return device, dist.get_rank(), dist.get_world_size()
    return device, 0, 1


def _sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


# ---------------------------------------------------------------------------------------------
# Streaming rows
# ---------------------------------------------------------------------------------------------

class RowStream:
    """Mini-batches of selected rows of several members of one feature file, within a memory budget.

    ``rows``: bool [N] of the rows to serve (None: all). ``batches(epoch)`` yields
    ``(arrays {member: [b, d]} in the file's dtype, row indices [b])``; with ``shuffle`` every epoch
    is a new seeded order, without it rows come in file order (evaluation).
    """

    def __init__(self, file: FeatureFile, members: Sequence[str], rows: Optional[np.ndarray], batch_size: int,
                 budget_bytes: float, seed: int = 0, shuffle: bool = True):
        self.file, self.members, self.batch_size = file, list(members), batch_size
        self.seed, self.shuffle = seed, shuffle
        self.rows = np.ones(file.num_rows, bool) if rows is None else rows
        self.count = int(self.rows.sum())
        self.row_bytes = sum(file.width_of(m) * file.dtype_of(m).itemsize for m in self.members)
        # The chunk geometry (hence the order) is that of every layer of the file, whatever subset is
        # read: a layer probed alone sees the same mini-batches as with all the others.
        every = sum(file.width(l) * file.dtype_of(f"layer{l}").itemsize for l in file.layers)
        geometry_bytes = max(every, self.row_bytes)
        # Half the budget holds the chunks read, half the shuffled copy of their selected rows.
        buffer_rows = max(batch_size, int(budget_bytes // (2 * geometry_bytes)))
        n = file.num_rows
        if buffer_rows >= n:
            self.chunk_rows, self.chunks_per_buffer = n, 1  # the whole file: a full shuffle each epoch
        else:
            # At least 256 chunks from random places per buffer, so a batch mixes many regions of
            # the file (extraction keeps the source order: an ImageNet folder is sorted by class).
            self.chunk_rows = max(1, min(4096, buffer_rows // 256))
            self.chunks_per_buffer = max(1, buffer_rows // self.chunk_rows)
        self.num_chunks = math.ceil(n / self.chunk_rows)
        self.buffer_bytes = 2 * self.chunk_rows * self.chunks_per_buffer * self.row_bytes

    def steps(self) -> int:
        return math.ceil(self.count / self.batch_size)

    def _read_chunks(self, chunk_ids) -> tuple[dict, np.ndarray]:
        spans = [(c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.file.num_rows)) for c in chunk_ids]
        index = np.concatenate([np.arange(a, b) for a, b in spans])
        keep = self.rows[index]
        arrays = {}
        for m in self.members:
            buf = np.empty((len(index), self.file.width_of(m)), self.file.dtype_of(m))
            pos = 0
            for a, b in spans:
                self.file.read_rows(m, a, b, out=buf[pos:pos + b - a])
                pos += b - a
            arrays[m] = buf[keep] if not keep.all() else buf
        return arrays, index[keep]

    def batches(self, epoch: int = 0) -> Iterator[tuple[dict, np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        order = rng.permutation(self.num_chunks) if self.shuffle else np.arange(self.num_chunks)
        carry: Optional[tuple[dict, np.ndarray]] = None
        for g in range(0, self.num_chunks, self.chunks_per_buffer):
            group = np.sort(order[g:g + self.chunks_per_buffer])  # file order inside a group: sequential reads
            arrays, index = self._read_chunks(group)
            if self.shuffle:
                perm = rng.permutation(len(index))
                arrays, index = {m: a[perm] for m, a in arrays.items()}, index[perm]
            if carry is not None:
                arrays = {m: np.concatenate([carry[0][m], a]) for m, a in arrays.items()}
                index = np.concatenate([carry[1], index])
            full = len(index) // self.batch_size * self.batch_size
            for s in range(0, full, self.batch_size):
                yield {m: a[s:s + self.batch_size] for m, a in arrays.items()}, index[s:s + self.batch_size]
            carry = ({m: a[full:] for m, a in arrays.items()}, index[full:]) if full < len(index) else None
        if carry is not None:
            yield carry


def _chan(a: tuple, b: tuple) -> tuple:
    """Combine (count, mean, M2) of two row sets (float64): Chan et al.'s parallel variance."""
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    if n == 0:
        return a
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta ** 2 * (na * nb / n)


def feature_statistics(file: FeatureFile, layers: Sequence[int], holdout: np.ndarray, budget_bytes: float,
                       rank: int = 0, world: int = 1, device: Optional[torch.device] = None) -> dict:
    """``{"fit": {l: (mean, std)}, "all": {l: (mean, std)}}`` float32 tensors, from one pass over the rows.

    ``fit`` excludes the ``holdout`` rows; ``all`` is every row. Rank r reads chunks r, r+W, ...;
    the per-rank moments are gathered and combined in rank order.
    """
    device = device or torch.device("cpu")
    widths = {l: file.width_of(member(l)) for l in layers}
    row_bytes = sum(8 * w for w in widths.values()) * 2  # float64 copy + centred temporary
    chunk = max(1, int(budget_bytes // row_bytes))
    parts = {l: {"fit": (0, np.zeros(w), np.zeros(w)), "hold": (0, np.zeros(w), np.zeros(w))}
             for l, w in widths.items()}
    for c, start in enumerate(range(0, file.num_rows, chunk)):
        if c % world != rank:
            continue
        stop = min(start + chunk, file.num_rows)
        sel = holdout[start:stop]
        for l in layers:
            x = file.read_rows(member(l), start, stop).astype(np.float64)
            for name, rows in (("fit", x[~sel]), ("hold", x[sel])):
                if len(rows):
                    m = rows.mean(0)
                    parts[l][name] = _chan(parts[l][name], (len(rows), m, ((rows - m) ** 2).sum(0)))
            del x
    out: dict = {"fit": {}, "all": {}}
    for l in layers:
        mine = [parts[l]["fit"], parts[l]["hold"]]
        if world > 1:  # [2 sets, 1 + 2w] per rank, gathered on the collective's device
            flat = torch.tensor(np.stack([np.concatenate([[n], m, m2]) for n, m, m2 in mine]), dtype=torch.float64,
                                device=device)
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            w = widths[l]
            ranks = [[(float(g[i, 0]), g[i, 1:1 + w].cpu().numpy(), g[i, 1 + w:].cpu().numpy()) for i in range(2)]
                     for g in gathered]
        else:
            ranks = [mine]
        fit = hold = (0, np.zeros(widths[l]), np.zeros(widths[l]))
        for f, h in ranks:
            fit, hold = _chan(fit, f), _chan(hold, h)
        for name, (n, m, m2) in (("fit", fit), ("all", _chan(fit, hold))):
            std = np.sqrt(m2 / max(n, 1))
            std[std < 1e-6] = 1.0  # constant features stay 0 (as the L-BFGS probe's standardize)
            out[name][l] = (torch.tensor(m, dtype=torch.float32, device=device),
                            torch.tensor(std, dtype=torch.float32, device=device))
    return out


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------

class HeadSet:
    """G linear heads over the same input (one layer, or a window of layers concatenated), one rate each."""

    def __init__(self, name: str, layers: Sequence[int], width: int, classes: int, rates: Sequence[float],
                 stats: dict, device: torch.device):
        self.name, self.layers, self.rates = name, list(layers), [float(r) for r in rates]
        g = len(self.rates)
        self.weight = torch.zeros(g, width, classes, device=device, requires_grad=True)
        self.bias = torch.zeros(g, classes, device=device, requires_grad=True)
        self.velocity = [torch.zeros_like(self.weight), torch.zeros_like(self.bias)]
        self.rate = torch.tensor(self.rates, device=device)
        self.diverged = torch.zeros(g, dtype=torch.bool, device=device)
        self.stats = stats  # {layer: (mean, std)} of the rows these heads train on
        self.loss_sum = torch.zeros(g, dtype=torch.float64, device=device)  # over the last epoch's steps
        self.loss_rows = 0
        self.classes = classes

    def inputs(self, batch: dict, device, view: int = 0) -> torch.Tensor:
        xs = []
        for l in self.layers:
            x = torch.from_numpy(batch[member(l, view)]).to(device, non_blocking=True).float()
            mean, std = self.stats[l]
            xs.append((x - mean) / std)
        return xs[0] if len(xs) == 1 else torch.cat(xs, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # [G, b, C]
        return torch.einsum("bd,gdc->gbc", x, self.weight) + self.bias[:, None, :]

    def step(self, x: torch.Tensor, y: torch.Tensor, global_rows: int, factor: float, momentum: float,
             weight_decay: float, world: int, record: bool = True) -> None:
        g = len(self.rates)
        logits = self.logits(x)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(g), reduction="none")
        per_head = losses.view(g, -1).sum(1) / global_rows  # this rank's share of each head's mean loss
        self.weight.grad = self.bias.grad = None
        per_head.sum().backward()
        grads = [self.weight.grad, self.bias.grad]
        loss = per_head.detach().double()
        if world > 1:
            flat = torch.cat([grads[0].reshape(-1), grads[1].reshape(-1), loss.float()])
            dist.all_reduce(flat)
            n_w = grads[0].numel()
            grads = [flat[:n_w].view_as(grads[0]), flat[n_w:n_w + grads[1].numel()].view_as(grads[1])]
            loss = flat[n_w + grads[1].numel():].double()
        with torch.no_grad():
            bad = ~torch.isfinite(loss) | ~torch.isfinite(grads[0]).flatten(1).all(1)
            self.diverged |= bad
            rate = torch.where(self.diverged, torch.zeros_like(self.rate), self.rate * factor)
            for p, v, grad in zip((self.weight, self.bias), self.velocity, grads):
                grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
                if weight_decay and p is self.weight:
                    grad = grad + weight_decay * p
                v.mul_(momentum).add_(grad)
                p.sub_(rate.view(-1, *[1] * (p.dim() - 1)) * v)
                dead = self.diverged.view(-1, *[1] * (p.dim() - 1))
                p.masked_fill_(dead, 0.0)
                v.masked_fill_(dead, 0.0)
            if record:
                self.loss_sum += torch.where(self.diverged, torch.zeros_like(loss), loss) * global_rows
                self.loss_rows += global_rows

    def finish(self) -> None:
        """Mark the heads whose last-epoch loss ended over twice the zero-weight loss ln(classes) as diverged.

        Twice, not once: on a layer without signal a sound rate hovers around ln(classes) itself.
        """
        mean = self.loss_sum / max(self.loss_rows, 1)
        self.diverged |= ~(mean <= DIVERGED * math.log(self.classes))
        self.final_loss = mean

    @torch.no_grad()
    def predict(self, batch: dict, device, view: int = 0) -> torch.Tensor:  # [G, b]
        return self.logits(self.inputs(batch, device, view)).argmax(-1)


def cosine(t: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * t / total))


def _local(n: int, rank: int, world: int) -> slice:
    return slice(n * rank // world, n * (rank + 1) // world)


def train_heads(heads: list[HeadSet], stream: RowStream, labels: np.ndarray, settings: SGDSettings,
                device, rank: int, world: int, desc: str) -> dict:
    """Train every head set on the same mini-batches of ``stream`` for the run's steps (cosine decay)."""
    steps_per_epoch = stream.steps()
    total = settings.iterations or max(1, math.ceil(settings.epochs * steps_per_epoch))
    recorded_from = total - min(steps_per_epoch, total)  # the last epoch's steps judge divergence
    bar = tqdm(total=total, desc=desc, unit="step", disable=not settings.progress or rank != 0, dynamic_ncols=True)
    t0, rows_seen, step, epoch = time.perf_counter(), 0, 0, 0
    while step < total:
        for arrays, index in stream.batches(epoch):
            if step >= total:
                break
            part = _local(len(index), rank, world)
            local = {m: a[part] for m, a in arrays.items()}
            y = torch.from_numpy(labels[index[part]]).to(device)
            factor = cosine(step, total)
            for h in heads:
                h.step(h.inputs(local, device), y, len(index), factor, settings.momentum, settings.weight_decay, world,
                       record=step >= recorded_from)
            rows_seen += len(index)
            step += 1
            bar.update(1)
        epoch += 1
    bar.close()
    for h in heads:
        h.finish()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return {"steps": total, "epochs": round(rows_seen / max(stream.count, 1), 3), "rows": rows_seen,
            "seconds": round(seconds, 2), "rows_per_second": round(rows_seen / max(seconds, 1e-9), 1),
            "batch_size": stream.batch_size}


@torch.no_grad()
def evaluate_heads(heads: list[HeadSet], stream: RowStream, labels: np.ndarray, device, rank: int, world: int,
                   views: int = 1, seed: int = 0, num_classes: int = 0) -> dict:
    """{head name: {"correct": [G], "correct_vote": [G] (views > 1), "rows": n}} over ``stream`` (file order)."""
    out = {h.name: {"correct": torch.zeros(len(h.rates), dtype=torch.float64, device=device),
                    "vote": torch.zeros(len(h.rates), dtype=torch.float64, device=device)} for h in heads}
    rows = 0
    for arrays, index in stream.batches(0):
        part = _local(len(index), rank, world)
        local = {m: a[part] for m, a in arrays.items()}
        idx = index[part]
        y = torch.from_numpy(labels[idx]).to(device)
        rows += len(index)
        for h in heads:
            preds = [h.predict(local, device, v) for v in range(views)]  # views x [G, b]
            out[h.name]["correct"] += (preds[0] == y).sum(1).double()
            if views > 1:
                stacked = torch.stack(preds, 1).cpu().numpy()  # [G, K, b]
                for g in range(len(h.rates)):
                    voted = modal_vote(stacked[g], num_classes, seed, idx)
                    out[h.name]["vote"][g] += float((voted == labels[idx]).sum())
    result = {}
    for h in heads:
        c = _sum(out[h.name]["correct"], world).cpu().numpy()
        v = _sum(out[h.name]["vote"], world).cpu().numpy()
        result[h.name] = {"accuracy": (c / max(rows, 1)).tolist(),
                          "accuracy_vote": (v / max(rows, 1)).tolist() if views > 1 else None}
    return result


# ---------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------

def _choose(head: HeadSet, accuracy: list[float]) -> tuple[Optional[float], float, dict]:
    """(rate, its held-out accuracy, {rate: accuracy or "diverged"}); ties keep the smaller rate."""
    diverged = head.diverged.cpu().tolist()
    table = {f"{r:g}": ("diverged" if d else a) for r, a, d in zip(head.rates, accuracy, diverged)}
    alive = [(a, -r) for r, a, d in zip(head.rates, accuracy, diverged) if not d]
    if not alive:
        return None, float("nan"), table
    acc, neg_rate = max(alive)
    return -neg_rate, acc, table


def _all_diverged(name: str, table: dict) -> FeatureFileError:
    return FeatureFileError(f"{name}: every rate of --lr-grid diverged ({', '.join(table)}: the loss turned NaN/inf "
                            f"or ended over twice its starting value ln(classes)); "
                            f"try smaller rates, e.g. --lr-grid 0.1,0.03,0.01,0.003")


def sgd_probe(train: FeatureFile, test: FeatureFile, layers: Sequence[int], settings: SGDSettings) -> dict:
    """The per-layer result of the SGD protocol (module docstring): the JSON core of ``linear_probe.py``.

    Under torchrun it joins the launcher's process group for the run and leaves it afterwards: a
    gloo group still alive at interpreter exit can abort the process ("terminate called without an
    active exception").
    """
    if settings.threads:
        torch.set_num_threads(settings.threads)
    created = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    device, rank, world = _setup(settings.device)
    try:
        result = _sgd_probe(train, test, layers, settings, device, rank, world)
    except BaseException:
        if created:
            dist.destroy_process_group()
        raise
    if created:
        dist.barrier()  # every rank done with its collectives before the group goes
        dist.destroy_process_group()
    return result


def _sgd_probe(train: FeatureFile, test: FeatureFile, layers: Sequence[int], settings: SGDSettings,
               device: torch.device, rank: int, world: int) -> dict:
    from igpt_ds.train.metrics import peak_rss_bytes

    log = settings.log
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    say = log if rank == 0 else (lambda *a, **k: None)
    t_start = time.perf_counter()
    y_train, y_test = train.labels(), test.labels()
    classes = int(max(y_train.max(), y_test.max())) + 1
    holdout = stratified_holdout(y_train, settings.holdout, settings.seed)
    budget = settings.memory_budget_mb * 2**20
    views = 1
    if settings.bert_eval == "vote":
        views = min(test.masks(l) for l in layers)
        if views < 2:
            raise FeatureFileError(f"{test.path}: --bert-eval vote needs the features of several BERT masks per image "
                                   f"(members layer<l>_mask<k>); extract the test split with --bert-eval vote "
                                   f"--bert-masks 5")
    say(f"  sgd probe on {device} ({world} process{'es' if world > 1 else ''}): {len(y_train)} train rows "
        f"({int(holdout.sum())} held out to choose the rate), {len(y_test)} test rows, {classes} classes, "
        f"layers {list(layers)}, rates {[f'{r:g}' for r in settings.lr_grid]}")
    t0 = time.perf_counter()
    stats = feature_statistics(train, layers, holdout, budget, rank, world, device)
    stats_seconds = time.perf_counter() - t0

    def stream(file, rows, members, shuffle=True, seed_offset=0):
        return RowStream(file, members, rows, settings.batch_size, budget, settings.seed + seed_offset, shuffle)

    def heads_for(window_sets, which, rates_of):
        return [HeadSet(name, ls, sum(train.width_of(member(l)) for l in ls), classes, rates_of(name), stats[which],
                        device) for name, ls in window_sets]

    result: dict = {"layers": {}, "passes": {}}
    members = [member(l) for l in layers]
    # 1. Rate search: every layer x every rate on the fit part, scored on the held-out part.
    search = heads_for([(str(l), [l]) for l in layers], "fit", lambda _: settings.lr_grid)
    fit_stream = stream(train, ~holdout, members)
    say(f"  stream: buffer {fit_stream.buffer_bytes / 2**20:.0f} MiB in chunks of {fit_stream.chunk_rows} rows; "
        f"{fit_stream.steps()} steps per epoch of batch {settings.batch_size}")
    result["passes"]["search"] = train_heads(search, fit_stream, y_train, settings, device, rank, world, "rate search")
    held = evaluate_heads(search, stream(train, holdout, members, shuffle=False), y_train, device, rank, world)
    chosen = {}
    for h in search:
        rate, acc, table = _choose(h, held[h.name]["accuracy"])
        if rate is None:
            raise _all_diverged(f"layer {h.name}", table)
        chosen[h.name] = rate
        result["layers"][h.name] = {"lr": rate, "val_accuracy": acc, "lr_search": table}
    best = max(layers, key=lambda l: (result["layers"][str(l)]["val_accuracy"], -l))
    window = None
    if settings.concat or settings.concat_layers:
        from igpt_ds.evaluate.probe import concat_window

        window = list(settings.concat_layers) or concat_window(best, settings.concat, layers)
        cs = heads_for([("concat", window)], "fit", lambda _: settings.lr_grid)
        result["passes"]["concat_search"] = train_heads(cs, fit_stream, y_train, settings, device, rank, world,
                                                        "concat rate search")
        held_c = evaluate_heads(cs, stream(train, holdout, members, shuffle=False), y_train, device, rank, world)
        rate, acc, table = _choose(cs[0], held_c["concat"]["accuracy"])
        if rate is None:
            raise _all_diverged(f"concat {window}", table)
        chosen["concat"] = rate
        result["concat"] = {"layers": window, "lr": rate, "val_accuracy": acc, "lr_search": table,
                            "width": sum(train.width_of(member(l)) for l in window)}
    # 2. Final heads: each layer (and the window) at its rate, on all of train; test scored once.
    sets = [(str(l), [l]) for l in layers] + ([("concat", window)] if window else [])
    final = heads_for(sets, "all", lambda name: [chosen[name]])
    result["passes"]["final"] = train_heads(final, stream(train, None, members, seed_offset=1), y_train, settings,
                                            device, rank, world, "final heads")
    test_members = [member(l, v) for l in layers for v in range(views)]
    scored = evaluate_heads(final, stream(test, None, test_members, shuffle=False), y_test, device, rank, world,
                            views, settings.seed, classes)
    for h in final:
        entry = result["concat"] if h.name == "concat" else result["layers"][h.name]
        entry["train_loss"] = float(h.final_loss[0])  # mean over the last epoch
        entry["diverged_in_final"] = bool(h.diverged[0])
        single = scored[h.name]["accuracy"][0]
        if views > 1:
            entry.update(test_accuracy=scored[h.name]["accuracy_vote"][0], test_accuracy_single_mask=single)
        else:
            entry["test_accuracy"] = single
        if h.name != "concat":
            entry["width"] = train.width_of(member(int(h.name)))
    result["bert_eval"] = (f"modal vote of {views} single-mask predictions, ties at random (seed {settings.seed})"
                           if views > 1 else None)
    result["_heads"] = {h.name: (h, stats["all"]) for h in final}
    rows_read = sum(p["rows"] for p in result["passes"].values())
    seconds = time.perf_counter() - t_start
    result["statistics_seconds"] = round(stats_seconds, 2)
    result["throughput"] = {
        "rows_per_second": round(rows_read / max(sum(p["seconds"] for p in result["passes"].values()), 1e-9), 1),
        "features_per_second_per_layer": round(rows_read * len(layers) / max(seconds, 1e-9), 1),
        "note": "training rows (all passes) per second of training; x layers trained at once"}
    result["peak_rss_bytes"] = peak_rss_bytes()
    if device.type == "cuda":
        result["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(device))
    result["device"], result["world_size"], result["rank"] = str(device), world, rank
    result["stream"] = {"buffer_bytes": fit_stream.buffer_bytes, "chunk_rows": fit_stream.chunk_rows,
                        "memory_budget_mb": settings.memory_budget_mb}
    return result


def save_heads(path: str, heads: dict) -> str:
    """The final heads as ``.npz``: ``<name>.weight`` [d, C], ``<name>.bias`` [C], ``<name>.mean``/``.std`` [d]."""
    from igpt_ds.checkpoint.atomic import atomic_file

    arrays = {}
    for name, (h, stats) in heads.items():
        arrays[f"{name}.weight"] = h.weight[0].detach().cpu().numpy()
        arrays[f"{name}.bias"] = h.bias[0].detach().cpu().numpy()
        arrays[f"{name}.mean"] = torch.cat([stats[l][0] for l in h.layers]).cpu().numpy()
        arrays[f"{name}.std"] = torch.cat([stats[l][1] for l in h.layers]).cpu().numpy()
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return path

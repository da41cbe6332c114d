"""Data-parallel trainer ranks under torchrun: gloo on the CPU, NCCL on GPUs.

    torchrun --standalone --nproc-per-node 2 -m trainer      # or: datadiet train --nproc 2

Rank 0 is the trainer as one process runs it: the weight table, the stream, the lease, the validation set,
publishing and checkpoints (trainer/loop.py, intake.py, publish.py). Every step it draws the global batch
(``batch_size`` rows, the same sampler) and sends each rank its contiguous shard of payloads and importance
weights; every rank, rank 0 included, runs the forward and backward of its shard through a
DistributedDataParallel wrapper (its backward all-reduces the gradients), with its own ghost scores
(trainer/hypergrad.py: the hooks see the rank's own activations), and the shards' losses, dots and norms
are gathered back in batch order, so the weighting rule's ``observe`` gets the whole batch as one process
would give it. Every rank then takes the same optimizer step on the same all-reduced gradient.

The loss scale: one process backprops sum_i c_i loss_i over the global batch (c sums to 1). DDP averages
the ranks' gradients, (1/N) sum_r grad L_r, so rank r backprops

    L_r = N sum_{i in shard r} c_i loss_i       =>    (1/N) sum_r grad L_r = sum_i c_i grad loss_i

and its scorer's hooks see N c_i g_i: the coefficients it divides by are N c_i (GhostScorer.scores).

The validation gradient G_val is computed on rank 0 (trainer/validation.py) and sent with the step that
first needs it; the model and the optimizer state are sent whenever rank 0 changed them outside a step
(resume, idle restore, optimizer reset). Messages go over a gloo group of their own, also under NCCL,
so a rank waiting for an idle rank 0 waits on a socket, not on a spinning GPU kernel: a step is one
broadcast_object_list from rank 0 (every shard's payloads and importance weights; each rank takes its
own), DDP's all-reduce, and one all_gather of the shards' losses, dots and norms as float64 tensors.
Rank 0 decides when to stop (max_steps, SIGTERM) and tells the others; they ignore SIGTERM/SIGINT.

Not supported with ranks: the per-batch rules (``batch_from``: rholoss, l2rw), which re-weight the batch
between its forward and backward; they exit with status 78 at start. RNG: rank 0 seeds as one process does
(DATADIET_SEED), rank r > 0 its torch stream from (DATADIET_SEED, r) (dropout differs per shard).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import itertools
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.models import build_model
from trainer.models.base import Batch, ModelNotFound, TrainModel, to_device
from trainer.sampler import Draw
from trainer.settings import TrainerSettings
from trainer.step import Learner
from trainer.table import WeightTable
from trainer.weighting import METHODS, Weighting

log = logging.getLogger("datadiet.trainer")

# how long a rank waits for rank 0's next message: an idle trainer may send nothing for days, and torchrun
# ends every rank when one exits, so there is no deadline to keep here
WAIT_FOR_RANK0 = timedelta(days=365)


class RanksError(ValueError):
    """Settings that distributed ranks cannot run (a per-batch weighting rule)."""


@dataclass
class Ranks:
    """This process's place among the torchrun ranks, and the process groups."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    control: Any  # the gloo group the messages go over (dist.ProcessGroup)
    stopped: bool = False
    in_step: bool = False  # rank 0: between a step's message and its gather (the others are mid-step)
    net: DistributedDataParallel | None = None  # held here alone: freed before the groups go (close)

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def shards(self, n: int) -> list[slice]:
        """Contiguous shards of a batch of n, in rank order (the first n % world one row longer)."""
        q, r = divmod(n, self.world)
        bounds = np.cumsum([0] + [q + (i < r) for i in range(self.world)])
        return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]

    def send(self, message: dict[str, Any]) -> None:
        """Rank 0: one message to every other rank."""
        self.in_step = message["op"] == "step"
        dist.broadcast_object_list([message], src=0, group=self.control)

    def receive(self) -> dict[str, Any]:
        """Ranks > 0: rank 0's next message (waits as long as rank 0 takes)."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return dict(box[0])

    def gather(self, rows: np.ndarray, sizes: list[int]) -> np.ndarray:
        """Every rank's ``rows`` (k, sizes[rank]) side by side in rank order, (k, sum(sizes)), on every
        rank: one all_gather of float64 tensors padded to the longest shard."""
        k, m = rows.shape[0], max(sizes)
        mine = torch.full((k, m), float("nan"), dtype=torch.float64)
        mine[:, : rows.shape[1]] = torch.from_numpy(rows)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine, group=self.control)
        self.in_step = False
        return torch.cat([o[:, :b] for o, b in zip(out, sizes, strict=True)], dim=1).numpy()

    def stop(self) -> None:
        """Rank 0: tell the other ranks to exit (once; after the final checkpoint, or on a failed start)."""
        if not self.stopped:
            self.stopped = True
            self.send({"op": "stop"})

    def finish(self) -> None:
        """Rank 0, at exit: stop the others, unless it fails mid-step (the others wait in a collective
        that a message would not match: rank 0 exits and torchrun ends them), and leave the groups."""
        if not self.in_step:
            with contextlib.suppress(Exception):
                self.stop()
        self.close()

    def close(self) -> None:
        """Free the DDP wrapper, then leave the groups: a reducer that outlives its process group (DDP
        sits in reference cycles, so only a collection frees it) aborts the process at exit, "terminate
        called without an active exception", in 2-3 of 10 runs here; none in 20 with the collection."""
        self.net = None
        gc.collect()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def world_size() -> int:
    """WORLD_SIZE as torchrun sets it; 1 when unset."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_settings(settings: TrainerSettings) -> None:
    """RanksError when the settings cannot run on several ranks."""
    cls = METHODS.get(settings.reweight)
    if cls is not None and cls.batch_from:
        raise RanksError(
            f"DATADIET_REWEIGHT={settings.reweight} re-weights each batch between its forward and backward, "
            "which torchrun ranks do not support yet: run one trainer process (no --nproc)"
        )


def start(settings: TrainerSettings) -> Ranks:
    """Join the torchrun ranks (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from torchrun): NCCL when
    this rank trains on CUDA, else gloo, plus the gloo group for messages. Raises RanksError for settings
    the ranks cannot run (every rank checks, so all exit alike)."""
    check_settings(settings)
    rank, world = int(os.environ["RANK"]), world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)  # "cuda" below (the trainer's device) is this rank's GPU
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    control = dist.new_group(backend="gloo", timeout=WAIT_FOR_RANK0)
    ranks = Ranks(rank, world, local_rank, device, control)
    _share_cores(settings, ranks)
    return ranks


def _share_cores(settings: TrainerSettings, ranks: Ranks) -> None:
    """On the CPU, unless DATADIET_TORCH_THREADS says otherwise, the ranks split the trainer's default
    threads (one less than the cores, at most 8) between them, at least one each."""
    if ranks.device.type == "cpu" and not settings.torch_threads:
        torch.set_num_threads(max(1, min(8, ((os.cpu_count() or 2) - 1) // ranks.world)))


def learner_for(ranks: Ranks | None) -> Callable[[TrainerSettings, TrainModel, Weighting], Learner]:
    """The Learner factory for Trainer: one process's, or rank 0's among ``ranks``."""
    return Learner if ranks is None else functools.partial(RankLearner, ranks=ranks)


class PerSampleLoss(nn.Module):
    """The model's ``per_sample_loss`` as a forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model: TrainModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model.per_sample_loss(batch)  # (b,)


def _cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it on the CPU (to pickle it for another rank's device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


class ShardLearner(Learner):
    """What every rank does with its shard: the DDP forward and backward, its scores, the gather."""

    ranks: Ranks

    def _wrap(self) -> None:
        # DDP's constructor broadcasts rank 0's parameters and buffers (a collective: every rank, at start)
        cuda = self.ranks.device.type == "cuda"
        # buffers do not train: synced at the start and sent with the model, not at every forward
        # (torch 2.13 renames broadcast_buffers to forward_sync_buffers)
        params = inspect.signature(DistributedDataParallel).parameters
        no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        self.ranks.net = DistributedDataParallel(
            PerSampleLoss(self.model),
            device_ids=[self.ranks.local_rank] if cuda else None,
            **{no_buffer_sync: False},  # type: ignore[arg-type]
        )

    def shard_step(
        self,
        batch: Batch,
        c: torch.Tensor,
        g_val: list[torch.Tensor] | None,
        sizes: list[int],
        pad: bool = False,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Forward and backward of this rank's shard (c: its importance weights (b,)), the gradients
        all-reduced by DDP; returns the whole batch's (losses (B,), dots (B,), norms (B,)) gathered from
        every rank in batch order, dots and norms None unscored or when a loss is not finite. ``sizes``:
        every rank's shard length; ``pad``: the shard is a stand-in with coefficient 0 (a rank without
        rows), which adds no row."""
        L, n = self, self.ranks.world
        coef = n * c  # N c_i: DDP averages over the N ranks (see the module docstring)
        with L.scorer.capture() if g_val is not None else contextlib.nullcontext():
            with torch.autocast(L.device.type, dtype=torch.bfloat16, enabled=L.autocast):
                assert self.ranks.net is not None, "a step after close()"
                losses = self.ranks.net(batch)  # (b,)
            (coef * losses.float()).sum().backward()
        b = 0 if pad else len(c)
        rows = np.full((3, b), np.nan)  # losses, dots, norms (NaN: not scored)
        rows[0] = losses.detach().double().cpu().numpy()[:b]
        if g_val is not None and pad:
            L.scorer.clear()
        elif g_val is not None and np.isfinite(rows[0]).all():
            d, q = L.scorer.scores(coef, g_val)  # hooks saw N c_i g_i: divided by N c_i
            rows[1], rows[2] = d.double().cpu().numpy(), q.double().cpu().numpy()
        every = self.ranks.gather(rows, sizes)  # (3, B)
        if g_val is None or not np.isfinite(every[0]).all():  # one process scores only finite losses
            return every[0], None, None
        return every[0], every[1], every[2]


class RankLearner(ShardLearner):
    """Rank 0's Learner: draws and weights as one process does, trains its shard with the other ranks."""

    def __init__(
        self, settings: TrainerSettings, model: TrainModel, weighting: Weighting, ranks: Ranks
    ) -> None:
        super().__init__(settings, model, weighting)
        self.ranks = ranks
        _share_cores(settings, ranks)  # after the Trainer set its one-process default
        ranks.send({"op": "start"})  # the others wait on the gloo group until rank 0 is this far
        self._wrap()
        log.info(
            "data-parallel: %d ranks (%s), each training a shard of the %d-row batch",
            ranks.world,
            ranks.backend,
            settings.batch_size,
        )
        self._changed = True  # the first step sends the model and optimizer (a resumed run's)
        self._sent_g_val: list[torch.Tensor] | None = None
        self._shard = slice(0, 0)
        self._sizes: list[int] = []

    def model_changed(self) -> None:
        self._changed = True

    def _batch(self, step: int, draw: Draw, g_val: list[torch.Tensor] | None) -> Batch:
        """Collate every shard (a sample that cannot be used sets the whole batch aside, as in one
        process, before any rank starts), send each rank its shard, return rank 0's on the device."""
        shards = self.ranks.shards(len(draw.rows))
        for part in shards[1:]:
            self.model.collate(draw.payloads[part])
        own = to_device(self.model.collate(draw.payloads[shards[0]]), self.device)
        message: dict[str, Any] = {"op": "step", "step": step, "scoring": g_val is not None}
        if g_val is not None and g_val is not self._sent_g_val:
            message["g_val"] = _cpu(g_val)
            self._sent_g_val = g_val
        if self._changed:
            # what a checkpoint holds (a LoRA model: its adapters; every rank built the same base)
            message["model"] = _cpu(self.model.checkpoint_tensors())
            message["optimizer"] = _cpu(self.opt.state_dict())
            self._changed = False
        # one broadcast carries every shard (each rank takes its own): at a few ranks, fewer round trips
        # than a broadcast and a scatter. A rank with no rows (a batch smaller than the world) trains the
        # batch's first sample with coefficient 0: it must join the backward's all-reduce, and adds nothing
        message["sizes"] = [p.stop - p.start for p in shards]
        message["shards"] = [
            (draw.payloads[p], draw.importance[p], False)
            if p.stop > p.start
            else ([draw.payloads[0]], np.zeros(1), True)
            for p in shards
        ]
        self.ranks.send(message)
        self._shard, self._sizes = shards[0], message["sizes"]
        return own

    def _backward(
        self,
        step: int,
        table: WeightTable,
        draw: Draw,
        batch: Batch,
        c: torch.Tensor,
        g_val: list[torch.Tensor] | None,
    ) -> tuple[np.ndarray, torch.Tensor, np.ndarray | None, np.ndarray | None]:
        losses, dots, norms = self.shard_step(batch, c[self._shard], g_val, self._sizes)
        # the loss one process backprops, sum_i c_i loss_i over the global batch (for train_loss)
        loss = (c.cpu() * torch.as_tensor(losses, dtype=torch.float32)).sum()
        return losses, loss, dots, norms


class WorkerLearner(ShardLearner):
    """A rank > 0: the model, optimizer and scorer; it trains the shards rank 0 sends until told to stop."""

    def __init__(self, settings: TrainerSettings, model: TrainModel, ranks: Ranks) -> None:
        super().__init__(settings, model, Weighting(settings, ranks.device))
        self.ranks = ranks
        self.g_val: list[torch.Tensor] | None = None

    def serve(self) -> int:
        """After rank 0's start: train shards until rank 0 says stop; exit status 0."""
        self._wrap()
        while True:
            message = self.ranks.receive()
            if message["op"] == "stop":
                return 0
            if "model" in message:
                self.model.load_checkpoint_tensors(message["model"])
                self.opt.load_state_dict(message["optimizer"])  # moved to the parameters' device
            if "g_val" in message:
                self.g_val = [g.to(self.device) for g in message["g_val"]]
            payloads, importance, pad = message["shards"][self.ranks.rank]
            batch = to_device(self.model.collate(payloads), self.device)
            c = torch.as_tensor(importance, dtype=torch.float32, device=self.device)
            self.model.train()
            self._warm_up(int(message["step"]))
            g_val = self.g_val if message["scoring"] else None
            losses, _, _ = self.shard_step(batch, c, g_val, message["sizes"], pad)
            # rank 0 sets the batch aside on a loss that is not finite, and skips a gradient that is not
            # (the same all-reduced gradient here): no step on any rank
            if not np.isfinite(losses).all() or not self._update():
                self.opt.zero_grad(set_to_none=True)


def serve(settings: TrainerSettings, ranks: Ranks) -> int:
    """A rank > 0's process: build the model (DDP gives it rank 0's parameters), then train the shards
    rank 0 sends until it says stop. SIGTERM and SIGINT are left to rank 0, which finishes the step, writes
    its final checkpoint and then tells this rank to stop."""

    def leave_it_to_rank0(signum: int, _frame: object) -> None:
        log.info("rank %d: signal %d; rank 0 finishes the step and stops every rank", ranks.rank, signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, leave_it_to_rank0)
    torch.manual_seed(int(np.random.SeedSequence([settings.seed, ranks.rank]).generate_state(1)[0]))
    try:
        try:
            model: TrainModel | None = build_model(settings.model, settings.model_params).to(ranks.device)
        except (ModelNotFound, ImportError, ValueError):
            model = None  # rank 0 builds the same model, fails alike, says why and stops every rank
        if ranks.receive()["op"] == "stop":  # rank 0 could not start (a model, the database schema)
            return 0
        if model is None:
            raise RuntimeError(f"rank {ranks.rank} cannot build the model that rank 0 built")
        return WorkerLearner(settings, model, ranks).serve()
    finally:
        ranks.close()

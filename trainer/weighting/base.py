"""The interface between the training loop and a weighting rule: a rule sees a per-batch record and the
weight table, never the trainer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from trainer.settings import TrainerSettings
from trainer.table import WeightTable

IMPORTANCE_FLOOR = 1e-8  # the least loss coefficient: GhostScorer.scores divides by each, so all must be > 0
BatchFrom = Literal["", "losses", "scores"]  # what a per-batch rule's batch_importance needs (see Weighting)


@dataclass(frozen=True)
class BatchRecord:
    """What one training step saw, as a weighting rule gets it. Every array is (B,), in batch order.

    rows      the batch's rows in the weight table (a row can repeat)
    importance  importance weights c_i of the step's loss sum_i c_i loss_i (sum to 1, all > 0):
              w_i / (n q_i) for rows drawn with probability q_i, w_i for rows from the unscored queue
    losses    per-sample training losses before the update (None when asked before the forward)
    payloads  the samples (contract Sample dicts)
    dots      <grad loss_i, G_val>, the hypergradient score before the -lr factor (scoring steps only)
    norms     ||grad loss_i|| over the scored layers (scoring steps only)
    g_norm    ||G_val|| (scoring steps only)
    step      the trainer step the batch trains (0-based)
    loss_of   the current model's per-sample losses on any Sample dicts, (n,), no gradient (every step:
              rules that compare a sample's loss with the validation set's use it)
    """

    step: int
    rows: np.ndarray
    importance: np.ndarray
    payloads: Sequence[dict[str, Any]]
    losses: np.ndarray | None = None
    dots: np.ndarray | None = None
    norms: np.ndarray | None = None
    g_norm: float | None = None
    loss_of: Callable[[Sequence[dict[str, Any]]], np.ndarray] | None = None

    @property
    def scored(self) -> bool:
        return self.dots is not None


class Weighting:
    """A weighting rule: it turns what each batch shows into every live sample's weight.

    The loop calls ``observe`` once per step with the step's ``BatchRecord`` (scores included on scoring
    steps), ``weights`` every ``reweight_every`` steps, ``batch_importance`` on per-batch rules
    (``batch_from``),
    and ``on_validation`` whenever it loads a validation set. A rule owns its state: per-row statistics
    in table columns it declares in ``columns`` (compacted and checkpointed with the rows; the table's
    own ``visits`` column, scored visits, is the loop's), everything else through ``state``/``load_state``.
    It never sees the trainer. ``scores`` says whether the loop must compute outer-step scores at all.
    """

    name: ClassVar[str] = "base"
    needs_scores: ClassVar[bool] = False
    # per-batch rules: what ``batch_importance`` needs. "losses": the loop asks before its one backward;
    # "scores": after it (the scores come from that backward), then redoes the backward; "": never asks
    batch_from: ClassVar[BatchFrom] = ""
    columns: ClassVar[dict[str, type]] = {}  # per-row columns, as table column "<name>_<column>"

    def __init__(self, settings: TrainerSettings, device: torch.device | None = None) -> None:
        self.settings = settings
        self.device = device or torch.device("cpu")
        # long work inside a rule (training a reference model) calls this now and then: the trainer sets it
        # to renew its lease, so a rule that trains for longer than the lease's TTL does not lose it
        self.heartbeat: Callable[[], None] = lambda: None

    def attach(self, table: WeightTable) -> None:
        """Declare this rule's columns on ``table`` (a new table, or one restored from a checkpoint)."""
        for col, dtype in self.columns.items():
            table.add_column(self.column_name(col), dtype)

    def column_name(self, col: str) -> str:
        return f"{self.name}_{col}"

    def col(self, table: WeightTable, col: str) -> np.ndarray:
        """The whole storage of one of this rule's columns (rows 0..n-1 are in use)."""
        return table.cols[self.column_name(col)]

    def observe(self, table: WeightTable, batch: BatchRecord) -> None:
        """Take one step's batch: its losses every step, its outer-step scores on scoring steps."""

    def batch_importance(self, table: WeightTable, batch: BatchRecord) -> np.ndarray | None:
        """Per-batch methods (``batch_from``) return new loss coefficients for this batch (B,), summing to
        1, all > 0, that the step's backward uses. None keeps the step as it is."""
        return None

    def weights(self, table: WeightTable, step: int) -> np.ndarray:
        """Every row's weight (dead rows 0), averaging 1 over live rows."""
        return np.where(table.alive, 1.0, 0.0).astype(np.float32)

    def on_validation(
        self, table: WeightTable, samples: Sequence[dict[str, Any]], version: int, *, task_changed: bool
    ) -> None:
        """A validation set was loaded (``task_changed``: it replaced one the run trained against, so old
        evidence should fade)."""

    def state(self) -> dict[str, Any]:
        return {}

    def report(self) -> dict[str, Any]:
        """What the trainer status publishes about the rule (``/v1/stats`` trainer.weighting)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        return None


def normalise(raw: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Scale so live weights average 1; dead rows 0."""
    raw = np.where(alive, raw, 0.0)
    n = int(alive.sum())
    total = float(raw.sum())
    if n == 0 or total <= 0:
        return np.where(alive, 1.0, 0.0).astype(np.float32)
    return (raw * (n / total)).astype(np.float32)


def shared_weights(table: WeightTable, z: np.ndarray, *, natural: bool = True) -> np.ndarray:
    """exp(logit) per row, with the copies a source posts beyond the natural rate sharing one weight.

    For the live copies C_{s,g} that source s posted of content group g (c = |C_{s,g}|), the other
    sources' rate of g predicts how many copies s would post by chance (natural repetition: on a long
    stream over a finite set of problems, a correct answer recurs), and only the excess shares:

        e_{s,g} = n_s * (C_g - c) / (N - n_s)        n_s: s's live samples, C_g: live copies of g from every
                                                     source, N: live samples (leave-one-out: s's own
                                                     copies do not raise the rate it is judged by)
        w_i     = exp(mean_{j in C_{s,g}} z_j) * min(1, max(e_{s,g}, 1) / c)      i in C_{s,g}

    So a source that repeats content no more than the others do keeps a full weight per copy, while
    one that floods content (the others post it rarely or never: e <= 1) gets, for all its copies
    together, the weight of one sample (``natural=False``: always so, whatever the others post). The
    same content from different sources is never shared: independent agents agreeing on an answer is
    evidence for it. Without the natural rate, a source's correct answers, which recur, were split among
    their copies while its wrong ones, which vary, were not: on a stream 13x longer than the noisy
    scenario's problem pool, a sloppy source's wrong answers then outweighed its right ones (per-sample
    AUC 0.42; issue 12). Dead rows 0.
    """
    alive = table.alive
    raw = np.zeros(table.n, dtype=np.float64)
    if not alive.any():
        return raw
    src = table.source[alive].astype(np.int64)
    group = table.group[alive]
    # (source, group) as one uint64 key: the source index mixed in by an odd multiplier, wrapping
    key = group ^ (src.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    z_group = np.bincount(inverse, weights=z[alive], minlength=len(counts)) / counts
    c = counts[inverse].astype(np.float64)  # (live,) copies of this row's content from its source
    share = 1.0 / c
    if natural:
        _, g_inverse, g_counts = np.unique(group, return_inverse=True, return_counts=True)
        n_s = np.bincount(src)[src].astype(np.float64)  # (live,)
        n = float(len(src))
        others = g_counts[g_inverse] - c  # copies of this content from the other sources
        expected = n_s * others / np.maximum(n - n_s, 1.0)
        share = np.minimum(1.0, np.maximum(expected, 1.0) / c)
    raw[alive] = np.exp(z_group[inverse]) * share
    return raw

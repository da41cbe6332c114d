"""The interface between the training loop and a weighting rule."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from trainer.settings import TrainerSettings
from trainer.table import WeightTable

if TYPE_CHECKING:
    from trainer.loop import Trainer

COEF_FLOOR = 1e-8  # the least loss coefficient: GhostScorer.scores divides by each, so all must be > 0
BatchFrom = Literal["", "losses", "scores"]  # what a per-batch rule's batch_coef needs (see Weighting)


class Weighting:
    """A weighting rule. ``scores`` says whether the loop must compute outer-step scores at all."""

    name: ClassVar[str] = "base"
    scores: ClassVar[bool] = False
    # per-batch rules: what ``batch_coef`` needs. "losses": the loop asks before its one backward;
    # "scores": after it (the scores come from that backward), then redoes the backward; "": never asks
    batch_from: ClassVar[BatchFrom] = ""

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings

    def bind(self, trainer: Trainer) -> None:
        """Called once by the Trainer that uses this rule (rules that need its validation set, payloads or
        device keep a reference; most need nothing)."""

    def observe(
        self,
        table: WeightTable,
        rows: np.ndarray,
        dots: np.ndarray,
        norms: np.ndarray,
        g_norm: float,
        step: int,
    ) -> None:
        """Take one batch's outer-step scores: dots = <grad loss_i, G_val>, norms = ||grad loss_i||."""

    def observe_losses(self, table: WeightTable, rows: np.ndarray, losses: np.ndarray, step: int) -> None:
        """Every step: the batch's per-sample training losses (before the update)."""

    def batch_coef(
        self,
        table: WeightTable,
        rows: np.ndarray,
        coef: np.ndarray,
        losses: np.ndarray,
        dots: np.ndarray | None,
        norms: np.ndarray | None,
    ) -> np.ndarray | None:
        """Per-batch methods (``batch_from``) return new loss coefficients for this batch (summing to 1, all
        > 0) that the step's backward uses. None keeps the step as it is."""
        return None

    def weights(self, table: WeightTable, step: int) -> np.ndarray:
        """Every row's weight (dead rows 0), averaging 1 over live rows."""
        return np.where(table.alive, 1.0, 0.0).astype(np.float32)

    def on_validation_change(self, table: WeightTable) -> None:
        """The task changed: let old evidence fade."""

    def state(self) -> dict[str, Any]:
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


def shared_weights(table: WeightTable, z: np.ndarray) -> np.ndarray:
    """exp(logit) per row, with one source's copies of identical content sharing one weight.

    For the live copies C_g that one source posted of content group g:
    w_i = exp(mean_{j in C_g} z_j) / |C_g|  for i in C_g, so the copies weigh the same and together weigh
    what one sample with that logit would: a source cannot multiply its own content's weight by repeating
    it. The same content from different sources is not shared: independent agents agreeing on an answer
    is evidence for it (sharing across sources would give a correct answer that three agents gave the
    weight of a wrong one that one agent gave). Dead rows 0.
    """
    alive = table.alive
    raw = np.zeros(table.n, dtype=np.float64)
    if not alive.any():
        return raw
    # (source, group) as one uint64 key: the source index mixed in by an odd multiplier, wrapping
    key = table.group[alive] ^ (table.source[alive].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    z_group = np.bincount(inverse, weights=z[alive], minlength=len(counts)) / counts
    raw[alive] = np.exp(z_group[inverse]) / counts[inverse]
    return raw

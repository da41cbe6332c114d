"""Finding the samples a model cannot use, so that one bad sample never stops the trainer.

A sample the API accepted can still be unusable for the model: it fails to collate (a value the model's
dtype cannot hold, a shape the model does not take), or its loss or its gradient is not finite. When a
batch fails in one of these ways, ``unusable`` tries each of its samples alone and names the ones that fail
with the reason; the loop quarantines them (CONTRACT.md: acknowledged, never trained on, counted, listed
with the reason) and goes on with the rest. The per-sample retry costs B forward/backward passes, but it
runs only on a failed batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from store.feed import TrainerFeed
from trainer.models.base import TrainModel, to_device
from trainer.table import WeightTable

log = logging.getLogger("datadiet.trainer")


def _describe(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:500]


def collate_failures(model: TrainModel, samples: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """Index -> reason for each sample that fails to collate on its own."""
    out = {}
    for i, sample in enumerate(samples):
        try:
            model.collate([sample])
        except Exception as e:  # any error of the model's own collate is the sample's fault
            out[i] = f"does not collate for the model: {_describe(e)}"
    return out


def unusable(
    model: TrainModel, samples: Sequence[Mapping[str, Any]], device: torch.device, autocast: bool
) -> dict[int, str]:
    """Index -> reason for each sample that fails alone: collate, a non-finite loss, or a non-finite
    gradient of its loss. Leaves the model's parameters and gradients as they were (grads cleared)."""
    out = collate_failures(model, samples)
    params = [p for p in model.parameters() if p.requires_grad]
    for i, sample in enumerate(samples):
        if i in out:
            continue
        model.zero_grad(set_to_none=True)
        batch = to_device(model.collate([sample]), device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model.per_sample_loss(batch).float().sum()
        value = float(loss.detach())
        if not math.isfinite(value):
            out[i] = f"its loss is not finite ({value})"
            continue
        loss.backward()
        if not all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None):
            out[i] = "the gradient of its loss is not finite"
    model.zero_grad(set_to_none=True)
    return out


def parameters_finite(model: TrainModel) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class Quarantine:
    """Samples set aside: taken out of the table at once, moved out of the buffer (into its quarantine
    list) as soon as Redis takes it. ``count`` is how many this run has quarantined."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, str, str]] = []  # (ordinal, source, reason) not yet in Redis
        self.count = 0

    def set_aside(
        self,
        table: WeightTable,
        rows: np.ndarray,
        payloads: Sequence[Mapping[str, Any]],
        model: TrainModel,
        autocast: bool,
    ) -> int:
        """A batch failed (collate, or a non-finite loss or gradient): quarantine each of its samples that
        fails alone; returns how many. Raises FloatingPointError when the model itself is not finite
        (no sample is to blame; the last checkpoint is)."""
        if not parameters_finite(model):
            raise FloatingPointError("the model's parameters are not finite: restart from a checkpoint")
        bad = unusable(model, payloads, model.device, autocast)
        if not bad:
            log.warning("a batch gave a non-finite loss or gradient with no single sample to blame: skipped")
            return 0
        idx = np.array(sorted(bad), dtype=np.int64)
        table.kill(rows[idx], evicted=False)
        for i in idx.tolist():
            row = int(rows[i])
            self.pending.append((int(table.ordinal[row]), table.sources[int(table.source[row])], bad[i]))
        self.count += len(idx)
        first = self.pending[-len(idx)]
        log.warning(
            "quarantined %d sample(s) the model cannot use (e.g. ordinal %d from %r: %s)",
            len(idx),
            *first,
        )
        return len(idx)

    def flush(self, feed: TrainerFeed, step: int) -> None:
        """Move the set-aside samples out of the buffer into its quarantine list (Redis errors and
        LeaseLost propagate; the list is kept until this succeeds)."""
        if self.pending:
            ordinals, sources, reasons = zip(*self.pending, strict=True)
            feed.quarantine(ordinals, sources, reasons, step)
            self.pending.clear()

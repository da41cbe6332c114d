"""One training step: the weighted inner update, with the outer step's scores on scoring steps.

    loss = sum_i c_i loss_i                         c: the batch's importance weights (trainer/sampler.py)
    s_i  = <grad loss_i, G_val>                      from the same backward, by ghost products
                                                     (trainer/hypergrad.py; the one-step look-ahead score
                                                     is -lr s_i, Learning to Reweight, GREATS)

The weighting rule sees the step's ``BatchRecord`` and turns it into weights (trainer/weighting/). A
batch whose samples fail to collate, or whose loss or gradient is not finite, is not trained on: its
unusable samples are quarantined (trainer/quarantine.py) and the loop draws again.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from trainer.hypergrad import GhostScorer
from trainer.intake import PayloadCache
from trainer.models.base import TrainModel, to_device
from trainer.quarantine import Quarantine
from trainer.sampler import Draw, Sampler
from trainer.settings import TrainerSettings
from trainer.table import WeightTable
from trainer.validation import Validation
from trainer.weighting.base import BatchRecord, Weighting


class Learner:
    """The model, its optimizer and scorer, and the step that trains them."""

    def __init__(self, settings: TrainerSettings, model: TrainModel, weighting: Weighting) -> None:
        self.settings = settings
        self.model = model
        self.device = model.device
        self.autocast = self.device.type == "cuda"  # bf16 autocast on CUDA
        self.opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.scorer = GhostScorer(model.scored_modules())
        self.weighting = weighting
        self.scorings = 0  # scoring steps taken
        self.train_loss = math.nan  # running training loss: 0.95 old + 0.05 new

    def step(
        self,
        step: int,
        table: WeightTable,
        sampler: Sampler,
        cache: PayloadCache,
        validation: Validation,
        quarantine: Quarantine,
    ) -> bool | None:
        """Train step ``step``: True when the model was updated, False when there was nothing to train on,
        None when the batch was set aside (its unusable samples quarantined) and no update was made."""
        s, w = self.settings, self.weighting
        outer = step % s.outer_every == 0
        scoring = outer and w.needs_scores and bool(validation.samples)
        if step % s.reweight_every == 0:
            sampler.reweight(table, w.weights(table, step))
        draw = sampler.draw(table, cache, from_queue=outer)
        if not len(draw.rows):
            return False
        if scoring and (validation.g_val is None or self.scorings % s.val_grad_every == 0):
            validation.refresh_gradient(
                self.model, sampler.rng, s.val_batch_size, s.val_grad_beta, self.autocast
            )
        g_val = validation.g_val if scoring else None
        try:
            batch = self._batch(step, draw, g_val)
        except Exception:  # one of the samples cannot be used by this model: find it, set it aside
            self._set_aside(table, draw, quarantine)
            return None
        c = torch.as_tensor(draw.importance, dtype=torch.float32, device=self.device)
        self.model.train()
        self._warm_up(step)
        losses_np, loss, dots, norms = self._backward(step, table, draw, batch, c, g_val)
        if not np.isfinite(losses_np).all():  # before anything learns from this batch
            self._set_aside(table, draw, quarantine)
            return None
        scores: dict[str, Any] = {}
        if scoring:
            assert validation.g_val is not None and dots is not None and norms is not None
            scores = {
                "dots": dots,
                "norms": norms,
                "g_norm": float(
                    torch.stack([g.float().square().sum() for g in validation.g_val]).sum().sqrt()
                ),
            }
        record = BatchRecord(
            step, draw.rows, draw.importance, draw.payloads, losses_np, **scores, loss_of=self.losses_of
        )
        w.observe(table, record)
        if scoring:
            self.scorings += 1
            table.count_first_scores(draw.rows)
            visits = table.cols["visits"]  # scored visits: counted here, whatever the rule
            np.add.at(visits, draw.rows[visits[draw.rows] < np.iinfo(np.uint16).max], 1)
            # samples scored fewer than min_visits times go back in the queue: one score is a noisy estimate
            # (only those taken from it: one drawn by weight is still queued, and would be queued twice)
            again = draw.rows[draw.queued & (table.visits[draw.rows] < s.min_visits)]
            table.unscored.extend(np.unique(again))
        # L2RW re-weights this very batch from its scores: a second backward
        batch_importance = w.batch_importance(table, record) if w.batch_from == "scores" else None
        if batch_importance is not None:
            self.opt.zero_grad(set_to_none=True)
            c2 = torch.as_tensor(batch_importance, dtype=torch.float32, device=self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                losses = self.model.per_sample_loss(batch)
            loss = (c2 * losses.float()).sum()
            loss.backward()
        if not self._update():  # a finite loss with an infinite gradient: same treatment
            self._set_aside(table, draw, quarantine)
            return None
        lv = float(loss.detach())
        self.train_loss = lv if math.isnan(self.train_loss) else 0.95 * self.train_loss + 0.05 * lv
        return True

    # ------------------------------------------------------------------ the parts trainer/distributed.py
    # replaces: one process trains the whole batch; with torchrun ranks, each trains its shard
    def _batch(self, step: int, draw: Draw, g_val: list[torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The batch this process trains on: the whole draw, collated, on the device (raises when a
        sample cannot be collated)."""
        return to_device(self.model.collate(draw.payloads), self.device)

    def _warm_up(self, step: int) -> None:
        """Linear warm-up of the learning rate: lr (step + 1) / warmup_lr_steps, capped at lr."""
        s = self.settings
        for group in self.opt.param_groups:
            group["lr"] = s.lr * min(1.0, (step + 1) / max(s.warmup_lr_steps, 1))

    def _backward(
        self,
        step: int,
        table: WeightTable,
        draw: Draw,
        batch: dict[str, torch.Tensor],
        c: torch.Tensor,
        g_val: list[torch.Tensor] | None,
    ) -> tuple[np.ndarray, torch.Tensor, np.ndarray | None, np.ndarray | None]:
        """One forward and backward of sum_i c_i loss_i over ``batch`` (c: (B,) importance weights),
        scored against ``g_val`` when given: (losses (B,) float64, the loss backpropagated, dots (B,),
        norms (B,)); dots and norms are None unscored or when a loss is not finite."""
        w = self.weighting
        with self.scorer.capture() if g_val is not None else contextlib.nullcontext():
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                losses = self.model.per_sample_loss(batch)  # (B,)
            if w.batch_from == "losses":  # RHO-LOSS selection: chosen before the one backward
                before = losses.detach().double().cpu().numpy()
                chosen = w.batch_importance(
                    table, BatchRecord(step, draw.rows, draw.importance, draw.payloads, before)
                )
                if chosen is not None:
                    c = torch.as_tensor(chosen, dtype=torch.float32, device=self.device)
            loss = (c * losses.float()).sum()  # sum_i w_i loss_i / sum_i w_i, importance-corrected
            loss.backward()
        losses_np = losses.detach().double().cpu().numpy()
        if g_val is None or not np.isfinite(losses_np).all():
            return losses_np, loss, None, None
        dots, norms = self.scorer.scores(c, g_val)
        return losses_np, loss, dots.double().cpu().numpy(), norms.double().cpu().numpy()

    def _update(self) -> bool:
        """Clip the gradient's norm to grad_clip and take the optimizer step; False (no step, the
        gradient kept) when its norm is not finite."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        if not bool(torch.isfinite(grad_norm)):
            return False
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return True

    def model_changed(self) -> None:
        """The model or the optimizer changed outside a step (an idle restore, an optimizer reset): one
        process has nothing to do; a distributed learner sends them to the other ranks."""

    @torch.no_grad()
    def losses_of(self, samples: Sequence[dict[str, Any]]) -> np.ndarray:
        """The current model's per-sample losses on Sample dicts, (n,), in eval mode without gradients, in
        batches of the trainer's batch size; the model is left in train mode."""
        self.model.eval()
        out = []
        for i in range(0, len(samples), self.settings.batch_size):
            batch = to_device(
                self.model.collate(list(samples[i : i + self.settings.batch_size])), self.device
            )
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                out.append(self.model.per_sample_loss(batch).double().cpu().numpy())
        self.model.train()
        return np.concatenate(out) if out else np.empty(0)

    def _set_aside(self, table: WeightTable, draw: Draw, quarantine: Quarantine) -> None:
        self.opt.zero_grad(set_to_none=True)
        quarantine.set_aside(table, draw.rows, draw.payloads, self.model, self.autocast)

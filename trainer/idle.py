"""When to stop training a buffer that no longer changes, and when to start again.

The trainer idles when there is nothing new to learn: no new sample for ``idle_after_s`` seconds, the
unscored queue empty (every sample has had its first use), and the validation loss not lower by
``idle_min_delta`` than its best for ``idle_patience`` steps -- early stopping on a plateau, as Keras's
``EarlyStopping(patience, min_delta, restore_best_weights=True)``
(https://keras.io/api/callbacks/early_stopping/). While idle it trains nothing: it blocks on the ingest
stream (a 1 s blocking read, so a sample that arrives wakes it at once) and checks the validation set's
version; a new sample or a new validation set resumes training.

The loss watched is the validation set's mean loss (``Validation.full_loss``, the checkpoints'
``val_loss``), measured every ``idle_patience // 10`` steps once the buffer is quiet; without a validation
set, the running training loss. The weights at the best validation loss of the quiet spell are kept (the
model's checkpoint tensors, on the CPU); when the trainer idles with a worse loss than that best, the
model goes back to them before the idle checkpoint is written, so the newest checkpoint, the one agents
get, is the best of the quiet spell and never a later, worse one. (Checkpoints written during the
patience steps stay in the history.) A run with ``DATADIET_MAX_STEPS`` trains its steps and never idles.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trainer.loop import Trainer
    from trainer.settings import TrainerSettings

log = logging.getLogger("datadiet.trainer")


class Idler:
    def __init__(self, settings: TrainerSettings) -> None:
        self.patience = settings.idle_patience
        self.quiet_s = settings.idle_after_s
        self.min_delta = settings.idle_min_delta
        self.enabled = settings.idle_patience > 0 and not settings.max_steps
        self.check_every = max(1, self.patience // 10)
        self.idle = False
        self.last_news = time.monotonic()  # the last new sample or validation set (or the start)
        self.best = math.inf  # the lowest loss of this quiet spell
        self.best_step = -1
        self.best_tensors: dict[str, torch.Tensor] | None = None  # the model at ``best_step`` (CPU)
        self.watching = ""  # "validation" or "training": which loss the spell watches
        self.last_loss = math.nan  # the loss at the last measurement

    def news(self, why: str) -> None:
        """Something new to learn from arrived (``why``: what, for the log): resume if idle, and start
        the wait for a quiet buffer again."""
        self.last_news = time.monotonic()
        self._forget()
        if self.idle:
            self.idle = False
            log.info("resuming training: %s", why)

    def should_idle(self, t: Trainer) -> bool:
        """After a training step: whether the trainer should idle now (measures the loss when due)."""
        if not self.enabled or self.idle:
            return False
        if time.monotonic() - self.last_news < self.quiet_s or len(t.table.unscored) or not t.table.live:
            if self.best_step >= 0:
                self._forget()
            return False
        if t.step % self.check_every:
            return False
        on_validation = bool(t.validation.samples)
        watching = "validation" if on_validation else "training"
        if watching != self.watching:  # a validation set arrived (or went): a new spell
            self._forget()
            self.watching = watching
        loss = t.validation.full_loss(t.learner.model) if on_validation else t.learner.train_loss
        if math.isnan(loss):
            return False
        self.last_loss = loss
        if loss < self.best - self.min_delta or self.best_step < 0:
            self.best, self.best_step = loss, t.step
            if on_validation:  # the weights to go back to if the loss rises from here
                tensors = t.learner.model.checkpoint_tensors()
                self.best_tensors = {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
            return False
        return t.step - self.best_step >= self.patience

    def rest(self, t: Trainer) -> bool:
        """Enter the idle state, logging why; puts the model back to the quiet spell's best weights when
        the validation loss rose since. Returns whether the model changed (it needs a checkpoint)."""
        self.idle = True
        quiet = time.monotonic() - self.last_news
        restored = False
        if self.best_tensors is not None and self.last_loss > self.best + self.min_delta:
            t.learner.model.load_checkpoint_tensors(self.best_tensors)
            t.validation.loss = self.best  # the running loss restarts from the restored model's
            restored = True
        log.info(
            "idle: no new samples for %.0f s and the %s loss has not improved by %g in %d steps "
            "(best %.4f at step %d, now %.4f)%s; waiting for new samples or a new validation set",
            quiet,
            self.watching,
            self.min_delta,
            t.step - self.best_step,
            self.best,
            self.best_step,
            self.last_loss,
            f": back to the step-{self.best_step} weights" if restored else "",
        )
        self.best_tensors = None
        return restored

    def _forget(self) -> None:
        self.best, self.best_step, self.best_tensors = math.inf, -1, None
        self.last_loss = math.nan

"""The learning loop: continual weighted training on the buffer, with online bilevel reweighting.

    python -m trainer                # or: datadiet train (see trainer/__main__.py for the settings)

``Trainer.run`` reads top to bottom: wait for Redis, the lease and the database, resume, then every
iteration take new samples from the stream (``intake``), check for a new validation set
(``validation``), train one step (``step``: a batch drawn by ``sampler``, one forward/backward of the
importance-weighted loss, on scoring steps every sample's hypergradient score turned into weights by the
weighting rule) and publish now and then (``publish``: weights, checkpoints, the lease; rank 0's work).
When there is nothing new to learn (no new samples for a while, the validation loss on a plateau) the
trainer idles until samples or a new validation set arrive (``idle``). Its own Prometheus metrics, and
freshness, are ``metrics``'s.

Faults (docs/faults.md): one trainer per deployment holds the lease (store/lease.py) and every write it
makes is fenced by it; Redis and database outages are waited out with backoff while training goes on with
what the trainer holds (trainer/outage.py); a sample the model cannot use is quarantined, never trained
on, and never stops the loop (trainer/quarantine.py); a resumed run holds everything the stopped one did
(trainer/state.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from sqlalchemy.engine import Engine

from store.checkpoints import remove_stale_temp_files
from store.feed import TrainerFeed
from store.lease import LeaseLost
from trainer.idle import Idler
from trainer.intake import Intake
from trainer.metrics import TrainerMetrics
from trainer.models import build_model
from trainer.models.base import TrainModel
from trainer.outage import DATABASE_ERRORS, REDIS_ERRORS, Dependency
from trainer.publish import Publisher, checkpoint, status
from trainer.quarantine import Quarantine
from trainer.sampler import Sampler
from trainer.settings import TrainerSettings
from trainer.state import resume
from trainer.step import Learner
from trainer.table import WeightTable
from trainer.validation import Validation
from trainer.weighting import Weighting, make_weighting

log = logging.getLogger("datadiet.trainer")

EXIT_LEASE_LOST = 75  # EX_TEMPFAIL: another trainer holds the lease (a supervisor may start this one again)
WAITING_NOTE_S = 30.0  # how often the trainer says it has no validation set yet
IDLE_HEARTBEAT_S = 30.0  # how often an idle trainer refreshes its status hash (``updated_at``)


class Trainer:
    def __init__(
        self,
        settings: TrainerSettings,
        feed: TrainerFeed,
        engine: Engine,
        learner: Callable[[TrainerSettings, TrainModel, Weighting], Learner] = Learner,
    ) -> None:
        """``learner`` builds the Learner (trainer/distributed.py: rank 0's, which trains with the other
        torchrun ranks)."""
        s = self.settings = settings
        device = torch.device(
            "cuda"
            if s.device == "auto" and torch.cuda.is_available()
            else ("cpu" if s.device == "auto" else s.device)
        )
        if device.type == "cpu":
            # the API shares the machine: oversubscribed torch threads spin and slow everything down
            torch.set_num_threads(s.torch_threads or max(1, min(8, (os.cpu_count() or 2) - 1)))
        torch.manual_seed(s.seed)
        self.rng = np.random.default_rng(s.seed)  # batches and validation batches: one stream
        model = build_model(s.model, s.model_params).to(device)
        self.learner = learner(s, model, make_weighting(s, device))
        # a rule training a reference model keeps the lease alive (and says where it is)
        self.learner.weighting.heartbeat = self._renew_lease
        self.table = WeightTable()
        self.learner.weighting.attach(self.table)
        self.feed, self.engine = feed, engine
        self.redis = Dependency("redis", REDIS_ERRORS, max_delay_s=s.max_backoff_s)
        self.db = Dependency("database", DATABASE_ERRORS, max_delay_s=s.max_backoff_s)
        self.intake = Intake(feed, s, self.redis)
        self.sampler = Sampler(s, self.rng)
        self.validation = Validation()
        self.quarantine = Quarantine()
        self.publisher = Publisher(
            feed, engine, s.data_dir, s.publish_every_s, s.publish_tolerance, s.publish_max_rows
        )
        self.step = 0
        self.checkpointed_step = -1
        self.checkpoint_due = False  # a checkpoint could not be written (Redis down): retry it
        self.stop_requested = False
        self.rate = 0.0  # steps per second
        self.idler = Idler(s)
        self.metrics = TrainerMetrics()
        self.waiting_noted = -math.inf  # when the trainer last said it has no validation set
        self.idle_published = 0.0  # when an idle trainer last refreshed its status hash

    # ------------------------------------------------------------------ the process
    def run(self) -> int:
        """Train until DATADIET_MAX_STEPS (or SIGTERM/SIGINT), then write a final checkpoint; exit status
        (0, or EXIT_LEASE_LOST when another trainer holds this deployment's lease)."""
        s = self.settings
        if s.trainer_metrics_port:
            try:
                self.metrics.serve(self, s.trainer_metrics_host, s.trainer_metrics_port)
            except OSError as e:
                log.error(
                    "cannot serve the trainer's metrics on %s:%d (DATADIET_TRAINER_METRICS_PORT): %s",
                    s.trainer_metrics_host,
                    s.trainer_metrics_port,
                    e.strerror or e,
                )
                return os.EX_CONFIG
        previous = _install_signal_handlers(self)
        try:
            if not self._start():
                return EXIT_LEASE_LOST if not self.stop_requested else 0
            self.redis.meanwhile = self.db.meanwhile = "training on what the trainer holds"
            return self._run()
        except LeaseLost as e:
            log.error("%s: stopping without writing more (steps since the last checkpoint are dropped)", e)
            return EXIT_LEASE_LOST
        except Exception as e:
            # a trainer paused past its lease can wake anywhere, and fail on what its successor changed
            # meanwhile (a checkpoint file retention deleted under a resume): that is the lost lease, not a
            # crash of its own
            successor = self._successor()
            if successor is None:
                raise
            log.error(
                "another trainer took the lease (%s) while this one was paused; stopping without writing "
                "more (what failed here: %s: %s)",
                successor,
                type(e).__name__,
                e,
            )
            return EXIT_LEASE_LOST
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            with contextlib.suppress(*REDIS_ERRORS):
                self.feed.lease.release()
            self.metrics.close()

    def _start(self) -> bool:
        """Wait for Redis, the lease and the database (with backoff, logging once per outage), then
        resume; False when the lease is held elsewhere and DATADIET_LEASE_WAIT is off, or on a stop."""
        s, stop = self.settings, lambda: self.stop_requested
        if not self.redis.wait_for(self.feed.ensure_group, stop)[0]:
            return False
        ok, held = self.redis.wait_for(lambda: self.feed.lease.acquire(wait=s.lease_wait, stop=stop), stop)
        if not ok or not held:
            if not self.stop_requested:
                log.error("not waiting for the lease (DATADIET_LEASE_WAIT is off): exiting")
            return False
        # holding the lease, no other trainer can be mid-write: what a killed write left is garbage. Each
        # step that touches shared files or rows first checks the lease is still this process's (a
        # trainer paused here past its TTL must not delete or register its successor's files)
        if not self.redis.wait_for(self.feed.lease.renew, stop)[0]:
            return False
        for sub in ("checkpoints", "trainer"):
            remove_stale_temp_files(s.data_dir / sub)
        for db_step in (self.publisher.adopt_unregistered, lambda: resume(self, self.engine)):
            if not self.redis.wait_for(self.feed.lease.renew, stop)[0]:
                return False
            if not self.db.wait_for(db_step, stop)[0]:
                return False
        for redis_step in (
            lambda: self.intake.take_pending(self.table),
            lambda: self.intake.sync_evictions(self.table),
            lambda: self.quarantine.flush(self.feed, self.step),
        ):
            if not self.redis.wait_for(redis_step, stop)[0]:
                return False
        return True

    def _run(self) -> int:
        s = self.settings
        last_progress = t_rate = time.monotonic()
        steps_at_rate = self.step
        if not s.max_steps or self.step < s.max_steps:
            log.info(
                "training %s (%s) on %s, %d samples in the table",
                self.learner.model.kind,
                self.learner.weighting.name,
                self.learner.device,
                self.table.live,
            )
        while not self.stop_requested and (not s.max_steps or self.step < s.max_steps):
            # every Redis or database call below is skipped while that dependency is in backoff; a lost
            # lease (LeaseLost) is not an outage and ends the run
            self.redis.attempt(self.feed.lease.renew_if_due)
            self.redis.attempt(self.poll)  # an idle trainer waits here (1 s at most) for a new sample
            if self.idler.idle or self.step % s.validation_check_every == 0 or not self.validation.samples:
                self.redis.attempt(self.refresh_validation)
            self._note_waiting()
            if self.step % s.reweight_every == 0:  # evicted samples leave the table before a reweight
                self.redis.attempt(lambda: self.intake.read_evictions(self.table))
            if self.quarantine.pending:
                self.redis.attempt(lambda: self.quarantine.flush(self.feed, self.step))
            if self.publisher.pending:
                self.db.attempt(self.publisher.register_pending)
            if self.idler.idle:
                self._stay_idle()
                continue
            if not self.table.live or not self.train_step():
                if self.redis.down:  # nothing cached to train on: wait for Redis instead of spinning
                    time.sleep(min(self.redis.wait_s(), 0.5) or 0.05)
                continue
            now = time.monotonic()
            if now - t_rate >= 1.0:
                self.rate = (self.step - steps_at_rate) / (now - t_rate)
                t_rate, steps_at_rate = now, self.step
            if self.publisher.due():
                self.redis.attempt(self.publish)
            if self.step % s.checkpoint_every == 0 or (self.checkpoint_due and self.redis.ready()):
                checkpoint(self)
            if now - last_progress >= s.progress_every_s:
                last_progress = now
                self._progress()
            if self.idler.should_idle(self):
                self._rest()
        if self.step > 0 and self.step != self.checkpointed_step and not checkpoint(self):
            log.warning("no final checkpoint (Redis unavailable): the steps since the last one are dropped")
        return 0

    # ------------------------------------------------------------------ the named steps
    def _successor(self) -> str | None:
        """Who took this trainer's lease since it last held it (store.lease), or None; None too when Redis
        cannot say."""
        try:
            return self.feed.lease.superseded()
        except REDIS_ERRORS:
            return None

    def _renew_lease(self) -> None:
        self.redis.attempt(self.feed.lease.renew_if_due)

    def poll(self) -> None:
        """New stream entries into the table (Redis errors propagate)."""

        def new_validation_first() -> None:
            if self.validation.version >= 0:
                # a new validation set must be seen before the samples posted after it join a cohort
                self.refresh_validation()

        new = self.intake.poll(self.table, new_validation_first, wait=self.idler.idle)
        if new:
            self.idler.news(f"{new} new sample{'s' if new > 1 else ''}")
        self.sampler.bound_queue(self.table)

    def refresh_validation(self) -> None:
        """Take a new validation set if there is one (Redis errors propagate)."""
        self.validation.refresh(self.feed, self.table, self.learner.model, self._on_validation)

    def _on_validation(self, new: bool) -> None:
        task_changed = new and self.step > 0
        if task_changed:
            # the task may have changed: the backlog queued before it did is no longer the most useful
            # to score first (those samples stay in the table and are drawn by weight); samples that
            # arrived since the last check (ordinals only grow) and from now on are queued as usual
            self.table.new_cohort()  # what arrives from now on is estimated apart from the older data
            self.table.unqueue_through(self.validation.checked_ordinal)
        v = self.validation
        if new:
            self.idler.news(f"validation set v{v.version}")
        self.learner.weighting.on_validation(self.table, v.samples, v.version, task_changed=task_changed)
        if task_changed and self.settings.reset_optimizer_on_validation_change:
            # Adam's moments describe the old task's gradients: the new one starts from fresh moments
            self.learner.opt.state.clear()
            self.learner.model_changed()

    def train_step(self) -> bool:
        """One inner step (and outer step when due); False when there was nothing to train on."""
        stepped = self.learner.step(
            self.step, self.table, self.sampler, self.intake.cache, self.validation, self.quarantine
        )
        # the queued samples this step took were used for the first time (if it trained)
        self.metrics.freshness.observe(self.table.take_first_uses(stepped is True))
        if stepped is None:  # the batch was set aside: quarantine it now if Redis takes it, draw again
            self.redis.attempt(lambda: self.quarantine.flush(self.feed, self.step))
            return True
        if stepped:
            self.step += 1
        return stepped

    # ------------------------------------------------------------------ rank 0: publishing
    def publish(self) -> None:
        self.publisher.publish_weights(self.table, self.step, self.learner.weighting.name, status(self))

    # ------------------------------------------------------------------ idling
    def _rest(self) -> None:
        """Idle: the model goes back to its best weights if the loss rose (trainer/idle.py), and what it
        idles with is checkpointed and published (status ``idle``)."""
        changed = self.idler.rest(self)
        if changed:
            self.learner.model_changed()
        self.rate = 0.0
        self.idle_published = time.monotonic()
        if changed or self.step != self.checkpointed_step:
            checkpoint(self)  # publishes the weights and status too
        else:
            self.redis.attempt(self.publish)

    def _stay_idle(self) -> None:
        """One idle iteration (the poll before it waited for samples): retry a checkpoint that Redis
        refused, refresh the status hash now and then, and wait out a Redis outage without spinning."""
        if self.checkpoint_due and self.redis.ready():
            checkpoint(self)
        now = time.monotonic()
        if now - self.idle_published >= IDLE_HEARTBEAT_S:
            self.idle_published = now
            self.redis.attempt(
                lambda: self.feed.set_status(updated_at=datetime.now(UTC).isoformat(), **status(self))
            )
        if self.redis.down:
            time.sleep(min(self.redis.wait_s(), 0.5) or 0.05)

    # ------------------------------------------------------------------ saying what it does
    def _note_waiting(self) -> None:
        """At start and every WAITING_NOTE_S, say that there is no validation set and what to do."""
        now = time.monotonic()
        if self.validation.samples or self.redis.down or now - self.waiting_noted < WAITING_NOTE_S:
            return
        self.waiting_noted = now
        if self.learner.weighting.needs_scores:
            log.info(
                "no validation set yet: PUT /v1/validation with trusted samples (see README); "
                "training uniformly meanwhile"
            )
        else:
            log.info(
                "no validation set yet: PUT /v1/validation with trusted samples (see README) to measure "
                "the validation loss; training (%s weighting) meanwhile",
                self.learner.weighting.name,
            )

    def _progress(self) -> None:
        doc = self.publisher.last_doc or {}
        eff = doc.get("summary", {}).get("effective_fraction", 1.0)
        down = [d.name for d in (self.redis, self.db) if d.down]
        if down:
            log.info("waiting for %s; training on what the trainer holds", " and ".join(down))
        val = self.validation.current_loss
        val_text = "-" if math.isnan(val) else f"{val:.4f}"
        fresh = self.metrics.freshness.summary()["freshness_p50_s"]
        log.info(
            "step %d | %.1f steps/s | val_loss %s | train_loss %.4f | effective %.2f | live %d "
            "| unscored %d | freshness p50 %s",
            self.step,
            self.rate,
            val_text if self.validation.samples else "(no validation set)",
            self.learner.train_loss,
            eff,
            self.table.live,
            len(self.table.unscored),
            "-" if fresh == "" else f"{fresh:.1f}s",
        )


def _install_signal_handlers(trainer: Trainer) -> dict[int, Any]:
    """SIGTERM and SIGINT finish the step and checkpoint; returns the handlers they replace."""

    def stop(signum: int, _frame: object) -> None:
        if trainer.step > 0 and trainer.step != trainer.checkpointed_step:  # as _run decides at its end
            log.info("signal %d: finishing the step, writing a final checkpoint", signum)
        else:
            log.info("signal %d: stopping (nothing trained since the last checkpoint)", signum)
        trainer.stop_requested = True

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}

"""The learning loop: continual weighted training on the buffer, with online bilevel reweighting.

Each step: take new stream entries into the weight table; draw a batch (never-scored samples first, the
rest from the sum tree by weight, with an exploration floor); one forward/backward of the weighted loss
sum_i c_i loss_i, c_i proportional to w_i / q_i (w the weight, q the draw probability); on outer steps,
the same backward yields every sample's hypergradient score against the running validation gradient
(trainer/hypergrad.py), which the weighting rule turns into weights (trainer/weighting/).

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
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from store.checkpoints import remove_stale_temp_files
from store.feed import StreamEntry, TrainerFeed
from store.lease import LeaseLost
from store.meta import Checkpoint
from trainer.checkpoint import load_checkpoint
from trainer.hypergrad import GhostScorer, val_grad
from trainer.models import build_model
from trainer.models.base import to_device
from trainer.outage import DATABASE_ERRORS, REDIS_ERRORS, Dependency
from trainer.publish import Publisher
from trainer.quarantine import collate_failures, parameters_finite, unusable
from trainer.settings import TrainerSettings
from trainer.state import TrainerState, load_state, state_paths
from trainer.table import WeightTable
from trainer.weighting import make_weighting
from trainer.weighting.base import COEF_FLOOR

log = logging.getLogger("datadiet.trainer")

EXIT_LEASE_LOST = 75  # EX_TEMPFAIL: another trainer holds the lease (a supervisor may start this one again)
MISSING = object()  # a payload not fetched this time (Redis unavailable): skip the row, do not kill it


class PayloadCache:
    """Sample payloads by ordinal, fetched from Redis in batches, least recently used dropped first."""

    def __init__(self, feed: TrainerFeed, size: int, redis_dep: Dependency | None = None) -> None:
        self.feed, self.size = feed, size
        self.redis = redis_dep or Dependency("redis", REDIS_ERRORS)
        self.items: OrderedDict[int, dict[str, Any]] = OrderedDict()

    def get(self, ordinals: np.ndarray) -> list[Any]:
        """Payloads in order: a dict, None where the sample was evicted, or MISSING where it is not cached
        and Redis is unavailable (the trainer goes on with what it holds)."""
        out: list[Any] = [None] * len(ordinals)
        missing = []
        for j, o in enumerate(ordinals.tolist()):
            hit = self.items.get(o)
            if hit is None:
                missing.append(j)
            else:
                self.items.move_to_end(o)
                out[j] = hit
        if missing:
            ok, fetched = self.redis.attempt(lambda: self.feed.fetch([int(ordinals[j]) for j in missing]))
            if not ok or fetched is None:
                for j in missing:
                    out[j] = MISSING
                return out
            for j, doc in zip(missing, fetched, strict=True):
                out[j] = doc
                if doc is not None and self.size:
                    self.items[int(ordinals[j])] = doc
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return out


class Trainer:
    def __init__(self, settings: TrainerSettings, feed: TrainerFeed, engine: Engine) -> None:
        s = self.settings = settings
        self.device = torch.device(
            "cuda"
            if s.device == "auto" and torch.cuda.is_available()
            else ("cpu" if s.device == "auto" else s.device)
        )
        if self.device.type == "cpu":
            # the API shares the machine: oversubscribed torch threads spin and slow everything down
            torch.set_num_threads(s.torch_threads or max(1, min(8, (os.cpu_count() or 2) - 1)))
        torch.manual_seed(s.seed)
        self.rng = np.random.default_rng(s.seed)
        self.model = build_model(s.model, s.model_params).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        self.scorer = GhostScorer(self.model.scored_modules())
        self.weighting = make_weighting(s)
        self.table = WeightTable()
        self.feed = feed
        self.redis = Dependency("redis", REDIS_ERRORS, max_delay_s=s.max_backoff_s)
        self.db = Dependency("database", DATABASE_ERRORS, max_delay_s=s.max_backoff_s)
        self.cache = PayloadCache(feed, s.payload_cache, self.redis)
        self.publisher = Publisher(feed, engine, s.data_dir, s.publish_every_s)
        self.engine = engine
        self.step = 0
        self.checkpointed_step = -1
        self.unacked: list[str] = []
        self.val_version = -1
        self.val_samples: list[dict[str, Any]] = []
        self.checked_ordinal = -1  # the newest sample's ordinal when the validation set was last checked
        self.g_val: list[torch.Tensor] | None = None
        self.scorings = 0
        self.val_loss = math.nan
        self.train_loss = math.nan
        self.stop_requested = False
        self.checkpoint_due = False  # a checkpoint could not be written (Redis down): retry it
        self.quarantined = 0  # samples this process quarantined
        self.pending_quarantine: list[tuple[int, str, str]] = []  # (ordinal, source, reason) not yet in Redis
        self.validation_unusable = 0  # validation samples the model cannot use (left out, logged)
        self.autocast = self.device.type == "cuda"
        self.weighting.bind(self)  # rules that need the trainer's model kind, validation set or payloads

    # ------------------------------------------------------------------ start-up
    def restore(self) -> None:
        """Resume from the newest checkpoint of this model kind and config that has its trainer state (the
        newest one alone if none has), if there is one."""
        with Session(self.engine) as session:
            rows = session.scalars(select(Checkpoint).order_by(Checkpoint.version.desc()).limit(20)).all()
        complete = [
            r for r in rows if all(f.exists() for f in state_paths(self.settings.data_dir, r.version))
        ]
        row = complete[0] if complete else (rows[0] if rows else None)
        if row is None:
            log.info("no checkpoint yet: starting a new %s model", self.model.kind)
            return
        if row.model_kind != self.model.kind or row.config != self.model.config:
            log.warning(
                "newest checkpoint v%d is a %s %s, not this %s %s: starting fresh",
                row.version,
                row.model_kind,
                row.config,
                self.model.kind,
                self.model.config,
            )
            return
        loaded = load_checkpoint(row.path, sha256=row.sha256, device=self.device)
        self.model.load_state_dict(loaded.module.state_dict())
        state = load_state(self.settings.data_dir, row.version)
        self.step = self.checkpointed_step = row.step
        if state is None:
            log.warning("checkpoint v%d has no trainer state: resuming the model only", row.version)
            return
        info = state.info
        self.opt.load_state_dict(state.optimizer)
        self.table = WeightTable.from_state(state.table_arrays, info["table"])
        self.weighting.load_state(info.get("weighting", {}))
        self.scorings = int(info.get("scorings", 0))
        if state.g_val is not None:
            self.g_val = [torch.from_numpy(g).to(self.device) for g in state.g_val]
        if "rng" in info:
            self.rng.bit_generator.state = info["rng"]
        if state.torch_rng is not None:
            torch.set_rng_state(torch.from_numpy(state.torch_rng.copy()))
        # the validation set the run trained against, not just its version: without the samples a resumed
        # run would think itself up to date and never score again
        self.val_version = int(info.get("val_version", -1))
        self.val_samples = state.validation
        self.val_loss = _nan_if_none(info.get("val_loss"))
        self.train_loss = _nan_if_none(info.get("train_loss"))
        self.checked_ordinal = int(info.get("checked_ordinal", self.table.max_ordinal))
        self.quarantined = int(info.get("quarantined", 0))
        self.pending_quarantine = [tuple(q) for q in info.get("pending_quarantine", [])]  # type: ignore[misc]
        log.info(
            "resumed from checkpoint v%d at step %d with %d samples", row.version, self.step, self.table.live
        )

    def take_pending(self) -> None:
        """Entries this consumer got but did not acknowledge before it stopped: back into the table."""
        after = "0"
        while True:
            entries = self.feed.read_pending(self.settings.read_count, after=after)
            if not entries:
                break
            self._add(entries)
            after = entries[-1].entry_id
        self._add(self.feed.claim_stale(self.settings.claim_idle_ms))

    # ------------------------------------------------------------------ stream and validation
    def _add(self, entries: list[StreamEntry]) -> None:
        if not entries:
            return
        self.table.add(
            np.array([e.ordinal for e in entries], dtype=np.int64),
            np.array([e.group for e in entries], dtype=np.uint64),
            [e.source for e in entries],
        )
        # acknowledged once the table holding them is saved (at the next checkpoint): at-least-once
        self.unacked.extend(e.entry_id for e in entries)

    def sync_evictions(self) -> None:
        """Mark rows whose samples the buffer evicted (by the API's capacity bound) since we last looked."""
        t = self.table
        rows = np.flatnonzero(t.alive)
        if len(rows):
            live = np.asarray(self.feed.live_ordinals(t.ordinal[rows].tolist()), dtype=np.bool_)
            t.kill(rows[np.logical_not(live)])

    def poll(self) -> None:
        block = None if self.table.live else 1000
        entries = self.feed.read_new(self.settings.read_count, block_ms=block)
        try:
            if entries and self.val_version >= 0:
                # a new validation set must be seen before the samples posted after it join a cohort
                self.refresh_validation()
        finally:  # delivered entries join the table even if Redis fails in between: none is dropped
            self._add(entries)

    def refresh_validation(self) -> None:
        version = self.feed.validation_version()
        if version == self.val_version and (self.val_samples or version <= 0):
            self.checked_ordinal = self.table.max_ordinal
            return
        version, samples = self.feed.validation()
        if not samples and self.val_samples:
            # Redis lost the set (a restart without persistence): the trainer's copy is still the task
            log.warning(
                "the validation set is gone from Redis (version %d); keeping the trainer's copy (v%d, %d "
                "samples) until a new one is sent",
                version,
                self.val_version,
                len(self.val_samples),
            )
            self.val_version = version
            return
        bad = collate_failures(self.model, samples)
        if bad:
            log.warning(
                "validation set v%d: leaving out %d samples the model cannot use (first: #%d, %s)",
                version,
                len(bad),
                min(bad),
                bad[min(bad)],
            )
            samples = [v for i, v in enumerate(samples) if i not in bad]
        self.validation_unusable = len(bad)
        same = version == self.val_version  # the same set, reloaded (the trainer had lost its copy)
        self.val_version, self.val_samples = version, samples
        if same:
            return
        self.g_val = None
        if self.step > 0:
            # the task may have changed: the backlog queued before it did is no longer the most useful
            # to score first (those samples stay in the table and are drawn by weight); samples that
            # arrived since the last check (ordinals only grow) and from now on are queued as usual
            self.table.new_cohort()  # what arrives from now on is estimated apart from the older data
            self.table.unqueue_through(self.checked_ordinal)
            self.weighting.on_validation_change(self.table)
            if self.settings.reset_optimizer_on_validation_change:
                # Adam's moments describe the old task's gradients: the new one starts from fresh moments
                self.opt.state.clear()
        self.checked_ordinal = self.table.max_ordinal
        log.info("validation set v%d: %d samples", self.val_version, len(self.val_samples))

    # ------------------------------------------------------------------ one step
    def _reweight(self) -> None:
        t = self.table
        w = self.weighting.weights(t, self.step)
        t.cols["weight"][: t.n] = w
        n_live = max(t.live, 1)
        probs = (1 - self.settings.explore) * w / max(
            float(w.sum()), 1e-12
        ) + self.settings.explore * t.alive / n_live
        t.set_sampling(np.where(t.alive, probs, 0.0))

    def _batch(self, fresh_first: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """(rows, loss coefficients summing to 1, which rows came from the queue, payloads) for one batch;
        evicted samples dropped."""
        s, t = self.settings, self.table
        fresh = t.take_fresh(int(s.batch_size * s.fresh_fraction)) if fresh_first else np.empty(0, np.int64)
        drawn = t.draw(s.batch_size - len(fresh), self.rng) if t.tree.total > 0 else np.empty(0, np.int64)
        rows = np.concatenate([fresh, drawn]).astype(np.int64)
        w = t.weight[rows].astype(np.float64)
        q = t.tree.values(drawn) / t.tree.total if len(drawn) else np.empty(0)
        coef = np.concatenate([w[: len(fresh)], w[len(fresh) :] / (max(t.live, 1) * np.maximum(q, 1e-12))])
        payloads = self.cache.get(t.ordinal[rows])
        evicted = np.array([p is None for p in payloads], dtype=bool)
        missing = np.array([p is MISSING for p in payloads], dtype=bool)  # Redis unavailable, not cached
        if evicted.any():
            t.kill(rows[evicted])
        queued = np.arange(len(rows)) < len(fresh)
        if missing.any():
            t.fresh.extend(rows[missing & queued])  # still to be scored: back in the queue
        keep = ~(evicted | missing)
        rows, coef, queued = rows[keep], coef[keep], queued[keep]
        coef = np.maximum(coef / max(coef.sum(), 1e-12), COEF_FLOOR)
        return rows, coef / coef.sum(), queued, [p for p, k in zip(payloads, keep, strict=True) if k]

    def _val_batch(self) -> dict[str, torch.Tensor]:
        k = min(self.settings.val_batch_size, len(self.val_samples))
        idx = self.rng.choice(len(self.val_samples), size=k, replace=False)
        return to_device(self.model.collate([self.val_samples[i] for i in idx]), self.device)

    def _refresh_g_val(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, grads = val_grad(self.model, self._val_batch())
        grads = [g.float() for g in grads]
        b = self.settings.val_grad_beta
        if self.g_val is None:
            self.g_val = grads
        else:  # running average: G <- b G + (1 - b) g
            self.g_val = [b * old + (1 - b) * new for old, new in zip(self.g_val, grads, strict=True)]
        self.val_loss = loss if math.isnan(self.val_loss) else 0.8 * self.val_loss + 0.2 * loss

    def train_step(self) -> bool:
        """One inner step (and outer step when due); False when there was nothing to train on."""
        s = self.settings
        outer = self.step % s.outer_every == 0
        scoring = outer and self.weighting.scores and bool(self.val_samples)
        if self.step % s.reweight_every == 0:
            self._reweight()
        rows, coef, queued, payloads = self._batch(fresh_first=outer)
        if not len(rows):
            return False
        if scoring and (self.g_val is None or self.scorings % s.val_grad_every == 0):
            self._refresh_g_val()
        try:
            batch = to_device(self.model.collate(payloads), self.device)
        except Exception:  # one of the samples cannot be used by this model: find it, set it aside
            self._quarantine_unusable(rows, payloads)
            return True
        c = torch.as_tensor(coef, dtype=torch.float32, device=self.device)
        self.model.train()
        for group in self.opt.param_groups:  # linear warm-up of the learning rate
            group["lr"] = s.lr * min(1.0, (self.step + 1) / max(s.warmup_lr_steps, 1))
        with self.scorer.capture() if scoring else contextlib.nullcontext():
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                losses = self.model.per_sample_loss(batch)  # (B,)
            if self.weighting.batch_from == "losses":  # RHO-LOSS selection: chosen before the one backward
                before = losses.detach().double().cpu().numpy()
                chosen = self.weighting.batch_coef(self.table, rows, coef, before, None, None)
                if chosen is not None:
                    c = torch.as_tensor(chosen, dtype=torch.float32, device=self.device)
            loss = (c * losses.float()).sum()  # sum_i w_i loss_i / sum_i w_i, importance-corrected
            loss.backward()
        losses_np = losses.detach().double().cpu().numpy()
        if not np.isfinite(losses_np).all():  # before anything learns from this batch
            self.opt.zero_grad(set_to_none=True)
            self._quarantine_unusable(rows, payloads)
            return True
        self.weighting.observe_losses(self.table, rows, losses_np, self.step)
        dots_np = norms_np = None
        if scoring:
            assert self.g_val is not None
            dots, norms = self.scorer.scores(c, self.g_val)
            dots_np, norms_np = dots.double().cpu().numpy(), norms.double().cpu().numpy()
            g_norm = float(torch.stack([g.float().square().sum() for g in self.g_val]).sum().sqrt())
            self.weighting.observe(self.table, rows, dots_np, norms_np, g_norm, self.step)
            self.scorings += 1
            # samples scored fewer than min_visits times go back in the queue: one score is a noisy estimate
            # (only those taken from it: one drawn by weight is still queued, and would be queued twice)
            again = rows[queued & (self.table.visits[rows] < s.min_visits)]
            self.table.fresh.extend(np.unique(again))
        # L2RW re-weights this very batch from its scores: a second backward
        batch_coef = (
            self.weighting.batch_coef(self.table, rows, coef, losses_np, dots_np, norms_np)
            if self.weighting.batch_from == "scores"
            else None
        )
        if batch_coef is not None:
            self.opt.zero_grad(set_to_none=True)
            c2 = torch.as_tensor(batch_coef, dtype=torch.float32, device=self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                losses = self.model.per_sample_loss(batch)
            loss = (c2 * losses.float()).sum()
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        if not bool(torch.isfinite(grad_norm)):  # a finite loss with an infinite gradient: same treatment
            self.opt.zero_grad(set_to_none=True)
            self._quarantine_unusable(rows, payloads)
            return True
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        lv = float(loss.detach())
        self.train_loss = lv if math.isnan(self.train_loss) else 0.95 * self.train_loss + 0.05 * lv
        self.step += 1
        return True

    # ------------------------------------------------------------------ quarantine
    def _quarantine_unusable(self, rows: np.ndarray, payloads: list[dict[str, Any]]) -> None:
        """A batch failed (collate, or a non-finite loss or gradient): quarantine each sample that fails
        alone; the step is not taken and the loop draws again."""
        if not parameters_finite(self.model):
            # no sample is to blame for a model that has diverged; the last checkpoint is still finite
            raise FloatingPointError(
                "the model's parameters are not finite: restart from the last checkpoint"
            )
        bad = unusable(self.model, payloads, self.device, self.autocast)
        if not bad:
            log.warning("a batch gave a non-finite loss or gradient with no single sample to blame: skipped")
            return
        idx = np.array(sorted(bad), dtype=np.int64)
        t = self.table
        t.kill(rows[idx], evicted=False)
        for i in idx.tolist():
            row = int(rows[i])
            source = t.sources[int(t.source[row])]
            self.pending_quarantine.append((int(t.ordinal[row]), source, bad[i]))
        self.quarantined += len(idx)
        first = int(idx[0])
        log.warning(
            "quarantined %d sample(s) the model cannot use (e.g. ordinal %d from %r: %s)",
            len(idx),
            int(t.ordinal[int(rows[first])]),
            t.sources[int(t.source[int(rows[first])])],
            bad[first],
        )
        self.redis.attempt(self.flush_quarantine)

    def flush_quarantine(self) -> None:
        """Move the quarantined samples out of the buffer and into its quarantine list (Redis errors
        propagate; the list is kept until this succeeds)."""
        if self.pending_quarantine:
            o, src, why = zip(*self.pending_quarantine, strict=True)
            self.feed.quarantine(o, src, why, self.step)
            self.pending_quarantine.clear()

    # ------------------------------------------------------------------ publishing
    @torch.no_grad()
    def full_val_loss(self, limit: int = 512) -> float:
        if not self.val_samples:
            return math.nan
        self.model.eval()
        losses = []
        for i in range(0, min(len(self.val_samples), limit), 128):
            batch = to_device(self.model.collate(self.val_samples[i : i + 128]), self.device)
            losses.append(self.model.per_sample_loss(batch).float().cpu())
        return float(torch.cat(losses).mean())

    def state(self) -> TrainerState:
        arrays, info = self.table.state()
        return TrainerState(
            step=self.step,
            table_arrays=arrays,
            info={
                "table": info,
                "weighting": self.weighting.state(),
                "scorings": self.scorings,
                "val_version": self.val_version,
                "rng": self.rng.bit_generator.state,
                "val_loss": _finite_or_none(self.val_loss),
                "train_loss": _finite_or_none(self.train_loss),
                "checked_ordinal": self.checked_ordinal,
                "quarantined": self.quarantined,
                "pending_quarantine": [list(q) for q in self.pending_quarantine],
            },
            optimizer=self.opt.state_dict(),
            g_val=[g.float().cpu().numpy() for g in self.g_val] if self.g_val is not None else None,
            validation=self.val_samples,
            torch_rng=torch.get_rng_state().numpy(),
        )

    def checkpoint(self) -> bool:
        """Publish weights and write a checkpoint; whether it was written. Redis unavailable: not now
        (``checkpoint_due`` retries it); database unavailable: written, its row registered later."""
        self.redis.attempt(self.sync_evictions)
        self.table.compact()  # rows of evicted samples go; the cache is keyed by ordinal, not row
        self._reweight()
        self.redis.attempt(self.publish)
        self.db.attempt(self.publisher.refresh_known_version)
        val = self.full_val_loss()
        metrics = {
            "val_loss": None if math.isnan(val) else val,
            "train_loss": _finite(self.train_loss),
            "effective_fraction": (self.publisher.last_doc or {})
            .get("summary", {})
            .get("effective_fraction"),
            "live_samples": self.table.live,
            "validation_version": self.val_version,
            "quarantined": self.quarantined,
        }
        settings = self.settings.model_dump(mode="json", exclude={"api_keys", "redis_url", "database_url"})
        state = self.state()
        ok, values = self.redis.attempt(
            lambda: self.publisher.write_checkpoint(self.model, state, metrics, settings)
        )
        if not ok or values is None:
            self.checkpoint_due = True  # no version without Redis (it is reserved under the lease)
            return False
        self.checkpoint_due = False
        self.checkpointed_step = self.step
        self.redis.attempt(self._ack)  # the saved table holds them now
        registered, _ = self.db.attempt(self.publisher.register_pending)
        log.info(
            "published checkpoint v%d at step %d (val_loss %s)%s",
            values["version"],
            self.step,
            metrics["val_loss"],
            "" if registered else "; its database row waits for the database",
        )
        return True

    def _ack(self) -> None:
        self.feed.ack(self.unacked)
        self.unacked.clear()
        self.feed.trim_acknowledged()

    def publish(self) -> None:
        self.publisher.publish_weights(self.table, self.step, self.weighting.name, self.status())

    def status(self) -> dict[str, Any]:
        return {
            "steps_per_s": round(self.rate, 3),
            "val_loss": _finite(self.val_loss) or "",
            "train_loss": _finite(self.train_loss) or "",
            "method": self.weighting.name,
            "device": self.device.type,
            "validation_version": self.val_version,
        }

    # ------------------------------------------------------------------ the process
    rate = 0.0

    def run(self) -> int:
        """Train until DATADIET_MAX_STEPS (or SIGTERM/SIGINT), then write a final checkpoint; exit status
        (0, or EXIT_LEASE_LOST when another trainer holds this deployment's lease)."""
        previous = _install_signal_handlers(self)
        try:
            if not self._start():
                return EXIT_LEASE_LOST if not self.stop_requested else 0
            return self._run()
        except LeaseLost as e:
            log.error(
                "%s: stopping without writing anything more (steps since the last checkpoint are dropped)", e
            )
            return EXIT_LEASE_LOST
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            with contextlib.suppress(*REDIS_ERRORS):
                self.feed.lease.release()

    def _start(self) -> bool:
        """Wait for Redis, the lease and the database (with backoff, logging once per outage), then
        restore; False when the lease is held elsewhere and DATADIET_LEASE_WAIT is off, or on a stop."""
        s, stop = self.settings, lambda: self.stop_requested
        if not self.redis.wait_for(self.feed.ensure_group, stop)[0]:
            return False
        ok, held = self.redis.wait_for(lambda: self.feed.lease.acquire(wait=s.lease_wait, stop=stop), stop)
        if not ok or not held:
            if not self.stop_requested:
                log.error("another trainer holds this deployment's lease and DATADIET_LEASE_WAIT is off")
            return False
        # holding the lease, no other trainer can be mid-write: what a killed write left is garbage
        for sub in ("checkpoints", "trainer"):
            remove_stale_temp_files(s.data_dir / sub)
        if not self.db.wait_for(self.publisher.adopt_unregistered, stop)[0]:
            return False
        if not self.db.wait_for(self.restore, stop)[0]:
            return False
        for step in (self.take_pending, self.sync_evictions, self.flush_quarantine):
            if not self.redis.wait_for(step, stop)[0]:
                return False
        return True

    def _run(self) -> int:
        s = self.settings
        last_progress = t_rate = time.monotonic()
        steps_at_rate = self.step
        if not s.max_steps or self.step < s.max_steps:
            log.info(
                "training %s (%s) on %s, %d samples in the table",
                self.model.kind,
                self.weighting.name,
                self.device,
                self.table.live,
            )
        while not self.stop_requested and (not s.max_steps or self.step < s.max_steps):
            # every Redis or database call below is skipped while that dependency is in backoff; a lost
            # lease (LeaseLost) is not an outage and ends the run
            self.redis.attempt(self.feed.lease.renew_if_due)
            self.redis.attempt(self.poll)
            if self.step % s.validation_check_every == 0 or not self.val_samples:
                self.redis.attempt(self.refresh_validation)
            if self.pending_quarantine:
                self.redis.attempt(self.flush_quarantine)
            if self.publisher.pending:
                self.db.attempt(self.publisher.register_pending)
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
                self.checkpoint()
            if now - last_progress >= s.progress_every_s:
                last_progress = now
                self._progress()
        if self.step > 0 and self.step != self.checkpointed_step and not self.checkpoint():
            log.warning("no final checkpoint (Redis unavailable): the steps since the last one are dropped")
        return 0

    def _progress(self) -> None:
        doc = self.publisher.last_doc or {}
        eff = doc.get("summary", {}).get("effective_fraction", 1.0)
        if not self.val_samples and self.weighting.scores:
            log.info("no validation set yet: training uniformly; PUT /v1/validation to start reweighting")
        down = [d.name for d in (self.redis, self.db) if d.down]
        if down:
            log.info("waiting for %s; training on what the trainer holds", " and ".join(down))
        log.info(
            "step %d | %.1f steps/s | val_loss %.4f | train_loss %.4f | effective %.2f | live %d | fresh %d",
            self.step,
            self.rate,
            self.val_loss,
            self.train_loss,
            eff,
            self.table.live,
            len(self.table.fresh),
        )


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)


def _finite_or_none(x: float) -> float | None:
    """A loss average as saved in the trainer state: exact (no rounding), None for NaN."""
    return None if math.isnan(x) else float(x)


def _nan_if_none(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _install_signal_handlers(trainer: Trainer) -> dict[int, Any]:
    """SIGTERM and SIGINT finish the step and checkpoint; returns the handlers they replace."""

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing the step, writing a final checkpoint", signum)
        trainer.stop_requested = True

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}

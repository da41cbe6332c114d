"""What a quality-benchmark run posts (bench/quality_run.py), and how fast: each method's training stream,
a compact record of what was posted, and the stream-rate pacer.

A run at rate R (``--rates 1 4 16``) streams its samples at R x batch size new samples per training step:
the first ``LEAD_STEPS`` steps' worth before the trainer starts (the initial fill), then always enough that
the stream stays ``LEAD_STEPS`` steps' worth ahead of the trainer's step read from ``GET /v1/stats``. Pacing
is by steps, never by seconds, so a slow machine sees the same stream. Where posting cannot keep up (a
digits step takes ~0.01 s; 16x that is ~100,000 samples a second), the pacer stops the trainer
(SIGSTOP to its process group) once it is within half the lead of the stream's end and lets it go on
(SIGCONT) when the full lead is posted again: the trainer waits for the stream, never the other way round.
The status step is up to one publish interval old, and the trainer publishes less often as its table grows
(at most ~10% of its time; with 200,000 live samples, at its checkpoints only). So the lead grows to twice
the largest step jump between two status reads (``status_gap``): the stream arrives in chunks of up to
that many steps' worth, at R x batch size per step on average. ``min_lead`` records the fewest steps'
worth of stream ahead of the trainer's published step (negative: behind it).
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.demo.scenarios import Scenario
from app.schema import content_group
from datadiet import Client

BATCH_SIZE = 64  # the trainer's batch (DATADIET_BATCH_SIZE), which a stream rate is relative to
LEAD_STEPS = 16  # a paced stream stays this many steps' worth ahead of the trainer; also the initial fill
POST_BATCH = 2000  # samples per POST
MAX_PAUSE_S = 5.0  # the trainer is never held stopped longer at a time (its Redis lease lasts 30 s)


def rate_label(rate: float | None) -> str:
    """``"all"`` (the whole stream up front) or ``"4x"``."""
    return "all" if rate is None else f"{rate:g}x"


def stream_length(steps: int, rate: float) -> int:
    """Samples a stream at ``rate`` needs to last ``steps`` steps, the initial fill included."""
    return math.ceil(rate * BATCH_SIZE * (steps + LEAD_STEPS))


def training_stream(
    scn: Scenario, method: str, seed: int, n: int, keep_fraction: float | None, paced: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | Iterator[dict[str, Any]]:
    """The method's training samples. Up front (``paced`` False): (samples posted at the start, samples
    posted at the drift switch). Paced: an iterator over the method's own stream. The oracle's and random's
    are filtered from the same ``n`` scenario samples that the other methods get, and are paced at
    ``paced_share`` of the rate: each kept sample arrives at about the step it arrives at in the full stream,
    so the oracle is the clean subsequence of the same arrivals, a like-for-like ceiling (filtering a longer
    stream to keep R x batch size a step gave it up to 6x more distinct clean samples than the stream the
    others select from). val-only is never paced: it posts the 100 validation samples."""
    if method == "val-only":
        first = [_as_training(s) for s in scn.validation]
        return first, [_as_training(s) for s in scn.validation_v2]
    if paced:
        stream: Iterator[dict[str, Any]] = scn.stream(n, seed)
        if method == "oracle":
            stream = (s for s in stream if _clean(s))
        elif method == "random":
            assert keep_fraction is not None
            rng = np.random.default_rng([seed, 7])
            stream = (s for s in stream if rng.random() < keep_fraction)
        return stream
    samples = list(scn.stream(n, seed))
    if method == "oracle":
        samples = [s for s in samples if _clean(s)]
    elif method == "random":
        assert keep_fraction is not None
        rng = np.random.default_rng([seed, 7])
        k = max(1, round(keep_fraction * len(samples)))
        samples = [samples[i] for i in np.sort(rng.choice(len(samples), size=k, replace=False))]
    if scn.switch_at is None:
        return samples, []
    cut = sum(1 for s in samples if s["meta"]["task"] == scn.task.name)  # the stream switches task once
    return samples[:cut], samples[cut:]


def _clean(sample: dict[str, Any]) -> bool:
    """What the oracle keeps: right for the task, and not a flood copy."""
    return not sample["meta"]["corrupted"] and sample["meta"]["kind"] != "flood"


def paced_share(scn: Scenario, method: str, keep_fraction: float | None) -> float:
    """The expected share of the scenario's stream that ``method`` posts: its pace is this share of the
    rate (the oracle: the clean, non-flood share; random: ``keep_fraction``; the rest: all of it)."""
    if method == "oracle":
        return sum(share * (1 - s.corrupted_fraction) for s, share in scn.sources if s.kind != "flood")
    if method == "random":
        assert keep_fraction is not None
        return keep_fraction
    return 1.0


def _as_training(sample: dict[str, Any]) -> dict[str, Any]:
    return {**sample, "id": f"train:{sample['id']}"}


@dataclass
class Posted:
    """What a run posted, one entry per sample, without the payloads (a 16x stream is a million samples):
    id, source, ground truth (``positive``: clean, or for drift of the new task), whether a flood copy,
    and the service's content group (app/schema.py ``content_group``)."""

    ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    positive: list[bool] = field(default_factory=list)
    flood: list[bool] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    def add(self, samples: list[dict[str, Any]], scn: Scenario) -> None:
        new_task = scn.task_v2.name if scn.task_v2 is not None else None
        for s in samples:
            self.ids.append(s["id"])
            self.sources.append(s["source"])
            meta = s["meta"]
            self.positive.append(meta["task"] == new_task if new_task else not meta["corrupted"])
            self.flood.append(meta["kind"] == "flood")
            self.groups.append(content_group(s["input"], s["target"]))

    def __len__(self) -> int:
        return len(self.ids)


class Pacer:
    """Posts ``samples`` at ``per_step`` samples per trainer step, ``LEAD_STEPS`` steps ahead (module
    docstring), stopping ``trainer`` while the stream falls behind."""

    def __init__(
        self,
        client: Client,
        samples: Iterator[dict[str, Any]],
        per_step: float,
        total: int,
        trainer: subprocess.Popen[bytes],
        scn: Scenario,
        posted: Posted,
    ) -> None:
        self.client, self.samples, self.per_step, self.total = client, samples, per_step, total
        self.trainer, self.scn, self.posted = trainer, scn, posted
        self.exhausted = False
        self.paused_since: float | None = None
        self.pauses = 0
        self.paused_s = 0.0
        self.min_lead = math.inf  # steps' worth of stream ahead of the trainer's (last published) step
        self.last_step = 0
        self.status_gap = 0  # the largest step jump between two status reads

    @property
    def lead(self) -> int:
        """Steps' worth kept ahead of the published step: LEAD_STEPS, or twice the status gap."""
        return max(LEAD_STEPS, 2 * self.status_gap)

    def target(self, step: int) -> int:
        return min(self.total, math.ceil(self.per_step * (step + self.lead)))

    def fill(self) -> None:
        """The initial fill: ``LEAD_STEPS`` steps' worth."""
        while not self.exhausted and len(self.posted) < self.target(0):
            self._post(self.target(0) - len(self.posted))

    def keep_up(self, step: int) -> bool:
        """Post towards the lead for the trainer at ``step``; whether anything was posted."""
        n = len(self.posted)
        self.status_gap = max(self.status_gap, step - self.last_step)
        self.last_step = step
        if not self.exhausted:
            self.min_lead = min(self.min_lead, n / self.per_step - step)
        want = self.target(step) - n
        if self.exhausted or want <= 0:
            self.resume()
            return False
        if self.paused_since is None and n < self.per_step * (step + self.lead / 2):
            os.killpg(self.trainer.pid, signal.SIGSTOP)  # the trainer waits for the stream
            self.paused_since = time.monotonic()
            self.pauses += 1
        self._post(want)
        if self.paused_since is not None and (
            len(self.posted) >= self.target(step) or time.monotonic() - self.paused_since > MAX_PAUSE_S
        ):
            self.resume()
        return True

    def resume(self) -> None:
        if self.paused_since is not None:
            os.killpg(self.trainer.pid, signal.SIGCONT)
            self.paused_s += time.monotonic() - self.paused_since
            self.paused_since = None

    def _post(self, want: int) -> None:
        batch = list(itertools.islice(self.samples, min(want, POST_BATCH)))
        if len(batch) < min(want, POST_BATCH):
            self.exhausted = True
        if batch:
            self.client.post_samples(batch, batch_size=POST_BATCH)
            self.posted.add(batch, self.scn)
        self.exhausted = self.exhausted or len(self.posted) >= self.total

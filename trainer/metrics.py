"""The trainer's own Prometheus metrics, and freshness: from a sample's POST to its first training use.

    DATADIET_TRAINER_METRICS_PORT=9464 python -m trainer      # then: curl http://127.0.0.1:9464/metrics

The API's ``/metrics`` reports what the trainer last wrote to Redis; this port reports the trainer process
itself, read at scrape time (so it answers while Redis is down too). It is prometheus_client's
``start_http_server`` on a registry of the trainer's own (no process or platform collectors), off unless
``DATADIET_TRAINER_METRICS_PORT`` is set. Families (each with HELP and TYPE):

    datadiet_trainer_step                    gauge      steps taken
    datadiet_trainer_steps_per_second        gauge      recent speed (0 while idle)
    datadiet_trainer_val_loss                gauge      validation loss (absent until measured)
    datadiet_trainer_train_loss              gauge      running training loss (absent before a step)
    datadiet_trainer_effective_fraction      gauge      share of live samples weighing >= 0.1
    datadiet_trainer_checkpoint_version      gauge      newest checkpoint registered (what agents get)
    datadiet_trainer_unscored                gauge      the scoring backlog: the unscored queue's length
    datadiet_trainer_live_samples            gauge      samples in the weight table
    datadiet_trainer_idle                    gauge      1 while idle (trainer/idle.py), else 0
    datadiet_trainer_freshness_seconds       histogram  POST to first training use, per sample

Freshness is measured on the samples whose first training use is their turn in the unscored queue (every
new sample enters it; one drawn by weight before its turn comes is counted at its turn, so the measure
errs long; one the scoring budget drops from the queue is not counted). Arrival is Redis's clock (the
stream entry id), use is the trainer's: on one machine they agree; across machines, their skew adds (a
negative age counts as 0).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from trainer.loop import Trainer

log = logging.getLogger("datadiet.trainer")

FRESHNESS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)  # seconds
FRESHNESS_WINDOW = 10_000  # samples the status hash's percentiles are over


class Freshness:
    """Ages (seconds) of samples at their first training use: into a Prometheus histogram, and a rolling
    window of the last ``window`` for the percentiles the trainer publishes in its status hash."""

    def __init__(self, registry: CollectorRegistry, window: int = FRESHNESS_WINDOW) -> None:
        self.histogram = Histogram(
            "datadiet_trainer_freshness_seconds",
            "Seconds from a sample's POST (its ingest stream entry) to its first use in a training step",
            buckets=FRESHNESS_BUCKETS,
            registry=registry,
        )
        self._ring = np.zeros(window, dtype=np.float64)
        self._seen = 0  # ages observed since the trainer started

    def observe(self, arrivals_ms: np.ndarray, now: float | None = None) -> None:
        """Samples that arrived at ``arrivals_ms`` (unix ms) were first trained on at ``now`` (unix s)."""
        if not len(arrivals_ms):
            return
        now = time.time() if now is None else now
        ages = np.maximum(now - np.asarray(arrivals_ms, dtype=np.float64) / 1000.0, 0.0)
        for age in ages.tolist():
            self.histogram.observe(age)
        ages = ages[-len(self._ring) :]
        at = (self._seen + np.arange(len(ages))) % len(self._ring)
        self._ring[at] = ages
        self._seen += len(ages)

    def window(self) -> np.ndarray:
        """The last (up to ``window``) ages, in no particular order."""
        return self._ring[: min(self._seen, len(self._ring))]

    def summary(self) -> dict[str, Any]:
        """``freshness_p50_s``, ``freshness_p99_s`` (seconds, "" before any) and ``freshness_n`` (how many
        ages they are over) for the trainer's status hash."""
        ages = self.window()
        if not len(ages):
            return {"freshness_p50_s": "", "freshness_p99_s": "", "freshness_n": 0}
        p50, p99 = np.percentile(ages, [50, 99])
        return {
            "freshness_p50_s": round(float(p50), 3),
            "freshness_p99_s": round(float(p99), 3),
            "freshness_n": len(ages),
        }


class TrainerCollector:
    """The trainer's numbers as gauges, read from the trainer object at scrape time (in the HTTP server's
    thread: each is one attribute read, so a scrape never waits for a step)."""

    def __init__(self, trainer: Trainer) -> None:
        self.t = trainer

    def collect(self) -> Iterator[Metric]:
        t = self.t
        doc = t.publisher.last_doc or {}
        values: list[tuple[str, str, float | None]] = [
            ("step", "Training steps taken", t.step),
            ("steps_per_second", "Training steps per second, recently (0 while idle)", t.rate),
            ("val_loss", "Loss on the validation set", t.validation.current_loss),
            ("train_loss", "Running average of the training loss", t.learner.train_loss),
            (
                "effective_fraction",
                "Share of live samples weighing at least 0.1, at the last publish",
                doc.get("summary", {}).get("effective_fraction"),
            ),
            (
                "checkpoint_version",
                "Newest checkpoint version registered in the database (what agents download)",
                t.publisher.known_version or None,
            ),
            ("unscored", "The scoring backlog: samples in the unscored queue", len(t.table.unscored)),
            ("live_samples", "Samples in the trainer's weight table", t.table.live),
            ("idle", "1 while the trainer idles (nothing new to learn), else 0", int(t.idler.idle)),
        ]
        for name, help_text, value in values:
            if value is not None and value == value:  # absent while unknown (None, NaN)
                yield GaugeMetricFamily(f"datadiet_trainer_{name}", help_text, value=float(value))


class TrainerMetrics:
    """The trainer's registry (its gauges and the freshness histogram) and, when a port is set, the HTTP
    server exposing it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.freshness = Freshness(self.registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, trainer: Trainer, host: str, port: int) -> None:
        """Register the trainer's gauges and serve ``/metrics`` on ``host:port`` in a daemon thread.
        Raises OSError when the address cannot be bound (the port is taken)."""
        self.registry.register(TrainerCollector(trainer))
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("trainer metrics on http://%s:%d/metrics", host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

"""The trainer process's own Prometheus metrics (DATADIET_TRAINER_METRICS_PORT), and retention in a real
run on SQLite."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from store.processes import free_port, stop_process_group
from tests.trainer.conftest import MLP, blobs, start_trainer, wait_for

FAMILIES = {
    "datadiet_trainer_step": "gauge",
    "datadiet_trainer_steps_per_second": "gauge",
    "datadiet_trainer_val_loss": "gauge",
    "datadiet_trainer_train_loss": "gauge",
    "datadiet_trainer_effective_fraction": "gauge",
    "datadiet_trainer_checkpoint_version": "gauge",
    "datadiet_trainer_unscored": "gauge",
    "datadiet_trainer_live_samples": "gauge",
    "datadiet_trainer_idle": "gauge",
    "datadiet_trainer_freshness_seconds": "histogram",
}


def scrape(url: str) -> dict[str, Any] | None:
    """{family name: family} from the trainer's /metrics, None while it does not answer."""
    try:
        text = httpx.get(url, timeout=2).text
    except httpx.TransportError:
        return None
    return {f.name: f for f in text_string_to_metric_families(text)} | {"_text": text}


def value(families: dict[str, Any], name: str, sample: str | None = None) -> float:
    return next(s.value for s in families[name].samples if s.name == (sample or name))


def test_the_trainer_serves_its_metrics_and_keeps_the_newest_five_checkpoints(
    redis_url: str, tmp_path: Path, make_settings: Callable[..., Any], make_client: Callable[..., TestClient]
) -> None:
    api = make_client(make_settings(model="mlp", model_params=MLP))
    api.put("/v1/validation", json={"samples": blobs(64, 9, source="v", noisy=False, prefix="v")})
    api.post("/v1/samples", json={"samples": blobs(300, 1, source="a", noisy=False, prefix="a")})
    port, log = free_port(), tmp_path / "trainer.log"
    url = f"http://127.0.0.1:{port}/metrics"
    proc = start_trainer(redis_url, tmp_path / "data", log, trainer_metrics_port=str(port))
    try:
        # a checkpoint every 25 steps (start_trainer): by version 8, retention has deleted three
        families = wait_for(
            lambda: (
                (m := scrape(url))
                and "datadiet_trainer_checkpoint_version" in m
                and value(m, "datadiet_trainer_checkpoint_version") >= 8
                and m
            ),
            120,
            "checkpoint v8 in the trainer's metrics",
            log,
        )
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        stop_process_group(proc)
    for name, kind in FAMILIES.items():
        assert families[name].type == kind, name
        assert f"# HELP {name} " in families["_text"] and f"# TYPE {name} {kind}" in families["_text"]
    assert value(families, "datadiet_trainer_step") >= 8 * 25
    assert value(families, "datadiet_trainer_live_samples") == 300
    assert value(families, "datadiet_trainer_idle") == 0
    assert (
        value(families, "datadiet_trainer_freshness_seconds", "datadiet_trainer_freshness_seconds_count")
        == 300
    )
    assert 0 < value(families, "datadiet_trainer_val_loss") < 10

    # retention ran on SQLite: the newest five checkpoints, in the database and on disk
    versions = [c["version"] for c in api.get("/v1/checkpoints").json()]
    newest = max(versions)
    assert versions == list(range(newest, newest - 5, -1))
    on_disk = sorted(int(p.name[1:9]) for p in (tmp_path / "data" / "checkpoints").glob("v*.safetensors"))
    assert on_disk == sorted(versions)


def test_a_metrics_port_in_use_stops_the_trainer_with_one_clear_line(redis_url: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        log = tmp_path / "trainer.log"
        proc = start_trainer(redis_url, tmp_path / "data", log, trainer_metrics_port=str(port))
        try:
            assert proc.wait(timeout=120) == 78  # EX_CONFIG: restarting cannot help
        finally:
            stop_process_group(proc)
    errors = [line for line in log.read_text().splitlines() if "DATADIET_TRAINER_METRICS_PORT" in line]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "in use" in errors[0], log.read_text()

"""``GET /metrics``: Prometheus text with HELP and TYPE lines, the names dashboards know, the trainer's
published numbers as the API reads them, and request counts and latencies by route template, method and
status, all parsed with prometheus_client's own parser after real requests."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import redis
from checkpoint_rows import publish_checkpoint
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from store.config import Settings
from store.feed import TrainerFeed
from store.keys import Keys

DASHBOARD_NAMES = {  # family name (a counter's without _total) -> type; present on every scrape
    "datadiet_buffer_samples": "gauge",
    "datadiet_buffer_capacity": "gauge",
    "datadiet_samples_ingested": "counter",
    "datadiet_samples_duplicates": "counter",
    "datadiet_samples_evicted": "counter",
    "datadiet_samples_quarantined": "counter",
    "datadiet_validation_version": "gauge",
}
SAMPLE_ROUTE = "/v1/samples/{sample_id}"


def scrape(client: TestClient) -> dict[str, list[Sample]]:
    """The samples of each metric family, by family name; asserts the text parses and documents itself."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(response.text))
    for family in families:
        assert family.documentation, f"{family.name} has no HELP line"
        assert family.type != "unknown", f"{family.name} has no TYPE line"
    return {family.name: family.samples for family in families}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The value of the sample ``name`` with exactly these labels, 0 when there is none yet."""
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) <= 1
    return found[0] if found else 0.0


def requests_of(metrics: dict[str, list[Sample]], route: str, method: str, status: str) -> float:
    samples = metrics.get("datadiet_http_requests", [])
    return value(samples, "datadiet_http_requests_total", route=route, method=method, status=status)


def test_metrics_parse_with_help_and_type_and_keep_the_dashboard_names(app_client: TestClient) -> None:
    samples = [{"source": "a", "input": f"q{i}", "target": "r"} for i in range(3)]
    app_client.post("/v1/samples", json={"samples": samples})
    app_client.post("/v1/samples", json={"samples": samples[:1]})
    app_client.put("/v1/validation", json={"samples": [{"input": "v", "target": "w"}]})

    metrics = scrape(app_client)
    text = app_client.get("/metrics").text

    for name, kind in DASHBOARD_NAMES.items():
        exposed = f"{name}_total" if kind == "counter" else name
        assert f"# HELP {exposed} " in text and f"# TYPE {exposed} {kind}\n" in text
    assert value(metrics["datadiet_buffer_samples"], "datadiet_buffer_samples") == 3
    assert value(metrics["datadiet_samples_ingested"], "datadiet_samples_ingested_total") == 3
    assert value(metrics["datadiet_samples_duplicates"], "datadiet_samples_duplicates_total") == 1
    assert value(metrics["datadiet_validation_version"], "datadiet_validation_version") == 1
    assert "datadiet_reported_trainer_step" not in metrics  # the trainer has not reported yet


def test_the_trainer_numbers_appear_once_the_trainer_reports(
    app_client: TestClient, make_settings: Callable[..., Settings], redis_url: str
) -> None:
    """What the trainer published in Redis, as the API reads it: its status hash, the weights' summary, and
    the newest checkpoint in the database; named ``datadiet_reported_*`` beside the trainer's own port."""
    settings = make_settings()
    before = scrape(app_client)
    assert not any(name.startswith("datadiet_reported_") for name in before)
    assert "datadiet_weights_effective_fraction" not in before
    assert "datadiet_checkpoint_version" not in before

    feed = TrainerFeed(redis.Redis.from_url(redis_url), Keys(settings.redis_prefix))
    assert feed.lease.acquire(wait=False)
    reported_at = datetime.now(UTC) - timedelta(seconds=30)
    feed.set_status(step=12, steps_per_s=3.5, val_loss=0.25, unscored=40, updated_at=reported_at.isoformat())
    summary = {"count": 10, "effective_fraction": 0.7, "mean": 1.0, "histogram": {"edges": [], "counts": []}}
    feed.publish_weights({"step": 12, "sources": {"a": 1.0}, "summary": summary}, [], [])
    publish_checkpoint(settings.resolved_database_url, settings.data_dir, 3, b"weights")

    metrics = scrape(app_client)

    def one(name: str) -> float:
        return value(metrics[name], name)

    assert one("datadiet_reported_trainer_step") == 12
    assert one("datadiet_reported_trainer_val_loss") == 0.25
    assert one("datadiet_reported_trainer_steps_per_second") == 3.5
    assert one("datadiet_reported_trainer_scoring_backlog_samples") == 40
    assert 30 <= one("datadiet_reported_trainer_age_seconds") < 60
    assert one("datadiet_weights_effective_fraction") == 0.7
    assert one("datadiet_checkpoint_version") == 3
    assert not any(name.startswith("datadiet_trainer_") for name in metrics)  # the trainer port's prefix


def test_request_counts_grow_by_route_template_method_and_status(app_client: TestClient) -> None:
    before = scrape(app_client)

    for sample_id in ("nope-1", "nope-2", "nope-3"):
        assert app_client.get(f"/v1/samples/{sample_id}").status_code == 404
    assert app_client.head("/v1/samples/nope-4").status_code == 404
    assert app_client.get("/no/such/path").status_code == 404
    assert (
        app_client.post(
            "/v1/samples", json={"samples": [{"source": "a", "input": "x", "target": "y"}]}
        ).status_code
        == 202
    )

    after = scrape(app_client)

    def grew(route: str, method: str, status: str) -> float:
        return requests_of(after, route, method, status) - requests_of(before, route, method, status)

    assert grew(SAMPLE_ROUTE, "GET", "404") == 3  # one series for the template, not one per id
    assert grew(SAMPLE_ROUTE, "HEAD", "404") == 1
    assert grew("unmatched", "GET", "404") == 1
    assert grew("/v1/samples", "POST", "202") == 1
    assert grew("/metrics", "GET", "200") == 1  # the first scrape
    routes = {s.labels["route"] for s in after["datadiet_http_requests"]}
    assert not any("nope" in r or "no/such" in r for r in routes)
    latency = after["datadiet_http_request_duration_seconds"]
    labels = {"route": SAMPLE_ROUTE, "method": "GET", "status": "404"}
    assert value(latency, "datadiet_http_request_duration_seconds_count", **labels) == 3
    assert value(latency, "datadiet_http_request_duration_seconds_sum", **labels) > 0
    posted = {"route": "/v1/samples", "method": "POST", "status": "202"}
    assert value(latency, "datadiet_http_request_duration_seconds_count", **posted) == 1
    buckets = [s for s in latency if s.name.endswith("_bucket") and s.labels.items() >= labels.items()]
    assert buckets and buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 3


def test_each_app_counts_its_own_requests(
    make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]
) -> None:
    first, second = make_client(make_settings()), make_client(make_settings())
    for _ in range(4):
        first.get("/healthz")

    assert requests_of(scrape(first), "/healthz", "GET", "200") == 4
    assert requests_of(scrape(second), "/healthz", "GET", "200") == 0

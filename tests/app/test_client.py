"""``datadiet.Client``: the agents' client, over HTTP against the real API (uvicorn in a subprocess).

Faults are real: an answer lost between the server and the client is a transport wrapper that forwards
each request to the server and then replaces its answer; a Redis outage is the API's redis-server
stopped and started again; nothing listening is a free port. Checkpoints are published as the trainer
publishes them (a safetensors file plus its SQL row), without running a trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy.orm import Session

from app.demo.scenarios import MLP_DIGITS
from app.schema import content_id
from datadiet import Client, DatadietError
from store.checkpoints import checkpoint_path
from store.meta import Checkpoint, make_engine, next_checkpoint_version
from store.processes import free_port, start_redis_server
from trainer import load_checkpoint
from trainer.checkpoint import save_checkpoint
from trainer.models import build_model

MLP_ENV = {"model": "mlp", "model_config": json.dumps(MLP_DIGITS)}


def digit_sample(i: int, source: str = "agent-a", **fields: Any) -> dict[str, Any]:
    """A valid sample for the digits ``mlp`` deployment (64 features, 10 classes)."""
    return {
        "source": source,
        "input": [((i * 7 + j) % 17) / 16 for j in range(64)],
        "target": i % 10,
        **fields,
    }


Rewrite = Callable[[httpx.Request, httpx.Response], httpx.Response | None]


class Tap(httpx.BaseTransport):
    """The real HTTP transport, recording every exchange; ``rewrite`` may replace an answer after the
    server has acted on the request (as a proxy that timed out, or a connection that dropped, would)."""

    def __init__(self, rewrite: Rewrite | None = None) -> None:
        self.inner = httpx.HTTPTransport()
        self.rewrite = rewrite
        self.seen: list[tuple[httpx.Request, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if self.rewrite is not None and (replaced := self.rewrite(request, response)) is not None:
            response = replaced  # the rewrite has read or wrapped the real answer
        self.seen.append((request, response.status_code))
        return response

    def close(self) -> None:
        self.inner.close()

    def statuses(self, path_part: str = "") -> list[int]:
        return [status for request, status in self.seen if path_part in request.url.path]


def lose_first_answers(n: int, status: int, retry_after: str | None = None) -> Rewrite:
    """Replace the first ``n`` answers to ``POST /v1/samples`` by ``status`` (the server stored the batch)."""
    lost = 0

    def rewrite(request: httpx.Request, response: httpx.Response) -> httpx.Response | None:
        nonlocal lost
        if request.method != "POST" or lost >= n:
            return None
        response.read()
        lost += 1
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        body = {"error": {"type": "Unavailable", "detail": f"lost answer {lost}"}}
        return httpx.Response(status, json=body, headers=headers, request=request)

    return rewrite


@pytest.fixture
def database(tmp_path: Path) -> str:
    """The SQLite database the API (and the checkpoints published here) use."""
    return f"sqlite:///{tmp_path / 'meta.db'}"


@pytest.fixture
def api(start_api: Callable[..., str], database: str) -> str:
    """The real API for the digits ``mlp`` kind, on the test's Redis."""
    return start_api(database_url=database, **MLP_ENV)


@pytest.fixture
def publish(database: str, tmp_path: Path) -> Iterator[Callable[[], Checkpoint]]:
    """``publish()``: a new checkpoint (random mlp weights), as the trainer publishes one: file, then row."""
    engine = make_engine(database)

    def make() -> Checkpoint:
        with Session(engine) as session:
            version = next_checkpoint_version(session)
        torch.manual_seed(version)
        model = build_model("mlp", MLP_DIGITS)
        path = checkpoint_path(tmp_path / "trainer-data", version)
        sha, size = save_checkpoint(path, model, {"step": 10 * version, "version": version})
        row = Checkpoint(version=version, step=10 * version, sha256=sha, size=size, path=str(path),
                         model_kind="mlp", config=model.config, metrics={"val_loss": 2.3})  # fmt: skip
        with Session(engine, expire_on_commit=False) as session, session.begin():
            session.add(row)
        return row

    yield make
    engine.dispose()


def buffer_stats(url: str) -> dict[str, int]:
    return httpx.get(f"{url}/v1/stats").json()["buffer"]


# --- ingest -----------------------------------------------------------------------------------------------


def test_post_samples_sends_batches_and_returns_every_id_in_order(api: str) -> None:
    samples = [digit_sample(i, id=f"s{i:03d}") for i in range(25)]
    progress: list[int] = []
    tap = Tap()

    with Client(api, transport=tap) as client:
        summary = client.post_samples(iter(samples), batch_size=10, progress=progress.append)

    assert (summary.accepted, summary.duplicates) == (25, 0)
    assert summary.ids == [f"s{i:03d}" for i in range(25)]
    assert progress == [10, 20, 25]
    assert tap.statuses("/v1/samples") == [202, 202, 202]
    assert buffer_stats(api)["size"] == 25


def test_samples_without_id_get_the_contract_id_and_the_callers_dicts_are_untouched(api: str) -> None:
    samples = [digit_sample(i) for i in range(3)]
    originals = [dict(s) for s in samples]
    tap = Tap()

    with Client(api, transport=tap) as client:
        summary = client.post_samples(samples)

    expected = [content_id(s["source"], s["input"], s["target"]) for s in samples]
    sent = json.loads(tap.seen[0][0].content)["samples"]
    assert [s["id"] for s in sent] == expected  # set before the first try, so a retry cannot duplicate
    assert summary.ids == expected
    assert samples == originals
    with Client(api) as client:
        stored = client.sample(summary.ids[1])
    assert (stored["input"], stored["target"], stored["weight"]) == (samples[1]["input"], 1, 1.0)


def test_posting_the_same_samples_again_counts_duplicates_and_stores_nothing(api: str) -> None:
    samples = [digit_sample(i) for i in range(12)]
    with Client(api) as client:
        first = client.post_samples(samples, batch_size=5)
        again = client.post_samples(samples, batch_size=5)

    assert (first.accepted, first.duplicates) == (12, 0)
    assert (again.accepted, again.duplicates) == (0, 12)
    assert again.ids == first.ids
    stats = buffer_stats(api)
    assert (stats["size"], stats["ingested"], stats["duplicates"]) == (12, 12, 12)


def test_a_422_raises_datadiet_error_with_the_servers_type_and_detail_and_stops_sending(api: str) -> None:
    samples = [digit_sample(i) for i in range(10)]
    samples[7]["input"] = samples[7]["input"][:3]
    tap = Tap()

    with Client(api, transport=tap) as client, pytest.raises(DatadietError) as caught:
        client.post_samples(samples + [digit_sample(i) for i in range(10, 20)], batch_size=5)

    error = caught.value
    assert (error.status, error.type) == (422, "ValidationError")
    assert error.detail.startswith("samples[2].input: input has 3 numbers; this model takes exactly 64")
    assert [(e["index"], e["field"]) for e in error.body["errors"]] == [(2, "input")]  # index in its batch
    assert "POST /v1/samples" in str(error)
    assert tap.statuses() == [202, 422]  # no retry, and the batches after the bad one were not sent
    assert buffer_stats(api)["size"] == 5


# --- retries ----------------------------------------------------------------------------------------------


def test_lost_503_answers_are_retried_and_every_sample_is_stored_exactly_once(api: str) -> None:
    samples = [digit_sample(i) for i in range(30)]  # no ids: the client's content ids make retries safe
    tap = Tap(lose_first_answers(3, 503, retry_after="0"))

    with Client(api, transport=tap, backoff=0.01) as client:
        summary = client.post_samples(samples, batch_size=10)

    assert tap.statuses("/v1/samples") == [503, 503, 503, 202, 202, 202]
    # the first batch was stored by the first try; its answer arrived on the fourth
    assert (summary.accepted, summary.duplicates) == (20, 10)
    assert len(set(summary.ids)) == 30
    stats = buffer_stats(api)
    assert (stats["size"], stats["ingested"], stats["duplicates"]) == (30, 30, 30)


def test_429_waits_for_retry_after(api: str) -> None:
    tap = Tap(lose_first_answers(1, 429, retry_after="1"))

    with Client(api, transport=tap, backoff=0.0) as client:
        start = time.monotonic()
        summary = client.post_samples([digit_sample(0)])
        waited = time.monotonic() - start

    assert waited >= 1.0
    assert tap.statuses() == [429, 202]
    assert summary.duplicates == 1


def test_retries_give_up_with_the_servers_error_after_the_last_try(api: str) -> None:
    tap = Tap(lose_first_answers(100, 503, retry_after="0"))

    with Client(api, transport=tap, retries=2) as client, pytest.raises(DatadietError) as caught:
        client.post_samples([digit_sample(0)])

    assert (caught.value.status, caught.value.type) == (503, "Unavailable")
    assert "gave up after 3 tries" in str(caught.value)
    assert len(tap.seen) == 3


def test_nothing_listening_is_retried_then_raised_with_a_clear_message() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    tap = Tap()

    with Client(url, retries=2, backoff=0.01, transport=tap) as client, pytest.raises(DatadietError) as c:
        client.stats()

    assert c.value.status is None
    assert c.value.type == "ConnectError"
    assert str(c.value).startswith(f"ConnectError: cannot reach the datadiet API at {url}")
    assert "GET /v1/stats; gave up after 3 tries" in str(c.value)
    assert tap.seen == []  # no request ever got an answer


@pytest.mark.slow
def test_ingest_goes_through_a_redis_outage_without_losing_or_duplicating_samples(
    start_api: Callable[..., str], database: str, tmp_path: Path
) -> None:
    servers = [start_redis_server(tmp_path / "redis", persistent=True)]
    try:
        api = start_api(redis_url=servers[0].url, database_url=database, **MLP_ENV)
        restarted = threading.Event()

        def restart() -> None:
            servers.append(start_redis_server(servers[0].dir, port=servers[0].port, persistent=True))
            restarted.set()

        def outage_after_first_batch(sent: int) -> None:
            if sent == 20:  # Redis goes away between the first and the second request, for ~1.5 s
                servers[0].stop()
                threading.Timer(1.5, restart).start()

        tap = Tap()
        with Client(api, transport=tap, retries=8, backoff=0.2) as client:
            summary = client.post_samples([digit_sample(i) for i in range(60)], batch_size=20,
                                          progress=outage_after_first_batch)  # fmt: skip

        assert restarted.wait(10)
        statuses = tap.statuses("/v1/samples")
        assert statuses[0] == 202 and 503 in statuses and statuses[-1] == 202
        assert (summary.accepted, summary.duplicates) == (60, 0)
        stats = buffer_stats(api)
        assert stats["size"] == stats["ingested"] == len(set(summary.ids)) == 60
    finally:
        for server in servers:
            server.stop()


# --- reading: validation, weights, stats ------------------------------------------------------------------


def test_validation_set_is_replaced_and_appended(api: str) -> None:
    with Client(api) as client:
        replaced = client.set_validation([digit_sample(i) for i in range(4)])
        appended = client.set_validation([digit_sample(i) for i in range(4, 6)], append=True)
        info = client.validation()

    assert replaced["count"] == 4
    assert appended == {"count": 6, "version": replaced["version"] + 1}
    assert info == appended


def test_sample_weights_splits_long_id_lists_and_omits_unknown_ids(api: str) -> None:
    samples = [digit_sample(i, id=f"{'x' * 100}-{i:04d}") for i in range(150)]  # ~16 KB of ids
    tap = Tap()

    with Client(api, transport=tap) as client:
        ids = client.post_samples(samples).ids
        weights = client.sample_weights([*ids, "never-posted"])
        ranked = client.ranked("desc", limit=5)
        stats = client.stats()

    assert set(weights) == set(ids)
    assert all(w == 1.0 for w in weights.values())  # uniform until the trainer publishes
    assert len(tap.statuses("/v1/weights/samples")) >= 3
    assert all(len(str(request.url)) < 8_000 for request, _ in tap.seen)
    assert len(ranked["weights"]) == 5 and set(ranked["weights"]) <= set(ids)
    assert stats["buffer"]["size"] == 150


def test_api_key_is_sent_as_a_bearer_token(api: str) -> None:
    tap = Tap()
    with Client(api, api_key="s3cret", transport=tap) as client:
        client.weights()
    assert tap.seen[0][0].headers["Authorization"] == "Bearer s3cret"


# --- checkpoints ------------------------------------------------------------------------------------------


def test_before_any_checkpoint_latest_is_none_waiting_times_out_and_pulling_is_404(
    api: str, tmp_path: Path
) -> None:
    dest = tmp_path / "models"
    with Client(api) as client:
        assert client.latest_checkpoint() is None
        assert client.checkpoints() == []
        with pytest.raises(TimeoutError, match=r"no checkpoint >= v1 after 0\.5s"):
            client.wait_for_checkpoint(timeout=0.5)
        with pytest.raises(DatadietError) as caught:
            client.pull_checkpoint(f"{dest}/")

    assert (caught.value.status, caught.value.type) == (404, "NotFound")
    assert not dest.exists()  # no directory, no file, no temp file


def test_pull_downloads_once_then_answers_304_until_a_newer_checkpoint(
    api: str, publish: Callable[[], Checkpoint], tmp_path: Path
) -> None:
    v1 = publish()
    tap = Tap()
    dest = tmp_path / "models"
    dest.mkdir()

    with Client(api, transport=tap) as client:
        path = client.pull_checkpoint(dest)
        assert path == dest / "model.safetensors"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == v1.sha256
        before = os.stat(path)

        assert client.pull_checkpoint(dest) == path
        after = os.stat(path)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

        v2 = publish()
        assert client.wait_for_checkpoint(min_version=2)["sha256"] == v2.sha256
        client.pull_checkpoint(dest)

    assert tap.statuses("/file") == [200, 304, 200]
    assert tap.seen[1][0].headers["If-None-Match"] == f'"{v1.sha256}"'
    assert hashlib.sha256(path.read_bytes()).hexdigest() == v2.sha256
    assert load_checkpoint(path).version == 2
    assert sorted(p.name for p in dest.iterdir()) == ["model.safetensors"]


def test_pull_to_a_file_path_by_version_never_over_another_version_unless_forced(
    api: str, publish: Callable[[], Checkpoint], tmp_path: Path
) -> None:
    v1, v2 = publish(), publish()
    with Client(api) as client:
        path = client.pull_checkpoint(tmp_path / "deep" / "v1.safetensors", version=1)
        assert path == tmp_path / "deep" / "v1.safetensors"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == v1.sha256

        with pytest.raises(DatadietError) as caught:  # v1 is there: another version is not put over it
            client.pull(path, version=2)
        assert caught.value.type == "WouldReplace"
        assert caught.value.body == {"path": str(path), "held": 1, "served": 2}
        assert hashlib.sha256(path.read_bytes()).hexdigest() == v1.sha256

        pulled = client.pull(path, version=2, force=True)
        current = client.pull(path, version=2)

    assert (pulled.path, pulled.version, pulled.downloaded, pulled.replaced) == (path, 2, True, 1)
    assert pulled.size == v2.size == path.stat().st_size
    assert (current.version, current.downloaded) == (2, False)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == v2.sha256


def test_a_corrupted_download_is_refused_and_the_old_file_kept(
    api: str, publish: Callable[[], Checkpoint], tmp_path: Path
) -> None:
    publish()

    def flip_a_byte(request: httpx.Request, response: httpx.Response) -> httpx.Response | None:
        if not request.url.path.endswith("/file") or response.status_code != 200:
            return None
        body = bytearray(response.read())
        body[len(body) // 2] ^= 0xFF
        return httpx.Response(200, headers=response.headers, content=bytes(body), request=request)

    dest = tmp_path / "model.safetensors"
    with Client(api) as client:
        client.pull_checkpoint(dest, version=1)
    good = dest.read_bytes()
    publish()

    with Client(api, transport=Tap(flip_a_byte)) as client, pytest.raises(DatadietError) as caught:
        client.pull_checkpoint(dest)

    assert caught.value.type == "ChecksumMismatch"
    assert "the file was not saved" in caught.value.detail
    assert dest.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


class _BreaksAfter(httpx.SyncByteStream):
    """A body that delivers ``limit`` bytes of ``inner`` and then drops the connection."""

    def __init__(self, inner: httpx.Response, limit: int) -> None:
        self.inner, self.limit = inner, limit

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        for chunk in self.inner.iter_raw(4096):
            chunk = chunk[: self.limit - sent]
            sent += len(chunk)
            yield chunk
            if sent >= self.limit:
                raise httpx.ReadError("connection dropped mid-body")

    def close(self) -> None:
        self.inner.close()


def test_a_dropped_download_resumes_with_range_and_is_verified(
    api: str, publish: Callable[[], Checkpoint], tmp_path: Path
) -> None:
    v1 = publish()
    broken = False

    def drop_first_download(request: httpx.Request, response: httpx.Response) -> httpx.Response | None:
        nonlocal broken
        if broken or not request.url.path.endswith("/file"):
            return None
        broken = True
        return httpx.Response(200, headers=response.headers, stream=_BreaksAfter(response, 10_000))

    tap = Tap(drop_first_download)
    with Client(api, transport=tap, backoff=0.01) as client:
        path = client.pull_checkpoint(tmp_path / "m.safetensors")

    assert tap.statuses("/file") == [200, 206]
    resumed = tap.seen[1][0].headers
    assert (resumed["Range"], resumed["If-Range"]) == ("bytes=10000-", f'"{v1.sha256}"')
    assert hashlib.sha256(path.read_bytes()).hexdigest() == v1.sha256

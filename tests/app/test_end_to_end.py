"""End to end, over HTTP only: agents post digits samples to the real API (uvicorn in a subprocess), the
real trainer (``python -m trainer`` in a subprocess) learns weights and publishes checkpoints, and an
agent pulls a checkpoint with the client and predicts with ``trainer.load_checkpoint``.

One service for the module (starting the trainer is the expensive part): a redis-server of its own, the
API and the trainer on one SQLite database and data dir, ``mlp`` on 64 features and 10 classes,
a checkpoint every 50 steps and 150 steps in all (checkpoints v1 at step 50 ... the final one at 150).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.demo.scenarios import MLP_DIGITS, Scenario, build_scenario
from datadiet import Client, load_latest
from store.processes import datadiet_env, spawn, start_api_process, start_redis_server, stop_process_group
from trainer import load_checkpoint

pytestmark = pytest.mark.slow

N_STREAM = 1000
MAX_STEPS = 150
CHECKPOINT_EVERY = 50
WAIT_S = 240.0  # generous: the machine running the tests may be busy with other work


@dataclass
class Service:
    url: str
    scenario: Scenario
    ids: list[str]
    trainer: subprocess.Popen[bytes]
    trainer_log: Path

    def logs(self) -> str:
        return f"trainer log (tail):\n{self.trainer_log.read_text()[-3000:]}"

    def wait_for_checkpoint(self, client: Client, min_version: int) -> dict[str, Any]:
        try:
            return client.wait_for_checkpoint(min_version, timeout=WAIT_S)
        except TimeoutError as e:
            pytest.fail(f"{e}\n{self.logs()}")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The API and the trainer, running, with the validation set and N_STREAM digits samples posted."""
    root = tmp_path_factory.mktemp("e2e")
    redis_server = start_redis_server(root / "redis")
    settings = {
        "redis_url": redis_server.url,
        "database_url": f"sqlite:///{root / 'meta.db'}",
        "data_dir": str(root / "data"),
        "model": "mlp",
        "model_config": json.dumps(MLP_DIGITS),
    }
    procs: list[subprocess.Popen[bytes]] = []

    try:
        # the API creates the schema first
        api, url = start_api_process(datadiet_env(**settings), log=root / "api.log", cwd=root, timeout=60)
        procs.append(api)
        env = datadiet_env(**settings, max_steps=str(MAX_STEPS), checkpoint_every=str(CHECKPOINT_EVERY))
        trainer = spawn([sys.executable, "-m", "trainer"], log=root / "trainer.log", env=env, cwd=root)
        procs.append(trainer)
        scenario = build_scenario("digits")
        with Client(url) as client:
            client.set_validation(scenario.validation)
            ids = client.post_samples(scenario.stream(N_STREAM), batch_size=250).ids
        yield Service(url, scenario, ids, trainer, root / "trainer.log")
    finally:
        for proc in procs:
            stop_process_group(proc)
        redis_server.stop()


@pytest.fixture(scope="module")
def finished(service: Service) -> Service:
    """The service once the trainer has run its MAX_STEPS and exited: weights and checkpoints are final."""
    try:
        code = service.trainer.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the trainer did not finish {MAX_STEPS} steps in {WAIT_S:.0f}s\n{service.logs()}")
    assert code == 0, service.logs()
    return service


def test_agent_pulls_a_checkpoint_predicts_and_pulls_again_only_when_there_is_a_newer_one(
    service: Service, tmp_path: Path
) -> None:
    test_set = service.scenario.test
    with Client(service.url) as client:
        service.wait_for_checkpoint(client, 1)
        first = client.checkpoints()[-1]
        path = client.pull_checkpoint(f"{tmp_path}/models/", version=1)

        assert path == tmp_path / "models" / "model.safetensors"
        model = load_checkpoint(path, sha256=first["sha256"])
        assert (model.kind, model.version, model.step) == ("mlp", 1, CHECKPOINT_EVERY)
        labels = model.predict([s["input"] for s in test_set])
        assert len(labels) == len(test_set)
        assert all(isinstance(y, int) and 0 <= y < 10 for y in labels)
        assert all(math.isfinite(x) for x in model.loss(test_set[:20]))

        before = os.stat(path)
        assert client.pull_checkpoint(path.parent, version=1) == path  # 304: the file is not touched
        after = os.stat(path)
        assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
            before.st_ino, before.st_mtime_ns, before.st_size)  # fmt: skip

        newer = service.wait_for_checkpoint(client, 2)
        client.pull_checkpoint(path.parent)

    assert newer["sha256"] != first["sha256"]
    assert os.stat(path).st_ino != before.st_ino  # a new file, renamed into place
    assert load_checkpoint(path).version >= 2


def test_checkpoint_file_has_sha256_etag_304_range_and_version_headers(service: Service) -> None:
    with Client(service.url) as client:
        meta = service.wait_for_checkpoint(client, 1)
    version, sha = meta["version"], meta["sha256"]
    file_url = f"{service.url}/v1/checkpoints/{version}/file"

    full = httpx.get(file_url)
    assert full.status_code == 200
    assert hashlib.sha256(full.content).hexdigest() == sha
    assert full.headers["ETag"] == f'"{sha}"'
    assert full.headers["X-Checkpoint-Version"] == str(version)
    assert int(full.headers["Content-Length"]) == meta["size"] == len(full.content)

    cached = httpx.get(file_url, headers={"If-None-Match": f'"{sha}"'})
    assert (cached.status_code, cached.content, cached.headers["ETag"]) == (304, b"", f'"{sha}"')
    stale = httpx.get(file_url, headers={"If-None-Match": '"' + "0" * 64 + '"'})
    assert stale.status_code == 200

    part = httpx.get(file_url, headers={"Range": "bytes=0-99"})
    assert part.status_code == 206
    assert part.content == full.content[:100]
    assert part.headers["Content-Range"] == f"bytes 0-99/{len(full.content)}"

    latest = httpx.get(f"{service.url}/v1/checkpoints/latest/file")
    assert latest.headers["ETag"] == f'"{hashlib.sha256(latest.content).hexdigest()}"'
    assert int(latest.headers["X-Checkpoint-Version"]) >= version

    for path in ("/v1/checkpoints/999999", "/v1/checkpoints/999999/file"):
        missing = httpx.get(service.url + path)
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "NotFound"
        assert "999999" in missing.json()["error"]["detail"]


def test_weights_are_per_source_summing_to_one_and_per_sample_averaging_one(finished: Service) -> None:
    source_names = {source.name for source, _ in finished.scenario.sources}
    with Client(finished.url) as client:
        doc = client.weights()
        weights = client.sample_weights(finished.ids)
        stats = client.stats()

    assert doc["step"] == MAX_STEPS
    assert set(doc["sources"]) == source_names
    assert sum(doc["sources"].values()) == pytest.approx(1.0, abs=1e-6)
    assert doc["summary"]["count"] == N_STREAM
    assert 0 < doc["summary"]["effective_fraction"] <= 1
    assert set(weights) == set(finished.ids)
    assert sum(weights.values()) / len(weights) == pytest.approx(1.0, abs=1e-3)
    assert stats["buffer"]["ingested"] == stats["buffer"]["size"] == len(set(finished.ids)) == N_STREAM
    assert stats["trainer"]["step"] == MAX_STEPS

    some = finished.ids[:50]
    by_ids = httpx.get(f"{finished.url}/v1/weights/samples", params={"ids": ",".join([*some, "nope"])})
    assert by_ids.status_code == 200
    assert set(by_ids.json()["weights"]) == set(some)
    assert by_ids.json()["weights"] == {i: weights[i] for i in some}


def test_lowest_and_highest_weighted_samples_are_ordered(finished: Service) -> None:
    def ranked(order: str) -> dict[str, Any]:
        response = httpx.get(f"{finished.url}/v1/weights/samples", params={"order": order, "limit": 5})
        assert response.status_code == 200
        return response.json()

    low, high = ranked("asc"), ranked("desc")
    low_w, high_w = list(low["weights"].values()), list(high["weights"].values())

    assert len(low_w) == len(high_w) == 5
    assert low_w == sorted(low_w) and high_w == sorted(high_w, reverse=True)
    assert max(low_w) <= min(high_w)
    assert low_w[0] < 1 < high_w[0]  # the trainer has spread the weights out
    assert set(low["sources"]) == set(low["weights"])
    assert set(low["sources"].values()) | set(high["sources"].values()) <= {
        s.name for s, _ in finished.scenario.sources
    }
    with Client(finished.url) as client:
        assert client.ranked("asc", 5)["weights"] == low["weights"]


def test_final_checkpoint_is_at_max_steps_and_beats_chance(finished: Service, tmp_path: Path) -> None:
    with Client(finished.url) as client:
        listed = client.checkpoints()
        latest = client.latest_checkpoint()

    versions = [c["version"] for c in listed]
    assert versions == sorted(versions, reverse=True) and versions[-1] == 1
    assert latest is not None and latest["version"] == versions[0] and latest["step"] == MAX_STEPS
    assert (latest["model"], latest["config"]["n_features"]) == ("mlp", 64)

    model = load_latest(finished.url, dest=tmp_path)
    test_set = finished.scenario.test
    labels = model.predict([s["input"] for s in test_set])
    accuracy = sum(y == s["target"] for y, s in zip(labels, test_set, strict=True)) / len(test_set)
    assert model.version == latest["version"]
    assert accuracy > 0.3, f"accuracy {accuracy:.2f} on the test set; chance is 0.1"

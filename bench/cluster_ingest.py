"""Ingestion into one Redis server against a 3-master Redis Cluster (``redis+cluster://``), the buffer on
one slot and sharded over three (``DATADIET_BUFFER_SHARDS=3``).

    python bench/cluster_ingest.py                  # 3 rounds of 20,000 samples (~1 KB each) per row
    python bench/cluster_ingest.py --quick          # 1 round of 5,000: a smoke run

All are Redis 7 (store.redis_cluster.redis7_binaries), without persistence, on this machine. With one shard
every key of a deployment shares one hash tag, so on the cluster the whole buffer is one slot on one master:
the other masters hold nothing. The sharded row uses a prefix whose three shard tags hash to slots of three
different masters (``{<prefix>:0}`` ... ``{<prefix>:2}``). Per round, on an emptied buffer:

    store       SampleBuffer.ingest (the INGEST Lua script) from one asyncio client, batches of 500: the
                Redis side and redis-py's, no HTTP
    HTTP        POST /v1/samples through the API under uvicorn (one worker), one client, batches of 500
                (bench/ingest.py's client and samples)

and the masters' own cost from INFO commandstats (``usec`` of EVALSHA, summed over the masters, per sample
stored), the busiest master's share of it and the rate that master's one thread alone would allow, and the
CPU each master used during the store phase (INFO cpu, user + sys seconds / the phase's seconds: cores).

Prints a markdown table and writes it to ``bench/results/cluster_ingest.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import orjson
import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.schema import to_record  # noqa: E402
from bench.ingest import BATCH, make_samples, start_api, time_http  # noqa: E402
from store.buffer import SampleBuffer  # noqa: E402
from store.keys import Keys  # noqa: E402
from store.processes import free_port, redis_server_argv, stop_process_group, wait_for_redis  # noqa: E402
from store.redis_client import async_client, sync_client  # noqa: E402
from store.redis_cluster import LocalCluster, redis7_binaries, start_redis_cluster  # noqa: E402

RESULTS = REPO / "bench" / "results" / "cluster_ingest.md"


async def time_store(url: str, samples: list[dict[str, object]], keys: Keys) -> float:
    """Seconds to ingest ``samples`` through SampleBuffer.ingest, ``BATCH`` per call, one client."""
    records = [to_record(s) for s in samples]
    client = async_client(url)
    try:
        buffer = SampleBuffer(client, keys, 10_000_000, 1000)
        await buffer.ingest(records[:1])  # connect (and, on a cluster, read the slot map) untimed
        start = time.perf_counter()
        accepted = 1
        for i in range(1, len(records), BATCH):
            accepted += (await buffer.ingest(records[i : i + BATCH])).accepted
        elapsed = time.perf_counter() - start
    finally:
        await client.aclose()
    if accepted != len(records):
        sys.exit(f"the buffer accepted {accepted} of {len(records)} samples")
    return elapsed


def evalsha_us(master: redis.Redis) -> float:
    """Microseconds the master spent in EVALSHA calls since the last CONFIG RESETSTAT."""
    return float(master.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0.0))


def cpu_s(master: redis.Redis) -> float:
    """CPU seconds (user + sys, main thread and the rest) the server has used since it started."""
    info = master.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def spread_prefix(cluster: LocalCluster, shards: int) -> str:
    """A prefix whose ``shards`` shard tags hash to slots of as many different masters."""
    for i in range(1000):
        prefix = f"bench{i}" if i else "bench"
        owners = {cluster.owner(sk.ids).port for sk in Keys(prefix, shards).all_shards()}
        if len(owners) == min(shards, len(cluster.nodes)):
            return prefix
    raise RuntimeError("no prefix spreads the shards over the masters")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="1 round of 5,000 samples")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.samples = 1, 5_000
    found = redis7_binaries()
    if found is None:
        sys.exit("bench/cluster_ingest.py needs redis-server 7 or newer (apt install redis-server)")
    load = os.getloadavg()[0]
    # name, store s, HTTP s, (total us/sample, busiest master's us/sample), CPU cores per master per round
    rows: list[tuple[str, list[float], list[float], list[tuple[float, float]], list[list[float]]]] = []
    with tempfile.TemporaryDirectory(prefix="datadiet-cluster-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        (work / "single").mkdir()
        port = free_port()
        argv = [found[0], *redis_server_argv(work / "single", port)[1:]]  # Redis 7, no persistence
        single = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(stop_process_group, single)
        single_url = f"redis://127.0.0.1:{port}/0"
        wait_for_redis(single_url, single, 10, work / "single" / "redis.log")
        cluster = start_redis_cluster(work / "cluster", 3, persistent=False)
        stack.callback(cluster.stop)
        master = cluster.owner(Keys().ids)
        masters = [master] + [n for n in cluster.nodes if n is not master]  # the single slot's master first
        prefix = spread_prefix(cluster, 3)
        targets = [
            ("one server (redis://)", single_url, Keys(), [redis.Redis(port=port)]),
            ("3-master cluster, 1 slot", cluster.url(), Keys(), [n.client() for n in masters]),
            (
                f"3-master cluster, 3 shards ({prefix})",
                cluster.url(),
                Keys(prefix, 3),
                [n.client() for n in masters],
            ),
        ]
        for i, (name, url, keys, nodes) in enumerate(targets):
            (work / f"row{i}").mkdir()
            api = start_api(
                f"row{i}",
                url,
                work / f"row{i}",
                stack,
                redis_prefix=keys.prefix,
                buffer_shards=str(keys.shards),
            )
            admin = stack.enter_context(sync_client(url))
            store_s: list[float] = []
            http_s: list[float] = []
            us: list[tuple[float, float]] = []
            cpu: list[list[float]] = []
            for rnd in range(args.rounds):
                admin.flushall()
                for node in nodes:
                    node.config_resetstat()
                before = [cpu_s(node) for node in nodes]
                store_s.append(asyncio.run(time_store(url, make_samples(f"s{rnd}", args.samples), keys)))
                cpu.append([(cpu_s(node) - b) / store_s[-1] for node, b in zip(nodes, before, strict=True)])
                per_node = [evalsha_us(node) / args.samples for node in nodes]
                us.append((sum(per_node), max(per_node)))
                admin.flushall()
                http_s.append(time_http(api, make_samples(f"h{rnd}", args.samples), 1))
                print(
                    f"{name} round {rnd + 1}: store {args.samples / store_s[-1]:,.0f}/s, "
                    f"HTTP {args.samples / http_s[-1]:,.0f}/s, masters {us[-1][0]:.1f} us/sample "
                    f"(busiest {us[-1][1]:.1f}), CPU {' / '.join(f'{c:.2f}' for c in cpu[-1])}",
                    file=sys.stderr,
                )
            rows.append((name, store_s, http_s, us, cpu))

    size = len(orjson.dumps(make_samples("x", 1)[0]))
    lines = [
        "# Ingestion: one Redis server against a Redis Cluster, one slot and sharded",
        "",
        "| buffer | store samples/s (median) | HTTP samples/s (median) | masters' us/sample (all) | busiest "
        "master's us/sample | busiest master's thread alone: samples/s | CPU per master in the store phase "
        "(cores) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, store_s, http_s, us, cpu in rows:
        total = statistics.median(u[0] for u in us)
        busiest = statistics.median(u[1] for u in us)
        cores = [statistics.median(c[j] for c in cpu) for j in range(len(cpu[0]))]
        lines.append(
            f"| {name} | {args.samples / statistics.median(store_s):,.0f} "
            f"| {args.samples / statistics.median(http_s):,.0f} | {total:.1f} | {busiest:.1f} "
            f"| {1e6 / busiest:,.0f} | {' / '.join(f'{c:.2f}' for c in cores)} |"
        )
    lines += [
        "",
        f"{args.rounds} round(s) of {args.samples:,} samples of {size} bytes as JSON, batches of {BATCH}, on "
        "an emptied buffer; Redis 7 without persistence. store: SampleBuffer.ingest from one asyncio client "
        "(sharded: a batch's samples grouped by shard, one INGEST call per shard, concurrently); HTTP: one "
        "client, the API under uvicorn with one worker. us/sample: EVALSHA usec (INFO commandstats) per "
        "sample stored, summed over the masters and the busiest master's; CPU: each master's user + sys "
        "seconds over the store phase's seconds, the one-slot master first.",
        f"Client, API and every redis-server share one machine: {os.cpu_count()} CPUs, load average "
        f"{load:.1f} at the start. `python bench/cluster_ingest.py"
        f"{' --quick' if args.quick else ''}`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)


if __name__ == "__main__":
    main()

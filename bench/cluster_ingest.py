"""Ingestion into one Redis server against a 3-master Redis Cluster (``redis+cluster://``).

    python bench/cluster_ingest.py                  # 3 rounds of 20,000 samples (~1 KB each) per row
    python bench/cluster_ingest.py --quick          # 1 round of 5,000: a smoke run

Both are Redis 7 (store.redis_cluster.redis7_binaries), without persistence, on this machine. Every key of
a deployment shares one hash tag, so on the cluster the whole buffer is one slot on one master: the other
masters hold nothing. Per round, on an emptied buffer:

    store       SampleBuffer.ingest (the INGEST Lua script) from one asyncio client, batches of 500: the
                Redis side and redis-py's, no HTTP
    HTTP        POST /v1/samples through the API under uvicorn (one worker), one client, batches of 500
                (bench/ingest.py's client and samples)

and the master's own cost from INFO commandstats (``usec_per_call`` of EVALSHA over a 500-sample batch):
microseconds of the master's one thread per sample, and the rate that thread alone would allow.

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
from store.redis_cluster import redis7_binaries, start_redis_cluster  # noqa: E402

RESULTS = REPO / "bench" / "results" / "cluster_ingest.md"


async def time_store(url: str, samples: list[dict[str, object]]) -> float:
    """Seconds to ingest ``samples`` through SampleBuffer.ingest, ``BATCH`` per call, one client."""
    records = [to_record(s) for s in samples]
    client = async_client(url)
    try:
        buffer = SampleBuffer(client, Keys(), 10_000_000, 1000)
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


def master_us_per_sample(master: redis.Redis) -> float:
    """Microseconds the master spent per sample in EVALSHA calls since the last CONFIG RESETSTAT."""
    stats = master.info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {})
    return float(evalsha.get("usec_per_call", 0.0)) / BATCH


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
    rows: list[tuple[str, list[float], list[float], list[float]]] = []
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
        targets = [
            ("one server (redis://)", single_url, redis.Redis(port=port)),
            ("3-master cluster (redis+cluster://)", cluster.url(), master.client()),
        ]
        for name, url, node in targets:
            (work / name.split()[0]).mkdir()
            api = start_api(name.split()[0], url, work / name.split()[0], stack)
            admin = stack.enter_context(sync_client(url))
            store_s: list[float] = []
            http_s: list[float] = []
            us: list[float] = []
            for rnd in range(args.rounds):
                admin.flushall()
                node.config_resetstat()
                store_s.append(asyncio.run(time_store(url, make_samples(f"s{rnd}", args.samples))))
                us.append(master_us_per_sample(node))
                admin.flushall()
                http_s.append(time_http(api, make_samples(f"h{rnd}", args.samples), 1))
                print(
                    f"{name} round {rnd + 1}: store {args.samples / store_s[-1]:,.0f}/s, "
                    f"HTTP {args.samples / http_s[-1]:,.0f}/s, master {us[-1]:.1f} us/sample",
                    file=sys.stderr,
                )
            rows.append((name, store_s, http_s, us))

    size = len(orjson.dumps(make_samples("x", 1)[0]))
    lines = [
        "# Ingestion: one Redis server against a Redis Cluster",
        "",
        "| buffer | store samples/s (median) | HTTP samples/s (median) | master us/sample | one master's "
        "thread alone: samples/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, store_s, http_s, us in rows:
        per = statistics.median(us)
        lines.append(
            f"| {name} | {args.samples / statistics.median(store_s):,.0f} "
            f"| {args.samples / statistics.median(http_s):,.0f} | {per:.1f} | {1e6 / per:,.0f} |"
        )
    lines += [
        "",
        f"{args.rounds} round(s) of {args.samples:,} samples of {size} bytes as JSON, batches of {BATCH}, on "
        "an emptied buffer; Redis 7 without persistence. store: SampleBuffer.ingest from one asyncio client; "
        "HTTP: one client, the API under uvicorn with one worker. master us/sample: EVALSHA usec_per_call "
        "(INFO commandstats) / batch, on the master holding the buffer's slot.",
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

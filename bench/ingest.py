"""Ingestion benchmark: ``POST /v1/samples`` through the real API against raw pipelined XADD into Redis.

    python bench/ingest.py                         # 5 rounds of 60,000 samples (~1 KB each)
    python bench/ingest.py --quick                 # 2 rounds of 10,000: a smoke run
    python bench/ingest.py --rounds 3 --samples 30000 --clients 4

It starts its own redis-server (free port, no persistence) and the API under uvicorn with ONE worker,
then, every round, on an emptied Redis:

    HTTP, 1 client      one httpx client (keep-alive) posting batches of 500 samples
    HTTP, N clients     N clients (threads) posting the same way at once
    HTTP, buffer full   one client, into a second API whose buffer is already at --capacity: every
                        accepted sample evicts one (the steady state of a long-running service)
    raw XADD            redis-py pipelines of 500 XADDs of the same payloads into a scratch stream: the
                        floor cost of getting the bytes into Redis; no validation, dedup, ranking or HTTP

Prints a markdown table and writes it to ``bench/results/ingest.md``. The client, the API and Redis
share this machine's cores, so absolute numbers depend on it; the ratio is the point.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import redis

from store.processes import datadiet_env, start_api_process, start_redis_server, stop_process_group

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "ingest.md"
BATCH = 500


def make_samples(tag: str, n: int) -> list[dict[str, object]]:
    """``n`` distinct samples of about 1 KB each as JSON (unique ids per tag)."""
    filler = "The agent looked at the page, scrolled, and chose the third link because it matched. " * 11
    return [
        {
            "id": f"{tag}-{i}",
            "source": f"agent-{i % 8}",
            "input": f"step {i}: {filler}",
            "target": f"click(link-{i % 7}) then read paragraph {i % 13} and answer",
            "reward": (i % 10) / 10,
        }
        for i in range(n)
    ]


def batches(samples: list[dict[str, object]], batch: int = BATCH) -> list[bytes]:
    """Request bodies of ``batch`` samples, encoded before the clock starts."""
    return [orjson.dumps({"samples": samples[i : i + batch]}) for i in range(0, len(samples), batch)]


def post_all(base_url: str, bodies: list[bytes]) -> int:
    accepted = 0
    with httpx.Client(base_url=base_url, timeout=120, headers={"Content-Type": "application/json"}) as http:
        for body in bodies:
            response = http.post("/v1/samples", content=body)
            response.raise_for_status()
            accepted += response.json()["accepted"]
    return accepted


def time_http(base_url: str, samples: list[dict[str, object]], clients: int, batch: int = BATCH) -> float:
    """Seconds for ``clients`` concurrent clients to post ``samples`` (split between them), ``batch`` per
    request."""
    bodies = batches(samples, batch)
    shares = [bodies[c::clients] for c in range(clients)]
    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        accepted = sum(pool.map(lambda share: post_all(base_url, share), shares))
        elapsed = time.perf_counter() - start
    if accepted != len(samples):
        sys.exit(f"the API accepted {accepted} of {len(samples)} distinct samples")
    return elapsed


def time_raw(r: redis.Redis, samples: list[dict[str, object]], batch: int = BATCH) -> float:
    """Seconds to XADD every sample's payload into a scratch stream, pipelined in batches of ``batch``."""
    payloads = [orjson.dumps(s) for s in samples]
    start = time.perf_counter()
    for i in range(0, len(payloads), batch):
        pipe = r.pipeline(transaction=False)
        for p in payloads[i : i + batch]:
            pipe.xadd("bench:raw", {"p": p})
        pipe.execute()
    elapsed = time.perf_counter() - start
    if r.xlen("bench:raw") != len(samples):
        sys.exit("raw XADD lost entries")
    return elapsed


@dataclass
class Row:
    method: str
    seconds: list[float]
    n: int

    def rates(self) -> list[float]:
        return [self.n / s for s in self.seconds]


def table(rows: list[Row], raw: Row) -> str:
    raw_median = statistics.median(raw.rates())
    lines = [
        f"| method | median samples/s | min | max | vs raw XADD | time for {rows[0].n:,} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        rates = row.rates()
        median = statistics.median(rates)
        lines.append(
            f"| {row.method} | {median:,.0f} | {min(rates):,.0f} | {max(rates):,.0f} "
            f"| {median / raw_median:.0%} | {statistics.median(row.seconds):.2f} s |"
        )
    return "\n".join(lines)


def start_api(name: str, redis_url: str, data_dir: Path, stack: ExitStack, **settings: str) -> str:
    """The API under uvicorn (one worker) on ``redis_url``, ``settings`` as ``DATADIET_*``, logging to
    ``<data_dir>/<name>.log`` and stopped with ``stack``; its URL, once ready and warmed up."""
    env = datadiet_env(redis_url=redis_url, data_dir=str(data_dir), **settings)
    api, base_url = start_api_process(env, log=data_dir / f"{name}.log", cwd=data_dir)
    stack.callback(stop_process_group, api, 15)
    post_all(base_url, batches(make_samples("warmup", 2 * BATCH)))
    return base_url


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=60_000, help="samples per method per round")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients of one row (0: no row)")
    parser.add_argument("--capacity", type=int, default=20_000, help="buffer size of the full-buffer row")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 10,000 samples")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.samples, args.capacity = 2, 10_000, 5_000

    http = Row("HTTP, 1 client", [], args.samples)
    many = Row(f"HTTP, {args.clients} clients", [], args.samples)
    full = Row(f"HTTP, 1 client, buffer full at {args.capacity:,} (each sample evicts one)", [], args.samples)
    raw = Row("raw redis-py pipelined XADD", [], args.samples)
    rows = [http] + ([many] if args.clients else []) + [full, raw]
    load = os.getloadavg()[0]  # others' work on this machine skews the numbers: say how busy it was
    with tempfile.TemporaryDirectory(prefix="datadiet-bench-") as tmp, ExitStack() as stack:
        server = start_redis_server(Path(tmp) / "redis")
        stack.callback(server.stop)
        r = stack.enter_context(redis.Redis.from_url(server.url))
        api = start_api("api", server.url, Path(tmp), stack)
        small_url = f"redis://127.0.0.1:{server.port}/1"
        small_api = start_api("api-full", small_url, Path(tmp), stack, buffer_max_samples=str(args.capacity))

        for rnd in range(args.rounds):
            r.flushall()
            http.seconds.append(time_http(api, make_samples(f"r{rnd}-1", args.samples), 1))
            if args.clients:
                r.flushall()
                many.seconds.append(time_http(api, make_samples(f"r{rnd}-n", args.samples), args.clients))
            r.flushall()
            post_all(small_api, batches(make_samples(f"r{rnd}-fill", args.capacity)))  # not timed
            full.seconds.append(time_http(small_api, make_samples(f"r{rnd}-full", args.samples), 1))
            r.flushall()
            raw.seconds.append(time_raw(r, make_samples(f"r{rnd}-raw", args.samples)))
            rates = ", ".join(f"{row.method}: {row.rates()[-1]:,.0f}/s" for row in rows)
            print(f"round {rnd + 1}/{args.rounds}: {rates}", file=sys.stderr)

    size = len(orjson.dumps(make_samples("x", 1)[0]))
    command = "python bench/ingest.py" + (" --quick" if args.quick else "")
    when = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    report = "\n".join([
        "# Ingestion benchmark",
        "",
        table(rows, raw),
        "",
        f"{args.rounds} rounds of {args.samples:,} samples of {size} bytes as JSON in batches of {BATCH}, "
        "on an emptied Redis each time (the full-buffer row: filled to capacity first, untimed).",
        f"One uvicorn worker; client, API and redis-server share one machine: {os.cpu_count()} CPUs, "
        f"load average {load:.1f} at the start, Python {platform.python_version()}, "
        f"{platform.machine()}.",
        f"`{command}`, {when}.",
        "",
    ])  # fmt: skip
    print(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)


if __name__ == "__main__":
    main()

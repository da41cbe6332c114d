"""``bench/perf.py``'s HTTP sections: ingest (section 1) and weight reads (section 2).

Ingest reuses ``bench/ingest.py``'s samples, clients and raw-XADD floor, at several batch sizes, against
the API with 1 and 2 uvicorn workers. Weight reads fill the buffer with 1,000,000 ``mlp`` samples through
the INGEST Lua script, run a trainer on them, and load the API with ``bench/perf_load.py``.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.ingest import batches as bodies_of
from bench.ingest import make_samples, post_all, time_http, time_raw
from bench.perf_common import (
    Scale,
    Table,
    deployment,
    fill_buffer,
    median,
    mlp_records,
    ratio,
    run_load,
    trainer_status,
    verdict,
    wait_for,
)
from store.keys import Keys

INGEST_CLIENTS = 4
N_FEATURES, N_CLASSES = 16, 4  # the reads' and freshness's mlp: small numeric samples
MLP_CONFIG = f'{{"n_features": {N_FEATURES}, "n_classes": {N_CLASSES}}}'


def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds of ``proc`` and its children (uvicorn's workers)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


# ------------------------------------------------------------------------------------------- 1. ingest
def ingest(t: Table, s: Scale, work: Path) -> None:
    """Samples/s of ``POST /v1/samples`` at batches of 1, 50 and 500 with 1 and 2 API workers, each beside
    raw pipelined XADD of the same payloads in pipelines of the same size (the floor)."""
    t.columns = ["batch", "path", "samples/s (median)", "min", "max", "requests/s", "vs raw XADD",
                 "client CPU (cores)", "API CPU (cores)", "Redis CPU (cores)", "target"]  # fmt: skip
    with deployment(work) as d:
        r = d.client()
        redis_proc = psutil.Process(d.server.proc.pid)
        started = {w: d.api(f"api-{w}w", workers=w) for w in s.ingest_workers}
        apis = {w: url for w, (_, url) in started.items()}
        procs = {w: psutil.Process(proc.pid) for w, (proc, _) in started.items()}
        for url in apis.values():  # imports and first-request costs, not timed
            post_all(url, bodies_of(make_samples("warmup", 200), 50))
        rates: dict[tuple[int, str], list[float]] = {}
        cpu: dict[tuple[int, str], list[tuple[float, float, float]]] = {}  # client, API, Redis: cores
        for rnd in range(s.rounds):
            for batch, n in s.ingest_samples.items():
                samples = make_samples(f"r{rnd}b{batch}", n)
                r.flushall()
                client0, redis0 = time.process_time(), cpu_seconds(redis_proc)
                secs = time_raw(r, samples, batch)
                used = (time.process_time() - client0, 0.0, cpu_seconds(redis_proc) - redis0)
                cpu.setdefault((batch, "raw"), []).append((used[0] / secs, 0.0, used[2] / secs))
                rates.setdefault((batch, "raw"), []).append(n / secs)
                for w, url in apis.items():
                    r.flushall()
                    samples = make_samples(f"r{rnd}b{batch}w{w}", n)
                    api0, client0, redis0 = (
                        cpu_seconds(procs[w]),
                        time.process_time(),
                        cpu_seconds(redis_proc),
                    )
                    secs = time_http(url, samples, INGEST_CLIENTS, batch)
                    used = (
                        (time.process_time() - client0) / secs,
                        (cpu_seconds(procs[w]) - api0) / secs,
                        (cpu_seconds(redis_proc) - redis0) / secs,
                    )
                    cpu.setdefault((batch, f"{w}w"), []).append(used)
                    rates.setdefault((batch, f"{w}w"), []).append(n / secs)
            last = ", ".join(f"b{b} {k}: {v[-1]:,.0f}/s" for (b, k), v in rates.items())
            print(f"  ingest round {rnd + 1}/{s.rounds}: {last}", file=sys.stderr)
        for batch in s.ingest_samples:
            raw = median(rates[(batch, "raw")])
            client, _, red = (median([c[i] for c in cpu[(batch, "raw")]]) for i in (0, 1, 2))
            t.add(batch, "raw redis-py pipelined XADD (floor)", raw, *minmax(rates[(batch, "raw")]),
                  raw / batch, "1.00x", client, "", red, "")  # fmt: skip
            for w in apis:
                xs = rates[(batch, f"{w}w")]
                target = ""
                if batch == 500 and w == 1:
                    target = f">= 50% of raw: {verdict(median(xs) >= 0.5 * raw)}"
                if batch == 500 and w == 2 and 1 in apis:
                    target = f"faster than 1 worker: {verdict(median(xs) > median(rates[(batch, '1w')]))}"
                label = f"HTTP, {w} worker{'s' if w > 1 else ''}, {INGEST_CLIENTS} clients"
                client, api, red = (median([c[i] for c in cpu[(batch, f"{w}w")]]) for i in (0, 1, 2))
                t.add(batch, label, median(xs), *minmax(xs), median(xs) / batch, ratio(median(xs), raw),
                      client, api, red, target)  # fmt: skip
    size = len(bodies_of(make_samples("x", 1), 1)[0])
    t.notes.append(
        f"{s.rounds} rounds; per round and batch size: "
        + ", ".join(f"{n:,} samples at batch {b}" for b, n in s.ingest_samples.items())
        + f", ~{size} bytes each as JSON (`bench/ingest.py`'s samples), on an emptied Redis each time. "
        f"HTTP: {INGEST_CLIENTS} httpx clients (threads, keep-alive) in this process; the raw floor: "
        "one redis-py client, pipelines of `batch` XADDs of the same payloads. Client, API and Redis share "
        "the machine's cores; CPU columns: process CPU seconds per wall second while posting (the client's "
        "includes the response parsing of its threads; the API's, all its worker processes)."
    )


def minmax(xs: list[float]) -> tuple[float, float]:
    return min(xs), max(xs)


# -------------------------------------------------------------------------------------- 2. weight reads
def reads(t: Table, s: Scale, work: Path) -> None:
    """``GET /v1/weights``, ``?ids=`` (100 ids) and a conditional ``GET /v1/weights`` under 50 connections
    at ``s.read_samples`` samples while a trainer publishes, beside ``GET /healthz`` (the HTTP floor)."""
    t.columns = ["request", "req/s", "p50 ms", "p99 ms", "req/s vs /healthz", "p99 vs /healthz", "statuses",
                 "client CPU (cores)", "API CPU (cores)", "Redis CPU (cores)", "target"]  # fmt: skip
    n = s.read_samples
    with deployment(work) as d:
        r = d.client()
        validation = [rec.payload for rec in mlp_records(0, 200, N_FEATURES, N_CLASSES, tag="v")]
        secs, _ = fill_buffer(
            d.url,
            n,
            lambda lo, hi: mlp_records(lo, hi, N_FEATURES, N_CLASSES),
            capacity=n,
            validation=validation,
        )
        t.notes.append(f"Filled {n:,} samples through the INGEST script in {secs:.1f} s ({n / secs:,.0f}/s).")
        settings = {"buffer_max_samples": str(n), "model": "mlp", "model_config": MLP_CONFIG}
        trainer = d.trainer("trainer", torch_threads="1", checkpoint_every="1000000", **settings)
        api, url = d.api("api", 1, **settings)
        took = wait_for(
            lambda: bool(r.exists(Keys().weights)) or trainer.poll() is not None, 600, "a publish"
        )
        if trainer.poll() is not None:
            raise RuntimeError(f"the trainer exited with {trainer.returncode}; see {work / 'trainer.log'}")
        t.notes.append(f"The trainer's first publish came {took:.0f} s after the API was ready.")
        ids = ",".join(f"s{i}" for i in random.Random(0).sample(range(n), 100))
        paths = {
            "GET /healthz (floor)": "/healthz",
            "GET /v1/weights": "/v1/weights",
            "GET /v1/weights/samples?ids= (100 ids)": f"/v1/weights/samples?ids={ids}",
            "GET /v1/weights, If-None-Match: the ETag it last got": "/v1/weights",
        }
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in paths}
        etags = []
        api_proc, redis_proc = psutil.Process(api.pid), psutil.Process(d.server.proc.pid)
        for rnd in range(s.rounds):
            for label, path in paths.items():
                headers: tuple[str, ...] = ()
                if "If-None-Match" in label:
                    etag = httpx.get(url + path, timeout=30).headers.get("etag")
                    etags.append(etag)
                    headers = (f"If-None-Match: {etag or chr(34) + 'none' + chr(34)}",)
                cpu0, redis0, t0 = cpu_seconds(api_proc), cpu_seconds(redis_proc), time.perf_counter()
                out = run_load(url, path, conns=s.read_conns, seconds=s.read_seconds, headers=headers,
                               track_etag="If-None-Match" in label)  # fmt: skip
                out["api_core"] = (cpu_seconds(api_proc) - cpu0) / (time.perf_counter() - t0)
                out["redis_core"] = (cpu_seconds(redis_proc) - redis0) / (time.perf_counter() - t0)
                runs[label].append(out)
            print(f"  reads round {rnd + 1}/{s.rounds}: "
                  + ", ".join(f"{k.split()[1]} {v[-1]['req_s']:,.0f}/s" for k, v in runs.items()),
                  file=sys.stderr)  # fmt: skip
        doc = httpx.get(url + "/v1/weights", timeout=30).json()
        status = trainer_status(r)

    def med(label: str, key: str) -> float:
        return median([o[key] for o in runs[label] if o[key] is not None])

    floor = "GET /healthz (floor)"
    for label in paths:
        statuses: dict[str, int] = {}
        for o in runs[label]:
            for code, c in o["statuses"].items():
                statuses[code] = statuses.get(code, 0) + c
            for e, c in o["errors"].items():
                statuses[e] = statuses.get(e, 0) + c
        rps, p99 = med(label, "req_s"), med(label, "p99_ms")
        target = ""
        if label == "GET /v1/weights":
            ok = rps >= 0.8 * med(floor, "req_s") and p99 <= 1.5 * med(floor, "p99_ms")
            target = f">= 0.80x req/s, <= 1.5x p99: {verdict(ok)}"
        elif "ids=" in label:
            target = f">= 0.50x req/s: {verdict(rps >= 0.5 * med(floor, 'req_s'))}"
        elif "If-None-Match" in label:
            share = statuses.get("304", 0) / max(sum(statuses.values()), 1)
            target = f"304 (expected once supported): {share:.1%} of answers"
        t.add(label, rps, med(label, "p50_ms"), p99, ratio(rps, med(floor, "req_s")),
              ratio(p99, med(floor, "p99_ms")), " ".join(f"{k}: {v:,}" for k, v in statuses.items()),
              med(label, "cpu_core"), med(label, "api_core"), med(label, "redis_core"), target)  # fmt: skip
    t.notes.append(
        f"{s.rounds} rounds of {s.read_seconds:g} s per request kind (medians of the rounds), "
        f"{s.read_conns} keep-alive connections from `bench/perf_load.py` (asyncio streams, its own "
        "process; client CPU 1.0 = one core busy: near it the client may be the limit). One uvicorn "
        f"worker. {n:,} samples ({N_FEATURES} features) in the buffer; the trainer "
        "(`python -m trainer`, mlp, 1 torch thread) published while the load ran: "
        f"step {doc.get('step')} at the end, "
        f"{doc.get('summary', {}).get('count', 0):,} samples in its last document, "
        f"trainer status step {status.get('step', 'n/a')}. "
        f"ETags the API sent for /v1/weights before the rounds: "
        f"{', '.join(sorted({str(e) for e in etags}))[:200]}. The conditional row: each connection starts "
        "with that ETag and, after a 200 (the trainer published a new document), asks with the new one."
    )

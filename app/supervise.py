"""``datadiet up``: the whole service on one machine as supervised child processes.

Before anything starts, the supervisor takes the data dir's lock (``<data_dir>/up.lock``: one ``up`` per
data dir) and binds the API's port itself; either failing ends ``up`` at once with one line saying why,
leaving nothing running. It then owns the embedded Redis (unless ``DATADIET_REDIS_URL`` is set), migrates
the database once, and runs the API (uvicorn serving the supervisor's listening socket, ``--fd``) and the
trainer as children. "Up" is printed only once the API's ``/readyz`` answers 200 -- necessarily from its
own child, since nobody else can hold the port. A child that crashes is restarted with backoff; one that
exits within START_WINDOW_S of its start MAX_START_FAILURES times in a row can never start, and the
supervisor gives up: it stops everything and exits non-zero, naming the child and the last line it wrote.
A trainer that finishes (``DATADIET_MAX_STEPS``) stays stopped. Ctrl-C or SIGTERM stops the trainer first
(it writes a final checkpoint), then the API, then Redis. Children die with the supervisor even if it is
killed outright (Linux parent-death signal), so no orphan survives.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from store.config import Settings
from store.embedded import EmbeddedRedis
from store.meta import check_schema, make_engine, migrate
from store.processes import api_argv, one_line, stop_process_group, wait_until_ready
from store.redis_client import BadRedisURL, parse_redis_url

log = logging.getLogger("datadiet.up")
PR_SET_PDEATHSIG = 1
EX_CONFIG = 78  # sysexits.h: a child that exits so has a configuration error; restarting it cannot help
START_WINDOW_S = 30.0  # a child that exits sooner than this after it was started failed to start
MAX_START_FAILURES = 3  # failures to start in a row after which the supervisor gives up
LOCK_FILE = "up.lock"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class StartError(RuntimeError):
    """The service cannot start, or a child can never start; the message is one line saying why."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError):  # not Linux: the supervisor's shutdown path still stops its children
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def hold_lock(path: Path, owner: str) -> int:
    """Take the exclusive lock on ``path`` (created if missing) for as long as the returned fd stays open.

    Raises StartError naming the holder (what it wrote in the file) when another process holds it. The
    kernel drops the lock when its holder exits, however it exits, so a stale file never blocks a start.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 512).decode(errors="replace").strip() or "a process that has not said who it is"
        os.close(fd)
        raise StartError(
            f"another datadiet is already running on {path.parent} ({holder}): stop it first, or give this "
            "one another DATADIET_DATA_DIR"
        ) from None
    note_lock(fd, owner)
    return fd


def note_lock(fd: int, owner: str) -> None:
    """Say who holds the lock, for the message a second start prints."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner.encode() + b"\n", 0)


def bind_listener(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound and listening; StartError when the address is taken.

    The supervisor holds it and every API process it starts serves it, so the port cannot be taken
    between restarts and a client that connects during a restart waits in the backlog instead of being
    refused.
    """
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise StartError(f"cannot listen on {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise StartError(
                f"port {port} on {host} is already in use (another datadiet, or another program): stop it, "
                "or choose another port with --port"
            ) from None
        raise StartError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    # accepted connections inherit it: without it a response written in two parts waits ~40 ms for an ACK
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.listen(2048)
    return sock


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0  # exits within START_WINDOW_S of a start, in a row
    restarts: int = 0
    next_start: float = 0.0
    finished: bool = False
    log_file: IO[bytes] | None = field(default=None, repr=False)
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40), repr=False)  # its last lines
    pump: threading.Thread | None = field(default=None, repr=False)

    def last_words(self) -> str:
        """What it said last, on one line: its uncaught exception (with the message's further lines), else
        the last line it wrote (uvicorn's error)."""
        if self.pump is not None:
            self.pump.join(timeout=2)  # it exited: its pipe is at EOF once the last line is read
        lines = [_ANSI.sub("", line).rstrip() for line in self.tail]
        lines = [line for line in lines if line.strip()]
        starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
        if starts:  # the exception: the lines after the traceback's indented frames
            after = lines[starts[-1] + 1 :]
            message = [
                line.strip()
                for line in after[next((i for i, x in enumerate(after) if not x[:1].isspace()), len(after)) :]
                if not line.strip().startswith("For further information visit")
            ]
            if message:
                return "; ".join(message)[:400]
        return lines[-1].strip()[:400] if lines else "it wrote nothing"


def _pump(stream: IO[bytes], out: IO[bytes], tail: deque[str]) -> None:
    """Copy a child's output to ``out`` line by line, keeping the last lines in ``tail``."""
    with contextlib.suppress(OSError, ValueError):  # our stderr closed, or the log file closed on stop
        for line in iter(stream.readline, b""):
            tail.append(line.decode(errors="replace"))
            out.write(line)
            out.flush()
    stream.close()


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


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
        self.stop_requested = False  # set from a signal handler: wait_ready gives up waiting
        self.listener: socket.socket | None = None
        self.lock_fd: int | None = None
        self.started = False
        # the API's command line names the listener's fd: start() sets it once it has bound the socket
        self.children = [Child("api", []), Child("trainer", [sys.executable, "-m", "trainer"])]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Lock the data dir and bind the port (StartError, nothing started, if either is taken), then
        Redis, the database's schema, and the children."""
        s = self.settings
        if s.redis_url:  # a URL no child could use (store.redis_client): say so before anything starts
            try:
                parse_redis_url(s.redis_url)
            except BadRedisURL as e:
                raise StartError(str(e)) from None
        s.ensure_data_dir()
        self.lock_fd = hold_lock(s.data_dir / LOCK_FILE, f"pid {os.getpid()}, starting")
        self.listener = bind_listener(self.host, self.port)
        self.port = int(self.listener.getsockname()[1])  # --port 0: the one the kernel chose
        note_lock(self.lock_fd, f"pid {os.getpid()}, API at {self.url}")
        self.started = True
        redis_url = s.redis_url
        if not redis_url:
            self.redis = EmbeddedRedis(s.data_dir)
            try:
                redis_url = self.redis.start()
            except RuntimeError as e:
                raise StartError(f"the embedded Redis did not start: {e}") from None
            if self.redis.proc is None:
                self.redis = None  # joined a server someone else runs: not ours to stop
        engine = make_engine(s.resolved_database_url)
        try:  # once here, not in each child (DATADIET_AUTO_MIGRATE=false in theirs: they only check it)
            migrate(engine) if s.auto_migrate else check_schema(engine)
        except Exception as e:  # whatever the driver raises: the database is not usable
            raise StartError(f"the database cannot be used: {one_line(e)}") from None
        finally:
            engine.dispose()
        self.env = {
            **os.environ,
            **self.extra_env,
            "DATADIET_REDIS_URL": redis_url,
            "DATADIET_DATA_DIR": str(s.data_dir.resolve()),
            "DATADIET_AUTO_MIGRATE": "false",
        }
        self.children[0].argv = api_argv(fd=self.listener.fileno())
        for child in self.children:
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        out: IO[bytes] = sys.stderr.buffer
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            child.log_file = child.log_file or open(self.log_dir / f"{child.name}.log", "ab")  # noqa: SIM115
            out = child.log_file
        fds = (self.listener.fileno(),) if self.listener is not None and child.name == "api" else ()
        # its own process group: Ctrl-C reaches only the supervisor, which stops children in order
        child.proc = subprocess.Popen(
            child.argv,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=fds,
            preexec_fn=_die_with_parent,
            process_group=0,
        )
        assert child.proc.stdout is not None
        child.tail.clear()
        child.pump = threading.Thread(
            target=_pump, args=(child.proc.stdout, out, child.tail), name=f"{child.name}-output", daemon=True
        )
        child.pump.start()
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", child.name, child.proc.pid)

    def check(self) -> None:
        """Restart crashed children (with backoff); call it periodically.

        Raises StartError when a child has failed to start MAX_START_FAILURES times in a row.
        """
        now = time.monotonic()
        for child in self.children:
            if child.finished or child.proc is None:
                continue
            if child.next_start:
                if now >= child.next_start:
                    child.restarts += 1
                    child.next_start = 0.0
                    self._spawn(child)
                continue
            code = child.proc.poll()
            if code is None:
                continue
            if code == 0 and child.name == "trainer":
                log.info("trainer finished (DATADIET_MAX_STEPS reached)")
                child.finished = True
                continue
            if code == EX_CONFIG:  # a configuration error (a model that cannot be built) will not fix itself
                raise StartError(
                    f"the {child.name} cannot start: its configuration is invalid ({_exit_text(code)}); "
                    f"its last words: {child.last_words()}"
                )
            ran = now - child.started_at
            child.failures = child.failures + 1 if ran < START_WINDOW_S else 0
            if child.failures >= MAX_START_FAILURES:
                raise StartError(
                    f"the {child.name} cannot start: it {_exit_text(code)} {child.failures} times in a row "
                    f"within {START_WINDOW_S:.0f}s of starting; its last words: {child.last_words()}"
                )
            delay = min(30.0, 2.0**child.failures)
            log.warning(
                "%s %s after %.0fs (%s); restarting in %.0fs",
                child.name,
                _exit_text(code),
                ran,
                child.last_words(),
                delay,
            )
            child.next_start = now + delay

    def trainer_finished(self) -> bool:
        return any(c.finished for c in self.children if c.name == "trainer")

    def stop(self) -> None:
        """Trainer first (final checkpoint), then the API, then Redis; no child is left behind.

        Safe after a start that failed half-way, and idempotent.
        """
        for child in sorted(self.children, key=lambda c: c.name != "trainer"):
            if child.proc is not None and not stop_process_group(
                child.proc, timeout=60 if child.name == "trainer" else 15
            ):
                log.warning("%s did not stop in time: killed it", child.name)
            if child.pump is not None:
                child.pump.join(timeout=5)
            if child.log_file is not None:
                child.log_file.close()
                child.log_file = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # releases the data dir's lock
            self.lock_fd = None
        if self.started:
            self.started = False
            log.info("stopped")

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Until the API's /readyz answers 200 (True), or a stop is requested (False).

        Raises StartError when a child cannot start or the API is not ready within ``timeout``.
        """

        def slow(last: str) -> None:  # a dependency that does not answer: say so before the timeout
            log.warning("the API is not ready yet (%s); waiting up to %.0f s in all", last, timeout)

        def keep_waiting() -> bool:
            if self.stop_requested:
                return False
            self.check()  # restarts a crashed child; StartError when one can never start
            return True

        try:
            return wait_until_ready(self.url, timeout=timeout, keep_waiting=keep_waiting, on_slow=slow)
        except StartError:
            raise
        except RuntimeError as e:  # not ready within timeout
            raise StartError(str(e)) from None


def run_forever(sup: Supervisor) -> int:
    """Run until Ctrl-C / SIGTERM (status 0), or until the service cannot run (one line on stderr, 1)."""
    stop = False

    def _stop(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = sup.stop_requested = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    failure: str | None = None
    try:
        sup.start()
        if sup.wait_ready():
            print(f"datadiet is up: API at {sup.url} (docs at {sup.url}/docs); Ctrl-C stops it", flush=True)
        while not stop:
            sup.check()
            time.sleep(0.5)
    except StartError as e:
        failure = str(e)
    finally:
        sup.stop()
    if failure is not None:
        print(f"datadiet: {failure}", file=sys.stderr, flush=True)
        return 1
    return 0

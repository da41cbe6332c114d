"""The HTTP load client of ``bench/perf.py``: HTTP/1.1 keep-alive GETs over raw asyncio streams (uvloop when
installed), in a process of its own so that it neither shares the GIL with the benchmark nor hides its own
CPU use. Prints one JSON object on stdout.

    python bench/perf_load.py http://127.0.0.1:8000 /healthz --conns 50 --seconds 5
    python bench/perf_load.py http://127.0.0.1:8000 /v1/weights --track-etag
    python bench/perf_load.py http://127.0.0.1:8000 /v1/checkpoints/1/file --download 3

Load mode: ``--conns`` connections, each sending its next request as soon as the last answer's body is
read (closed loop), for ``--seconds``. Answer: requests, req_s, latency p50/p99/max in ms (request written
to body read), the status codes seen, bytes of bodies read, and the client's CPU seconds and share of one
core (``cpu_core``: 1.0 = one core busy the whole time; near 1.0 the client, not the server, may be the
limit). ``--track-etag``: each connection, once answered 200 with an ``ETag``, asks with ``If-None-Match``
(a poller that keeps what it last got; RFC 9110 §13.1.2). Download mode: one connection, ``--download``
sequential GETs of the whole body, each timed: seconds and bytes per download.

Bodies are framed by Content-Length or chunked transfer coding (RFC 9112 §6-7); 1xx answers are not
expected and not handled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import numpy as np


async def read_answer(reader: asyncio.StreamReader, chunk: int = 1 << 16) -> tuple[int, int, bytes | None]:
    """Read one HTTP/1.1 answer (head and body); (status, body bytes, its ETag or None)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, chunked, etag = -1, False, None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"etag":
            etag = value.strip()
    if status == 304 or status == 204 or 100 <= status < 200:
        return status, 0, etag
    if chunked:
        total = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers expected: the empty line
                return status, total, etag
            await reader.readexactly(size + 2)
            total += size
    if length < 0:
        raise RuntimeError(f"answer {status} has neither Content-Length nor chunked coding")
    left = length
    while left:
        got = await reader.read(min(chunk, left))
        if not got:
            raise asyncio.IncompleteReadError(b"", left)
        left -= len(got)
    return status, length, etag


def request_bytes(host: str, path: str, headers: list[str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Accept: */*", *headers, "", ""]
    return "\r\n".join(lines).encode()


async def load(
    url: str, path: str, headers: list[str], conns: int, seconds: float, track_etag: bool = False
) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    req = request_bytes(f"{host}:{port}", path, headers)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    body = 0
    streams = [await asyncio.open_connection(host, port) for _ in range(conns)]
    start = time.perf_counter()
    deadline = start + seconds

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal body
        clock = time.perf_counter
        this = req
        while clock() < deadline:
            t0 = clock()
            try:
                writer.write(this)
                status, n, etag = await read_answer(reader)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                errors[type(e).__name__] += 1
                return
            latencies.append(clock() - t0)
            statuses[status] += 1
            body += n
            if track_etag and status == 200 and etag:  # as a poller does: ask again with what it holds
                kept = [h for h in headers if not h.lower().startswith("if-none-match:")]
                this = request_bytes(f"{host}:{port}", path, [*kept, f"If-None-Match: {etag.decode()}"])

    cpu0 = time.process_time()
    await asyncio.gather(*(worker(r, w) for r, w in streams))
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    for _, w in streams:
        w.close()
    lat = np.array(latencies) * 1e3
    return {
        "requests": len(latencies),
        "seconds": wall,
        "req_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "max_ms": float(lat.max()) if len(lat) else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": dict(errors),
        "body_bytes": body,
        "cpu_s": cpu,
        "cpu_core": cpu / wall,
    }


async def download(url: str, path: str, headers: list[str], times: int) -> dict[str, Any]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    req = request_bytes(f"{host}:{port}", path, headers)
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
    secs, sizes, statuses = [], [], []
    cpu0 = time.process_time()
    for _ in range(times):
        t0 = time.perf_counter()
        writer.write(req)
        status, n, _ = await read_answer(reader, chunk=1 << 20)
        secs.append(time.perf_counter() - t0)
        sizes.append(n)
        statuses.append(status)
    writer.close()
    return {"seconds": secs, "bytes": sizes, "statuses": statuses, "cpu_s": time.process_time() - cpu0}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", help="base URL, http://host:port")
    parser.add_argument("path", help="path and query, e.g. /v1/weights")
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--download", type=int, default=0, help="N sequential whole-body GETs instead")
    parser.add_argument(
        "--track-etag", action="store_true", help="after a 200 with an ETag, send If-None-Match with it"
    )
    args = parser.parse_args()
    if args.conns < 1 or args.seconds <= 0:
        print("perf_load: --conns must be >= 1 and --seconds > 0", file=sys.stderr)
        return 2
    run: Callable[..., Any] = asyncio.run
    with contextlib.suppress(ImportError):
        from uvloop import run
    if args.download:
        out = run(download(args.url, args.path, args.header, args.download))
    else:
        out = run(load(args.url, args.path, args.header, args.conns, args.seconds, args.track_etag))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

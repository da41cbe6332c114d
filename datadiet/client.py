"""The Python client for agents and anything else that talks to a datadiet API over HTTP.

Usage::

    from datadiet import Client, load_checkpoint, load_latest

    with Client("http://127.0.0.1:8000", api_key=None) as dd:
        dd.set_validation([{"input": [0.0] * 64, "target": 3}])                  # the task to get better at
        summary = dd.post_samples({"source": "agent-7", "input": x, "target": y} for x, y in data)
        print(summary.accepted, summary.duplicates, summary.ids[:3])
        print(dd.weights()["sources"])                                           # {"agent-7": 1.0}
        print(dd.sample_weights(summary.ids[:100]))                              # {id: weight}
        print(dd.sample(summary.ids[0]))                                         # the sample, its weight
        dd.wait_for_checkpoint(min_version=1, timeout=300)
        path = dd.pull_checkpoint("models/")            # models/model.safetensors; a no-op if current
        pulled = dd.pull("models/")                     # the same, saying what it did: version, size,
                                                        # downloaded or current (Pulled)

    model = load_checkpoint(path)                       # or load_latest(url): pull into a cache, load
    model.predict([[0.0] * 64])

Transient failures are retried: a refused or timed-out connection by httpx's transport
(``httpx.HTTPTransport(retries=connect_retries)``; nothing was sent, so any request may try again), and
429 and 503 answers (after their ``Retry-After`` when given) and, for idempotent requests, read timeouts
and dropped connections by tenacity, with exponential backoff and jitter. A checkpoint download that
breaks mid-body resumes with ``Range``, and a pull replaces an existing file only by a newer ``latest``
unless ``force=True`` (``Client.pull``); the retry policy is in
``datadiet/retry.py``, the download in ``datadiet/download.py``. Retrying ingest is safe because ingest
is idempotent by id, and the client gives every sample without an ``id`` its contract id (the sha256 of the
canonical JSON of source, input and target) before the first try, so a retried batch is counted as
duplicates, never stored twice. Any other error answer raises :class:`DatadietError` at once, carrying the
server's ``status``, ``type`` and ``detail`` (CONTRACT.md, "Errors").
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from datadiet import download
from datadiet.contract import MAX_SAMPLES_PER_REQUEST, with_id
from datadiet.errors import DatadietError
from datadiet.retry import RetryPolicy

if TYPE_CHECKING:
    from trainer.checkpoint import LoadedModel

DEFAULT_URL = "http://127.0.0.1:8000"
MAX_IDS_QUERY_CHARS = 6_000  # ids per GET /v1/weights/samples, so the request line stays well under 16 KiB


@dataclass(frozen=True)
class IngestSummary:
    """What ``post_samples`` stored: counts summed over its requests, and every sample's id in order.

    A batch whose first try reached the server but whose answer was lost counts as duplicates when it is
    retried: ``accepted + duplicates`` is always the number of samples sent.
    """

    accepted: int
    duplicates: int
    ids: list[str] = field(repr=False)


class Client:
    """A synchronous datadiet client (one connection pool; thread-safe as ``httpx.Client`` is).

    ``retries`` is the number of extra tries after a 429/503 answer or a transient failure; the wait
    before try ``k`` is ``backoff * 2**k`` seconds, times a random factor in [0.5, 1.5), or the server's
    ``Retry-After``. ``connect_retries`` (default ``retries``) is the number of extra tries after a
    refused or timed-out connection: httpx's transport makes them (waiting 0, 0.5, 1, 2, ... s), or the
    client when ``transport`` replaces httpx's (tests, proxies, ``httpx.MockTransport``). The CLI uses
    ``connect_retries=0``: nothing listening is reported at once, not after seconds of waiting.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
        connect_retries: int | None = None,
    ) -> None:
        connect_retries = retries if connect_retries is None else connect_retries
        if retries < 0 or backoff < 0 or connect_retries < 0:
            raise ValueError(f"retries, backoff and connect_retries must be >= 0, got {retries}, {backoff}, "
                             f"{connect_retries}")  # fmt: skip
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.connect_retries = connect_retries
        transport_retries_connects = transport is None
        if transport is None:
            transport = httpx.HTTPTransport(retries=connect_retries)
        headers = {"User-Agent": "datadiet-client/0.1", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self._retry = RetryPolicy(
            self._http,
            self.url,
            retries=retries,
            backoff=backoff,
            connect_retries=connect_retries,
            transport_retries_connects=transport_retries_connects,
        )

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ samples and validation
    def post_samples(
        self,
        samples: Iterable[dict[str, Any]],
        *,
        batch_size: int = 1000,
        progress: Callable[[int], None] | None = None,
    ) -> IngestSummary:
        """Ingest ``samples`` (any iterable, read lazily) in requests of ``batch_size``.

        Samples without an ``id`` get their contract id here (the caller's dicts are not modified).
        Each request is all-or-nothing; a bad sample raises DatadietError (type ``ValidationError``,
        ``body["errors"]`` naming each bad sample's index within its batch) and later batches are not
        sent. ``progress(n)`` is called after each batch with the number of samples sent so far.
        """
        if not 1 <= batch_size <= MAX_SAMPLES_PER_REQUEST:
            raise ValueError(f"batch_size must be in [1, {MAX_SAMPLES_PER_REQUEST}], got {batch_size}")
        accepted = duplicates = sent = 0
        ids: list[str] = []
        for batch in _batches((with_id(s) for s in samples), batch_size):
            out = self._json("POST", "/v1/samples", body={"samples": batch})
            accepted += int(out["accepted"])
            duplicates += int(out["duplicates"])
            ids.extend(out["ids"])
            sent += len(batch)
            if progress is not None:
                progress(sent)
        return IngestSummary(accepted, duplicates, ids)

    def set_validation(self, samples: Sequence[dict[str, Any]], *, append: bool = False) -> dict[str, Any]:
        """Replace (``PUT``) or extend (``append=True``: ``POST``) the validation set -> count, version.

        An append that times out after reaching the server is not retried (it would append twice).
        """
        method = "POST" if append else "PUT"
        return self._json(method, "/v1/validation", body={"samples": list(samples)}, idempotent=not append)

    def validation(self) -> dict[str, Any]:
        """``{"count": n, "version": v}`` of the validation set."""
        return self._json("GET", "/v1/validation")

    # ------------------------------------------------------------------ weights and stats
    def weights(self) -> dict[str, Any]:
        """``GET /v1/weights``: step, per-source weights (summing to 1) and the per-sample summary."""
        return self._json("GET", "/v1/weights")

    def sample_weights(self, ids: Sequence[str]) -> dict[str, float]:
        """Current weights of ``ids`` (unknown or evicted ids are absent), in as many requests as needed."""
        weights: dict[str, float] = {}
        for chunk in _id_chunks(ids):
            out = self._json("GET", "/v1/weights/samples", params={"ids": ",".join(chunk)})
            weights.update(out["weights"])
        return weights

    def ranked(self, order: str = "asc", limit: int = 10) -> dict[str, Any]:
        """The ``limit`` lowest (``asc``) or highest (``desc``) weighted samples: step, weights, sources."""
        if order not in ("asc", "desc"):
            raise ValueError(f"order is 'asc' or 'desc', got {order!r}")
        return self._json("GET", "/v1/weights/samples", params={"order": order, "limit": limit})

    def sample(self, sample_id: str) -> dict[str, Any]:
        """``GET /v1/samples/{id}``: one stored sample (the Sample fields) with its current ``weight``.

        Needs the ``admin`` scope when keys are configured. DatadietError 404 when the id was never
        posted or has been evicted.
        """
        return self._json("GET", f"/v1/samples/{quote(sample_id, safe='')}")

    def stats(self) -> dict[str, Any]:
        """``GET /v1/stats``: buffer counters, validation set and trainer progress."""
        return self._json("GET", "/v1/stats")

    # ------------------------------------------------------------------ checkpoints
    def checkpoints(self) -> list[dict[str, Any]]:
        """Published checkpoints' metadata, newest first."""
        return self._json("GET", "/v1/checkpoints")

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The newest checkpoint's metadata (with ``model`` and ``config``), or None before the first."""
        try:
            return self._json("GET", "/v1/checkpoints/latest")
        except DatadietError as e:
            if e.status == 404:
                return None
            raise

    def wait_for_checkpoint(self, min_version: int = 1, timeout: float = 120.0) -> dict[str, Any]:
        """Poll until a checkpoint with version >= ``min_version`` exists; its metadata, or TimeoutError."""
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            latest = self.latest_checkpoint()
            if latest is not None and int(latest["version"]) >= min_version:
                return latest
            left = deadline - time.monotonic()
            if left <= 0:
                seen = "none yet" if latest is None else f"the newest is v{latest['version']}"
                raise TimeoutError(f"no checkpoint >= v{min_version} after {timeout:g}s ({seen})")
            time.sleep(min(delay, left))
            delay = min(delay * 1.5, 2.0)

    def pull_checkpoint(
        self, dest: str | os.PathLike[str], version: int | str = "latest", *, force: bool = False
    ) -> Path:
        """Download a checkpoint file to ``dest`` unless it is already there; returns the file's path.

        ``dest`` is a directory when it exists as one or ends with a separator (the file is then
        ``dest/model.safetensors``), else the file's path. An existing file is offered to the server by
        its sha256 (``If-None-Match``) and left untouched when current (304). Otherwise the body streams
        to a temp file beside the target, resuming with ``Range`` after a dropped connection; its sha256
        must equal the ``ETag`` before it atomically replaces the target. Nothing is created on disk
        before the server sends the file. Without ``force``, an existing file is replaced only by a newer
        version of ``latest``; any other version raises DatadietError type ``WouldReplace`` (details in
        :meth:`pull`).
        """
        return self.pull(dest, version, force=force).path

    def pull(
        self, dest: str | os.PathLike[str], version: int | str = "latest", *, force: bool = False
    ) -> download.Pulled:
        """``pull_checkpoint``, telling what it did: the path, the version and size (bytes) of the file
        there now, whether it was downloaded or found current, and the version it replaced.

        Raises DatadietError: type ``WouldReplace`` (``body``: ``path``, ``held``: the version there or
        None when the file is no datadiet checkpoint, ``served``) when, without ``force``, the server's
        file would replace one of a version other than an older one of ``latest``; ``NotFound`` (404) for
        no such checkpoint; ``ChecksumMismatch`` when the body does not hash to its ``ETag``.
        """
        return download.pull_checkpoint(self._retry, dest, version, force=force)

    # ------------------------------------------------------------------ HTTP
    def _json(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        idempotent: bool = True,
    ) -> Any:
        """One API call: the parsed JSON of a 2xx answer; DatadietError for anything else."""
        content = None
        headers = {}
        if body is not None:
            # the standard library writes NaN/Infinity, so the server can name the offending field (422)
            content = json.dumps(body, separators=(",", ":"), allow_nan=True).encode()
            headers["Content-Type"] = "application/json"
        response = self._retry.send(method, path, content=content, params=params, headers=headers,
                                    idempotent=idempotent)  # fmt: skip
        if not response.is_success:
            raise DatadietError.from_response(response)
        return response.json()


def load_latest(
    url: str = DEFAULT_URL, dest: str | os.PathLike[str] | None = None, **client_kwargs: Any
) -> LoadedModel:
    """Pull the newest checkpoint (skipped when the cached copy is current) and load it.

    ``dest`` defaults to a per-server cache directory under ``$XDG_CACHE_HOME/datadiet`` (or
    ``~/.cache/datadiet``). ``client_kwargs`` go to :class:`Client` (``api_key``, ``timeout``, ...).
    Needs torch (the ``trainer`` package); posting samples does not.
    """
    from trainer import load_checkpoint

    if dest is None:
        dest = download.cache_dir(url)
    with Client(url, **client_kwargs) as client:
        path = client.pull_checkpoint(dest, force=True)  # a cache: whatever the server has now
    return load_checkpoint(path)


# ---------------------------------------------------------------------- helpers


def _batches(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _id_chunks(ids: Sequence[str]) -> Iterator[list[str]]:
    """``ids`` in runs whose comma-joined length stays under MAX_IDS_QUERY_CHARS."""
    chunk: list[str] = []
    length = 0
    for i in ids:
        if chunk and length + len(i) + 1 > MAX_IDS_QUERY_CHARS:
            yield chunk
            chunk, length = [], 0
        chunk.append(i)
        length += len(i) + 1
    if chunk:
        yield chunk

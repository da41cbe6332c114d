"""The Python client for agents and anything else that talks to a datadiet API over HTTP.

Usage::

    from datadiet import Client, load_checkpoint, load_latest

    with Client("http://127.0.0.1:8000", api_key=None) as dd:
        dd.set_validation([{"input": [0.0] * 64, "target": 3}])                  # the task to get better at
        summary = dd.post_samples({"source": "agent-7", "input": x, "target": y} for x, y in data)
        print(summary.accepted, summary.duplicates, summary.ids[:3])
        print(dd.weights()["sources"])                                           # {"agent-7": 1.0}
        print(dd.sample_weights(summary.ids[:100]))                              # {id: weight}
        dd.wait_for_checkpoint(min_version=1, timeout=300)
        path = dd.pull_checkpoint("models/")            # models/model.safetensors; a no-op if current

    model = load_checkpoint(path)                       # or load_latest(url): pull into a cache, load
    model.predict([[0.0] * 64])

Transient failures are retried: a refused or timed-out connection by httpx's transport
(``httpx.HTTPTransport(retries=connect_retries)``; nothing was sent, so any request may try again), and
429 and 503 answers (after their ``Retry-After`` when given) and, for idempotent requests, read timeouts
and dropped connections by tenacity, with exponential backoff and jitter. A checkpoint download that
breaks mid-body resumes with ``Range`` (``Client.pull_checkpoint``). Retrying ingest is safe because ingest
is idempotent by id, and the client gives every sample without an ``id`` its contract id (the sha256 of the
canonical JSON of source, input and target) before the first try, so a retried batch is counted as
duplicates, never stored twice. Any other error answer raises :class:`DatadietError` at once, carrying the
server's ``status``, ``type`` and ``detail`` (CONTRACT.md, "Errors").
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception, retry_if_result, stop_after_attempt

from datadiet.contract import MAX_SAMPLES_PER_REQUEST, content_id
from store.checkpoints import sha256_file

if TYPE_CHECKING:
    from trainer.checkpoint import LoadedModel

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
CHECKPOINT_FILE = "model.safetensors"
RETRY_STATUSES = frozenset({429, 503})
CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)  # nothing was sent: any request may retry
MAX_DELAY_S = 60.0  # cap on one wait between tries, Retry-After included
MAX_IDS_QUERY_CHARS = 6_000  # ids per GET /v1/weights/samples, so the request line stays well under 16 KiB
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class DatadietError(Exception):
    """An error answer from the API, or no answer at all.

    ``status`` is the HTTP status (None when the server could not be reached); ``type`` and ``detail``
    are the server's, from the contract's error body ``{"error": {"type", "detail", ...}}``, and ``body``
    is that ``error`` object whole (e.g. ``errors``: the index and field of each rejected sample).
    ``request`` names the call (``"POST /v1/samples"``) and ``note`` what the client added to it.
    """

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        type: str = "Error",
        body: dict[str, Any] | None = None,
        request: str = "",
        note: str = "",
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.type = type
        self.detail = detail
        self.body: dict[str, Any] = body or {}
        self.request = request
        self.note = note

    def __str__(self) -> str:
        where = f"HTTP {self.status} " if self.status is not None else ""
        context = "; ".join(filter(None, [self.request, self.note]))
        return f"{where}{self.type}: {self.detail}" + (f" ({context})" if context else "")

    @classmethod
    def from_response(cls, response: httpx.Response, note: str = "") -> DatadietError:
        """The error a (read) response carries, whatever shape its body has."""
        try:
            body = response.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            kind, detail = str(error.get("type", "HTTPError")), str(error.get("detail", ""))
        else:
            kind, detail, error = "HTTPError", response.text[:500] or response.reason_phrase, {}
        request = f"{response.request.method} {response.request.url.path}"
        return cls(detail, status=response.status_code, type=kind, body=error, request=request, note=note)


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
        self._transport_retries_connects = transport is None
        if transport is None:
            transport = httpx.HTTPTransport(retries=connect_retries)
        headers = {"User-Agent": "datadiet-client/0.1", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

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

    def pull_checkpoint(self, dest: str | os.PathLike[str], version: int | str = "latest") -> Path:
        """Download a checkpoint file to ``dest`` unless it is already there; returns the file's path.

        ``dest`` is a directory when it exists as one or ends with a separator (the file is then
        ``dest/model.safetensors``), else the file's path. An existing file is offered to the server by
        its sha256 (``If-None-Match``) and left untouched when current (304). Otherwise the body streams
        to a temp file beside the target, resuming with ``Range`` after a dropped connection; its sha256
        must equal the ``ETag`` before it atomically replaces the target.
        """
        path = _checkpoint_target(dest)
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"/v1/checkpoints/{quote(str(version), safe='')}/file"
        headers = {"Accept": "application/octet-stream"}
        if path.is_file():
            headers["If-None-Match"] = f'"{sha256_file(path)}"'
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                fresh = self._download(url, headers, out)
                if fresh is None:
                    log.debug("%s is current (304); not downloaded", path)
                    return path
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            log.info("checkpoint v%s -> %s (sha256 %s)", fresh[0], path, fresh[1][:12])
            return path
        finally:
            tmp.unlink(missing_ok=True)

    def _download(self, url: str, headers: dict[str, str], out: IO[bytes]) -> tuple[str, str] | None:
        """Stream ``url`` into the open file ``out``, verified: (served version, sha256), or None on 304."""
        etag: str | None = None
        digest = hashlib.sha256()
        written = 0
        for attempt in range(self.retries + 1):
            request_headers = dict(headers)
            if etag is not None and written:  # resume, but only if the file is still the same one
                request_headers.update({"Range": f"bytes={written}-", "If-Range": f'"{etag}"'})
            response = self._send("GET", url, headers=request_headers, stream=True)
            try:
                if response.status_code == 304:
                    return None
                if response.status_code not in (200, 206):
                    response.read()
                    raise DatadietError.from_response(response)
                served = _strong_sha256_etag(response)
                if response.status_code == 206:  # the rest of the same file, from where we stopped
                    start = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
                    if served != etag or start != str(written):
                        raise DatadietError(
                            f"asked to resume {url} at byte {written} of {etag}, the server sent "
                            f"{response.headers.get('Content-Range')!r} of {served}",
                            status=206,
                            type="ResumeMismatch",
                        )
                else:  # a whole body (first try, or the file changed since): start over
                    out.seek(0)
                    out.truncate()
                    digest, written, etag = hashlib.sha256(), 0, served
                try:
                    for chunk in response.iter_bytes():  # as it arrives: a break loses nothing
                        out.write(chunk)
                        digest.update(chunk)
                        written += len(chunk)
                except httpx.TransportError as e:
                    if attempt >= self.retries:
                        raise _unreachable(self.url, e, attempt + 1) from e
                    log.warning("download of %s broke after %d bytes (%s); resuming", url, written, e)
                    time.sleep(self._delay(attempt, None))
                    continue
            finally:
                response.close()
            if digest.hexdigest() != etag:
                raise DatadietError(
                    f"downloaded {written} bytes of {url} hash to {digest.hexdigest()}, but the server's "
                    f"ETag is {etag}; the file was not saved",
                    type="ChecksumMismatch",
                )
            return response.headers.get("X-Checkpoint-Version", "?"), etag
        raise AssertionError("unreachable")  # the loop returns or raises

    # ------------------------------------------------------------------ HTTP with retries
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
        response = self._send(method, path, content=content, params=params, headers=headers,
                              idempotent=idempotent)  # fmt: skip
        if not response.is_success:
            raise DatadietError.from_response(response)
        return response.json()

    def _send(
        self,
        method: str,
        path: str,
        *,
        stream: bool = False,
        idempotent: bool = True,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send with retries; returns the first answer that is not 429/503, or raises DatadietError.

        At most ``retries + 1`` tries (tenacity): a 429/503 answer is tried again after its Retry-After
        or the backoff; read timeouts and dropped connections only when the request is ``idempotent``
        (the server may have acted on it). Refused connections are the transport's (``connect_retries``).
        """
        request = self._http.build_request(method, path, **kwargs)
        tries = connect_failures = 0

        def send() -> httpx.Response:
            nonlocal tries
            tries += 1
            return self._http.send(request, stream=stream)

        def transient(exc: BaseException) -> bool:
            nonlocal connect_failures
            if isinstance(exc, CONNECT_ERRORS):  # httpx's transport has retried it already; a caller's not
                connect_failures += 1
                return not self._transport_retries_connects and connect_failures <= self.connect_retries
            return idempotent and isinstance(exc, httpx.TransportError)

        def before_sleep(state: RetryCallState) -> None:
            assert state.outcome is not None and state.next_action is not None
            if state.outcome.failed:
                e = state.outcome.exception()
                why = str(e) or type(e).__name__
            else:
                response = state.outcome.result()
                response.close()
                why = f"HTTP {response.status_code}"
            log.warning("%s %s: %s; retrying in %.2fs", method, path, why, state.next_action.sleep)

        retrying = Retrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=self._wait,
            retry=retry_if_exception(transient) | retry_if_result(lambda r: r.status_code in RETRY_STATUSES),
            before_sleep=before_sleep,
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )
        try:
            response: httpx.Response = retrying(send)
        except httpx.TransportError as e:
            if self._transport_retries_connects and isinstance(e, CONNECT_ERRORS):
                tries += self.connect_retries  # the transport's own tries within the last one
            raise _unreachable(self.url, e, tries) from e
        if response.status_code in RETRY_STATUSES:  # retries exhausted
            if stream:
                response.read()
            raise DatadietError.from_response(response, f"gave up after {tries} tries")
        return response

    def _wait(self, state: RetryCallState) -> float:
        """tenacity's wait before the next try: the answer's Retry-After, else jittered backoff."""
        outcome = state.outcome
        retry_after = None
        if outcome is not None and not outcome.failed:
            retry_after = outcome.result().headers.get("Retry-After")
        return self._delay(state.attempt_number - 1, retry_after)

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait before try ``attempt + 1``: the server's Retry-After, else jittered backoff."""
        hinted = _parse_retry_after(retry_after)
        if hinted is not None:
            return min(hinted, MAX_DELAY_S)
        return min(self.backoff * 2**attempt * random.uniform(0.5, 1.5), MAX_DELAY_S)


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
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "datadiet"
        dest = cache / re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")
        Path(dest).mkdir(parents=True, exist_ok=True)
    with Client(url, **client_kwargs) as client:
        path = client.pull_checkpoint(dest)
    return load_checkpoint(path)


# ---------------------------------------------------------------------- helpers


def with_id(sample: dict[str, Any]) -> dict[str, Any]:
    """``sample`` with its contract id filled in when it has none (a copy; the input is not modified).

    A sample lacking ``input`` or ``target`` is returned as is, for the server to reject by name.
    """
    if "id" in sample or "input" not in sample or "target" not in sample:
        return sample
    return {**sample, "id": content_id(sample.get("source", ""), sample["input"], sample["target"])}


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


def _checkpoint_target(dest: str | os.PathLike[str]) -> Path:
    text = os.fspath(dest)
    path = Path(text)
    if path.is_dir() or text.endswith(("/", os.sep)):
        return path / CHECKPOINT_FILE
    return path


def _strong_sha256_etag(response: httpx.Response) -> str:
    """The sha256 in a checkpoint download's strong ``ETag: "<sha256>"``."""
    raw = response.headers.get("ETag", "")
    etag = raw.strip().strip('"').lower()
    if raw.startswith("W/") or not _SHA256_RE.fullmatch(etag):
        raise DatadietError(
            f"the server's ETag {raw!r} is not a quoted sha256; cannot verify the download",
            status=response.status_code,
            type="ChecksumMismatch",
        )
    return etag


def _parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None when absent or garbled."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _unreachable(url: str, exc: httpx.TransportError, tries: int) -> DatadietError:
    """The error for a request that got no answer (connection refused, timed out, dropped)."""
    reason = str(exc) or type(exc).__name__
    request = f"{exc.request.method} {exc.request.url.path}" if _has_request(exc) else ""
    return DatadietError(
        f"cannot reach the datadiet API at {url}: {reason}",
        type=type(exc).__name__,
        request=request,
        note=f"gave up after {tries} {'try' if tries == 1 else 'tries'}",
    )


def _has_request(exc: httpx.TransportError) -> bool:
    try:
        exc.request  # noqa: B018 -- httpx raises RuntimeError when the error has no request
    except RuntimeError:
        return False
    return True

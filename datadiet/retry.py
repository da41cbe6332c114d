"""The client's retry policy: which failures are tried again, how long to wait, and when to give up.

A refused or timed-out connection is retried by httpx's transport (``httpx.HTTPTransport(retries=n)``;
nothing was sent, so any request may try again), or here when a caller's transport replaces httpx's.
429 and 503 answers (after their ``Retry-After`` when given) and, for idempotent requests, read timeouts
and dropped connections are retried by tenacity, with exponential backoff and jitter. Whatever is left
raises :class:`~datadiet.errors.DatadietError`.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from typing import Any

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception, retry_if_result, stop_after_attempt

from datadiet.errors import DatadietError

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 503})
CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)  # nothing was sent: any request may retry
MAX_DELAY_S = 60.0  # cap on one wait between tries, Retry-After included


class RetryPolicy:
    """Sends requests on ``http`` with at most ``retries + 1`` tries each (see :class:`datadiet.Client`).

    ``transport_retries_connects`` says httpx's transport already retries refused connections
    (``connect_retries`` times); when False (a caller's transport) this policy retries them itself.
    """

    def __init__(
        self,
        http: httpx.Client,
        url: str,
        *,
        retries: int,
        backoff: float,
        connect_retries: int,
        transport_retries_connects: bool,
    ) -> None:
        self.http = http
        self.url = url
        self.retries = retries
        self.backoff = backoff
        self.connect_retries = connect_retries
        self.transport_retries_connects = transport_retries_connects

    def send(
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
        request = self.http.build_request(method, path, **kwargs)
        tries = connect_failures = 0

        def send() -> httpx.Response:
            nonlocal tries
            tries += 1
            return self.http.send(request, stream=stream)

        def transient(exc: BaseException) -> bool:
            nonlocal connect_failures
            if isinstance(exc, CONNECT_ERRORS):  # httpx's transport has retried it already; a caller's not
                connect_failures += 1
                return not self.transport_retries_connects and connect_failures <= self.connect_retries
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
            wait=self.wait,
            retry=retry_if_exception(transient) | retry_if_result(lambda r: r.status_code in RETRY_STATUSES),
            before_sleep=before_sleep,
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )
        try:
            response: httpx.Response = retrying(send)
        except httpx.TransportError as e:
            if self.transport_retries_connects and isinstance(e, CONNECT_ERRORS):
                tries += self.connect_retries  # the transport's own tries within the last one
            raise DatadietError.unreachable(self.url, e, tries) from e
        if response.status_code in RETRY_STATUSES:  # retries exhausted
            if stream:
                response.read()
            raise DatadietError.from_response(response, f"gave up after {tries} tries")
        return response

    def wait(self, state: RetryCallState) -> float:
        """tenacity's wait before the next try: the answer's Retry-After, else jittered backoff."""
        outcome = state.outcome
        retry_after = None
        if outcome is not None and not outcome.failed:
            retry_after = outcome.result().headers.get("Retry-After")
        return self.delay(state.attempt_number - 1, retry_after)

    def delay(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait before try ``attempt + 1``: the server's Retry-After, else jittered backoff."""
        hinted = parse_retry_after(retry_after)
        if hinted is not None:
            return min(hinted, MAX_DELAY_S)
        return min(self.backoff * 2**attempt * random.uniform(0.5, 1.5), MAX_DELAY_S)


def parse_retry_after(value: str | None) -> float | None:
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

"""Dependency outages: the trainer waits them out with backoff instead of exiting.

A Redis restart or a refused database must not end a process that runs for weeks. Each dependency has a
``Dependency`` breaker: a failed call marks it down (logged once per outage, with the error), later calls
are skipped until the backoff delay has passed (1 s doubling to ``max_delay_s``, with jitter, as in the
"exponential backoff and jitter" of M. Brooker, AWS Architecture Blog, 2015), and the first call that
succeeds again logs how long the outage lasted. Meanwhile the trainer keeps training on what it holds
(cached payloads) and retries what it could not do (publishing, checkpoint registration) when the
dependency is back.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy.exc

from store.redis_client import UNAVAILABLE_ERRORS

log = logging.getLogger("datadiet.trainer")

T = TypeVar("T")

REDIS_ERRORS: tuple[type[BaseException], ...] = UNAVAILABLE_ERRORS
"""A Redis that is restarting, unreachable or hung (BusyLoadingError is a ConnectionError), or a Redis
Cluster whose slot is failing over (CLUSTERDOWN, TRYAGAIN; store.redis_client)."""

DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,  # refused, reset, timed out (the DBAPI's OperationalError)
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,  # the pool had no connection in time
)
"""A database that refuses, drops or stalls connections."""


class Dependency:
    """Backoff state of one dependency (``redis`` or ``database``). Times in seconds (monotonic clock)."""

    def __init__(
        self,
        name: str,
        errors: tuple[type[BaseException], ...],
        *,
        first_delay_s: float = 1.0,
        max_delay_s: float = 30.0,
    ) -> None:
        self.name, self.errors = name, errors
        self.first_delay_s, self.max_delay_s = first_delay_s, max_delay_s
        self.down_since: float | None = None
        self.retry_at = 0.0
        self.delay_s = first_delay_s
        self.failures = 0  # failed calls in the current outage
        self.outages = 0  # outages seen since start
        # what goes on while it is down, for the outage's log line: the trainer says "training on what the
        # trainer holds" once it has started; before, it is only waiting
        self.meanwhile = "waiting for it"

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def ready(self) -> bool:
        """False while in backoff after a failure: skip calls until then."""
        return time.monotonic() >= self.retry_at

    def wait_s(self) -> float:
        """Seconds until the next call may be tried (0 when it may be tried now)."""
        return max(0.0, self.retry_at - time.monotonic())

    def failed(self, error: BaseException) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            self.outages += 1
            self.delay_s = self.first_delay_s
            log.warning(
                "%s unavailable (%s: %s): %s, retrying with backoff",
                self.name,
                type(error).__name__,
                str(error).splitlines()[0][:200] if str(error) else "",
                self.meanwhile,
            )
        self.failures += 1
        self.retry_at = now + self.delay_s * random.uniform(0.5, 1.0)
        self.delay_s = min(self.delay_s * 2, self.max_delay_s)

    def succeeded(self) -> None:
        if self.down_since is not None:
            log.warning(
                "%s is back after %.1f s (%d failed attempts)",
                self.name,
                time.monotonic() - self.down_since,
                self.failures,
            )
        self.down_since, self.retry_at, self.failures = None, 0.0, 0
        self.delay_s = self.first_delay_s

    def attempt(self, fn: Callable[[], T]) -> tuple[bool, T | None]:
        """Call ``fn`` unless in backoff; (True, result), or (False, None) if skipped or it failed with one
        of this dependency's errors (other errors propagate)."""
        if not self.ready():
            return False, None
        try:
            result = fn()
        except self.errors as e:
            self.failed(e)
            return False, None
        self.succeeded()
        return True, result

    def wait_for(
        self, fn: Callable[[], T], stop: Callable[[], bool] = lambda: False
    ) -> tuple[bool, T | None]:
        """Call ``fn`` until it succeeds, sleeping through the backoff: (True, result), or (False, None)
        once ``stop()`` turns true."""
        while not stop():
            ok, result = self.attempt(fn)
            if ok:
                return True, result
            time.sleep(min(self.wait_s(), 1.0) or 0.05)
        return False, None

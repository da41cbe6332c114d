"""The trainer lease: one trainer writes a deployment's weights, checkpoints and quarantine at a time.

A lease is a Redis string ``"<fencing token> <host> <pid>"`` with a TTL (``DATADIET_LEASE_TTL_S``). The
holder renews it from its training loop; a second trainer waits until the lease is released (a clean
stop) or expires (the holder died or hung), then takes it with a larger fencing token. Every trainer write
goes through a Lua script that first checks the caller still holds the lease (``store.scripts``,
``FENCED_*``), so a holder that was paused past its TTL and wakes up cannot publish over its successor:
the fencing-token scheme of M. Kleppmann, "How to do distributed locking" (2016), with Redis itself as the
store that checks the token. A shard of a sharded buffer lives on another slot than the lease, so its
writes check the token instead: each shard keeps the highest token that wrote to it and refuses a lower
one (``fenced_shard``); a new holder raises every shard's to its own as it takes the lease.

A holder known to be dead (same host, its pid gone: a SIGKILLed trainer being restarted) is taken over at
once instead of after the TTL. A lease that vanished with Redis's data (a restart without persistence) is
taken again by its last holder, unless another trainer has held it since: then the caller's state is
stale and it must stop (``LeaseLost``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.exceptions import RedisClusterException

from store import scripts
from store.keys import Keys
from store.redis_client import SyncClient

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """Another trainer holds the lease, or held it since this one did: this trainer's state is stale and
    it must stop without writing anything more."""


def _holder_is_dead(value: str) -> bool:
    """Whether a lease value names a process on this host that no longer exists."""
    parts = value.split(" ")
    if len(parts) != 3 or parts[1] != socket.gethostname() or not parts[2].isdigit():
        return False
    pid = int(parts[2])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class TrainerLease:
    """The lease of one trainer process on one deployment (``keys``); TTL in seconds."""

    def __init__(self, client: SyncClient, keys: Keys, ttl_s: float = 30.0) -> None:
        self.r: Any = client
        self.k = keys
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.holder = f"{socket.gethostname()} {os.getpid()}"
        self.value: str | None = None  # this process's lease value while it holds the lease
        self.token = 0  # the last fencing token this process held
        self.renewed_at = 0.0
        self._acquire = self.r.register_script(scripts.LEASE_ACQUIRE)
        self._renew = self.r.register_script(scripts.LEASE_RENEW)
        self._release = self.r.register_script(scripts.LEASE_RELEASE)
        self._claim = self.r.register_script(scripts.FENCE_SHARD_CLAIM)

    def try_acquire(self) -> str | None:
        """Take the lease if it is free; None on success, else the current holder's value.

        Raises LeaseLost if this process held it before and another trainer has held it since."""
        current = self.r.get(self.k.lease)
        if current is not None and self.value is not None and current.decode() == self.value:
            self.renew()  # this process holds it already (a fenced write took it since the last run)
            return None
        dead = current.decode() if current is not None and _holder_is_dead(current.decode()) else ""
        token, value = self._acquire(
            keys=[self.k.lease, self.k.fence], args=[self.ttl_ms, self.holder, self.token, dead]
        )
        token, value = int(token), value.decode() if isinstance(value, bytes) else str(value)
        if token == -1:
            self.value = None
            raise LeaseLost(f"another trainer held the lease since this one (fencing token {value})")
        if token == 0:
            return value
        if dead:
            log.warning("took over the trainer lease from a dead trainer (%s)", dead)
        self.token, self.value, self.renewed_at = token, value, time.monotonic()
        self._claim_shards()
        return None

    def _claim_shards(self) -> None:
        """Raise every shard's fencing token to this holder's (a sharded buffer): from now on a predecessor
        that wakes up is refused on every shard, not only on those this trainer has written to since.
        Raises LeaseLost if a shard has seen a newer token. A shard that cannot be reached is logged and
        left: this trainer's first write to it claims it (the lease is held; failing here would leave this
        trainer waiting for its own lease to expire)."""
        if not self.k.sharded:
            return
        for sk in self.k.all_shards():
            try:
                self._claim(keys=[sk.fence_seen], args=[self.token])
            except (redis.RedisError, RedisClusterException, OSError) as e:
                if isinstance(e, redis.ResponseError) and str(e).startswith("NOLEASE"):
                    self.value = None
                    raise LeaseLost(f"shard {sk.shard}: {str(e).removeprefix('NOLEASE').strip()}") from None
                log.warning("could not claim shard %d with fencing token %d (%s)", sk.shard, self.token, e)

    def acquire(self, *, wait: bool, poll_s: float = 1.0, stop: Callable[[], bool] = lambda: False) -> bool:
        """Take the lease; with ``wait``, poll until it is free (logging once) or ``stop()`` is true.
        Returns whether it is held. Raises LeaseLost as ``try_acquire``."""
        logged = False
        while True:
            holder = self.try_acquire()
            if holder is None:
                log.info("holding the trainer lease (fencing token %d)", self.token)
                return True
            if not wait:
                log.error("another trainer holds this deployment's lease (%s)", holder)
                return False
            if stop():
                return False
            if not logged:
                log.warning(
                    "another trainer holds this deployment's lease (%s): waiting for it to stop or for "
                    "its lease to expire (at most %.0f s after it dies)",
                    holder,
                    self.ttl_ms / 1000,
                )
                logged = True
            time.sleep(poll_s)

    def renew(self) -> None:
        """Extend the lease; take it again if it vanished and nobody held it since. Raises LeaseLost."""
        if self.value is None:
            if self.try_acquire() is not None:
                raise LeaseLost("another trainer holds the lease")
            return
        state = int(self._renew(keys=[self.k.lease], args=[self.value, self.ttl_ms]))
        if state == 1:
            self.renewed_at = time.monotonic()
            return
        if state == 0:
            log.warning("the trainer lease vanished (expired, or Redis lost it): taking it again")
            self.value = None
            if self.try_acquire() is not None:
                raise LeaseLost("another trainer took the lease")
            return
        self.value = None
        raise LeaseLost("another trainer took the lease (this one was paused or cut off past its TTL)")

    def renew_if_due(self) -> None:
        """Renew once a third of the TTL has passed since the last renewal."""
        if self.value is None or time.monotonic() - self.renewed_at >= self.ttl_ms / 3000:
            self.renew()

    def superseded(self) -> str | None:
        """The lease value of a trainer that has taken the lease since this process last held it, or None
        (this process still holds it, or nobody has held it since). A read only: it neither renews nor
        takes the lease. Raises Redis errors."""
        if not self.token:
            return None
        fence, current = self.r.get(self.k.fence), self.r.get(self.k.lease)
        if fence is not None and int(fence) > self.token:
            return current.decode() if current is not None else f"fencing token {int(fence)}"
        return None

    def release(self) -> None:
        """Give the lease up (a clean stop), so a waiting trainer takes over at once."""
        if self.value is not None:
            self._release(keys=[self.k.lease], args=[self.value])
            self.value = None

    def fenced(self, script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a ``FENCED_*`` script (its KEYS[1] the lease, its ARGV[1] the lease value) under the lease:
        taken first when this process does not hold it and it is free. Raises LeaseLost."""
        for attempt in range(2):
            if self.value is None:
                self.renew()
            try:
                return script(keys=[self.k.lease, *keys], args=[self.value, *args])
            except redis.ResponseError as e:
                if not str(e).startswith("NOLEASE") or attempt:
                    raise
                holder = str(e).removeprefix("NOLEASE").strip()
                self.value = None
                if holder:
                    raise LeaseLost(f"another trainer holds the lease ({holder})") from None
        raise AssertionError("unreachable")

    def fenced_shard(self, script: Any, shard: Keys, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a ``FENCED_SHARD_*`` script (its KEYS[1] the shard's ``fence_seen``, its ARGV[1] the fencing
        token) on one shard of a sharded buffer, with this holder's token: refused once a newer token has
        written to (or claimed) that shard. Takes the lease first when this process does not hold it.
        Raises LeaseLost."""
        if self.value is None:
            self.renew()
        try:
            return script(keys=[shard.fence_seen, *keys], args=[self.token, *args])
        except redis.ResponseError as e:
            if not str(e).startswith("NOLEASE"):
                raise
            self.value = None
            raise LeaseLost(f"shard {shard.shard}: {str(e).removeprefix('NOLEASE').strip()}") from None

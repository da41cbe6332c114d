"""``store.lease.TrainerLease``: who holds the trainer lease, and whether a holder was superseded."""

from __future__ import annotations

import time

import pytest
import redis

from store.keys import Keys
from store.lease import LeaseLost, TrainerLease


def test_a_holder_is_superseded_only_once_another_took_the_lease_since(redis_client: redis.Redis) -> None:
    """``superseded`` reads, never writes: it is None while A holds the lease and while the lease has
    merely expired (A may take it back), and names the successor once B has taken it, even after B let it
    go again. A's next renew raises LeaseLost."""
    keys = Keys()
    a, b = TrainerLease(redis_client, keys, ttl_s=0.1), TrainerLease(redis_client, keys, ttl_s=30)
    assert a.superseded() is None  # never held: nothing to be superseded from
    assert a.acquire(wait=False)
    assert a.superseded() is None
    time.sleep(0.2)  # A is paused past its TTL
    assert redis_client.get(keys.lease) is None
    assert a.superseded() is None  # expired, but nobody has taken it: not lost
    assert b.acquire(wait=False)
    assert a.superseded() == b.value and b.superseded() is None
    assert redis_client.get(keys.lease) == (b.value or "").encode()  # reading changed nothing
    b.release()
    assert a.superseded() == f"fencing token {b.token}"
    with pytest.raises(LeaseLost):
        a.renew()


def test_acquiring_a_lease_this_process_already_holds_is_immediate(redis_client: redis.Redis) -> None:
    """A trainer whose fenced write took the lease back after a run released it (a second ``run()`` in one
    process) holds it: acquiring again renews it at once instead of waiting out its own TTL."""
    lease = TrainerLease(redis_client, Keys(), ttl_s=30)
    assert lease.acquire(wait=False)
    token, value = lease.token, lease.value
    started = time.monotonic()
    assert lease.acquire(wait=True, poll_s=5.0)
    assert time.monotonic() - started < 1.0
    assert (lease.token, lease.value) == (token, value) and redis_client.pttl(Keys().lease) > 29_000

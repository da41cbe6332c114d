"""Redis clients from a ``DATADIET_REDIS_URL``: one server, or a Redis Cluster.

    redis://host:6379/0, rediss://..., unix:///path/redis.sock    one server: redis.Redis
    redis+cluster://host:port, rediss+cluster://host:port         a cluster (any node): RedisCluster

A cluster URL names one node, the client finds the others itself (CLUSTER SLOTS, redis-py's
``RedisCluster``; https://redis.readthedocs.io/en/stable/clustering.html). A cluster has no databases
other than 0, so a cluster URL takes no ``/<db>`` path. Options (timeouts, ``retry``) go to the client as
redis-py names them; both kinds take the same ones.

Every key of one deployment carries the hash tag ``{prefix}`` (store/keys.py), so each Lua script, MULTI
and pipeline of ours touches one slot: the cluster client runs them unchanged on that slot's master.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.exceptions import ClusterDownError, RedisClusterException, SlotNotCoveredError, TryAgainError

SyncClient = redis.Redis | RedisCluster
"""What ``sync_client`` returns: the trainer's client (store.feed, store.lease)."""

AsyncClient = aioredis.Redis | AsyncRedisCluster
"""What ``async_client`` returns: the API's client (store.buffer)."""

UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,  # refused, reset; a server still loading (BusyLoadingError)
    redis.TimeoutError,
    ClusterDownError,  # CLUSTERDOWN: the slot's master is failing, or the cluster state is not ok yet
    TryAgainError,  # TRYAGAIN: a slot being migrated
    SlotNotCoveredError,  # the client's slot map has no node for the slot (not a RedisError)
)
"""A Redis or Redis Cluster that is restarting, unreachable, hung or failing over: wait and retry."""

SINGLE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}  # -> the node's own scheme


class BadRedisURL(ValueError):
    """``DATADIET_REDIS_URL`` is not a URL this module can connect to; the message is one line."""


def cluster_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` is a cluster client's way of saying the cluster is unavailable without a RedisError:
    a slot no known node serves (SlotNotCoveredError), or "Redis Cluster cannot be connected" (no node
    it knows answers; a RedisClusterException raised from the connection error)."""
    if isinstance(exc, SlotNotCoveredError):
        return True
    return isinstance(exc, RedisClusterException) and isinstance(exc.__cause__, UNAVAILABLE_ERRORS)


def parse_redis_url(url: str) -> tuple[bool, str]:
    """(whether ``url`` names a cluster, the URL redis-py's ``from_url`` takes for it).

    Raises BadRedisURL for another scheme, a cluster URL without a host, or one with a database other
    than 0 (a cluster has only database 0)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in SINGLE_SCHEMES:
        return False, url
    if scheme not in CLUSTER_SCHEMES:
        known = ", ".join(f"{s}://" for s in (*SINGLE_SCHEMES, *CLUSTER_SCHEMES))
        raise BadRedisURL(f"DATADIET_REDIS_URL {_redacted(url)!r}: the scheme must be one of {known}")
    if not parts.hostname:
        raise BadRedisURL(f"DATADIET_REDIS_URL {_redacted(url)!r}: a cluster URL names one node, host:port")
    if parts.path.strip("/") not in ("", "0"):
        raise BadRedisURL(
            f"DATADIET_REDIS_URL {_redacted(url)!r}: a Redis Cluster has only database 0 (drop the path)"
        )
    return True, urlunsplit((CLUSTER_SCHEMES[scheme], parts.netloc, "", parts.query, ""))


def is_cluster(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (BadRedisURL as ``parse_redis_url``)."""
    return parse_redis_url(url)[0]


def sync_client(url: str, **options: Any) -> SyncClient:
    """A synchronous client for ``url``: ``redis.Redis``, or ``redis.cluster.RedisCluster`` for a
    cluster URL. ``options``: redis-py's (``socket_timeout=10``, seconds). Connects lazily for one server,
    at once for a cluster (it reads the slot map: a cluster that does not answer raises RedisError or
    RedisClusterException here). Raises BadRedisURL."""
    cluster, target = parse_redis_url(url)
    if cluster:
        return RedisCluster.from_url(target, **options)
    return redis.Redis.from_url(target, **options)


def async_client(url: str, **options: Any) -> AsyncClient:
    """An asyncio client for ``url``: ``redis.asyncio.Redis``, or ``redis.asyncio.cluster.RedisCluster``
    for a cluster URL (which reads the slot map on its first command). Raises BadRedisURL."""
    cluster, target = parse_redis_url(url)
    if cluster:
        return AsyncRedisCluster.from_url(target, **options)
    return aioredis.Redis.from_url(target, **options)


def announcements_client(url: str, **options: Any) -> aioredis.Redis:
    """An asyncio client for a Pub/Sub subscription (store.buffer ``follow_publications``).

    For a cluster: a plain client on the node the URL names. Redis Cluster forwards every ``PUBLISH``
    to every node over its bus ("Pub/Sub", https://redis.io/docs/latest/operate/oss_and_stack/reference/
    cluster-spec/#pubsub), so one node hears the trainer's announcements whichever master runs the
    script. (redis-py's asyncio ``ClusterPubSub`` works too, but only once the client has read the slot
    map; before, ``subscribe`` raises KeyError: redis-py 8.1.) While that node is down the API reads
    the weights document from Redis on every request, as with one server that is down. Raises
    BadRedisURL."""
    _, target = parse_redis_url(url)
    return aioredis.Redis.from_url(target, **options)


def _redacted(url: str) -> str:
    """``url`` without its password, for an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

"""``store.embedded``: the Redis a process starts for itself when ``DATADIET_REDIS_URL`` is unset."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from store.embedded import EmbeddedRedis, resolve_redis_url


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def embedded(data_dir: Path) -> Iterator[EmbeddedRedis]:
    """An embedded server on ``data_dir``, stopped after the test if the test left it running."""
    server = EmbeddedRedis(data_dir)
    yield server
    server.stop()


def test_embedded_redis_keeps_its_data_across_a_restart(data_dir: Path, embedded: EmbeddedRedis) -> None:
    with redis.Redis.from_url(embedded.start()) as r:
        r.set("greeting", "hello")
        r.xadd("stream", {"o": 1})
    embedded.stop()
    with pytest.raises(OSError), socket.socket(socket.AF_UNIX) as s:
        s.connect(str(embedded.socket))  # nobody listens any more
    assert (embedded.dir / "appendonly.aof").stat().st_size > 0  # the data lives in the append-only file

    restarted = EmbeddedRedis(data_dir)
    try:
        with redis.Redis.from_url(restarted.start()) as r:
            assert r.get("greeting") == b"hello"
            assert r.xlen("stream") == 1
    finally:
        restarted.stop()


def test_a_second_embedded_redis_on_the_same_dir_joins_the_running_one(
    data_dir: Path, embedded: EmbeddedRedis
) -> None:
    url = embedded.start()
    second = EmbeddedRedis(data_dir)

    assert second.start() == url
    assert second.proc is None  # it started nothing
    second.stop()  # and stopping it leaves the first one's server running
    with redis.Redis.from_url(url) as r:
        assert r.ping()
        r.set("k", "v")
    assert resolve_redis_url(None, data_dir) == (url, None)  # nothing to stop for a joiner either


def test_a_configured_url_is_used_as_is(redis_url: str, data_dir: Path) -> None:
    assert resolve_redis_url(redis_url, data_dir) == (redis_url, None)
    assert not (data_dir / "redis").exists()

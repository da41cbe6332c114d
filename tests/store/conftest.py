"""Helpers of the buffer tests: stored-form samples, and one call on a fresh SampleBuffer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import orjson
import pytest
import redis.asyncio as aioredis

from store.buffer import SampleBuffer, SampleRecord
from store.keys import Keys

T = TypeVar("T")


def record(i: int, source: str = "agent-a") -> SampleRecord:
    """A stored-form sample ``s<i>`` (what ``app.schema.to_record`` makes of a posted one)."""
    doc = {"id": f"s{i}", "source": source, "input": f"what is {i}+1?", "target": f"{i + 1}"}
    return SampleRecord(f"s{i}", source, f"{i:016x}", orjson.dumps(doc))


@pytest.fixture
def buffer_call(redis_url: str) -> Callable[..., Any]:
    """``buffer_call(keys, lambda buffer: buffer.ingest(...), capacity=...)``: one call on a fresh
    SampleBuffer of ``keys`` (a prefix and shard count) on the test's Redis."""

    def call(keys: Keys, use: Callable[[SampleBuffer], Coroutine[Any, Any, T]], capacity: int = 1000) -> T:
        async def run() -> T:
            client = aioredis.Redis.from_url(redis_url)
            try:
                return await use(SampleBuffer(client, keys, capacity, validation_max=100))
            finally:
                await client.aclose()

        return asyncio.run(run())

    return call

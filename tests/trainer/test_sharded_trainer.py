"""The trainer on a buffer sharded over 4 hash tags (``DATADIET_BUFFER_SHARDS=4``, one redis-server): it
reads every shard's stream, drops what each shard evicts, acknowledges per shard, and a resumed run (after a
SIGKILL, or a clean stop) goes on exactly as with one shard."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis
import torch
from fastapi.testclient import TestClient

from store.keys import SHARD_BITS, TRAINER_GROUP, Keys, shard_of_ordinal
from store.processes import stop_process_group
from tests.trainer.conftest import (
    MLP,
    blobs,
    published_checkpoints,
    sigkill_after_checkpoints,
    start_trainer,
    wait_for,
)
from tests.trainer.test_resume import _final, _post_stream
from trainer.loop import EXIT_LEASE_LOST
from trainer.state import load_state
from trainer.table import WeightTable

SHARDS = 4
KEYS = Keys("dd", SHARDS)
CAPACITY = 1200


def test_a_sigkilled_trainer_on_a_sharded_buffer_resumes_with_every_sample_kept_or_evicted(
    redis_url: str, tmp_path: Path, make_settings: Callable[..., Any], make_client: Callable[..., TestClient]
) -> None:
    data_dir = tmp_path / "data"
    api = make_client(
        make_settings(model="mlp", model_params=MLP, buffer_max_samples=CAPACITY, buffer_shards=SHARDS)
    )
    assert (
        api.post(
            "/v1/samples", json={"samples": blobs(1000, 1, source="clean", noisy=False, prefix="a")}
        ).status_code
        == 202
    )
    assert (
        api.put(
            "/v1/validation", json={"samples": blobs(32, 3, source="v", noisy=False, prefix="v")}
        ).status_code
        == 200
    )
    log = tmp_path / "trainer.log"
    killed_at = sigkill_after_checkpoints(
        api, start_trainer(redis_url, data_dir, log, buffer_shards=str(SHARDS)), log, versions=2
    )

    # accepted while the trainer is down, over capacity: every shard evicts down to CAPACITY / SHARDS
    assert (
        api.post(
            "/v1/samples", json={"samples": blobs(600, 2, source="late", noisy=False, prefix="b")}
        ).status_code
        == 202
    )
    final_step = killed_at["step"] + 40
    proc = start_trainer(redis_url, data_dir, log, buffer_shards=str(SHARDS), max_steps=str(final_step))
    try:
        assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        stop_process_group(proc)
    assert f"resumed from checkpoint v{killed_at['version']}" in log.read_text()

    state = load_state(data_dir, api.get("/v1/checkpoints/latest").json()["version"])
    assert state is not None and state.step == final_step
    t = state.table_arrays
    in_table = {int(o) for o, alive in zip(t["ordinal"], t["alive"], strict=True) if alive}
    r = redis.Redis.from_url(redis_url)
    live = {int(o) for sk in KEYS.all_shards() for o in r.hkeys(sk.samples)}
    assert {shard_of_ordinal(o) for o in live} == set(range(SHARDS))
    assert in_table == live  # every accepted sample is in the table, or was evicted by its shard
    stats = api.get("/v1/stats").json()["buffer"]
    assert stats["ingested"] == 1600 and stats["size"] == len(live) == stats["ingested"] - stats["evicted"]
    assert len(live) <= CAPACITY and stats["evicted"] >= 1600 - CAPACITY
    for sk in KEYS.all_shards():  # everything read was acknowledged at the final checkpoint
        assert r.xpending(sk.ingest, TRAINER_GROUP)["pending"] == 0
    # the published weights reached every shard's priority zset
    weighted = [r.zscore(KEYS.for_shard(shard_of_ordinal(o)).priority, o) for o in sorted(live)]
    assert sum(1 for w in weighted if w is not None and w < 1e12) > len(live) // 2


def test_a_sharded_run_stopped_and_resumed_ends_bit_for_bit_like_one_run(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    make_client: Callable[..., TestClient],
    make_trainer: Callable[..., Any],
) -> None:
    """test_resume's exact comparison on a 4-shard buffer: the per-shard stream positions, the table's
    per-shard ordinals and the validation set's per-shard marks all come back on resume."""
    k = 45
    knobs = {
        "model": "mlp",
        "model_params": MLP,
        "checkpoint_every": k,
        "warmup_steps": 10,
        "buffer_shards": 4,
    }
    runs = {}
    for name in ("whole", "split"):
        _post_stream(make_client(make_settings(redis_prefix=name, **knobs)))
    for name, stops in (("whole", [2 * k]), ("split", [k, 2 * k])):
        for max_steps in stops:
            trainer = make_trainer(redis_prefix=name, data_dir=tmp_path / name, max_steps=max_steps, **knobs)
            assert trainer.run() == 0
        runs[name] = _final(tmp_path / name)
    (whole_model, whole), (split_model, split) = runs["whole"], runs["split"]
    for name, tensor in whole_model.items():
        assert torch.equal(tensor, split_model[name]), f"model tensor {name} differs after resume"
    for col in ("ordinal", "weight", "visits", "alive", "sampling", "fresh"):
        np.testing.assert_array_equal(whole.table_arrays[col], split.table_arrays[col], err_msg=col)
    assert {shard_of_ordinal(int(o)) for o in whole.table_arrays["ordinal"]} == set(range(4))
    assert whole.info["rng"] == split.info["rng"] and whole.info["weighting"] == split.info["weighting"]
    assert whole.info["checked_ordinal"] == split.info["checked_ordinal"]
    assert isinstance(whole.info["checked_ordinal"], list) and len(whole.info["checked_ordinal"]) == 4
    assert int(split.table_arrays["visits"].sum()) > 0


def test_a_trainer_paused_past_its_lease_cannot_publish_into_a_sharded_buffer(
    redis_url: str, tmp_path: Path, make_settings: Callable[..., Any], make_client: Callable[..., TestClient]
) -> None:
    """test_faults' fencing test on a 4-shard buffer: A hangs (SIGSTOP) past its lease, B takes over (and
    claims every shard with its token); A, woken, stops with the lease-lost status and its weights never
    reach a shard."""
    data_dir = tmp_path / "data"
    api = make_client(make_settings(model="mlp", model_params=MLP, buffer_shards=SHARDS))
    api.post("/v1/samples", json={"samples": blobs(400, 1, source="a", noisy=False, prefix="a")})
    api.put("/v1/validation", json={"samples": blobs(32, 2, source="v", noisy=False, prefix="v")})
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    shards = str(SHARDS)
    a = start_trainer(redis_url, data_dir, log_a, lease_ttl_s="2", buffer_shards=shards)
    b = None
    try:
        wait_for(lambda: published_checkpoints(api), 120, "A's first checkpoint", log_a)
        os.killpg(a.pid, signal.SIGSTOP)
        b = start_trainer(redis_url, data_dir, log_b, lease_ttl_s="2", buffer_shards=shards)
        wait_for(lambda: "published checkpoint" in log_b.read_text(), 120, "B to take over", log_b)
        r = redis.Redis.from_url(redis_url)
        assert [int(r.get(sk.fence_seen)) for sk in KEYS.all_shards()] == [2] * SHARDS
        os.killpg(a.pid, signal.SIGCONT)
        assert a.wait(timeout=60) == EXIT_LEASE_LOST, log_a.read_text()
        assert "another trainer" in log_a.read_text() or "has written to this shard" in log_a.read_text()
        assert b.poll() is None
        assert [int(r.get(sk.fence_seen)) for sk in KEYS.all_shards()] == [2] * SHARDS
    finally:
        stop_process_group(a)
        if b is not None:
            stop_process_group(b)


def test_the_table_finds_the_rows_of_ordinals_whose_shards_interleave() -> None:
    """Rows of a sharded buffer are out of ordinal order (the shards' streams interleave): rows_of must find
    exactly what a scan finds, before and after a compaction and with rows added since its index was made;
    the per-shard newest ordinals skip the membership test for new entries and mark the validation cut."""
    rng = np.random.default_rng(0)
    table = WeightTable()
    seqs = [0] * SHARDS
    for _ in range(40):
        shards = rng.integers(0, SHARDS, size=int(rng.integers(1, 200)))
        ordinals = []
        for s in shards.tolist():
            seqs[s] += 1
            ordinals.append(s << SHARD_BITS | seqs[s])
        table.add(
            np.array(ordinals, dtype=np.int64), np.zeros(len(ordinals), np.uint64), ["a"] * len(ordinals)
        )
        query = np.concatenate([rng.choice(table.ordinal, size=min(50, table.n)), [12345]])
        rows = table.rows_of(query)
        np.testing.assert_array_equal(rows, np.flatnonzero(np.isin(table.ordinal, query)))
        table.kill(rows[:20])
        table.compact()
    assert table.max_ordinals().tolist() == [s << SHARD_BITS | seqs[s] for s in range(SHARDS)]
    # a re-delivered entry is recognised as a row the table holds
    assert len(table.add(table.ordinal[:3].copy(), np.zeros(3, np.uint64), ["a"] * 3)) == 0
    cut = table.max_ordinals()
    table.add(np.array([1 << SHARD_BITS | (seqs[1] + 1)]), np.zeros(1, np.uint64), ["a"])
    table.unqueue_through(cut)
    assert table.ordinal[table.unscored.array()].tolist() == [1 << SHARD_BITS | (seqs[1] + 1)]


def test_a_trainer_whose_shard_count_differs_from_the_buffers_exits_78_naming_the_setting(
    redis_url: str, tmp_path: Path, make_settings: Callable[..., Any], make_client: Callable[..., TestClient]
) -> None:
    api = make_client(make_settings(model="mlp", model_params=MLP, buffer_shards=SHARDS))
    assert (
        api.post(
            "/v1/samples", json={"samples": blobs(20, 1, source="a", noisy=False, prefix="a")}
        ).status_code
        == 202
    )
    log = tmp_path / "trainer.log"
    trainer = start_trainer(redis_url, tmp_path / "data", log)  # DATADIET_BUFFER_SHARDS unset: 1
    try:
        assert trainer.wait(timeout=120) == 78
    finally:
        stop_process_group(trainer)
    assert (
        "DATADIET_BUFFER_SHARDS=1, but this deployment's buffer is split over 4 shard(s)" in log.read_text()
    )

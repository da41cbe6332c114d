"""A trainer killed with SIGKILL resumes from its last checkpoint and loses no accepted sample."""

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

from store.keys import Keys
from store.meta import Checkpoint, make_engine
from store.processes import stop_process_group
from tests.trainer.conftest import (
    MLP,
    blobs,
    published_checkpoints,
    sigkill_after_checkpoints,
    start_trainer,
    wait_for,
)
from trainer.state import load_state

CAPACITY = 2500


def test_sigkilled_trainer_resumes_and_every_accepted_sample_is_kept_or_evicted(
    redis_url: str, tmp_path: Path, make_settings: Callable[..., Any], make_client: Callable[..., TestClient]
) -> None:
    data_dir = tmp_path / "data"
    api = make_client(make_settings(model="mlp", model_params=MLP, buffer_max_samples=CAPACITY))
    first = blobs(2000, 1, source="clean", noisy=False, prefix="a")
    assert api.post("/v1/samples", json={"samples": first}).status_code == 202
    assert (
        api.put(
            "/v1/validation", json={"samples": blobs(64, 3, source="v", noisy=False, prefix="v")}
        ).status_code
        == 200
    )
    log = tmp_path / "trainer.log"

    killed_at = sigkill_after_checkpoints(api, start_trainer(redis_url, data_dir, log), log, versions=2)

    # accepted while the trainer is down; over capacity, so the buffer evicts the oldest unweighted ones
    second = blobs(1000, 2, source="late", noisy=False, prefix="b")
    assert api.post("/v1/samples", json={"samples": second}).status_code == 202
    final_step = killed_at["step"] + 60
    proc = start_trainer(redis_url, data_dir, log, max_steps=str(final_step))
    try:
        assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    finally:
        stop_process_group(proc)
    text = log.read_text()
    assert f"resumed from checkpoint v{killed_at['version']} at step {killed_at['step']}" in text, text[
        -3000:
    ]

    latest = api.get("/v1/checkpoints/latest").json()
    assert latest["step"] == final_step
    state = load_state(data_dir, latest["version"])
    assert state is not None and state.step == final_step
    table = state.table_arrays
    in_table = {int(o) for o, alive in zip(table["ordinal"], table["alive"], strict=True) if alive}
    r = redis.Redis.from_url(redis_url)
    live = {int(o) for o in r.hkeys(Keys().samples)}
    counters = {k.decode(): int(v) for k, v in r.hgetall(Keys().counters).items()}
    assert counters["ingested"] == 3000
    assert counters["evicted"] == 3000 - CAPACITY
    assert in_table == live  # every accepted sample is in the table, or counted as evicted
    assert len(live) + counters["evicted"] == counters["ingested"]
    with make_engine(f"sqlite:///{data_dir / 'meta.db'}").connect() as conn:
        versions = [row.version for row in conn.execute(Checkpoint.__table__.select())]
    assert versions == sorted(set(versions)) and len(versions) >= 3


# --- a resumed run continues as the uninterrupted one would ---------------------------------------


def _post_stream(api: TestClient) -> None:
    clean = blobs(500, 11, source="clean", noisy=False, prefix="c")
    noisy = blobs(300, 12, source="noisy", noisy=True, prefix="n")
    assert api.post("/v1/samples", json={"samples": clean + noisy}).status_code == 202
    val = blobs(64, 13, source="v", noisy=False, prefix="v")
    assert api.put("/v1/validation", json={"samples": val}).status_code == 200


def _final(data_dir: Path) -> tuple[Any, Any]:
    """(the newest checkpoint's tensors, its trainer state)."""
    import safetensors.torch

    engine = make_engine(f"sqlite:///{(data_dir / 'meta.db').resolve()}")
    with engine.connect() as conn:
        row = conn.execute(Checkpoint.__table__.select().order_by(Checkpoint.version.desc())).first()
    engine.dispose()
    assert row is not None
    state = load_state(data_dir, row.version)
    assert state is not None
    return safetensors.torch.load_file(row.path), state


def test_a_run_stopped_at_step_k_and_resumed_ends_bit_for_bit_like_one_run_to_2k(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    make_client: Callable[..., TestClient],
    make_trainer: Callable[..., Any],
) -> None:
    """Everything a run holds comes back on resume: model, optimizer, weight table (with its queue and
    sampling tree), the weighting rule's statistics, the validation set and gradient, loss averages and
    both RNGs. On the CPU with one torch thread the same operations in the same order give the same bits,
    so the comparison is exact, not within a tolerance: any state left out shows up as a difference."""
    k = 45  # not a multiple of reweight_every: the first draws after the resume use the restored tree
    knobs = {"model": "mlp", "model_params": MLP, "checkpoint_every": k, "warmup_steps": 10}
    runs = {}
    for name in ("whole", "split"):
        _post_stream(make_client(make_settings(redis_prefix=name, **knobs)))
    for name, stops in (("whole", [2 * k]), ("split", [k, 2 * k])):
        for max_steps in stops:  # the split run: a clean stop at step k (a final checkpoint), then a restart
            trainer = make_trainer(redis_prefix=name, data_dir=tmp_path / name, max_steps=max_steps, **knobs)
            assert trainer.run() == 0
            assert trainer.step == max_steps
        runs[name] = _final(tmp_path / name)

    (whole_model, whole), (split_model, split) = runs["whole"], runs["split"]
    assert whole.step == split.step == 2 * k
    assert whole_model.keys() == split_model.keys()
    for name, tensor in whole_model.items():
        assert torch.equal(tensor, split_model[name]), f"model tensor {name} differs after resume"
    for col in (
        "ordinal",
        "weight",
        "bilevel_score_sum",
        "bilevel_evidence",
        "visits",
        "alive",
        "sampling",
        "fresh",
    ):
        np.testing.assert_array_equal(whole.table_arrays[col], split.table_arrays[col], err_msg=col)
    assert whole.info["weighting"] == split.info["weighting"]
    assert whole.info["val_loss"] == split.info["val_loss"] and whole.info["val_loss"] is not None
    assert whole.info["rng"] == split.info["rng"]
    for a, b in zip(whole.g_val or [], split.g_val or [], strict=True):
        np.testing.assert_array_equal(a, b)
    for (ka, a), (kb, b) in zip(
        sorted(whole.optimizer["state"].items()), sorted(split.optimizer["state"].items()), strict=True
    ):
        assert ka == kb and all(torch.equal(a[f], b[f]) for f in a), f"optimizer state {ka} differs"
    # and the resumed half really did reweight: samples were scored after the restart
    assert split.validation and int(split.table_arrays["visits"].sum()) > 0


def test_a_trainer_stopped_with_sigterm_keeps_scoring_after_a_restart(
    redis_url: str, tmp_path: Path, make_settings: Callable[..., Any], make_client: Callable[..., TestClient]
) -> None:
    """The field report: a restarted trainer said ``val_loss nan`` forever and never scored again."""
    data_dir = tmp_path / "data"
    api = make_client(make_settings(model="mlp", model_params=MLP))
    _post_stream(api)
    log = tmp_path / "trainer.log"
    proc = start_trainer(redis_url, data_dir, log)
    try:
        wait_for(lambda: published_checkpoints(api), 120, "a checkpoint", log)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        stop_process_group(proc)
    before = api.get("/v1/checkpoints/latest").json()
    scored_before = int(load_state(data_dir, before["version"]).table_arrays["visits"].sum())  # type: ignore[union-attr]
    proc = start_trainer(redis_url, data_dir, log, max_steps=str(before["step"] + 50))
    try:
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        stop_process_group(proc)
    after = api.get("/v1/checkpoints/latest").json()
    assert after["step"] == before["step"] + 50
    assert after["metrics"]["val_loss"] is not None, "the resumed trainer lost its validation set"
    scored_after = int(load_state(data_dir, after["version"]).table_arrays["visits"].sum())  # type: ignore[union-attr]
    assert scored_after > scored_before, "no sample was scored after the restart"

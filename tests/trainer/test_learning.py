"""The learning loop's behaviour on a stream where one source is right and another's labels are random."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.trainer.conftest import MLP, blobs, roc_auc
from trainer.loop import Trainer
from trainer.models.base import to_device

STEPS = 400
CLEAN = blobs(1500, 1, source="clean", noisy=False, prefix="c")
NOISY = blobs(1500, 2, source="noisy", noisy=True, prefix="n")
MIXED = [s for pair in zip(CLEAN, NOISY, strict=True) for s in pair]
VALIDATION = blobs(64, 3, source="val", noisy=False, prefix="v")
HELD_OUT = blobs(500, 4, source="test", noisy=False, prefix="t")


@pytest.fixture
def post_stream(
    make_settings: Callable[..., Any], make_client: Callable[..., TestClient]
) -> Callable[[str], TestClient]:
    """``post_stream(prefix)``: the mixed stream and the validation set posted through the API into the
    deployment ``prefix``; returns that API's client."""

    def post(prefix: str) -> TestClient:
        api = make_client(make_settings(model="mlp", model_params=MLP, redis_prefix=prefix))
        for i in range(0, len(MIXED), 1000):
            assert api.post("/v1/samples", json={"samples": MIXED[i : i + 1000]}).status_code == 202
        assert api.put("/v1/validation", json={"samples": VALIDATION}).status_code == 200
        return api

    return post


def held_out_loss(trainer: Trainer) -> float:
    trainer.learner.model.eval()
    with torch.no_grad():
        batch = to_device(trainer.learner.model.collate(HELD_OUT), trainer.learner.device)
        return float(trainer.learner.model.per_sample_loss(batch).mean())


def test_noisy_source_weight_drops_below_half_the_clean_source(
    post_stream: Callable[[str], TestClient], make_trainer: Callable[..., Trainer]
) -> None:
    api = post_stream("dd")
    assert make_trainer(max_steps=STEPS).run() == 0
    sources = api.get("/v1/weights").json()["sources"]
    assert sources["noisy"] < 0.5 * sources["clean"], sources
    assert sum(sources.values()) == pytest.approx(1.0)
    assert min(sources.values()) > 0  # no source collapses to exactly zero


def test_per_sample_weights_separate_corrupted_from_clean(
    post_stream: Callable[[str], TestClient], make_trainer: Callable[..., Trainer]
) -> None:
    api = post_stream("dd")
    make_trainer(max_steps=STEPS).run()
    ids = [s["id"] for s in MIXED]
    weights: dict[str, float] = {}
    for i in range(0, len(ids), 500):
        weights.update(
            api.get("/v1/weights/samples", params={"ids": ",".join(ids[i : i + 500])}).json()["weights"]
        )
    assert len(weights) == len(ids)
    w = np.array([weights[i] for i in ids])
    clean = np.array([not s["meta"]["corrupted"] for s in MIXED])
    auc = roc_auc(clean, w)
    assert auc >= 0.9
    assert w.mean() == pytest.approx(1.0, rel=1e-3)  # the live buffer's weights average 1


def test_reweighted_model_beats_uniform_on_held_out_clean_data(
    post_stream: Callable[[str], TestClient], make_trainer: Callable[..., Trainer], tmp_path: Path
) -> None:
    losses = {}
    for method in ("uniform", "bilevel"):
        post_stream(method)
        trainer = make_trainer(
            max_steps=STEPS, reweight=method, redis_prefix=method, data_dir=tmp_path / method
        )
        trainer.run()
        losses[method] = held_out_loss(trainer)
    assert losses["bilevel"] < losses["uniform"], losses


def test_identical_content_under_different_ids_shares_one_weight(
    make_settings: Callable[..., Any],
    make_client: Callable[..., TestClient],
    make_trainer: Callable[..., Trainer],
) -> None:
    api = make_client(make_settings(model="mlp", model_params=MLP))
    copies = [{**CLEAN[0], "id": f"copy-{i}"} for i in range(200)]
    assert api.post("/v1/samples", json={"samples": CLEAN[1:1000] + copies}).status_code == 202
    assert api.put("/v1/validation", json={"samples": VALIDATION}).status_code == 200
    make_trainer(max_steps=200).run()
    got = api.get("/v1/weights/samples", params={"ids": ",".join(c["id"] for c in copies)}).json()["weights"]
    others = api.get("/v1/weights/samples", params={"ids": ",".join(s["id"] for s in CLEAN[1:400])}).json()
    copy_weights = np.array(list(got.values()))
    assert len(copy_weights) == 200 and np.ptp(copy_weights) < 1e-6  # one weight, split among the copies
    # all 200 copies together weigh about what one sample does, not 200 times as much
    assert copy_weights.sum() < 3 * np.median(list(others["weights"].values()))


def test_a_new_validation_set_is_picked_up_within_a_few_steps(
    post_stream: Callable[[str], TestClient], make_trainer: Callable[..., Trainer]
) -> None:
    api = post_stream("dd")
    trainer = make_trainer(max_steps=30)
    trainer.run()
    first = trainer.validation.version
    version = api.put("/v1/validation", json={"samples": HELD_OUT[:50]}).json()["version"]
    assert version > first
    trainer.settings.max_steps = 30 + trainer.settings.validation_check_every + 1
    trainer.run()
    assert trainer.validation.version == version
    assert [s["id"] for s in trainer.validation.samples] == [s["id"] for s in HELD_OUT[:50]]

"""The trainer's CUDA path: ghost scores on the GPU, under bf16 autocast, and real runs on it.

Skipped where torch sees no GPU (CI has none); ``bench/gpu_check.sh`` runs this file on a GPU machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from store.meta import latest_checkpoint
from tests.trainer.conftest import MLP
from tests.trainer.test_hypergrad import TINY_GPT, _ghost, _model, _text_samples
from tests.trainer.test_learning import HELD_OUT, MIXED, STEPS, VALIDATION
from trainer import load_checkpoint
from trainer.hypergrad import reference_scores, val_grad
from trainer.loop import Trainer
from trainer.models import TrainModel
from trainer.models.base import Batch, to_device
from trainer.publish import status

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
KINDS = ["tiny-gpt", "mlp"]


def _on_cuda(kind: str) -> tuple[TrainModel, Batch, list[torch.Tensor], torch.Tensor]:
    """(float32 model on the GPU, its training batch there, G_val there, non-uniform coef summing to 1)."""
    model, train, val = _model(kind, torch.float32)
    model.to(CUDA)
    batch = to_device(model.collate(train), CUDA)
    _, g_val = val_grad(model, to_device(model.collate(val), CUDA))
    coef = torch.rand(len(train), generator=torch.Generator().manual_seed(3)) + 0.05
    return model, batch, g_val, (coef / coef.sum()).to(CUDA)


def _assert_dots_close(dots: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """Per-sample dots agree to ``rel`` of their largest magnitude (single dots can be near 0)."""
    torch.testing.assert_close(dots, ref, rtol=rel, atol=rel * ref.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
def test_ghost_scores_on_cuda_match_per_sample_autograd(kind: str) -> None:
    model, batch, g_val, coef = _on_cuda(kind)
    dots, norms = _ghost(model, batch, coef, g_val)
    assert dots.is_cuda and norms.is_cuda and dots.dtype == torch.float32
    ref_dots, ref_norms = reference_scores(model, batch, g_val)
    assert (ref_dots.abs() > 0).all() and (ref_norms > 0).all()
    _assert_dots_close(dots, ref_dots, 1e-4)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=0.0)

    # and both are the float64 truth, computed on the CPU (float32 matmuls on the GPU, not TF32)
    exact, train, _ = _model(kind, torch.float64)  # the same weights and samples
    exact_dots, exact_norms = reference_scores(exact, exact.collate(train), [g.cpu().double() for g in g_val])
    _assert_dots_close(dots.cpu().double(), exact_dots, 1e-4)
    torch.testing.assert_close(norms.cpu().double(), exact_norms, rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_ghost_scores_under_cuda_bf16_autocast_match_per_sample_autograd(kind: str) -> None:
    model, batch, g_val, coef = _on_cuda(kind)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        dots, norms = _ghost(model, batch, coef, g_val)
        ref_dots, ref_norms = reference_scores(model, batch, g_val)  # the same bf16 forward, per sample
    ref32_dots, ref32_norms = reference_scores(model, batch, g_val)
    assert dots.dtype == torch.float32 and torch.isfinite(dots).all() and torch.isfinite(norms).all()
    # bf16 keeps 8 significant bits: a few per cent, against the same bf16 model and against float32
    _assert_dots_close(dots, ref_dots, 0.03)
    torch.testing.assert_close(norms, ref_norms, rtol=0.03, atol=0.0)
    _assert_dots_close(dots, ref32_dots, 0.05)
    torch.testing.assert_close(norms, ref32_norms, rtol=0.05, atol=0.0)
    assert torch.nn.functional.cosine_similarity(dots, ref32_dots, dim=0) > 0.99


def _text_stream(n: int, seed: int, source: str) -> list[dict[str, Any]]:
    return [{**s, "source": source} for s in _text_samples(n, seed)]


def _post(api: TestClient, stream: list[dict[str, Any]], validation: list[dict[str, Any]]) -> TestClient:
    """``stream`` and the validation set through the real API into its Redis; returns ``api``."""
    for i in range(0, len(stream), 1000):
        assert api.post("/v1/samples", json={"samples": stream[i : i + 1000]}).status_code == 202
    assert api.put("/v1/validation", json={"samples": validation}).status_code == 200
    return api


Samples = list[dict[str, Any]]
# kind: (model params, stream, validation set, held-out samples)
STREAMS: dict[str, tuple[dict[str, Any], Samples, Samples, Samples]] = {
    "mlp": (MLP, MIXED[:1000], VALIDATION, HELD_OUT),
    "tiny-gpt": (TINY_GPT, _text_stream(400, 11, "a"), _text_stream(32, 12, "v"), _text_stream(64, 13, "t")),
}


@pytest.mark.parametrize("kind", KINDS)
def test_cuda_run_writes_checkpoints_that_load_on_cpu_and_resume_there(
    kind: str,
    make_settings: Callable[..., Any],
    make_client: Callable[..., TestClient],
    make_trainer: Callable[..., Trainer],
) -> None:
    params, stream, validation, held_out = STREAMS[kind]
    _post(make_client(make_settings(model=kind, model_params=params)), stream, validation)

    steps = 100
    trainer = make_trainer(model=kind, model_params=params, max_steps=steps, checkpoint_every=50)
    assert (
        trainer.learner.device.type == "cuda" and trainer.learner.autocast
    )  # device=auto picks the GPU, bf16 autocast
    assert trainer.run() == 0
    assert (
        trainer.step == steps and trainer.learner.scorings > 0 and math.isfinite(trainer.learner.train_loss)
    )
    assert all(p.is_cuda for p in trainer.learner.model.parameters())
    assert status(trainer)["device"] == "cuda"
    with Session(trainer.engine) as session:
        row = latest_checkpoint(session)
    assert row is not None and row.version == 2 and row.step == steps
    assert math.isfinite(row.metrics["val_loss"])

    loaded = load_checkpoint(row.path, sha256=row.sha256)
    assert loaded.step == steps and all(p.device.type == "cpu" for p in loaded.module.parameters())
    # the CPU copy computes what the GPU model computes (float32 both, no autocast)
    trainer.learner.model.eval()
    with torch.no_grad():
        gpu = trainer.learner.model.per_sample_loss(
            to_device(trainer.learner.model.collate(held_out), CUDA)
        ).cpu()
    torch.testing.assert_close(torch.tensor(loaded.loss(held_out)), gpu, rtol=1e-4, atol=1e-5)
    inputs = [s["input"] for s in held_out]
    answers = loaded.predict(inputs)
    assert len(answers) == len(inputs)
    if kind == "mlp":  # trained on the GPU: far above chance (1/4) on clean held-out blobs
        assert sum(a == s["target"] for a, s in zip(answers, held_out, strict=True)) / len(held_out) > 0.6
        assert answers == trainer.learner.model.predict(inputs)
    else:
        assert all(isinstance(a, str) for a in answers)

    # a CPU trainer resumes from the GPU's checkpoint: model, optimizer, weight table, G_val
    cpu = make_trainer(model=kind, model_params=params, max_steps=steps + 10, device="cpu")
    assert cpu.run() == 0
    assert cpu.step == steps + 10 and cpu.table.live == trainer.table.live
    assert math.isfinite(cpu.learner.train_loss)
    assert cpu.validation.g_val is not None and all(g.device.type == "cpu" for g in cpu.validation.g_val)


def test_noisy_source_weight_drops_below_half_the_clean_source_on_cuda(
    make_settings: Callable[..., Any],
    make_client: Callable[..., TestClient],
    make_trainer: Callable[..., Trainer],
) -> None:
    api = _post(make_client(make_settings(model="mlp", model_params=MLP)), MIXED, VALIDATION)
    trainer = make_trainer(max_steps=STEPS)
    assert trainer.learner.device.type == "cuda"
    assert trainer.run() == 0
    sources = api.get("/v1/weights").json()["sources"]
    assert sources["noisy"] < 0.5 * sources["clean"], sources

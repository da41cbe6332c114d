import random
import string

import pytest
import torch

from trainer.hypergrad import GhostScorer, layer_scores, reference_scores, scored_parameters, val_grad
from trainer.models import TrainModel, build_model

TINY_GPT = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}
MLP = {"n_features": 12, "n_classes": 5, "hidden": [16, 8]}


def _text_samples(n: int, seed: int) -> list[dict]:
    """Mixed lengths: short, long (input truncated from the left) and cut-short targets, so the batch pads."""
    rnd = random.Random(seed)

    def word(lo: int, hi: int) -> str:
        return "".join(rnd.choice(string.ascii_letters + "+= ") for _ in range(rnd.randint(lo, hi)))

    return [{"input": word(1, 40), "target": word(1, 30)} for _ in range(n)]


def _vector_samples(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, MLP["n_features"], generator=g)
    y = torch.randint(0, MLP["n_classes"], (n,), generator=g)
    return [{"input": xi.tolist(), "target": int(yi)} for xi, yi in zip(x, y, strict=True)]


def _model(kind: str, dtype: torch.dtype) -> tuple[TrainModel, list[dict], list[dict]]:
    torch.manual_seed(0)
    if kind == "tiny-gpt":
        return build_model(kind, TINY_GPT).to(dtype), _text_samples(9, 1), _text_samples(5, 2)
    return build_model(kind, MLP).to(dtype), _vector_samples(9, 1), _vector_samples(5, 2)


def _ghost(
    model: TrainModel, batch: dict, coef: torch.Tensor, g_val: list
) -> tuple[torch.Tensor, torch.Tensor]:
    scorer = GhostScorer(model.scored_modules())
    model.zero_grad(set_to_none=True)
    with scorer.capture():
        losses = model.per_sample_loss(batch)
        (coef * losses).sum().backward()
    return scorer.scores(coef, g_val)


@pytest.mark.parametrize("dead", [0.0, 0.3, 0.95])
@pytest.mark.parametrize("T", [1, 7])
def test_layer_scores_match_explicit_per_sample_gradients(dead: float, T: int) -> None:
    """All positions live, or dead ones dropped and packed, vs grad W_i = sum_t g_it a_it^T."""
    g = torch.Generator().manual_seed(4)
    B, d_in, d_out = 5, 6, 4
    a = torch.randn(B, T, d_in, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, T, d_out, generator=g, dtype=torch.float64)
    grad_out[torch.rand(B, T, generator=g) < dead] = 0.0
    G_W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    G_b = torch.randn(d_out, generator=g, dtype=torch.float64)
    per_W = torch.einsum("bto,bti->boi", grad_out, a)  # (B, d_out, d_in)
    per_b = grad_out.sum(dim=1)  # (B, d_out)
    dot, sq = layer_scores(a, grad_out, G_W, G_b)
    torch.testing.assert_close(dot, (per_W * G_W).sum(dim=(1, 2)) + per_b @ G_b)
    torch.testing.assert_close(sq, per_W.square().sum(dim=(1, 2)) + per_b.square().sum(dim=1))


@pytest.mark.parametrize("kind", ["tiny-gpt", "mlp"])
def test_ghost_scores_match_autograd(kind: str) -> None:
    model, train, val = _model(kind, torch.float64)
    batch = model.collate(train)
    if kind == "tiny-gpt":
        assert (batch["idx"] == 258).any(), "the batch should contain padding"
    _, g_val = val_grad(model, model.collate(val))
    coef = torch.rand(len(train), dtype=torch.float64) + 0.05
    coef = coef / coef.sum()  # w_i / sum_j w_j, non-uniform

    dots, norms = _ghost(model, batch, coef, g_val)
    ref_dots, ref_norms = reference_scores(model, batch, g_val)

    torch.testing.assert_close(dots, ref_dots, rtol=1e-4, atol=1e-4 * ref_dots.abs().max().item())
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=0.0)
    assert (ref_dots.abs() > 0).all() and (ref_norms > 0).all()


def test_ghost_scores_match_autograd_for_tiny_gpt_in_float32() -> None:
    model, train, val = _model("tiny-gpt", torch.float32)
    batch = model.collate(train)
    _, g_val = val_grad(model, model.collate(val))
    coef = torch.full((len(train),), 1.0 / len(train))
    dots, norms = _ghost(model, batch, coef, g_val)
    ref_dots, ref_norms = reference_scores(model, batch, g_val)
    torch.testing.assert_close(dots, ref_dots, rtol=1e-4, atol=1e-4 * ref_dots.abs().max().item())
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=0.0)


def test_padding_does_not_change_loss_or_scores_of_tiny_gpt() -> None:
    model, train, val = _model("tiny-gpt", torch.float64)
    _, g_val = val_grad(model, model.collate(val))
    batch = model.collate(train)
    padded = model.per_sample_loss(batch)
    alone = torch.cat([model.per_sample_loss(model.collate([s])) for s in train])
    torch.testing.assert_close(padded, alone, rtol=1e-10, atol=0.0)

    coef = torch.full((len(train),), 1.0 / len(train), dtype=torch.float64)
    dots, norms = _ghost(model, batch, coef, g_val)
    one = torch.ones(1, dtype=torch.float64)
    singles = [_ghost(model, model.collate([s]), one, g_val) for s in train]
    torch.testing.assert_close(dots, torch.cat([d for d, _ in singles]), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(norms, torch.cat([n for _, n in singles]), rtol=1e-8, atol=0.0)


def test_flat_grads_are_the_weighted_batch_gradient_and_val_grad_leaves_grad_untouched() -> None:
    model, train, val = _model("mlp", torch.float64)
    scorer = GhostScorer(model.scored_modules())
    model.zero_grad(set_to_none=True)
    val_grad(model, model.collate(val))
    assert all(p.grad is None for p in model.parameters())

    batch = model.collate(train)
    coef = torch.rand(len(train), dtype=torch.float64) + 0.1
    with scorer.capture():
        (coef * model.per_sample_loss(batch)).sum().backward()
    grads = scorer.flat_grads()
    # sum_i c_i grad loss_i is the weighted batch gradient, so <flat_grads, G> = sum_i c_i dots_i
    g_val = [torch.randn_like(p) for p in scored_parameters(model.scored_modules())]
    dots, _ = scorer.scores(coef, g_val)
    expected = sum((g * G).sum() for g, G in zip(grads, g_val, strict=True))
    torch.testing.assert_close((coef * dots).sum(), expected)


def test_scores_free_hook_memory_and_hooks_are_removed_after_capture() -> None:
    model, train, _ = _model("mlp", torch.float32)
    scorer = GhostScorer(model.scored_modules())
    coef = torch.full((len(train),), 1.0 / len(train))
    g_val = [torch.zeros_like(p) for p in scorer.params]
    with scorer.capture():
        (coef * model.per_sample_loss(model.collate(train))).sum().backward()
    scorer.scores(coef, g_val)
    assert not any(scorer._inputs) and not any(scorer._grads)
    model.per_sample_loss(model.collate(train)).sum().backward()  # outside capture: nothing recorded
    assert not any(scorer._inputs)
    with pytest.raises(RuntimeError):
        scorer.scores(coef, g_val)


def test_zero_coefficient_is_rejected() -> None:
    model, train, val = _model("mlp", torch.float32)
    _, g_val = val_grad(model, model.collate(val))
    coef = torch.full((len(train),), 1.0 / len(train))
    coef[0] = 0.0
    with pytest.raises(ValueError, match="coef"):
        _ghost(model, model.collate(train), coef, g_val)


def test_ghost_scores_under_bf16_autocast_track_float32_scores() -> None:
    model, train, val = _model("tiny-gpt", torch.float32)
    batch = model.collate(train)
    _, g_val = val_grad(model, model.collate(val))
    coef = torch.full((len(train),), 1.0 / len(train))
    dots, norms = _ghost(model, batch, coef, g_val)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dots16, norms16 = _ghost(model, batch, coef, g_val)
    assert dots16.dtype == torch.float32 and torch.isfinite(dots16).all()
    cos = torch.nn.functional.cosine_similarity(dots, dots16, dim=0)
    assert cos > 0.99
    torch.testing.assert_close(norms16, norms, rtol=0.02, atol=0.0)

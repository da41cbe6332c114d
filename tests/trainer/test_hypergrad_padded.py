"""The scores' accelerator path (``layer_scores(pack=False)``: padded shapes, no host sync) on the CPU,
where CI runs: the same numbers as the packed CPU path and as explicit per-sample gradients."""

import pytest
import torch

from trainer.hypergrad import layer_scores


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dead", [0.0, 0.3, 0.95])
@pytest.mark.parametrize("T", [1, 7])
def test_layer_scores_on_padded_shapes_match_packed_and_explicit_gradients(
    dead: float, T: int, bias: bool
) -> None:
    g = torch.Generator().manual_seed(5)
    B, d_in, d_out = 6, 5, 3
    a = torch.randn(B, T, d_in, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, T, d_out, generator=g, dtype=torch.float64)
    grad_out[torch.rand(B, T, generator=g) < dead] = 0.0
    grad_out[0, -1] = 1.0  # one position live at the end: packing keeps the longest count
    G_W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    G_b = torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None
    per_W = torch.einsum("bto,bti->boi", grad_out, a)  # (B, d_out, d_in)
    per_b = grad_out.sum(dim=1)  # (B, d_out)
    want_dot = (per_W * G_W).sum(dim=(1, 2)) + (per_b @ G_b if bias else 0.0)
    want_sq = per_W.square().sum(dim=(1, 2)) + (per_b.square().sum(dim=1) if bias else 0.0)

    for pack in (False, True):
        dot, sq = layer_scores(a, grad_out, G_W, G_b, pack=pack)
        torch.testing.assert_close(dot, want_dot)
        torch.testing.assert_close(sq, want_sq)


def test_layer_scores_compute_in_float32_from_bf16_activations_inside_autocast() -> None:
    g = torch.Generator().manual_seed(6)
    a = torch.randn(4, 5, 8, generator=g).bfloat16()
    grad_out = torch.randn(4, 5, 6, generator=g).bfloat16()
    G_W, G_b = torch.randn(6, 8, generator=g), torch.randn(6, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dot, sq = layer_scores(a, grad_out, G_W, G_b, pack=False)
    assert dot.dtype == sq.dtype == torch.float32

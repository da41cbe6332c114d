"""Ghost scores on the layers Hugging Face models contain, pinned to per-sample autograd: GPT-2's Conv1D,
PEFT LoRA adapters (by Gram and by direct per-sample gradients), and a tied output head."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from tests.hf_tiny import GPT2, LLAMA, save_tokenizer
from trainer.hypergrad import (
    GhostScorer,
    TiedEmbedding,
    is_conv1d,
    layer_scores,
    reference_scores,
    score_method,
    scored_parameters,
    tied_scores,
    val_grad,
)
from trainer.models import build_model
from trainer.models.hf_causal_lm import HFCausalLM

ARCH = {"llama": LLAMA, "gpt2": GPT2}
TRAIN = [
    {
        "input": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3="}],
        "target": "5",
    },
    {"input": "say hi to the nice people", "target": "hi there"},
    {
        "input": [{"role": "user", "content": "weather?"}],
        "target": '{"name": "get_weather", "arguments": {}}',
    },
    {"input": "x", "target": "a reply that is rather longer than the others"},
]
VAL = [{"input": "2+2=", "target": "4"}, {"input": [{"role": "user", "content": "hello"}], "target": "hi"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tokenizer(tmp_path_factory.mktemp("tok"))


def _model(tokenizer: str, arch: str, lora: dict[str, Any] | None) -> HFCausalLM:
    torch.manual_seed(0)
    model = build_model(
        "hf-causal-lm", {"config": ARCH[arch], "tokenizer": tokenizer, "lora": lora, "max_length": 96}
    )
    assert isinstance(model, HFCausalLM)
    model.double().eval()
    if lora is not None:  # PEFT starts lora_B at zero; move it so both adapters carry gradient
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    return model


def _ghost(
    model: HFCausalLM, batch: dict, coef: torch.Tensor, g_val: list
) -> tuple[torch.Tensor, torch.Tensor]:
    scorer = GhostScorer(model.scored_modules())
    model.zero_grad(set_to_none=True)
    with scorer.capture():
        (coef * model.per_sample_loss(batch)).sum().backward()
    return scorer.scores(coef, g_val)


CASES = [
    ("llama", None),  # nn.Linear, untied head
    ("llama", {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    ("gpt2", None),  # Conv1D and a tied head
    ("gpt2", {"r": 4, "alpha": 8}),  # LoRA on Conv1D (c_attn, PEFT's default for GPT-2)
]


@pytest.mark.parametrize(("arch", "lora"), CASES, ids=["llama", "llama-lora", "gpt2", "gpt2-lora"])
def test_ghost_scores_match_per_sample_autograd(tokenizer: str, arch: str, lora: dict | None) -> None:
    model = _model(tokenizer, arch, lora)
    batch = model.collate(TRAIN)
    assert (batch["attention_mask"] == 0).any(), "the batch should pad"
    _, g_val = val_grad(model, model.collate(VAL))
    coef = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    dots, norms = _ghost(model, batch, coef, g_val)
    ref_dots, ref_norms = reference_scores(model, batch, g_val)
    assert ref_norms.min() > 0
    torch.testing.assert_close(dots, ref_dots, rtol=1e-6, atol=1e-8 * ref_dots.abs().max().item())
    torch.testing.assert_close(norms, ref_norms, rtol=1e-6, atol=0)


def test_lora_scores_cover_only_the_adapters(tokenizer: str) -> None:
    model = _model(tokenizer, "llama", {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    names = {id(m): n for n, m in model.named_modules()}
    scored = [names[id(m)] for m in model.scored_modules()]
    assert len(scored) == 2 * 2 * 2 and all(".lora_A." in n or ".lora_B." in n for n in scored)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in scored_parameters(model.scored_modules())} == trainable


def test_gpt2_scores_its_conv1d_layers_and_the_tied_head_as_one_matrix(tokenizer: str) -> None:
    model = _model(tokenizer, "gpt2", None)
    modules = model.scored_modules()
    assert sum(is_conv1d(m) for m in modules) == 2 * 4  # c_attn, c_proj, c_fc, mlp c_proj per block
    tied = [m for m in modules if isinstance(m, TiedEmbedding)]
    assert len(tied) == 1 and tied[0].weight is model.net.get_input_embeddings().weight


def test_scoring_the_tied_head_as_a_plain_linear_would_miss_the_embedding_part(tokenizer: str) -> None:
    """Why TiedEmbedding exists: the head's own per-sample gradient is not the shared matrix's."""
    model = _model(tokenizer, "gpt2", None)
    head = model.net.get_output_embeddings()
    batch = model.collate(TRAIN)
    _, g_val = val_grad(model, model.collate(VAL))
    coef = torch.full((len(TRAIN),), 0.25, dtype=torch.float64)
    head_only = GhostScorer([head])
    model.zero_grad(set_to_none=True)
    with head_only.capture():
        (coef * model.per_sample_loss(batch)).sum().backward()
    g_head = next(
        g for p, g in zip(scored_parameters(model.scored_modules()), g_val, strict=True) if p is head.weight
    )
    _, norms = head_only.scores(coef, [g_head])
    losses = model.per_sample_loss(batch)
    ref_norms = torch.stack(
        [torch.autograd.grad(losses[i], head.weight, retain_graph=True)[0].norm() for i in range(len(TRAIN))]
    )
    assert not torch.allclose(norms, ref_norms, rtol=1e-2)  # the head's part alone is not the shared matrix's


@pytest.mark.parametrize("method", ["gram", "direct"])
@pytest.mark.parametrize(("d_in", "d_out", "bias"), [(24, 3, False), (3, 24, False), (6, 5, True)])
def test_layer_scores_by_gram_and_by_direct_gradients_match_explicit_ones(
    method: str, d_in: int, d_out: int, bias: bool
) -> None:
    """A LoRA adapter's shapes (d -> r, r -> d) and a plain Linear's, with padding (dead positions)."""
    g = torch.Generator().manual_seed(5)
    B, T = 4, 9
    a = torch.randn(B, T, d_in, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, T, d_out, generator=g, dtype=torch.float64)
    grad_out[torch.rand(B, T, generator=g) < 0.3] = 0.0
    G_W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    G_b = torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None
    per_W = torch.einsum("bto,bti->boi", grad_out, a)  # (B, d_out, d_in)
    want_dot = (per_W * G_W).sum(dim=(1, 2))
    want_sq = per_W.square().sum(dim=(1, 2))
    if G_b is not None:
        want_dot = want_dot + grad_out.sum(dim=1) @ G_b
        want_sq = want_sq + grad_out.sum(dim=1).square().sum(dim=1)
    for pack in (False, True):
        dot, sq = layer_scores(a, grad_out, G_W, G_b, pack=pack, method=method)  # type: ignore[arg-type]
        torch.testing.assert_close(dot, want_dot)
        torch.testing.assert_close(sq, want_sq)


def test_the_cheaper_method_is_chosen_per_layer() -> None:
    assert score_method(B=64, T=512, d_in=576, d_out=8) == "direct"  # lora_A of SmolLM2 on long sequences
    assert score_method(B=64, T=512, d_in=8, d_out=576) == "direct"  # its lora_B
    assert score_method(B=64, T=4, d_in=576, d_out=8) == "gram"  # short sequences: the Grams are tiny
    assert score_method(B=64, T=64, d_in=128, d_out=384) == "gram"  # tiny-gpt's attention input
    assert score_method(B=64, T=4096, d_in=4096, d_out=4096) == "gram"  # direct would not fit in memory


def test_tied_scores_match_an_explicit_shared_gradient() -> None:
    """grad W_i = sum_t h_it a_it^T + sum_s onehot(x_is) e_is^T, with repeated tokens in x."""
    g = torch.Generator().manual_seed(6)
    B, S, T, V, d = 3, 7, 5, 11, 4
    x = torch.randint(0, 4, (B, S), generator=g)  # few distinct ids: repeats
    e = torch.randn(B, S, d, generator=g, dtype=torch.float64)
    a = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    h = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    G = torch.randn(V, d, generator=g, dtype=torch.float64)
    per_W = torch.einsum("btv,btd->bvd", h, a) + torch.einsum(
        "bsv,bsd->bvd", torch.nn.functional.one_hot(x, V).double(), e
    )  # (B, V, d)
    scores = tied_scores((x, e), (a, h), G, None)
    assert scores is not None
    torch.testing.assert_close(scores[0], (per_W * G).sum(dim=(1, 2)))
    torch.testing.assert_close(scores[1], per_W.square().sum(dim=(1, 2)))


def test_lora_over_a_bfloat16_base_keeps_float32_adapters_and_scores_them_exactly(tokenizer: str) -> None:
    """What the trainer runs on CUDA ("dtype": "auto" with LoRA): a bf16 frozen base, float32 adapters."""
    torch.manual_seed(0)
    config = {
        "config": LLAMA,
        "tokenizer": tokenizer,
        "lora": {"r": 4},
        "dtype": "bfloat16",
        "max_length": 96,
    }
    model = build_model("hf-causal-lm", config)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()
    batch = model.collate(TRAIN)
    _, g_val = val_grad(model, model.collate(VAL))
    coef = torch.full((len(TRAIN),), 0.25)
    dots, norms = _ghost(model, batch, coef, g_val)  # type: ignore[arg-type]
    ref_dots, ref_norms = reference_scores(model, batch, g_val)
    torch.testing.assert_close(dots, ref_dots, rtol=1e-4, atol=1e-5 * ref_dots.abs().max().item())
    torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=0)

import json
from typing import Any

import pytest
import torch

from trainer.models import (
    TrainModel,
    UnknownModelKind,
    build_model,
    input_kind_of,
    known_kinds,
    register,
)
from trainer.models.mlp import MLP
from trainer.models.tiny_gpt import EOS, IGNORE, SEP


@register("test-linear", input_kind="vector")
def build_linear(config: dict[str, Any]) -> TrainModel:
    """A user kind living outside trainer/: a one-layer classifier."""
    return MLP({"n_features": 3, "n_classes": 2, "hidden": [], **config})


def not_registered(config: dict[str, Any]) -> TrainModel:
    return MLP(config)


def _overfit(model: TrainModel, samples: list[dict], steps: int, lr: float) -> float:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batch = model.collate(samples)
    for _ in range(steps):
        loss = model.per_sample_loss(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def test_registry_knows_builtin_kinds_and_their_input_kinds() -> None:
    assert {"tiny-gpt", "mlp"} <= set(known_kinds())
    assert input_kind_of("tiny-gpt") == "text"
    assert input_kind_of("mlp") == "vector"
    assert build_model("tiny-gpt", {}).input_kind == "text"


def test_unknown_kind_error_lists_known_kinds() -> None:
    with pytest.raises(UnknownModelKind, match=r"known kinds: .*mlp.*tiny-gpt"):
        build_model("transformer-xl", {})


def test_kind_can_be_a_registered_factory_in_a_user_module() -> None:
    kind = f"{__name__}:build_linear"
    model = build_model(kind, {"n_classes": 4})
    assert model.kind == kind  # the import path is what rebuilds it in another process
    assert model.config["n_classes"] == 4
    assert input_kind_of(kind) == "vector"
    assert build_model("test-linear", {}).kind == "test-linear"


def test_module_path_to_an_unregistered_callable_is_rejected() -> None:
    with pytest.raises(UnknownModelKind, match="not a factory registered"):
        build_model(f"{__name__}:not_registered", {})
    with pytest.raises(UnknownModelKind, match="cannot import"):
        build_model("no_such_module_here:factory", {})
    with pytest.raises(UnknownModelKind):
        build_model("os:system", {})


def test_registering_a_taken_name_to_another_factory_fails() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register("mlp")(not_registered)


def test_unknown_config_key_is_rejected_with_the_known_keys() -> None:
    with pytest.raises(ValueError, match="n_embd"):
        build_model("tiny-gpt", {"n_embed": 64})
    with pytest.raises(ValueError, match="hidden"):
        build_model("mlp", {"hidden": 128})


@pytest.mark.parametrize("kind", ["tiny-gpt", "mlp"])
def test_resolved_config_round_trips_through_json_to_the_same_architecture(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(kind, {})
    config = json.loads(json.dumps(model.config))
    torch.manual_seed(0)
    again = build_model(kind, config)
    assert again.config == model.config
    for (name, p), (name2, q) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert name == name2 and torch.equal(p, q)


def test_tiny_gpt_keeps_the_end_of_a_long_input_and_cuts_a_long_target_without_eos() -> None:
    model = build_model("tiny-gpt", {"block_size": 16, "max_input": 8, "n_embd": 16, "n_head": 2})
    batch = model.collate(
        [{"input": "0123456789abcdef", "target": "ABCDEFGHIJKLMNOP"}, {"input": "x", "target": "y"}]
    )
    idx, labels = batch["idx"], batch["labels"]
    assert idx.shape == (2, 16)
    assert bytes(idx[0, :8].tolist()) == b"89abcdef" and idx[0, 8] == SEP
    # 9 prompt tokens leave 16 + 1 - 9 = 8 target tokens: all bytes, no EOS
    assert bytes(labels[0, 8:].tolist()) == b"ABCDEFGH"
    assert labels[0, :8].eq(IGNORE).all()
    assert labels[1, :1].eq(IGNORE).all() and labels[1, 1:3].tolist() == [ord("y"), EOS]
    assert labels[1, 3:].eq(IGNORE).all()


def test_tiny_gpt_overfits_and_predict_returns_only_the_targets() -> None:
    samples = [
        {"input": "2+3=", "target": "5"},
        {"input": "7+1=", "target": "8"},
        {"input": "hello", "target": "world"},
        {"input": "a long question that gets truncated from the left: abc?", "target": "yes!"},
        {"input": "é", "target": "ü ok"},
    ]
    torch.manual_seed(0)
    model = build_model("tiny-gpt", {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32})
    loss = _overfit(model, samples, steps=150, lr=3e-3)
    assert loss < 0.05
    assert model.predict([s["input"] for s in samples]) == [s["target"] for s in samples]
    assert model.training  # predict restores the mode it found
    assert model.predict([]) == []


def test_tiny_gpt_predict_stops_at_a_full_block_without_eos() -> None:
    torch.manual_seed(0)
    model = build_model("tiny-gpt", {"n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 8})
    with torch.no_grad():
        model.lm_head.bias[:] = 0.0
        model.lm_head.weight[:] = 0.0
        model.lm_head.bias[ord("z")] = 10.0  # always 'z', never EOS
    assert model.predict(["ab", "abcdef"]) == ["z" * 6, "z" * 2]  # 8 + 1 - len(prompt + SEP)


def test_mlp_overfits_and_predicts_class_labels() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g)
    samples = [{"input": xi.tolist(), "target": i % 3} for i, xi in enumerate(x)]
    torch.manual_seed(0)
    model = build_model("mlp", {"n_features": 6, "n_classes": 3, "hidden": [32]})
    assert _overfit(model, samples, steps=200, lr=1e-2) < 0.05
    assert model.predict([s["input"] for s in samples]) == [s["target"] for s in samples]


def test_mlp_rejects_wrong_length_vectors_and_out_of_range_classes() -> None:
    model = build_model("mlp", {"n_features": 2, "n_classes": 2})
    with pytest.raises(ValueError, match="sample 1 input"):
        model.collate([{"input": [0.0, 1.0], "target": 0}, {"input": [1.0], "target": 1}])
    with pytest.raises(ValueError, match="sample 0 target"):
        model.collate([{"input": [0.0, 1.0], "target": 2}])

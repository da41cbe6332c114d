"""The quality benchmark's plots (PNG, matplotlib's Agg backend): validation loss against steps per method,
weights of clean against corrupted samples, and source weights over time."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from bench.quality_run import RunResult


def plot_all(results: list[RunResult], out: Path, prefix: str = "quality") -> list[Path]:
    by_scenario: dict[str, list[RunResult]] = defaultdict(list)
    for r in results:
        if r.error is None:
            by_scenario[r.spec.plot_name].append(r)
    written = []
    for scenario, runs in by_scenario.items():
        written.append(_val_curves(scenario, runs, out / f"{prefix}-{scenario}-val-loss.png"))
        hist = _weight_histograms(scenario, runs, out / f"{prefix}-{scenario}-weights.png")
        if hist is not None:
            written.append(hist)
        sources = _source_history(scenario, runs, out / f"{prefix}-{scenario}-sources.png")
        if sources is not None:
            written.append(sources)
    return written


def _val_curves(scenario: str, runs: list[RunResult], path: Path) -> Path:
    """Mean over seeds of each method's validation loss at every checkpoint (drift: the new task's)."""
    drift = any(r.curve_v2 for r in runs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods: dict[str, list[RunResult]] = defaultdict(list)
    for r in runs:
        methods[r.spec.method].append(r)
    for method, rs in methods.items():
        if method == "val-only":  # its validation set is its training set: a different curve altogether
            continue
        curves = [dict(r.curve_v2 if drift else r.curve) for r in rs]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if steps:
            ax.plot(steps, [np.mean([c[s] for c in curves]) for s in steps], label=method, marker=".")
    if drift:
        switch = np.mean([r.switched_at for r in runs if r.switched_at is not None])
        ax.axvline(switch, color="grey", linestyle="--", label="validation v2 (mean switch)")
    ax.set_xlabel("step")
    ax.set_ylabel("new task's validation loss" if drift else "validation loss")
    ax.set_yscale("log")
    ax.set_title(f"{scenario}: validation loss (mean over seeds; val-only not shown)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _weight_histograms(scenario: str, runs: list[RunResult], path: Path) -> Path | None:
    """Final per-sample weights of clean against corrupted samples for the rules that keep weights."""
    shown = [
        r
        for r in runs
        if r.spec.method in ("bilevel", "loss")
        and r.weights is not None
        and r.positive is not None
        and r.positive.any()
        and not r.positive.all()
    ]
    seed = min((r.spec.seed for r in shown), default=None)
    shown = [r for r in shown if r.spec.seed == seed]
    if not shown:
        return None
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4), squeeze=False)
    drift = scenario == "drift"
    for ax, r in zip(axes[0], shown, strict=True):
        assert r.weights is not None and r.positive is not None
        top = max(float(np.quantile(r.weights, 0.995)), 1e-3)
        bins = np.linspace(0, top, 41)
        good, bad = ("new task", "old task") if drift else ("clean", "corrupted")
        ax.hist(np.clip(r.weights[r.positive], 0, top), bins=bins, alpha=0.6, label=good)
        ax.hist(np.clip(r.weights[~r.positive], 0, top), bins=bins, alpha=0.6, label=bad)
        ax.set_yscale("log")
        ax.set_xlabel("sample weight (live mean 1)")
        ax.set_title(f"{scenario} / {r.spec.method} / seed {r.spec.seed}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _source_history(scenario: str, runs: list[RunResult], path: Path) -> Path | None:
    """Published source weights against steps, bilevel, first seed."""
    rs = sorted(
        (r for r in runs if r.spec.method == "bilevel" and r.source_history), key=lambda r: r.spec.seed
    )
    if not rs:
        return None
    r = rs[0]
    names = sorted({n for _, src in r.source_history for n in src})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = [s for s, _ in r.source_history]
    for n in names:
        ax.plot(steps, [src.get(n, np.nan) for _, src in r.source_history], label=n)
    if r.switched_at is not None:
        ax.axvline(r.switched_at, color="grey", linestyle="--", label="validation v2")
    ax.set_xlabel("step")
    ax.set_ylabel("source weight (share of training signal)")
    ax.set_title(f"{scenario}: bilevel source weights, seed {r.spec.seed}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

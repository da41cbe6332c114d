"""The quality benchmark's report: the results table, the drift details, one PASS/MISS line per target the
issue sets, and ``quality.md`` / ``quality.json`` with the definitions of every metric."""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.quality_run import PACED_PUBLISH_S, RunResult, RunSpec
from bench.quality_stream import BATCH_SIZE, LEAD_STEPS, rate_label, stream_length


# ---------------------------------------------------------------------------------------------- metrics
def steps_to_reach(curve: list[tuple[int, float]], level: float) -> float:
    """The first checkpoint step whose validation loss is <= level; inf if none."""
    return next((float(step) for step, loss in curve if loss <= level), math.inf)


Key = tuple[str, str, str]  # (scenario, rate label, method)


def convergence(results: list[RunResult]) -> dict[tuple[str, str, str, int], tuple[float, float]]:
    """(steps to reach the uniform run's best validation loss, that / the steps uniform took to reach it)
    for every run with a uniform run of the same scenario, rate and seed (not drift: its task changes);
    keyed (scenario, rate label, method, seed)."""
    uniform = {
        (r.spec.scenario, r.spec.rate_label, r.spec.seed): r
        for r in results
        if r.spec.method == "uniform" and r.curve
    }
    out = {}
    for r in results:
        s = r.spec
        u = uniform.get((s.scenario, s.rate_label, s.seed))
        if u is None or s.scenario == "drift" or not r.curve:
            continue
        best = min(loss for _, loss in u.curve)
        steps = steps_to_reach(r.curve, best)
        out[(s.scenario, s.rate_label, s.method, s.seed)] = (steps, steps / steps_to_reach(u.curve, best))
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (nan, nan without any); inf when any is."""
    if any(math.isinf(v) for v in values):
        return math.inf, math.nan
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def fmt(m: float, s: float | None = None, digits: int = 3) -> str:
    if math.isnan(m):
        return "–"
    if math.isinf(m):
        return "never"
    text = f"{m:.{digits}f}"
    return text if s is None or math.isnan(s) else f"{text} ± {s:.{digits}f}"


def grouped(results: list[RunResult]) -> dict[Key, list[RunResult]]:
    """Runs by (scenario, rate label, method), in the order of ``results``."""
    groups: dict[Key, list[RunResult]] = defaultdict(list)
    for r in results:
        groups[(r.spec.scenario, r.spec.rate_label, r.spec.method)].append(r)
    return groups


def stat(runs: list[RunResult], get: Callable[[RunResult], float]) -> tuple[float, float]:
    return mean_std([get(r) for r in runs if r.error is None])


def render_table(results: list[RunResult]) -> str:
    conv = convergence(results)
    head = (
        "| scenario | rate | method | test acc | AUC sample | AUC content | effective fraction | "
        "steps to uniform's best (ratio) | Spearman | drift recovery (steps) | seeds |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for (scn, rate, method), runs in grouped(results).items():
        ok = [r for r in runs if r.error is None]
        c = [conv.get((scn, rate, method, r.spec.seed), (math.nan, math.nan)) for r in ok]
        steps, ratio = mean_std([x[0] for x in c]), mean_std([x[1] for x in c])
        conv_text = "–" if math.isnan(steps[0]) else f"{fmt(steps[0], None, 0)} ({fmt(ratio[0], None, 2)})"
        lines.append(
            f"| {scn} | {rate} | {method} | {fmt(*stat(ok, lambda r: r.test_acc))} "
            f"| {fmt(*stat(ok, lambda r: r.auc_sample))} | {fmt(*stat(ok, lambda r: r.auc_content))} "
            f"| {fmt(*stat(ok, lambda r: r.effective_fraction), digits=2)} | {conv_text} "
            f"| {fmt(*stat(ok, lambda r: r.spearman), digits=2)} "
            f"| {fmt(*stat(ok, lambda r: r.recovery_steps), digits=0) if scn == 'drift' else '–'} "
            f"| {len(ok)}/{len(runs)} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- targets
def targets(results: list[RunResult]) -> list[str]:
    """One PASS/MISS line per target the issue sets, with the margin: the up-front targets on the runs at
    rate "all", then the stream-rate and flood targets (``rate_targets``)."""
    g = {(s, m): runs for (s, rate, m), runs in grouped(results).items() if rate == "all"}
    conv = {(s, m, seed): v for (s, rate, m, seed), v in convergence(results).items() if rate == "all"}
    out = []

    def acc(scn: str, method: str) -> float:
        return stat(g.get((scn, method), []), lambda r: r.test_acc)[0]

    def line(ok: bool, text: str) -> None:
        out.append(f"{'PASS' if ok else 'MISS'}  {text}")

    for scn in ("noisy", "digits"):
        if (scn, "bilevel") not in g:
            continue
        b = acc(scn, "bilevel")
        o = acc(scn, "oracle")
        if math.isfinite(o):
            line(b >= 0.98 * o, f"{scn}: bilevel test acc {b:.3f} >= 98% of oracle {o:.3f} "
                 f"(= {0.98 * o:.3f}); margin {b - 0.98 * o:+.3f}")  # fmt: skip
        others = {m: acc(scn, m) for s, m in g if s == scn and not m.startswith("bilevel") and m != "oracle"}
        others = {m: v for m, v in others.items() if math.isfinite(v)}
        if others:
            best = max(others, key=lambda m: others[m])
            line(b > others[best], f"{scn}: bilevel test acc {b:.3f} above every other baseline; best other "
                 f"is {best} {others[best]:.3f}; margin {b - others[best]:+.3f}")  # fmt: skip
        auc = stat(g[(scn, "bilevel")], lambda r: r.auc_sample)[0]
        auc_c = stat(g[(scn, "bilevel")], lambda r: r.auc_content)[0]
        auc_u = stat(g[(scn, "bilevel")], lambda r: r.auc_unique)[0]
        unique = f"; without the flood's copies {auc_u:.3f}" if math.isfinite(auc_u) else ""
        line(auc >= 0.95, f"{scn}: bilevel per-sample ROC AUC {auc:.3f} >= 0.95; margin {auc - 0.95:+.3f} "
             f"(per-content AUC {auc_c:.3f}{unique})")  # fmt: skip
    for scn in ("noisy", "redundancy", "misaligned"):
        if (scn, "bilevel") not in g:
            continue
        eff = stat(g[(scn, "bilevel")], lambda r: r.effective_fraction)[0]
        line(eff <= 0.70, f"{scn}: bilevel effective fraction {eff:.2f} <= 0.70; margin {0.70 - eff:+.2f}")
        ratios = [conv[k][1] for k in conv if k[0] == scn and k[1] == "bilevel"]
        if ratios:
            r = mean_std(ratios)[0]
            line(r <= 0.5, f"{scn}: bilevel reaches uniform's best validation loss in {fmt(r, None, 2)} of "
                 f"uniform's steps <= 0.50" + (f"; margin {0.5 - r:+.2f}" if math.isfinite(r) else
                 " (not reached within the run in at least one seed)"))  # fmt: skip
    if ("drift", "bilevel") in g:
        rec = [r.recovery_steps for r in g[("drift", "bilevel")] if r.error is None]
        worst = max(rec) if rec else math.nan
        line(worst <= 200, f"drift: bilevel's new-task validation loss recovers within {fmt(worst, None, 0)} "
             f"steps (worst seed; mean {fmt(mean_std(rec)[0], None, 0)}) <= 200"
             + (f"; margin {200 - worst:+.0f}" if math.isfinite(worst) else ""))  # fmt: skip
    return out + rate_targets(results)


RATE_TARGET = 0.95  # of the oracle streamed the same way (issue 12)
FLOOD_TARGET = 2.0  # the flood's share of training <= this x its share of distinct items


def is_flood_sweep(scenario: str) -> bool:
    return scenario.startswith(("redundancy", "digits-flood"))


def rate_targets(results: list[RunResult]) -> list[str]:
    """Issue 12's targets: at each stream rate, bilevel >= 95% of the oracle streamed the same way and
    the unscored backlog under its bound; on redundancy and the flood sweep (every rate), bilevel >= 95% of
    the oracle and the flood's share of training <= 2x its share of distinct items."""
    g = grouped(results)
    out = []

    def line(ok: bool, text: str) -> None:
        out.append(f"{'PASS' if ok else 'MISS'}  {text}")

    for (scn, rate, method), runs in g.items():
        if method != "bilevel" or (rate == "all" and not is_flood_sweep(scn)):
            continue
        b = stat(runs, lambda r: r.test_acc)[0]
        o = stat(g.get((scn, rate, "oracle"), []), lambda r: r.test_acc)[0]
        if math.isfinite(o):
            line(b >= RATE_TARGET * o, f"{scn} at rate {rate}: bilevel test acc {b:.3f} >= 95% of the oracle "
                 f"{o:.3f} (= {RATE_TARGET * o:.3f}); margin {b - RATE_TARGET * o:+.3f}")  # fmt: skip
        if rate != "all":
            worst = max((r.backlog_max for r in runs if math.isfinite(r.backlog_max)), default=math.nan)
            bound = min((r.backlog_bound for r in runs if r.error is None), default=math.nan)
            if math.isnan(worst):
                line(False, f"{scn} at rate {rate}: unscored backlog not published by the trainer "
                     "(no trainer.unscored in /v1/stats)")  # fmt: skip
            elif math.isnan(bound):
                line(False, f"{scn} at rate {rate}: unscored backlog reached {worst:,.0f}; the trainer "
                     "has no bound (no DATADIET_MAX_UNSCORED)")  # fmt: skip
            else:
                line(worst <= bound, f"{scn} at rate {rate}: bilevel's unscored backlog peaked at "
                     f"{worst:,.0f} <= its bound {bound:,.0f} (worst seed); "
                     f"margin {bound - worst:+,.0f}")  # fmt: skip
        if is_flood_sweep(scn):
            share = stat(runs, lambda r: r.flood_share)[0]
            distinct = stat(runs, lambda r: r.flood_distinct_share)[0]
            if math.isfinite(share) and math.isfinite(distinct):
                bar = FLOOD_TARGET * distinct
                line(share <= bar, f"{scn} at rate {rate}: the flood's share of training {share:.3f} <= "
                     f"2 x its share of distinct items {distinct:.4f} (= {bar:.4f}); "
                     f"margin {bar - share:+.3f}")  # fmt: skip
    return out


def stream_table(results: list[RunResult]) -> str:
    """Per (scenario, rate, method): test acc, its share of the oracle's at the same rate, the unscored
    backlog, and for paced runs how the stream kept up."""
    g = grouped(results)
    lines = [
        "| scenario | rate | method | test acc | of oracle | unscored backlog max | samples posted "
        "| min lead (steps) | status gap (steps) | trainer stops (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (scn, rate, method), runs in g.items():
        ok = [r for r in runs if r.error is None]
        if not ok:
            continue
        acc = stat(ok, lambda r: r.test_acc)[0]
        o = stat(g.get((scn, rate, "oracle"), []), lambda r: r.test_acc)[0]
        of = f"{acc / o:.0%}" if math.isfinite(o) and o > 0 and method != "oracle" else "–"
        backlog = max((r.backlog_max for r in ok if math.isfinite(r.backlog_max)), default=math.nan)
        paced = rate != "all" and method != "val-only"
        lead = fmt(min(r.min_lead for r in ok), None, 0) if paced else "–"
        gap = str(max(r.status_gap for r in ok)) if paced else "–"
        stops = f"{sum(r.pauses for r in ok)} ({sum(r.paused_s for r in ok):.0f})" if paced else "–"
        exhausted = [r.exhausted_at for r in ok if r.exhausted_at is not None]
        posted = f"{np.mean([r.n_posted for r in ok]):,.0f}" + (
            f" (ran out at step {min(exhausted)})" if exhausted else ""
        )
        lines.append(
            f"| {scn} | {rate} | {method} | {fmt(acc)} | {of} | {fmt(backlog, None, 0)} | {posted} "
            f"| {lead} | {gap} | {stops} |"
        )
    return "\n".join(lines)


def flood_table(results: list[RunResult]) -> str:
    """Per (scenario, rate, method) with a flood: its share of training, of the samples, of the distinct
    items, and the content groups the service sees per flood item."""
    lines = [
        "| scenario | rate | method | flood share of training | of samples | of distinct items "
        "| training / distinct | content groups per flood item |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for (scn, rate, method), runs in grouped(results).items():
        ok = [r for r in runs if r.error is None and math.isfinite(r.flood_distinct_share)]
        if not ok or method == "oracle":
            continue
        share = stat(ok, lambda r: r.flood_share)
        distinct = stat(ok, lambda r: r.flood_distinct_share)[0]
        lines.append(
            f"| {scn} | {rate} | {method} | {fmt(*share)} | {fmt(*stat(ok, lambda r: r.flood_sample_share))} "
            f"| {fmt(distinct, None, 4)} | {fmt(share[0] / distinct, None, 1)} "
            f"| {fmt(*stat(ok, lambda r: r.flood_groups_per_item), digits=1)} |"
        )
    return "\n".join(lines)


def drift_table(results: list[RunResult]) -> str:
    """Per method: the old task's validation loss at the switch (the level to recover to), the new task's
    at the first checkpoint after the switch and at the end, and the recovery of each seed."""
    lines = [
        "| method | old-task val loss at switch | new-task val loss after switch | at the end "
        "| recovery per seed |",
        "|---|---:|---:|---:|---|",
    ]
    for (scn, _, method), runs in grouped(results).items():
        ok = [r for r in runs if r.error is None and r.curve_v2]
        if scn != "drift" or not ok:
            continue
        after = [
            next((loss for step, loss in r.curve_v2 if step > (r.switched_at or 0)), math.nan) for r in ok
        ]
        end = [r.curve_v2[-1][1] for r in ok]
        per_seed = ", ".join(fmt(r.recovery_steps, None, 0) for r in ok)
        lines.append(
            f"| {method} | {fmt(*stat(ok, lambda r: r.pre_switch_loss))} | {fmt(*mean_std(after))} "
            f"| {fmt(*mean_std(end))} | {per_seed} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- report
def write_report(meta: dict[str, Any], results: list[RunResult], out: Path, name: str) -> None:
    """``out/<name>.md`` (table, targets, definitions, plots) and ``out/<name>.json`` (meta and every run's
    numbers and curves, which ``--from-json`` renders again); the plots ``out/<name>-<scenario>-*.png``."""
    try:
        from bench.quality_plots import plot_all
    except ImportError as e:  # CI installs .[dev] only; the plots need .[bench] (matplotlib)
        print(f"plots skipped: {e} (pip install -e '.[bench]')", file=sys.stderr)
    else:
        plot_all(results, out, name)
    scenarios = dict.fromkeys(r.spec.plot_name for r in results)
    kinds = ("val-loss", "weights", "sources")
    plots = [p for s in scenarios for k in kinds if (p := out / f"{name}-{s}-{k}.png").exists()]
    failures = [
        f"- {r.spec.scenario}/{r.spec.method}/seed {r.spec.seed}: {r.error}" for r in results if r.error
    ]
    verdicts = targets(results)
    budget = meta["budget"]
    drift = budget.get("drift", [500, 25, 0])
    every = min((b[1] for s, b in budget.items() if s != "drift"), default=50)
    text = f"""# Quality benchmark{" (--quick)" if meta["quick"] else ""}

{render_table(results)}

{chr(10).join(f"- {v}" for v in verdicts) or "- (no targets apply to this selection)"}

Mean ± sample standard deviation over seeds {meta["seeds"]}; "–" where a metric does not apply or the
rule keeps no per-sample weights; "never": not reached within the run in at least one seed.
Budget (steps / stream samples): {", ".join(f"{s} {b[0]} / {b[2]:,}" for s, b in budget.items())}; batch 64;
every method through the same trainer process, model and step budget.
{len(results)} runs in {meta["elapsed_s"] / 60:.1f} min, {meta["workers"]} at a time, on {meta["machine"]},
load average {meta["load_start"]:.1f} at the start and {meta["load_end"]:.1f} at the end (other work shared
the machine). Code: {meta["commit"]}; the processes ran a snapshot of app/, store/ and trainer/ taken at the
start (trainer/ hash {meta["code"]}). {meta["date"]}. `{meta["command"]}`.
{_drift_section(results, drift)}{_stream_section(results)}{_flood_section(results)}
## Definitions

- **test acc**: exact match (text) or accuracy (digits) of the final checkpoint, pulled over HTTP, on the
  scenario's 500 held-out test problems (drift: the new task's). Nothing trains, reweights or stops
  early on them.
- **methods**: `uniform`, `loss`, `l2rw`, `rholoss`, `bilevel` are `DATADIET_REWEIGHT` rules
  (trainer/weighting/); `random` posts a random subset of the stream as large as bilevel's effective
  fraction for the same seed and trains uniformly (identical to `uniform` where that fraction is 1.00);
  `val-only` posts the 100 validation samples as the training stream (its validation loss is its
  training loss); `oracle` posts the stream without corrupted samples and without the flood source (the
  clean-only reference). `l2rw` runs with a fresh validation gradient every step
  (`DATADIET_VAL_GRAD_EVERY=1`, `DATADIET_VAL_GRAD_BETA=0`); `rholoss` trains its irreducible-loss model on
  the validation set for 300 steps and keeps the top 25% of each batch by reducible loss. Drift runs no
  `random` and no `oracle` (there is no clean-only stream once the task changes).
- **AUC sample**: ROC AUC of the final per-sample weights (`/v1/weights/samples?ids=`) at separating clean
  from corrupted samples (drift: new-task samples from old-task ones). **AUC content**: the same over
  distinct content (the service's content group: the same input up to case and whitespace, or vectors
  with the same SimHash, with the same target), each item weighing the sum of its copies' weights.
  The service splits one weight among a source's copies, so a heavily copied clean item (the digits
  flood: 20 images x 20 copies) has small per-sample weights but a normal total: the per-sample AUC counts
  each copy as a low-weighted clean sample, the per-content AUC counts the item once; the target line
  also gives the per-sample AUC without the flood's copies. Redundancy has no corrupted samples, so no
  AUC.
- **effective fraction**: share of live samples with weight >= 0.1 (`/v1/weights`, final).
- **steps to uniform's best**: first checkpoint step (every {every} steps) at which the method's
  validation loss (checkpoint metric `val_loss`, the full 100-sample validation set) is at or below the
  best the uniform run of the same seed reached; the ratio divides by the step at which uniform first
  reached it (mean of the per-seed ratios).
- **Spearman**: rank correlation between each source's final weight per distinct content item (its weight
  mass over its number of content groups, so a flood of copies counts once per problem) and its true
  quality (expected share of correct samples); only where qualities differ and weights are not uniform.
- **drift recovery**: the benchmark PUTs `validation_v2` and posts the new-task half of the stream once
  the trainer passes step {drift[0] // 2}. Every checkpoint (every {drift[1]} steps) is evaluated on
  `validation_v2`. Recovery is the number of steps from the last checkpoint on the old validation set
  until the new task's validation loss is at most 1.1 x the old task's validation loss at that
  checkpoint: back to the level the model held on the task before it changed. A method that had learnt
  little before the switch has a higher level to get back to (see the drift table).
- **rate**: `all` posts the whole stream before the trainer starts. Rate R streams it as the trainer
  goes: R x {BATCH_SIZE} (the batch) new samples per training step, paced by the trainer's step in
  `/v1/stats` (published every {PACED_PUBLISH_S} s in paced runs, less often as the trainer's table grows:
  it spends at most ~10% of its time publishing), never by the clock. The first {LEAD_STEPS} steps' worth
  is posted before the trainer starts, and the stream is kept {LEAD_STEPS} steps' worth ahead, or twice the
  largest step jump between two status reads (**status gap**) where that is more: the stream then arrives
  in chunks of up to that many steps' worth. Where posting falls behind, the benchmark stops the trainer
  (SIGSTOP) until the lead is back (**trainer stops**: how often, and for how long in all). **min lead**:
  the fewest steps' worth of stream ahead of the trainer's published step (negative: the trainer ran past
  what had arrived, by up to that plus the status gap, and trained on older samples meanwhile). Each
  method streams its own stream at the same rate, generated
  long enough for the budget (R x {BATCH_SIZE} x (steps + {LEAD_STEPS}) samples): the oracle's clean-only
  stream, random's subsample; `val-only` posts its 100 samples up front at every rate; drift runs only
  at `all`. Stream lengths per rate: {_lengths(budget, meta.get("rates", ["all"]))}.
- **unscored backlog**: the trainer's queue of samples not yet scored (`trainer.unscored` in
  `/v1/stats`, read every poll while the run goes; `–` where the trainer does not publish it). Its bound
  is the trainer's `DATADIET_MAX_UNSCORED` default.
- **flood share of training**: the flood source's final source weight (`/v1/weights` `sources`: its
  share of the live samples' weight mass, which the trainer draws by). **of samples**: its share of the
  samples posted. **of distinct items**: its problems' share of the distinct items posted, each flood
  problem counted once however its copies vary, every other sample by its content group. **content
  groups per flood item**: how many groups the service's copy test (`content_group`) splits each flood
  problem into: 1 where it sees every copy as one item.

## Plots

{chr(10).join(f"- `{p.name}`" for p in plots) or "- (none: matplotlib is not installed)"}
{chr(10) + "## Failed runs" + chr(10) + chr(10).join(failures) if failures else ""}"""
    (out / f"{name}.md").write_text(text)
    runs = ",\n".join(json.dumps(_plain(r.summary()), separators=(",", ":")) for r in results)
    (out / f"{name}.json").write_text(f'{{"meta": {json.dumps(_plain(meta))},\n"runs": [\n{runs}\n]}}\n')


def _drift_section(results: list[RunResult], drift: list[int]) -> str:
    if not any(r.curve_v2 for r in results):
        return ""
    return f"""
## Drift

Validation losses of the new task (`validation_v2`) after the switch at step ~{drift[0] // 2}, against
the old task's at the switch (the level recovery is measured against); mean ± std over seeds.

{drift_table(results)}
"""


def _stream_section(results: list[RunResult]) -> str:
    if all(r.spec.rate is None and math.isnan(r.backlog_max) for r in results):
        return ""
    return f"""
## Stream rates and the unscored backlog

Mean test accuracy over seeds, its share of the oracle's at the same rate, the largest unscored backlog of
any seed, and how the paced stream kept up with the trainer (see the definitions).

{stream_table(results)}
"""


def _flood_section(results: list[RunResult]) -> str:
    if not any(math.isfinite(r.flood_distinct_share) for r in results):
        return ""
    return f"""
## Floods

The flood's share of training against its share of the samples and of the distinct items (issue 12's
target: share of training <= 2 x share of distinct items); mean ± std over seeds.

{flood_table(results)}
"""


def _lengths(budget: dict[str, list[int]], rates: list[Any]) -> str:
    paced = [r for r in rates if r != "all"]
    if not paced:
        return "none (every run at `all`)"
    return "; ".join(
        f"{s} " + ", ".join(f"{rate_label(r)} {stream_length(b[0], r):,}" for r in paced)
        for s, b in budget.items()
        if s != "drift"
    )


def load_results(path: Path) -> tuple[dict[str, Any], list[RunResult]]:
    """(meta, runs) from a ``quality.json``; per-sample weights are not saved, so no histograms."""
    doc = json.loads(path.read_text())
    spec_fields = set(RunSpec.__dataclass_fields__)
    results = []
    for row in doc["runs"]:
        spec = RunSpec(**{k: row[k] for k in spec_fields if k in row})
        values = {
            k: v for k, v in row.items() if k not in spec_fields and k in RunResult.__dataclass_fields__
        }
        r = RunResult(spec, **{k: _number(v) if k in FLOAT_FIELDS else v for k, v in values.items()})
        r.curve = [tuple(x) for x in r.curve]  # type: ignore[misc]
        r.curve_v2 = [tuple(x) for x in r.curve_v2]  # type: ignore[misc]
        r.backlog = [tuple(x) for x in r.backlog]  # type: ignore[misc]
        r.arrivals = [tuple(x) for x in r.arrivals]  # type: ignore[misc]
        results.append(r)
    return doc["meta"], results


FLOAT_FIELDS = {
    "test_acc", "effective_fraction", "auc_sample", "auc_content", "auc_unique", "spearman",
    "pre_switch_loss", "recovery_steps", "wall_s", "flood_share", "flood_sample_share",
    "flood_distinct_share", "flood_groups_per_item", "backlog_max", "backlog_bound", "min_lead", "paused_s",
}  # fmt: skip


def _number(v: Any) -> float:
    """A saved float: null is nan, "inf" is inf."""
    return math.nan if v is None else float(v)


def _plain(x: object) -> object:
    """JSON-able: nan as null, inf as "inf", floats to 6 significant digits, numpy scalars as Python ones,
    tuples as lists."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if isinstance(x, float):
        return float(f"{x:.6g}")
    return x

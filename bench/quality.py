"""Quality benchmark: less data, faster convergence and better generalisation, against real baselines.

    python bench/quality.py                  # the full benchmark: 5 scenarios x 8 methods x 3 seeds
    python bench/quality.py --scenarios noisy-carry   # the hard-case probe, not in the default run
    python bench/quality.py --quick          # smoke: noisy, seed 0, uniform and bilevel; exit 1 unless
                                             # bilevel beats uniform on held-out test accuracy
    python bench/quality.py --scenarios noisy digits --methods uniform bilevel --seeds 0 1
    python bench/quality.py --scenarios noisy redundancy --rates 1 4 16   # streamed as the trainer goes
    python bench/quality.py --scenarios redundancy@0 redundancy@0.1 redundancy@0.25 redundancy@0.5 \
        digits-flood@0 digits-flood@0.002 digits-flood@0.01 digits-flood@0.03 digits-flood@0.1
                                             # the flood-noise sweep (not in the default run)

Every run goes through the real pipeline (bench/quality_run.py): its own redis-server, the API under
uvicorn, the trainer as ``python -m trainer`` (one torch thread), samples posted over HTTP with the
client, metrics read back over HTTP. Two runs at a time (one per core). The held-out test set is only
ever used for the final accuracy; nothing trains, reweights or stops early on it.

``--rates`` streams each run's samples as the trainer goes (bench/quality_stream.py): rate R is R x
batch size new samples per training step, paced by the trainer's step, the stream generated long enough
for the step budget; ``all`` (the default) posts the whole stream up front, as before. Drift runs only
``all`` (its stream switches task at a sample index).

Writes ``bench/results/quality.md`` (the table, the targets and the definitions), ``quality.json`` (every
run's numbers and curves) and PNGs ``bench/results/quality-<scenario>-*.png``; prints the table and one
PASS/MISS line per target.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from app.demo.scenarios import FLOOD_SWEEP  # noqa: E402
from bench.quality_report import load_results, render_table, targets, write_report  # noqa: E402
from bench.quality_run import RunResult, RunSpec, run, snapshot_code  # noqa: E402
from bench.quality_stream import stream_length  # noqa: E402

RESULTS = REPO / "bench" / "results"
SWEEP = [f"{base}@{level:g}" for base, levels in FLOOD_SWEEP.items() for level in levels]
SCENARIOS = ["noisy", "noisy-carry", "redundancy", "misaligned", "drift", "digits", *SWEEP]
# the five; noisy-carry (a consistent slip that no score sees before the model has learnt the carry,
# ~15% of the full run's time) and the flood-noise sweep run when asked for by name
DEFAULT_SCENARIOS = ["noisy", "redundancy", "misaligned", "drift", "digits"]
METHODS = ["uniform", "random", "val-only", "loss", "l2rw", "rholoss", "bilevel", "oracle"]
# bilevel without the trusted-set teacher, and with every queued sample scored; run when asked for by name
ABLATIONS = ["bilevel-hypergrad", "bilevel-queue-all", "bilevel-cheap", "bilevel-lean"]
NOT_FOR = {
    "drift": {"random", "oracle"},  # nothing to subsample against, no clean-only stream
    "noisy-carry": {"random", "val-only", "loss", "l2rw", "rholoss"},  # a probe: ours, uniform, oracle
}
# (steps, checkpoint every, stream samples) per scenario; drift switches task half-way. The noisy text
# scenarios get longer budgets: at 500 steps every method is still learning the task's format, and the
# carry slip is invisible to any score until the model has begun to learn the carry (~1,000+ steps).
# The rest keep 500 steps so that the whole run stays within the hour on 2 cores.
BUDGET = {
    "noisy": (1000, 50, 20_000),
    "noisy-carry": (1500, 100, 20_000),
    "redundancy": (500, 50, 20_000),
    "misaligned": (1000, 50, 20_000),
    "drift": (500, 25, 20_000),
    "digits": (1500, 50, 10_000),
}
BUDGET |= {name: BUDGET["digits" if name.startswith("digits") else "redundancy"] for name in SWEEP}
QUICK_BUDGET = BUDGET["noisy"]
POST_S = 1e-4  # generating and posting a sample, ~10,000 a second
COST = {"l2rw": 2.2, "rholoss": 2.0, "bilevel": 1.3}  # rough run time against uniform, for scheduling
SECONDS_PER_STEP = {"digits": 0.01}  # the rest: tiny-gpt, ~0.07 s per uniform step on a shared core


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="noisy, seed 0, uniform and bilevel (~3 min)")
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=DEFAULT_SCENARIOS)
    p.add_argument("--methods", nargs="+", choices=METHODS + ABLATIONS, default=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--rates",
        nargs="+",
        type=_rate,
        default=[None],
        metavar="R",
        help="stream rates: new samples per step in batches (1 4 16), or 'all' up front (default)",
    )
    p.add_argument("--workers", type=int, default=2, help="runs at a time (each trainer uses one thread)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--from-json", type=Path, help="render the report of a saved quality.json again, no runs")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.scenarios, args.methods, args.seeds, args.rates = ["noisy"], ["uniform", "bilevel"], [0], [None]
    name = "quality-quick" if args.quick else "quality"
    if args.from_json:
        meta, results = load_results(args.from_json)
        name = args.from_json.stem
    else:
        meta, results = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    print(render_table(results))
    for line in targets(results):
        print(line)
    print(f"\n{len(results)} runs in {meta['elapsed_s'] / 60:.1f} min")
    write_report(meta, results, args.out, name)
    return quick_verdict(results) if args.quick else 0


def _rate(text: str) -> float | None:
    if text == "all":
        return None
    rate = float(text)
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"a rate is a positive number or 'all', got {text!r}")
    return rate


def measure(args: argparse.Namespace) -> tuple[dict[str, Any], list[RunResult]]:
    """Run the selection; (meta for the report, results)."""
    specs = plan(args.scenarios, args.methods, args.seeds, args.quick, args.rates)
    workdir = Path(tempfile.mkdtemp(prefix="datadiet-quality-"))
    load_start = os.getloadavg()[0]
    t0 = time.monotonic()
    try:
        code = snapshot_code(workdir / "code")
        results = execute(specs, args.workers, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    dirty = _git("status", "--porcelain", "--", "app", "store", "trainer")
    meta = {
        "quick": args.quick,
        "seeds": args.seeds,
        "rates": ["all" if r is None else r for r in args.rates],
        "budget": {s: list(QUICK_BUDGET if args.quick else BUDGET[s]) for s in args.scenarios},
        "elapsed_s": time.monotonic() - t0,
        "workers": args.workers,
        "machine": f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}",
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "commit": _git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if dirty else ""),
        "code": code,
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "command": "python bench/quality.py " + " ".join(sys.argv[1:]),
    }
    return meta, results


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------------------------------------- runs
def plan(
    scenarios: list[str],
    methods: list[str],
    seeds: list[int],
    quick: bool,
    rates: list[float | None] | None = None,
) -> list[RunSpec]:
    specs = []
    for rate in rates or [None]:
        for scn in scenarios:
            if rate is not None and scn == "drift":
                print(
                    "drift runs only at rate 'all' (its stream switches task at a sample index)",
                    file=sys.stderr,
                )
                continue
            steps, every, n = QUICK_BUDGET if quick else BUDGET[scn]
            if rate is not None:  # long enough for the budget at this rate
                n = stream_length(steps, rate)
            for method in methods:
                if method in NOT_FOR.get(scn, set()):
                    continue
                for seed in seeds:
                    switch = steps // 2 if scn == "drift" else None
                    specs.append(RunSpec(scn, method, seed, steps, every, n, switch, rate=rate))
    # the longest first; random last, as it waits for bilevel's effective fraction
    return sorted(specs, key=lambda s: (s.method == "random", -_cost(s)))


def _cost(spec: RunSpec) -> float:
    per_step = SECONDS_PER_STEP.get(spec.scenario.split("@")[0].removesuffix("-flood"), 0.07)
    return spec.steps * per_step * COST.get(spec.method, 1.0) + spec.n_stream * POST_S


def execute(specs: list[RunSpec], workers: int, workdir: Path) -> list[RunResult]:
    """Every run, ``workers`` at a time, each importing the code snapshot under ``workdir / "code"``."""
    futures: dict[tuple[str, float | None, str, int], Future[RunResult]] = {}
    done: list[RunResult] = []

    def job(spec: RunSpec) -> RunResult:
        if spec.method == "random":
            ref = futures.get((spec.scenario, spec.rate, "bilevel", spec.seed))
            fraction = ref.result().effective_fraction if ref is not None else math.nan
            if not math.isfinite(fraction):
                return RunResult(spec, error="random needs bilevel's effective fraction (run bilevel too)")
            spec = RunSpec(**{**spec.__dict__, "keep_fraction": fraction})
        result = run(spec, workdir, workdir / "code")
        done.append(result)
        _progress(result, len(done), len(specs))
        return result

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for spec in specs:
            futures[(spec.scenario, spec.rate, spec.method, spec.seed)] = pool.submit(job, spec)
        results = [f.result() for f in futures.values()]
    order = METHODS + ABLATIONS
    return sorted(results, key=lambda r: (SCENARIOS.index(r.spec.scenario), _rate_order(r.spec.rate),
                                          order.index(r.spec.method), r.spec.seed))  # fmt: skip


def _rate_order(rate: float | None) -> float:
    return -1.0 if rate is None else rate


def _progress(r: RunResult, k: int, n: int) -> None:
    s = r.spec
    what = (
        f"FAILED {r.error}" if r.error else f"test acc {r.test_acc:.3f}, effective {r.effective_fraction:.2f}"
    )
    print(
        f"[{k}/{n}] {s.scenario}/{s.rate_label}/{s.method}/seed {s.seed}: {what} ({r.wall_s:.0f}s)",
        file=sys.stderr,
        flush=True,
    )


def quick_verdict(results: list[RunResult]) -> int:
    by = {r.spec.method: r for r in results}
    u, b = by.get("uniform"), by.get("bilevel")
    if u is None or b is None or u.error or b.error:
        print("QUICK FAIL: a run failed", file=sys.stderr)
        return 1
    ok = b.test_acc > u.test_acc
    verdict = "PASS" if ok else "FAIL"
    print(f"QUICK {verdict}: bilevel {b.test_acc:.3f} vs uniform {u.test_acc:.3f} test accuracy")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

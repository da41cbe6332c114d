"""Performance benchmark (issue 14): each path beside its floor, measured in the same run.

    python bench/perf.py --out bench/results/issue14          # everything: ~15 minutes on 2 cores
    python bench/perf.py --quick --out /tmp/perf              # a cut-down run: < 2 minutes
    python bench/perf.py --quick --only publish,memory --out /tmp/perf

Sections (``--only`` takes their names, comma-separated):

    ingest      POST /v1/samples at batches of 1, 50 and 500, API with 1 and 2 uvicorn workers, against raw
                pipelined XADD of the same payloads (bench/ingest.py's pieces)
    reads       GET /v1/weights, ?ids= (100 ids) and a conditional GET under 50 connections at 1,000,000
                samples while a trainer publishes, against GET /healthz (bench/perf_load.py drives them)
    publish     Publisher.publish_weights at 1,000,000 live rows: first, then after 1%, 10%, 100% changed;
                seconds and bytes written to Redis, against raw ZADD XX of the changed rows
    checkpoint  GET /v1/checkpoints/{v}/file of a ~100 MB checkpoint against reading it from disk; the 304
                answer's latency against /healthz's
    memory      Redis used_memory per stored ~1 KB sample against its payload; the trainer's bytes per
                live sample (WeightTable + sum tree)
    freshness   POST -> first training use, p50/p99, at 2,000 samples/s for 60 s (the trainer's own figures)
    step        bilevel vs uniform step time, mlp, tiny-gpt and hf-causal-lm (bench/trainer_cost.py's arms)

Every section starts its own processes (redis-server on a free port, the API under uvicorn, ``python -m
trainer``) in a temp dir, prints its markdown table when it finishes, and the tables so far are written
to ``--out`` (``perf.md``, ``perf.json``) after each one. A section that fails reports its error in its
table; the others still run. Numbers are medians of repeated rounds (``time.perf_counter``); the header
gives the command line, the git commit, the machine's CPU count and load averages. Exits 1 when a section
failed, else 0 (missed targets are marked in the tables, not in the exit status).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.perf_common import Scale, Table, redis_binary  # noqa: E402
from store.processes import one_line  # noqa: E402

Section = Callable[[Table, Scale, Path], None]
TITLES = {
    "ingest": "1. Ingest: POST /v1/samples against raw pipelined XADD",
    "reads": "2. Weight reads under 50 connections, against GET /healthz",
    "publish": "3. Publishing weights",
    "checkpoint": "4. Checkpoint pull",
    "memory": "5. Memory per sample",
    "freshness": "6. Freshness: POST to first training use",
    "step": "7. Step cost: bilevel against uniform",
}


def sections() -> dict[str, Section]:
    from bench import perf_serve, perf_store, perf_train

    return {
        "ingest": perf_serve.ingest,
        "reads": perf_serve.reads,
        "publish": perf_store.publish,
        "checkpoint": perf_store.checkpoint,
        "memory": perf_store.memory,
        "freshness": perf_train.freshness,
        "step": perf_train.step,
    }


def git_commit() -> str:
    """The checkout's commit, with ``+dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def header(argv: list[str]) -> dict[str, Any]:
    return {
        "command": " ".join(["python bench/perf.py", *argv]),
        "commit": git_commit(),
        "started": f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC",
        "cpus": os.cpu_count(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "redis_server": " ".join(redis_binary()),
    }


def render(head: dict[str, Any], tables: list[Table]) -> str:
    load = " / ".join(f"{x:.2f}" for x in head["load_average_start"])
    end = head.get("load_average_end")
    at_end = f", {' / '.join(f'{x:.2f}' for x in end)} at the end" if end else ""
    lines = [
        "# Performance benchmark (issue 14)",
        "",
        f"`{head['command']}`",
        "",
        f"Commit {head['commit']}, started {head['started']}; {head['cpus']} CPUs, load average {load} "
        f"(1/5/15 min) at the start{at_end}; Python {head['python']}, {head['machine']}. "
        f"Client, API, trainer and Redis share the machine. redis-server: {head['redis_server']}.",
        "",
    ]
    lines += [t.markdown() for t in tables]
    lines += targets(tables)
    return "\n".join(lines)


def targets(tables: list[Table]) -> list[str]:
    """The issue's targets gathered from the tables' last column: one row per verdict."""
    rows = [
        f"| {t.title.split(':')[0]} | {row[0] if t.key not in ('ingest', 'step') else f'{row[0]}, {row[1]}'} "
        f"| {row[-1]} |"
        for t in tables
        if t.columns and t.columns[-1] == "target"
        for row in t.rows
        if isinstance(row[-1], str) and row[-1].strip()
    ]
    errors = [f"| {t.title.split(':')[0]} | (section failed) | {t.error} |" for t in tables if t.error]
    if not rows and not errors:
        return []
    return ["## Targets", "", "| section | row | target |", "|---|---|---|", *rows, *errors, ""]


def write(out: Path, head: dict[str, Any], tables: list[Table]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf.md").write_text(render(head, tables))
    doc = {**head, "sections": {t.key: t.as_json() for t in tables}}
    (out / "perf.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/perf.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for perf.md and perf.json")
    parser.add_argument("--quick", action="store_true", help="a cut-down run (< 2 minutes): a smoke test")
    parser.add_argument("--only", default="", help=f"comma-separated sections of: {', '.join(TITLES)}")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    chosen = [x.strip() for x in args.only.split(",") if x.strip()] or list(TITLES)
    unknown = [x for x in chosen if x not in TITLES]
    if unknown:
        print(f"bench/perf.py: unknown section {', '.join(unknown)}; choose from {', '.join(TITLES)}",
              file=sys.stderr)  # fmt: skip
        return 2
    scale = Scale.quick_run() if args.quick else Scale()
    head = header(argv)
    head["scale"] = dataclasses.asdict(scale)
    print(f"{head['command']}: commit {head['commit']}, load average {head['load_average_start']}",
          file=sys.stderr)  # fmt: skip
    runners = sections()
    tables: list[Table] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="datadiet-perf-") as tmp:
        for key in chosen:
            table = Table(key, TITLES[key], [])
            tables.append(table)
            print(f"-- {TITLES[key]}", file=sys.stderr)
            start = time.perf_counter()
            try:
                runners[key](table, scale, Path(tmp) / key)
            except Exception as e:  # a section's failure is reported in its table; the rest still run
                failed = True
                table.error = one_line(e)
                traceback.print_exc(file=sys.stderr)
            table.seconds = time.perf_counter() - start
            print(table.markdown(), flush=True)
            head["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
            write(args.out, head, tables)
    print("\n".join(targets(tables)), flush=True)
    print(f"wrote {args.out / 'perf.md'} and {args.out / 'perf.json'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

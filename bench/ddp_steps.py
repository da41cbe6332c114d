"""Trainer step throughput with 1 and N data-parallel ranks (issue 16 part 2; docs/scaling.md).

    python bench/ddp_steps.py                         # mlp and tiny-gpt, 1 and 2 CPU ranks, 300 steps each
    python bench/ddp_steps.py --models tiny-gpt --ranks 1 2 4 --steps 500 --batch-size 128

For each model and rank count: a scratch redis-server (one for the whole run, a key prefix per run), a
buffer of 2,000 samples and a 64-sample validation set posted through the real app (in-process), then
``datadiet train --nproc N`` (torchrun) with ``DATADIET_MAX_STEPS``; the trainer's metrics port
(``datadiet_trainer_step``, rank 0) is polled every 0.25 s and the rate is taken between the first poll
at or past step ``--skip`` (start-up, the teacher's reference models and the first validation gradient
are not counted) and the last poll before the end. Default knobs (bilevel, a scoring step every step).
Prints a markdown table. On the CPU each rank gets ``--threads`` torch threads (default 1).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.trainer_idle import arithmetic  # noqa: E402
from store.processes import datadiet_env, free_port, spawn, start_redis_server, stop_process_group  # noqa: E402

MLP = {"n_features": 64, "n_classes": 10}


def vectors(n: int, prefix: str, rng: random.Random) -> list[dict[str, Any]]:
    """Two Gaussian-ish blobs per class on 64 features (the label is the arg-max feature block)."""
    out = []
    for i in range(n):
        y = rng.randrange(10)
        x = [rng.gauss(1.5 if j // 6 == y else 0.0, 1.0) for j in range(64)]
        out.append({"id": f"{prefix}{i}", "source": "s", "input": [round(v, 4) for v in x], "target": y})
    return out


def fill(redis_url: str, data_dir: Path, prefix: str, model: str) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from store.config import Settings

    rng = random.Random(0)
    make = vectors if model == "mlp" else arithmetic
    config = MLP if model == "mlp" else {}
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        redis_url=redis_url,
        redis_prefix=prefix,
        data_dir=data_dir,
        model=model,
        model_params=config,
    )
    with TestClient(create_app(settings)) as api:
        assert api.post("/v1/samples", json={"samples": make(2000, "t", rng)}).status_code == 202
        assert api.put("/v1/validation", json={"samples": make(64, "v", rng)}).status_code == 200


def step_now(url: str) -> float | None:
    try:
        text = httpx.get(url, timeout=1).text
    except httpx.HTTPError:
        return None
    return next(
        (float(line.split()[1]) for line in text.splitlines() if line.startswith("datadiet_trainer_step ")),
        None,
    )


def run(redis_url: str, root: Path, model: str, ranks: int, args: argparse.Namespace) -> tuple[float, float]:
    """(steps/s after --skip, wall seconds of the whole command)."""
    prefix = f"{model}-{ranks}"
    data_dir = root / prefix
    fill(redis_url, data_dir, prefix, model)
    port = free_port()
    env = datadiet_env(
        redis_url=redis_url,
        redis_prefix=prefix,
        data_dir=str(data_dir),
        model=model,
        model_config=json.dumps(MLP if model == "mlp" else {}),
        max_steps=str(args.steps),
        batch_size=str(args.batch_size),
        torch_threads=str(args.threads),
        checkpoint_every="100000",
        trainer_metrics_port=str(port),
    )
    log = root / f"{prefix}.log"
    argv = [sys.executable, "-m", "app.cli", "train", "--nproc", str(ranks)]
    t0 = time.monotonic()
    proc = spawn(argv, log=log, env=env, cwd=REPO)
    samples: list[tuple[float, float]] = []
    try:
        while proc.poll() is None:
            step = step_now(f"http://127.0.0.1:{port}/metrics")
            if step is not None:
                samples.append((time.monotonic(), step))
            time.sleep(0.25)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{prefix}: exit {proc.returncode}\n{log.read_text()[-3000:]}")
    finally:
        stop_process_group(proc)
    window = [(t, s) for t, s in samples if s >= args.skip]
    if len(window) < 2 or window[-1][1] == window[0][1]:
        raise SystemExit(f"{prefix}: too few steps measured ({samples[-3:]}); raise --steps")
    (t1, s1), (t2, s2) = window[0], window[-1]
    return (s2 - s1) / (t2 - t1), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mlp", "tiny-gpt"])
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--skip", type=int, default=30, help="steps left out of the rate (start-up)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (DATADIET_TORCH_THREADS)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ddp-steps-") as tmp:
        root = Path(tmp)
        server = start_redis_server(root / "redis")
        try:
            print(
                "| model | ranks | batch | threads/rank "
                f"| steps/s (steps {args.skip}-{args.steps}) | wall s |"
            )
            print("|---|---|---|---|---|---|")
            for model in args.models:
                for n in args.ranks:
                    rate, wall = run(server.url, root, model, n, args)
                    print(f"| {model} | {n} | {args.batch_size} | {args.threads} | {rate:.1f} | {wall:.1f} |")
                    sys.stdout.flush()
        finally:
            server.stop()


if __name__ == "__main__":
    main()

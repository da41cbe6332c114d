"""``datadiet demo``: the whole service plus simulated agents of known quality, with a live view.

Four agents stream 2-digit additions: one answers correctly, one is sloppy, one spams a few problems over
and over, one answers a different task on look-alike prompts. The tiny GPT trains on the stream while the
weights learn from a 100-problem trusted validation set. At the end, a table puts each agent's learned
weight beside its true quality, with the model's accuracy on held-out problems before and after.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from app.demo.scenarios import Scenario, build_scenario
from app.demo.tasks import exact_match
from app.supervise import Supervisor
from app.text_table import print_table
from datadiet import Client, load_checkpoint
from store.config import Settings

BATCH = 50
N_EVAL = 200


def _agents(
    client: Client, scn: Scenario, rate: float, seed: int, stop: threading.Event, counts: dict[str, int]
) -> None:
    """Post the scenario's stream at about ``rate`` samples/s until stopped."""
    stream = scn.stream(10_000_000, seed)
    t0, sent = time.monotonic(), 0
    while not stop.is_set():
        batch = [next(stream) for _ in range(BATCH)]
        try:
            client.post_samples(batch, batch_size=BATCH)
        except Exception as e:  # the demo goes on; the agent logs and retries with the next batch
            print(f"\nagent: post failed: {e}", file=sys.stderr)
            stop.wait(1.0)
            continue
        for s in batch:
            counts[s["source"]] = counts.get(s["source"], 0) + 1
        sent += len(batch)
        stop.wait(max(0.0, t0 + sent / rate - time.monotonic()))


def _accuracy(client: Client, dest: Path, test: list[dict[str, Any]]) -> tuple[float, int] | None:
    meta = client.latest_checkpoint()
    if meta is None:
        return None
    path = client.pull_checkpoint(dest)
    model = load_checkpoint(path, sha256=meta["sha256"])
    return exact_match(model.predict([s["input"] for s in test]), test), meta["step"]


def _untrained_accuracy(scn: Scenario, seed: int, test: list[dict[str, Any]]) -> float:
    import torch

    from trainer.models import build_model

    torch.manual_seed(seed)
    model = build_model(scn.model, scn.model_config).eval()
    return exact_match(model.predict([s["input"] for s in test]), test)


def run_demo(host: str, port: int, steps: int, seed: int, rate: float) -> int:
    scn = build_scenario("demo", seed)
    base = Settings()
    data_dir = (base.data_dir / "demo").resolve()
    shutil.rmtree(data_dir, ignore_errors=True)  # the demo starts from nothing every time
    env = {
        "DATADIET_DATA_DIR": str(data_dir),
        "DATADIET_DATABASE_URL": f"sqlite:///{data_dir / 'meta.db'}",
        "DATADIET_MODEL": scn.model,
        "DATADIET_MODEL_CONFIG": json.dumps(scn.model_config),
        "DATADIET_MAX_STEPS": str(steps),
        "DATADIET_CHECKPOINT_EVERY": str(max(50, steps // 10)),
        "DATADIET_SEED": str(seed),
        "DATADIET_REWEIGHT": "bilevel",
        "DATADIET_REDIS_URL": "",  # always the embedded Redis: the demo never touches a configured one
    }
    settings = Settings(data_dir=data_dir, database_url=env["DATADIET_DATABASE_URL"], redis_url=None)
    sup = Supervisor(settings, host, port, log_dir=data_dir / "logs", env=env)
    print(f"datadiet demo: 4 simulated agents, tiny GPT, {steps} steps; logs in {data_dir / 'logs'}")
    stop = threading.Event()
    counts: dict[str, int] = {}
    test = scn.test[:N_EVAL]
    start_acc = _untrained_accuracy(scn, seed, test)
    acc: tuple[float, int] | None = None
    try:
        sup.start()
        sup.wait_ready(timeout=120)
        client = Client(sup.url)
        client.set_validation(scn.validation)
        agents = threading.Thread(target=_agents, args=(client, scn, rate, seed, stop, counts), daemon=True)
        agents.start()
        seen_version, t_start = 0, time.monotonic()
        while not sup.trainer_finished():
            sup.check()
            time.sleep(2.0)
            latest = client.latest_checkpoint()
            if latest is not None and latest["version"] != seen_version:
                seen_version = latest["version"]
                acc = _accuracy(client, data_dir / "pulled", test)
            _live_line(client, steps, acc, time.monotonic() - t_start)
        stop.set()
        agents.join(timeout=10)
        acc = _accuracy(client, data_dir / "pulled", scn.test) or acc
        print()
        _summary(client, scn, counts, start_acc, acc)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        stop.set()
        sup.stop()
    return 0


def _live_line(client: Client, steps: int, acc: tuple[float, int] | None, elapsed: float) -> None:
    stats, weights = client.stats(), client.weights()
    t = stats["trainer"]
    effective = weights["summary"]["effective_fraction"]
    shares = "  ".join(f"{k.removeprefix('agent-')} {v:.2f}" for k, v in sorted(weights["sources"].items()))
    line = (
        f"\r{elapsed:5.0f}s  step {t['step'] or 0:>5}/{steps}  {t['steps_per_s'] or 0:5.1f} steps/s  "
        f"received {stats['buffer']['ingested']:>7,}  effective {effective:.2f}  "
        f"accuracy {f'{acc[0]:.0%}' if acc else '  - '}  | weights {shares}"
    )
    print(line[:200].ljust(120), end="", flush=True)


def _summary(
    client: Client, scn: Scenario, counts: dict[str, int], start_acc: float, acc: tuple[float, int] | None
) -> None:
    w = client.weights()
    stats = w.get("source_stats", {})
    rows = []
    for name, quality in sorted(scn.true_quality.items(), key=lambda kv: -kv[1]):
        rows.append(
            (
                name,
                f"{quality:.0%}",
                f"{w['sources'].get(name, 0):.3f}",
                f"{stats.get(name, {}).get('mean_weight', 0):.2f}",
                f"{counts.get(name, 0):,}",
            )
        )
    print("\nWhat datadiet learned about each agent (true quality is hidden from it):\n")
    print_table(["agent", "true quality", "share of training", "mean weight", "samples sent"], rows)
    b = client.stats()["buffer"]
    s = w["summary"]
    used = round(s["effective_fraction"] * s["count"])
    end = f"{acc[0]:.1%} at step {acc[1]}" if acc else "no checkpoint"
    print(f"\nheld-out exact match ({len(scn.test)} problems): start {start_acc:.1%} -> end {end}")
    print(
        f"samples received {b['ingested']:,} ({b['duplicates']:,} duplicates refused); "
        f"effectively used {used:,} of {s['count']:,} live ({s['effective_fraction']:.0%})"
    )

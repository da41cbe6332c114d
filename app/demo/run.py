"""``datadiet demo``: the whole service plus simulated agents of known quality, with a live view.

Four agents stream 2-digit additions: one answers correctly, one is sloppy, one spams a few problems over
and over, one answers a different task on look-alike prompts. The tiny GPT trains on the stream while the
weights learn from a 100-problem trusted validation set. At the end, a table puts each agent's learned
weight beside its true quality, with the model's accuracy on held-out problems before and after; the same
summary is written to ``<data dir>/demo/summary.json``.

The agents are paced by the trainer, not the clock: ``--rate`` is the samples all agents post together per
training step (default 32, half a batch of 64), each agent its scenario share of them. Before the first
step they post ``LEAD_STEPS`` steps' worth, and then keep ``rate * (step + LEAD_STEPS)`` samples posted,
reading the trainer's step from ``GET /v1/stats``. A seed therefore gives the same stream per step, and the
same table within noise, on a fast machine and on a busy one; only the wall time differs.

    datadiet demo                          # 1,500 steps, 32 samples per step, seed 0
    datadiet demo --steps 300 --port 8123  # a short one
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.demo.scenarios import Scenario, build_scenario
from app.demo.tasks import exact_match
from app.supervise import Supervisor
from app.text_table import print_table
from datadiet import Client, load_checkpoint
from datadiet.contract import MAX_SAMPLES_PER_REQUEST
from store.config import Settings

DEFAULT_RATE = 32.0  # samples per training step, all agents together: half of the trainer's batch of 64
LEAD_STEPS = 20  # the agents stay this many steps ahead: the first batches have something to draw from
POLL_S = 0.1  # how often the agents read the trainer's step
PUBLISH_EVERY_S = 0.5  # the trainer reports its step this often (its default, 2 s, would post in lumps)
EXTRAPOLATE_S = 1.0  # between reports, the agents assume the trainer goes on at its speed for at most this
MAX_POST = 1000  # samples per request
N_EVAL = 200


@dataclass
class Pace:
    """What the agents posted, and how far the trainer ever got ahead of them (in steps)."""

    rate: float
    steps: int  # the trainer's last step: nothing is due beyond it
    sent: dict[str, int] = field(default_factory=dict)
    total: int = 0
    max_behind: float = 0.0

    def due(self, step: int) -> int:
        """Samples to post now that the trainer is at ``step``: ``rate * (step + LEAD_STEPS)`` in all."""
        return max(0, round(self.rate * (min(step, self.steps) + LEAD_STEPS)) - self.total)


def _agents(url: str, scn: Scenario, pace: Pace, seed: int, stop: threading.Event) -> None:
    """Keep ``pace.due(step)`` samples of the scenario's stream posted, step read from ``/v1/stats``,
    until stopped. The first ``LEAD_STEPS`` steps' worth go in one request, before the trainer's first
    step (it starts on its first poll that finds samples), so every run starts from the same table."""
    stream = scn.stream(10_000_000, seed)
    reported, seen_at, speed = 0, time.monotonic(), 0.0  # the trainer's last reported step and speed
    with Client(url) as client:
        while not stop.is_set():
            # between two reports (every PUBLISH_EVERY_S or more) the trainer goes on at its last speed
            since = min(time.monotonic() - seen_at, EXTRAPOLATE_S)
            n = pace.due(reported + int(speed * since))
            if n > 0:
                batch = [next(stream) for _ in range(n if pace.total == 0 else min(n, MAX_POST))]
                try:
                    client.post_samples(batch, batch_size=min(len(batch), MAX_SAMPLES_PER_REQUEST))
                except Exception as e:  # the demo goes on; the agents log and post the batch again
                    print(f"\nagents: post failed: {e}", file=sys.stderr)
                    stream = itertools.chain(batch, stream)
                    stop.wait(1.0)
                    continue
                for s in batch:
                    pace.sent[s["source"]] = pace.sent.get(s["source"], 0) + 1
                pace.total += len(batch)
                continue
            stop.wait(POLL_S)
            try:
                t = client.stats()["trainer"]
            except Exception as e:  # the demo goes on; the agents log and read again
                print(f"\nagents: stats failed: {e}", file=sys.stderr)
                stop.wait(1.0)
                continue
            if (t["step"] or 0) != reported:
                reported, seen_at, speed = int(t["step"]), time.monotonic(), float(t["steps_per_s"] or 0)
                # steps the trainer took beyond what the agents had posted for (<= 0 while they keep up)
                pace.max_behind = max(pace.max_behind, reported - (pace.total / pace.rate - LEAD_STEPS))


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
    # an untrained model never ends its answer: in the demo's 64-token block each prediction runs to the
    # end (half a minute on 2 cores); 16 tokens hold any prompt here, its answer and the end token
    model = build_model(scn.model, {**scn.model_config, "block_size": 16}).eval()
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
        "DATADIET_PUBLISH_EVERY_S": str(PUBLISH_EVERY_S),
        "DATADIET_REDIS_URL": "",  # always the embedded Redis: the demo never touches a configured one
    }
    settings = Settings(data_dir=data_dir, database_url=env["DATADIET_DATABASE_URL"], redis_url=None)
    sup = Supervisor(settings, host, port, log_dir=data_dir / "logs", env=env)
    print(
        f"datadiet demo: 4 simulated agents posting {rate:g} samples per training step, tiny GPT, "
        f"{steps} steps; logs in {data_dir / 'logs'}"
    )
    stop = threading.Event()
    pace = Pace(rate, steps)
    test = scn.test[:N_EVAL]
    start_acc = _untrained_accuracy(scn, seed, test)
    acc: tuple[float, int] | None = None
    try:
        sup.start()
        sup.wait_ready(timeout=120)
        client = Client(sup.url)
        client.set_validation(scn.validation)
        agents = threading.Thread(target=_agents, args=(sup.url, scn, pace, seed, stop), daemon=True)
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
        _summary(client, scn, pace, start_acc, acc, data_dir / "summary.json")
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
    client: Client,
    scn: Scenario,
    pace: Pace,
    start_acc: float,
    acc: tuple[float, int] | None,
    out: Path,
) -> None:
    """Print the final table, and write it to ``out`` as JSON (one object per agent, plus the totals)."""
    w = client.weights()
    stats = w.get("source_stats", {})
    agents = {
        name: {
            "true_quality": quality,
            "share": w["sources"].get(name, 0.0),
            "mean_weight": stats.get(name, {}).get("mean_weight", 0.0),
            "sent": pace.sent.get(name, 0),
        }
        for name, quality in sorted(scn.true_quality.items(), key=lambda kv: -kv[1])
    }
    rows = [
        (name, f"{a['true_quality']:.0%}", f"{a['share']:.3f}", f"{a['mean_weight']:.2f}", f"{a['sent']:,}")
        for name, a in agents.items()
    ]
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
    print(
        f"paced at {pace.rate:g} samples per step; the trainer was at most {max(pace.max_behind, 0):.0f} "
        "steps ahead of the agents"
    )
    summary = {
        "step": w["step"],
        "rate": pace.rate,
        "max_steps_behind": max(pace.max_behind, 0.0),
        "agents": agents,
        "exact_match": {
            "start": start_acc,
            "end": acc[0] if acc else None,
            "end_step": acc[1] if acc else None,
        },
        "received": b["ingested"],
        "duplicates": b["duplicates"],
        "effective_fraction": s["effective_fraction"],
    }
    out.write_text(json.dumps(summary, indent=2) + "\n")

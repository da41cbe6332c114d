"""A trainer on a buffer that stops changing: does it idle, what does it cost meanwhile, how soon does a new
sample wake it, and how many checkpoints are left (issue 15).

    python bench/trainer_idle.py                   # tiny-gpt on the CPU, ~2 min on 2 busy cores
    python bench/trainer_idle.py --idle-after-s 30 --patience 300 --checkpoint-every 250   # the defaults

Runs ``datadiet up`` (embedded Redis, SQLite) in a scratch data dir with the trainer's metrics port on,
puts a 64-sample validation set and posts 500 arithmetic samples once; every 10 s it prints the trainer's
CPU use (from /proc), step, validation loss, state (``/v1/stats``) and the checkpoint files on disk. Once
the trainer has been idle for 20 s it posts one sample and reports how long the trainer took to step again
(``datadiet_trainer_step`` on the metrics port), then stops ``up``. Prints a markdown table; Linux only.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from store.processes import datadiet_env, free_port, wait_until_ready  # noqa: E402


def arithmetic(n: int, prefix: str, rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        out.append({"id": f"{prefix}{i}", "source": "calc", "input": f"{a}+{b}=", "target": str(a + b)})
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def trainer_pid(session: int) -> int | None:
    out = subprocess.run(["pgrep", "-s", str(session), "-f", "m trainer$"], capture_output=True)
    pids = [int(p) for p in out.stdout.split()]
    return pids[0] if pids else None


def metric(url: str, name: str) -> float | None:
    try:
        text = httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        return None
    return next((float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")), None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--idle-after-s", default="10")
    p.add_argument("--patience", default="300")
    p.add_argument("--checkpoint-every", default="50")
    p.add_argument("--limit-s", type=float, default=420.0, help="give up waiting for idle after this long")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dd-idle-"))
    port, metrics_port = free_port(), free_port()
    env = datadiet_env(
        idle_after_s=args.idle_after_s,
        idle_patience=args.patience,
        checkpoint_every=args.checkpoint_every,
        trainer_metrics_port=str(metrics_port),
    )
    argv = [sys.executable, "-m", "app.cli", "up", "--data-dir", str(work / "data"), "--port", str(port)]
    with (work / "up.log").open("wb") as log:
        up = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
    base, metrics_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    rows: list[str] = []  # the table, printed as it grows
    try:
        wait_until_ready(base, up, work / "up.log", timeout=120)
        rng = random.Random(0)
        t0 = time.monotonic()
        httpx.put(f"{base}/v1/validation", json={"samples": arithmetic(64, "v", rng)}).raise_for_status()
        httpx.post(f"{base}/v1/samples", json={"samples": arithmetic(500, "a", rng)}).raise_for_status()
        pid = None
        while pid is None:
            pid = trainer_pid(up.pid)
            time.sleep(0.2)
        last_cpu, last_t, idle_since = cpu_seconds(pid), time.monotonic(), None
        print("| t (s) | trainer CPU (% of a core) | step | val_loss | state | checkpoint files |")
        print("|---|---|---|---|---|---|", flush=True)
        while time.monotonic() - t0 < args.limit_s:
            time.sleep(10)
            cpu, now = cpu_seconds(pid), time.monotonic()
            t = httpx.get(f"{base}/v1/stats").json()["trainer"]
            ckpts = len(list((work / "data" / "checkpoints").glob("v*.safetensors")))
            rows.append(
                f"| {now - t0:.0f} | {100 * (cpu - last_cpu) / (now - last_t):.1f} | {t['step']} "
                f"| {t['val_loss']} | {t['state']} | {ckpts} |"
            )
            print(rows[-1], flush=True)
            last_cpu, last_t = cpu, now
            if t["state"] == "idle":
                idle_since = idle_since or now
                if now - idle_since >= 20:
                    break
        if idle_since is None:
            print(f"the trainer did not idle within {args.limit_s:.0f} s")
            return 1
        step = metric(metrics_url, "datadiet_trainer_step")
        posted = time.monotonic()
        httpx.post(f"{base}/v1/samples", json={"samples": arithmetic(1, "new", rng)}).raise_for_status()
        while metric(metrics_url, "datadiet_trainer_step") in (None, step):
            assert time.monotonic() - posted < 30, "the trainer did not resume"
            time.sleep(0.02)
        woke = time.monotonic() - posted
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        up.wait(60)
    print(f"\nidle after {idle_since - t0:.0f} s; a new sample resumed training {woke:.2f} s after its POST")
    idle_lines = [
        ln for ln in (work / "up.log").read_text().splitlines() if " idle: " in ln or "resuming" in ln
    ]
    print("\n".join(idle_lines))
    print(f"(logs: {work / 'up.log'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

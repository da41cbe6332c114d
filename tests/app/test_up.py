"""``datadiet up``: starts the whole service on the embedded defaults, restarts a crashed child, and stops
cleanly on SIGTERM leaving no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, datadiet_env, free_port, stop_process_group

pytestmark = pytest.mark.slow


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready in {timeout}s")


def api_pid(pid: int) -> int:
    for p in descendants(pid):
        try:
            if b"uvicorn" in Path(f"/proc/{p}/cmdline").read_bytes():
                return p
        except OSError:
            continue
    raise AssertionError("no API process under the supervisor")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_up_restarts_a_crashed_child_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = datadiet_env(
        data_dir=str(tmp_path / "data"),
        model="mlp",
        model_config='{"n_features": 4, "n_classes": 3}',
        torch_threads="1",
    )
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "up", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_ready(url)
        procs = descendants(proc.pid)
        assert len(procs) >= 3  # embedded redis, API, trainer
        sample = {"source": "a", "input": [1, 2, 3, 4], "target": 1}
        assert httpx.post(url + "/v1/samples", json={"samples": [sample]}).status_code == 202

        crashed = api_pid(proc.pid)
        os.kill(crashed, signal.SIGKILL)
        time.sleep(0.5)
        wait_ready(url, timeout=30)  # restarted after a backoff, on the same embedded Redis
        assert api_pid(proc.pid) != crashed
        assert httpx.get(url + "/v1/stats").json()["buffer"]["ingested"] == 1  # nothing lost

        procs = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        time.sleep(0.5)
        assert [p for p in procs if alive(p)] == []
    finally:
        stop_process_group(proc)
        log.close()

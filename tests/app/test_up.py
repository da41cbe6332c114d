"""``datadiet up``: starts the whole service on the embedded defaults, restarts a crashed child, and stops
cleanly on SIGTERM leaving no process behind. It fails at once, with one line and nothing left running, on a
busy port, on a data dir another ``up`` holds, and on an invalid setting; and gives up on a child that can
never start instead of restarting it forever."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from app.supervise import StartError, bind_listener, hold_lock
from store.processes import datadiet_env, free_port, spawn, stop_process_group, wait_until_ready
from tests.conftest import REPO_ROOT

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
    proc, _ = start_up(tmp_path, "data", port)
    try:
        wait_until_ready(url, timeout=60)
        procs = descendants(proc.pid)
        assert len(procs) >= 3  # embedded redis, API, trainer
        sample = {"source": "a", "input": [1, 2, 3, 4], "target": 1}
        assert httpx.post(url + "/v1/samples", json={"samples": [sample]}).status_code == 202

        crashed = api_pid(proc.pid)
        os.kill(crashed, signal.SIGKILL)
        time.sleep(0.5)
        # the supervisor holds the port: a request sent while no API runs waits for the next one, not refused
        assert httpx.get(url + "/healthz", timeout=60).status_code == 200
        wait_until_ready(url, timeout=30)  # restarted after a backoff, on the same embedded Redis
        assert api_pid(proc.pid) != crashed
        assert httpx.get(url + "/v1/stats").json()["buffer"]["ingested"] == 1  # nothing lost

        procs = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        time.sleep(0.5)
        assert [p for p in procs if alive(p)] == []
    finally:
        stop_process_group(proc)


MLP = {"model": "mlp", "model_config": '{"n_features": 4, "n_classes": 3}', "torch_threads": "1"}


def start_up(tmp_path: Path, name: str, port: int, **settings: str) -> tuple[subprocess.Popen[bytes], Path]:
    """``datadiet up --port port`` on the data dir ``<tmp_path>/<name>`` in the background; its output goes
    to a log of its own (returned)."""
    log = tmp_path / f"{name}-{secrets.token_hex(4)}.log"
    env = datadiet_env(**{"data_dir": str(tmp_path / name), **MLP, **settings})
    proc = spawn(
        [sys.executable, "-m", "app.cli", "up", "--port", str(port)], log=log, env=env, cwd=REPO_ROOT
    )
    return proc, log


def run_up(
    tmp_path: Path, name: str, port: int, timeout: float = 30, **settings: str
) -> tuple[int, list[str]]:
    """Run ``datadiet up`` to its end: exit status and output lines."""
    proc, log = start_up(tmp_path, name, port, **settings)
    try:
        return proc.wait(timeout=timeout), log.read_text().splitlines()
    finally:
        stop_process_group(proc)


def test_up_on_a_port_another_program_holds_fails_at_once_and_starts_nothing(tmp_path: Path) -> None:
    with closing(socket.socket()) as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        t0 = time.monotonic()
        code, lines = run_up(tmp_path, "data", port)
    assert code == 1 and time.monotonic() - t0 < 10
    assert lines == [
        f"datadiet: port {port} on 127.0.0.1 is already in use " + lines[0].split("in use ", 1)[1]
    ]
    assert not (tmp_path / "data" / "redis").exists()  # no embedded Redis was started, nor anything else


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_second_up_fails_fast_on_the_first_ones_port_or_data_dir(tmp_path: Path) -> None:
    port = free_port()
    first, _ = start_up(tmp_path, "data", port)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", timeout=60)
        procs = descendants(first.pid)

        # the reported case: same port, other data dir -- it used to print "up", then restart its API forever
        code, lines = run_up(tmp_path, "other", port)
        assert code == 1
        assert lines[-1].startswith(f"datadiet: port {port} on 127.0.0.1 is already in use")
        assert not (tmp_path / "other" / "redis").exists()

        code, lines = run_up(tmp_path, "data", free_port())  # same data dir, free port
        assert code == 1
        assert lines[-1].startswith(f"datadiet: another datadiet is already running on {tmp_path / 'data'} ")
        assert f"pid {first.pid}, API at http://127.0.0.1:{port}" in lines[-1]

        assert descendants(first.pid) == procs  # the first one was not disturbed
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
    finally:
        stop_process_group(first)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_up_gives_up_on_a_trainer_that_cannot_start_and_leaves_nothing_running(tmp_path: Path) -> None:
    proc, log = start_up(tmp_path, "data", free_port(), model="no-such-kind")
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= descendants(proc.pid)
            time.sleep(0.2)
        assert proc.returncode == 1
    finally:
        stop_process_group(proc)
    last = log.read_text().splitlines()[-1]
    # a configuration error (exit 78) is not retried: it will not fix itself
    assert last.startswith(
        "datadiet: the trainer cannot start: its configuration is invalid (exited with status 78)"
    )
    assert "unknown model kind 'no-such-kind'" in last
    assert len(seen) >= 3 and [p for p in seen if alive(p)] == []  # Redis and the API were stopped too


@pytest.mark.parametrize(
    ("setting", "value", "line"),
    [
        ("max_steps", "-1", "DATADIET_MAX_STEPS='-1': Input should be greater than or equal to 0"),
        ("api_keys", " , ", "DATADIET_API_KEYS=' , ' holds no key"),  # the API would refuse it at start
    ],
)
def test_up_with_an_invalid_setting_says_which_in_one_line(
    tmp_path: Path, setting: str, value: str, line: str
) -> None:
    t0 = time.monotonic()
    code, lines = run_up(tmp_path, "data", free_port(), **{setting: value})
    assert code == 1 and time.monotonic() - t0 < 10
    assert len(lines) == 1 and lines[0].startswith(f"datadiet: invalid setting {line}")
    assert not (tmp_path / "data").exists()  # nothing started


def test_binding_a_taken_port_is_a_start_error() -> None:
    with closing(bind_listener("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        with pytest.raises(StartError, match=f"port {port} on 127.0.0.1 is already in use"):
            bind_listener("127.0.0.1", port)


def test_a_held_lock_is_a_start_error_naming_its_holder(tmp_path: Path) -> None:
    fd = hold_lock(tmp_path / "up.lock", "pid 1, API at http://127.0.0.1:1")
    try:
        with pytest.raises(StartError, match=r"already running on .* \(pid 1, API at http://127.0.0.1:1\)"):
            hold_lock(tmp_path / "up.lock", "pid 2")
    finally:
        os.close(fd)
    os.close(hold_lock(tmp_path / "up.lock", "pid 2"))  # released with its holder's fd: free again


def test_up_says_what_it_waits_for_when_a_dependency_does_not_answer_then_stops_cleanly(
    tmp_path: Path,
) -> None:
    """A Redis that refuses every connection: within ~10 s ``up`` says it is not ready and why (what
    /readyz answers), not silence until its 60 s timeout; Ctrl-C then stops it with status 0."""
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    proc, log = start_up(tmp_path, "data", free_port(), redis_url=dead)
    try:
        deadline = time.monotonic() + 30
        while "not ready yet" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        line = next(x for x in log.read_text().splitlines() if "not ready yet" in x)
        assert "redis is unavailable" in line and "waiting up to 60 s" in line, line
        assert "datadiet is up" not in log.read_text()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        stop_process_group(proc)

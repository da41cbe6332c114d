"""The CLI's client commands (``datadiet push``, ``weights``, ``pull``) against a real API, or none.

Nothing listening is one plain line and exit 1 at once (no retrying a refused connection); an API that
answers 503 is retried, after its Retry-After, and then reported in one line, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from store.processes import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]


def datadiet_cli(*args: str, cwd: Path) -> tuple[int, str, str, float]:
    """Run ``datadiet ARGS`` (as ``python -m app.cli``): exit code, stdout, stderr, seconds taken."""
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.returncode, out.stdout, out.stderr, time.monotonic() - start


@pytest.mark.parametrize("command", [["weights"], ["push", "samples.jsonl"], ["pull", "models/"]])
def test_with_nothing_listening_a_client_command_fails_at_once_in_one_line(
    command: list[str], tmp_path: Path
) -> None:
    sample = {"source": "agent-a", "input": "1+1=", "target": "2"}
    (tmp_path / "samples.jsonl").write_text(json.dumps(sample) + "\n")
    url = f"http://127.0.0.1:{free_port()}"

    code, stdout, stderr, took = datadiet_cli(*command, "--url", url, cwd=tmp_path)

    assert code == 1
    assert stderr == f"datadiet: cannot reach the API at {url}: connection refused\n"
    assert stdout == ""
    assert took < 5.0  # was 16-19 s of retrying, then a 60-line traceback
    assert not (tmp_path / "models" / "model.safetensors").exists()


@pytest.mark.slow
def test_an_api_answering_503_is_retried_after_retry_after_then_reported_in_one_line(
    start_api: Callable[..., str], dedicated_redis: RedisServer, tmp_path: Path
) -> None:
    api = start_api(redis_url=dedicated_redis.url)
    dedicated_redis.stop()  # the API is up; its Redis is not: 503s

    code, _, stderr, took = datadiet_cli("weights", "--url", api, cwd=tmp_path)

    *retries, last = stderr.splitlines()
    assert code == 1
    assert last.startswith("datadiet: HTTP 503 ")
    assert last.endswith("(GET /v1/weights; gave up after 6 tries)")
    assert len(retries) == 5 and all("HTTP 503; retrying in 1.00s" in line for line in retries)
    assert "Traceback" not in stderr
    assert took >= 5.0  # five waits of the API's Retry-After: 1

"""The CLI's client commands (``datadiet push``, ``weights``, ``pull``) against a real API, or none.

One API (uvicorn, its own redis-server, SQLite) serves the whole module; each test posts samples of its
own sources, so the tests do not depend on each other's order. Checkpoints are published as the trainer
publishes them (file, then row), with safetensors headers that carry their version, without torch.

Nothing listening is two plain lines and exit 1 at once (no retrying a refused connection); an API that
answers 503 is retried, after its Retry-After, and then reported in one line, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from checkpoint_rows import publish_checkpoint
from cli_run import datadiet_cli
from safetensors.numpy import save

from app.cli_client import preview
from datadiet import Client
from store.processes import (
    RedisServer,
    datadiet_env,
    free_port,
    start_api_process,
    start_redis_server,
    stop_process_group,
)


@dataclass
class Api:
    url: str
    database_url: str
    data_dir: Path

    def buffer(self) -> dict[str, int]:
        return httpx.get(f"{self.url}/v1/stats").json()["buffer"]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The real API (tiny-gpt: text samples) on a redis-server of its own, for the whole module."""
    root = tmp_path_factory.mktemp("cli-api")
    redis = start_redis_server(root / "redis")
    database_url = f"sqlite:///{root / 'meta.db'}"
    env = datadiet_env(redis_url=redis.url, data_dir=str(root / "data"), database_url=database_url)
    proc, url = start_api_process(env, log=root / "api.log", cwd=root)
    try:
        yield Api(url, database_url, root / "trainer-data")
    finally:
        stop_process_group(proc)
        redis.stop()


def checkpoint_bytes(version: int) -> bytes:
    """A safetensors file whose header names its datadiet version, as the trainer's do."""
    return save({"w": np.full(50_000, version, np.float32)}, metadata={"datadiet.version": str(version)})


@pytest.fixture(scope="module")
def checkpoints(api: Api) -> dict[int, bytes]:
    """Checkpoints v1 and v2 published on the module's API: version -> file bytes."""
    files = {v: checkpoint_bytes(v) for v in (1, 2)}
    for v, data in files.items():
        publish_checkpoint(api.database_url, api.data_dir, v, data)
    return files


def write_jsonl(path: Path, samples: list[Any], *, raw: dict[int, str] | None = None) -> Path:
    """``samples`` one JSON a line; ``raw`` replaces line i (0-based) with the given text."""
    lines = [json.dumps(s) for s in samples]
    for i, text in (raw or {}).items():
        lines[i] = text
    path.write_text("\n".join(lines) + "\n")
    return path


def text_samples(source: str, n: int) -> list[dict[str, Any]]:
    return [{"source": source, "input": f"{source} {i}+{i}=", "target": str(2 * i)} for i in range(n)]


# --- nothing listening, errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["weights"], ["push", "samples.jsonl"], ["pull", "models/"]])
def test_with_nothing_listening_a_client_command_fails_at_once_in_two_plain_lines(
    command: list[str], tmp_path: Path
) -> None:
    write_jsonl(tmp_path / "samples.jsonl", text_samples("agent-a", 1))
    url = f"http://127.0.0.1:{free_port()}"

    code, stdout, stderr, took = datadiet_cli(*command, "--url", url, cwd=tmp_path)

    assert code == 1
    assert stderr.splitlines() == [
        f"datadiet: cannot reach the API at {url}: connection refused",
        "is it running? start it with `datadiet up` (or `datadiet serve`), or give --url or $DATADIET_URL",
    ]
    assert stdout == ""
    assert took < 5.0  # was 16-19 s of retrying, then a 60-line traceback
    assert not (tmp_path / "models").exists()  # pull made no directory


def test_debug_shows_the_traceback_instead(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    code, _, stderr, _ = datadiet_cli("weights", "--url", url, "--debug", cwd=tmp_path)
    code_before, _, stderr_before, _ = datadiet_cli("--debug", "weights", "--url", url, cwd=tmp_path)

    assert code == code_before == 1
    for err in (stderr, stderr_before):
        assert err.startswith("Traceback (most recent call last):")
        assert "datadiet.errors.DatadietError: ConnectError: cannot reach the datadiet API" in err


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


# --- push -------------------------------------------------------------------------------------------------


def test_push_of_a_missing_file_is_one_plain_line(api: Api, tmp_path: Path) -> None:
    code, stdout, stderr, _ = datadiet_cli("push", "nonexistent.jsonl", "--url", api.url, cwd=tmp_path)

    assert (code, stdout) == (1, "")
    assert stderr == "datadiet: nonexistent.jsonl: no such file\n"  # was a raw FileNotFoundError


def test_push_names_every_malformed_line_by_file_and_line_and_sends_nothing(api: Api, tmp_path: Path) -> None:
    samples = text_samples("agent-malformed", 6)
    path = write_jsonl(
        tmp_path / "s.jsonl", samples, raw={1: '{"source": "a", "input": ', 3: "", 4: "[1, 2]"}
    )
    before = api.buffer()["ingested"]

    code, stdout, stderr, _ = datadiet_cli("push", path.name, "--url", api.url, cwd=tmp_path)

    assert (code, stdout) == (1, "")
    assert stderr.splitlines() == [
        "datadiet: s.jsonl: 2 bad lines; nothing was sent",
        "s.jsonl:2: not valid JSON: Expecting value (column 26)",
        "s.jsonl:5: a sample is a JSON object, got an array",
    ]
    assert api.buffer()["ingested"] == before


def test_push_names_every_sample_the_api_refuses_by_file_and_line_and_stores_none(
    api: Api, tmp_path: Path
) -> None:
    samples = text_samples("agent-refused", 2500)  # more than the old 1,000-sample batch
    samples[4]["target"] = ""
    samples[1717]["colour"] = "red"
    samples[2400]["input"] = 7
    path = write_jsonl(tmp_path / "s.jsonl", samples, raw={2: ""})  # a blank line: line numbers shift
    before = api.buffer()["ingested"]

    code, stdout, stderr, _ = datadiet_cli("push", path.name, "--url", api.url, cwd=tmp_path)

    assert (code, stdout) == (1, "")
    assert stderr.splitlines() == [
        "datadiet: s.jsonl: the API refused 3 samples (HTTP 422 ValidationError); nothing from this file "
        "was stored",
        "s.jsonl:5: target: target must not be empty",
        "s.jsonl:1718: colour: unknown field(s) ['colour']; allowed: ['id', 'input', 'meta', 'reward', "
        "'source', 'target']",
        "s.jsonl:2401: input: input must be a string for this model kind, got int",
    ]
    assert api.buffer()["ingested"] == before  # the whole file went in one all-or-nothing request


def test_push_refused_in_a_later_request_says_which_lines_were_stored(api: Api, tmp_path: Path) -> None:
    samples = text_samples("agent-late", 30)
    samples[25]["target"] = ""
    path = write_jsonl(tmp_path / "s.jsonl", samples)
    before = api.buffer()["ingested"]

    code, _, stderr, _ = datadiet_cli("push", path.name, "--batch-size", "10", "--url", api.url, cwd=tmp_path)

    assert code == 1
    assert stderr.splitlines()[-2:] == [
        "datadiet: s.jsonl: the API refused 1 sample (HTTP 422 ValidationError); nothing from lines 21-30 "
        "was stored; lines 1-20 (20 samples) were stored before it (pushing the file again once fixed is "
        "safe: they count as duplicates)",
        "s.jsonl:26: target: target must not be empty",
    ]
    assert api.buffer()["ingested"] == before + 20


def test_push_progress_counts_the_samples_sent_so_far(api: Api, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", text_samples("agent-progress", 30))

    code, stdout, stderr, _ = datadiet_cli(
        "push", path.name, "--batch-size", "10", "--url", api.url, cwd=tmp_path
    )

    assert code == 0
    counts = [line.split()[1] for line in stderr.splitlines()]
    assert counts == ["10/30", "20/30", "30/30"]  # was 10, 30, 60 of 30: sums of running totals
    assert stdout == "accepted 30, duplicates 0 (30 in s.jsonl)\n"


# --- weights ----------------------------------------------------------------------------------------------


def test_weights_lowest_shows_source_weight_and_a_preview_of_each_sample(api: Api, tmp_path: Path) -> None:
    samples = [
        {"source": "agent-preview", "input": "what is 6*7?\nanswer briefly", "target": "42"},
        {"source": "agent-preview", "input": "x" * 200, "target": "a long input"},
    ]
    with Client(api.url) as client:
        ids = client.post_samples(samples).ids
        live = client.stats()["buffer"]["size"]

    code, stdout, stderr, _ = datadiet_cli("weights", "--lowest", str(live), "--url", api.url, cwd=tmp_path)

    assert (code, stderr) == (0, "")
    header, _, *rows = stdout.splitlines()[1:]
    assert header.split() == ["weight", "source", "sample", "input", "->", "target"]
    mine = {row.split()[2]: row for row in rows if "agent-preview" in row}
    assert set(mine) == {i[:12] + "…" for i in ids}  # a 64-character id, shortened
    first, long = mine[ids[0][:12] + "…"], mine[ids[1][:12] + "…"]
    assert first.split(maxsplit=3) == [
        "1.0000",
        "agent-preview",
        ids[0][:12] + "…",
        first.split(maxsplit=3)[3],
    ]
    assert first.endswith('"what is 6*7?\\nanswer briefly" -> "42"')  # one line: the newline shown as \n
    assert long.endswith('"' + "x" * 40 + '… -> "a long input"')  # clipped to 60 characters


def test_preview_of_a_vector_and_of_a_conversation() -> None:
    vector = {"input": [0.0625, 0.5, 1.0, 0.25, 0.75] + [0.0] * 59, "target": 3}
    chat = {
        "input": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}],
        "target": "4",
    }

    assert preview(vector) == "[0.0625, 0.5, 1, 0.25, …] (64 numbers) -> 3"
    assert preview(chat) == '(+1 msgs) user: "2+2?" -> "4"'


# --- pull -------------------------------------------------------------------------------------------------


def test_pull_says_it_downloaded_then_that_the_file_is_current(
    api: Api, checkpoints: dict[int, bytes], tmp_path: Path
) -> None:
    code, first, _, _ = datadiet_cli("pull", "m/", "--version", "1", "--url", api.url, cwd=tmp_path)
    code_again, again, _, _ = datadiet_cli("pull", "m/", "--version", "1", "--url", api.url, cwd=tmp_path)

    assert code == code_again == 0
    assert first == "downloaded v1 (200 kB) to m/model.safetensors\n"
    assert again == "m/model.safetensors is current (v1)\n"
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == checkpoints[1]


def test_pull_replaces_an_older_file_with_latest_but_no_other_version_without_force(
    api: Api, checkpoints: dict[int, bytes], tmp_path: Path
) -> None:
    target = tmp_path / "m" / "model.safetensors"
    datadiet_cli("pull", "m/", "--version", "1", "--url", api.url, cwd=tmp_path)

    code, stdout, _, _ = datadiet_cli("pull", "m/", "--url", api.url, cwd=tmp_path)
    assert (code, stdout) == (0, "downloaded v2 (200 kB) to m/model.safetensors, replacing v1\n")

    code, stdout, stderr, _ = datadiet_cli("pull", "m/", "--version", "1", "--url", api.url, cwd=tmp_path)
    assert (code, stdout) == (1, "")
    assert (
        stderr == "datadiet: m/model.safetensors holds v2; not replaced by v1; pass --force to replace it\n"
    )
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(checkpoints[2]).digest()

    code, stdout, _, _ = datadiet_cli(
        "pull", "m/", "--version", "1", "--force", "--url", api.url, cwd=tmp_path
    )
    assert (code, stdout) == (0, "downloaded v1 (200 kB) to m/model.safetensors, replacing v2\n")
    assert target.read_bytes() == checkpoints[1]


def test_pull_does_not_replace_a_file_that_is_not_a_checkpoint_without_force(
    api: Api, checkpoints: dict[int, bytes], tmp_path: Path
) -> None:
    (tmp_path / "notes.safetensors").write_text("my notes")

    code, _, stderr, _ = datadiet_cli("pull", "notes.safetensors", "--url", api.url, cwd=tmp_path)

    assert code == 1
    assert stderr == (
        "datadiet: notes.safetensors is not a datadiet checkpoint; not replaced by v2; pass --force to "
        "replace it\n"
    )
    assert (tmp_path / "notes.safetensors").read_text() == "my notes"


def test_a_failed_pull_creates_nothing(api: Api, checkpoints: dict[int, bytes], tmp_path: Path) -> None:
    code, stdout, stderr, _ = datadiet_cli(
        "pull", "m/deep/", "--version", "99", "--url", api.url, cwd=tmp_path
    )

    assert (code, stdout) == (1, "")
    assert stderr == f"datadiet: no checkpoint v99 on {api.url}; nothing was written\n"
    assert list(tmp_path.iterdir()) == []  # was: m/deep/ created even though the pull failed

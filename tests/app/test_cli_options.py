"""The ``datadiet`` command's own options: ``--version``, ``--data-dir``, and help that says where data goes
and what each option does. The real CLI in a subprocess; no API needed."""

from __future__ import annotations

import re
import socket
from importlib.metadata import version
from pathlib import Path

import pytest
from cli_run import datadiet_cli

from store.processes import free_port

WIDE = {"COLUMNS": "1000"}  # help on one line per option, so the text can be matched


def test_version_prints_the_installed_version(tmp_path: Path) -> None:
    code, stdout, _, _ = datadiet_cli("--version", cwd=tmp_path)

    assert (code, stdout) == (0, f"datadiet {version('datadiet')}\n")


@pytest.mark.parametrize("command", ["up", "train"])
def test_server_help_prints_where_the_data_goes_now(command: str, tmp_path: Path) -> None:
    _, default, _, _ = datadiet_cli(command, "--help", cwd=tmp_path, env=WIDE)
    _, from_env, _, _ = datadiet_cli(
        command, "--help", cwd=tmp_path, env={**WIDE, "DATADIET_DATA_DIR": "/srv/dd"}
    )

    assert f"(now: {tmp_path.resolve() / 'datadiet-data'}; set by --data-dir or DATADIET_DATA_DIR)" in default
    assert "(now: /srv/dd; set by --data-dir or DATADIET_DATA_DIR)" in from_env
    assert "--data-dir DIR" in default


def test_every_option_of_push_and_demo_has_help(tmp_path: Path) -> None:
    _, push, _, _ = datadiet_cli("push", "--help", cwd=tmp_path, env=WIDE)
    _, demo, _, _ = datadiet_cli("demo", "--help", cwd=tmp_path, env=WIDE)

    assert re.search(r"--batch-size N +samples per request, 1-10,000", push)
    assert "each all-or-nothing" in push  # what a push does when a line is bad
    assert re.search(r"--seed SEED +seeds the agents' streams and the trainer", demo)


def test_a_batch_size_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    code, _, stderr, _ = datadiet_cli("push", "s.jsonl", "--batch-size", "20000", cwd=tmp_path)

    assert code == 2
    assert (
        stderr.splitlines()[-1]
        == "datadiet push: error: argument --batch-size: must be in [1, 10000], got 20000"
    )


def test_data_dir_sets_where_up_keeps_its_data(tmp_path: Path) -> None:
    with socket.socket() as busy:  # up takes its data dir's lock, then finds the port busy: exit 1, quickly
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, stderr, _ = datadiet_cli("up", "--data-dir", "elsewhere", "--port", str(port), cwd=tmp_path)

    assert code == 1
    assert f"port {port} on 127.0.0.1 is already in use" in stderr
    assert (tmp_path / "elsewhere" / "up.lock").is_file()
    assert not (tmp_path / "datadiet-data").exists()


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (
            ["serve"],
            {"DATADIET_BUFFER_MAX_SAMPLES": "abc", "DATADIET_SEED": "x"},
            ["BUFFER_MAX_SAMPLES", "SEED"],
        ),
        (["serve"], {"DATADIET_REDIS_URL": "foo://bar"}, ["REDIS_URL"]),
        (["train"], {"DATADIET_TORCH_THREADS": "-3"}, ["TORCH_THREADS"]),
        (["up"], {"DATADIET_LEASE_TTL_S": "soon"}, ["LEASE_TTL_S"]),
    ],
)
def test_a_setting_that_cannot_be_used_is_named_as_its_variable_not_an_unexpected_error(
    argv: list[str], env: dict[str, str], named: list[str], tmp_path: Path
) -> None:
    """Whatever the command and whichever setting: one line naming each bad variable (DATADIET_X='value':
    why), no traceback, no 'unexpected error', and nothing started."""
    port = [] if argv == ["train"] else ["--port", str(free_port())]
    code, _, err, _ = datadiet_cli(*argv, *port, cwd=tmp_path, env=env)
    assert code != 0 and len(err.splitlines()) == 1 and err.startswith("datadiet: invalid setting DATADIET_")
    for name in named:
        assert re.search(rf"DATADIET_{name}\W", err), err
    assert "unexpected" not in err and "Traceback" not in err, err
    assert not (tmp_path / "datadiet-data" / "redis").exists()  # failed before starting anything


def test_the_trainer_alone_names_a_setting_that_cannot_be_used_and_exits_78(tmp_path: Path) -> None:
    import subprocess
    import sys

    from cli_run import ROOT

    out = subprocess.run(
        [sys.executable, "-m", "trainer"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "DATADIET_CHECKPOINT_EVERY": "often"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 78
    assert (
        out.stderr.startswith("invalid setting DATADIET_CHECKPOINT_EVERY='often': ")
        and "Traceback" not in out.stderr
    )

"""docker-compose.yml, checked without a Docker engine (none runs on our machines, so ``docker compose
config`` cannot): valid against the Compose Specification's JSON schema (vendored in .ci/, with its source
and licence), and our own rules: every ``DATADIET_*`` variable a service sets is a setting its process
reads, ``depends_on`` names services that exist and can satisfy the condition, the schema is migrated once
by a one-shot service the API and trainer wait for, each command is a real ``datadiet`` command line, and
the API can be scaled (no container_name, a host port range)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from app.cli import parser
from docs.gen_settings import all_env_names
from store.config import Settings
from trainer.settings import TrainerSettings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / ".ci" / "compose-spec.json"
ENV = {"DATADIET_API_KEYS": "ops:admin"}  # `docker compose up` refuses to start without it (${...:?})
VARIABLE = re.compile(r"\$\{(\w+)(?::?([-?])((?:[^{}]|\{[^{}]*\})*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` (compose-spec: Interpolation), as
    ``docker compose config`` applies them before it validates; ValueError for a ``:?`` left unset."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        if env.get(name):
            return env[name]
        if op == "?":
            raise ValueError(f"{name}: {arg}")
        return arg if op == "-" else ""

    return VARIABLE.sub(one, value)


def load(env: dict[str, str] = ENV) -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    schema = json.loads(
        SCHEMA.read_text()
    )  # "$schema": draft-07, written without the "#" jsonschema looks for
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def ours(services: dict[str, Any]) -> dict[str, Any]:
    """The services that run our image."""
    return {name: s for name, s in services.items() if "build" in s}


def test_the_compose_file_is_valid_against_the_compose_spec_schema() -> None:
    assert schema_errors(load()) == []


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d["services"]["api"].update(buidl="."),  # a misspelt key
        lambda d: d["services"]["api"].update(ports=8000),  # a port that is not a list
        lambda d: d["services"]["api"]["depends_on"]["migrate"].update(condition="service_done"),
    ],
)
def test_the_schema_check_catches_a_broken_file(break_it: Any) -> None:
    doc = load()
    break_it(doc)
    assert schema_errors(doc)


def test_the_api_keys_are_required_to_start_it() -> None:
    with pytest.raises(ValueError, match="DATADIET_API_KEYS"):
        load(env={})


def test_every_datadiet_variable_is_a_setting_its_process_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    readers = {"trainer": TrainerSettings}  # the others run the API or the CLI: Settings
    for name, service in ours(load()["services"]).items():
        reader = readers.get(name, Settings)
        env = {k: str(v) for k, v in service.get("environment", {}).items()}
        unknown = set(env) - all_env_names(reader)
        assert not unknown, f"{name} sets {sorted(unknown)}, which {reader.__name__} does not read"
        with monkeypatch.context() as m:  # and the process would start on these values
            for k, v in env.items():
                m.setenv(k, v)
            reader(_env_file=None)  # type: ignore[call-arg]


def test_depends_on_names_services_that_can_satisfy_it() -> None:
    services = load()["services"]
    for name, service in services.items():
        for target, how in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on {target}, which is not a service"
            condition = how.get("condition", "service_started")
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck for {name} to wait on"
            if condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} must run once"


def test_migrations_run_once_before_the_api_and_the_trainer() -> None:
    services = load()["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["datadiet", "migrate"]
    for name in ("api", "trainer"):
        assert services[name]["environment"]["DATADIET_AUTO_MIGRATE"] == "false"
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}


def test_each_command_is_a_real_datadiet_command_line() -> None:
    for name, service in ours(load()["services"]).items():
        command = service["command"]
        assert command[0] == "datadiet", name
        parser().parse_args(command[1:])  # exits (SystemExit) on an unknown command or option


def test_the_api_can_be_scaled() -> None:
    """``docker compose up --scale api=N``: no fixed container name anywhere, and the API publishes a host
    port range (a replica each) that no other service's published port overlaps."""
    services = load()["services"]
    assert not any("container_name" in s for s in services.values())
    published: dict[str, set[int]] = {}
    for name, service in services.items():
        for port in service.get("ports", []):
            host = str(port).rsplit(":", 1)[0].split(":")[-1]  # [ip:]host[-range]:container
            first, _, last = host.partition("-")
            published[name] = set(range(int(first), int(last or first) + 1))
    assert len(published["api"]) >= 2, "a single host port lets only one API replica start"
    for name, ports in published.items():
        for other, theirs in published.items():
            assert name == other or not ports & theirs, f"{name} and {other} publish the same host ports"

"""The agent side imports no server: ``from datadiet import Client, load_checkpoint`` in a fresh interpreter
leaves FastAPI, Starlette, Redis, SQLAlchemy, uvicorn and Alembic out of ``sys.modules``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER_PACKAGES = {"fastapi", "starlette", "redis", "sqlalchemy", "uvicorn", "alembic"}


def top_level_modules_after(code: str) -> set[str]:
    """The top-level packages in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_the_client_and_the_checkpoint_loader_import_no_server_package() -> None:
    loaded = top_level_modules_after("from datadiet import Client, DatadietError, load_checkpoint")

    assert {"datadiet", "httpx", "torch"} <= loaded  # the probe saw the imports happen
    assert loaded & SERVER_PACKAGES == set()


def test_posting_samples_does_not_import_torch() -> None:
    loaded = top_level_modules_after("from datadiet import Client")

    assert "torch" not in loaded
    assert loaded & SERVER_PACKAGES == set()


@pytest.mark.parametrize("module", ["app", "app.cli"])
def test_importing_the_app_package_or_the_cli_imports_no_server_package(module: str) -> None:
    assert top_level_modules_after(f"import {module}") & SERVER_PACKAGES == set()


def test_the_demo_does_not_import_the_cli() -> None:
    probe = "import app.demo.run, sys\nprint('app.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

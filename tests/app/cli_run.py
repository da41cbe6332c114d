"""Run the real ``datadiet`` command in a subprocess, for the CLI tests.

``from cli_run import datadiet_cli`` (``tests/app`` is on ``sys.path``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def datadiet_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
    """Run ``datadiet ARGS`` (as ``python -m app.cli``) in ``cwd`` with a bare environment plus ``env``:
    exit code, stdout, stderr, seconds taken."""
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.returncode, out.stdout, out.stderr, time.monotonic() - start

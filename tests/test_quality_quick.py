"""The quality benchmark's smoke run, as CI runs it: ``python bench/quality.py --quick`` (the noisy scenario,
seed 0, uniform and bilevel through the real API and trainer processes, 1,000 steps, ~1-2 minutes on 2
cores) exits 0 only when bilevel's held-out test accuracy beats uniform's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_quick_quality_benchmark_bilevel_beats_uniform_on_noisy_stream(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/quality.py", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # exit 0: bilevel beat uniform; 1: the run completed but it did not; anything else is a crash
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "quality-quick.md").exists()
    assert "QUICK PASS" in proc.stdout

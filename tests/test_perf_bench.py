"""The performance benchmark's smoke run: ``python bench/perf.py --quick --only publish,memory`` (~10 s on 2
cores) writes perf.md and perf.json whose tables hold measured numbers, and names a section it does not
know plainly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def perf(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "bench/perf.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_quick_publish_and_memory_sections_produce_tables_of_numbers(tmp_path: Path) -> None:
    proc = perf("--quick", "--only", "publish,memory", "--out", str(tmp_path))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    doc = json.loads((tmp_path / "perf.json").read_text())
    assert doc["command"].endswith(f"--quick --only publish,memory --out {tmp_path}")
    assert doc["cpus"] >= 1 and len(doc["load_average_start"]) == 3 and doc["commit"]
    assert list(doc["sections"]) == ["publish", "memory"]
    publish, memory = doc["sections"]["publish"], doc["sections"]["memory"]
    assert publish["error"] is None and memory["error"] is None
    # a first publish and publishes after 1%, 10% and 100% changed, each timed beside its floor
    kinds = [row[0] for row in publish["rows"]]
    assert kinds == [
        "first publish (everything new)",
        "after 1% changed",
        "after 10% changed",
        "after 100% changed",
    ]
    for row in publish["rows"]:
        changed, written, secs, mb, publishes, all_s, floor_s = (row[i] for i in (1, 2, 3, 4, 6, 7, 8))
        assert changed > 0 and 0 < secs < 60 and mb > 0 and 0 < floor_s < 60
        assert written is None or 0 <= written <= changed  # the publisher's own count, where it gives one
        assert publishes >= 1 and secs <= all_s < 600
        assert row[10].endswith("x")  # the ratio to the floor beside the absolutes
    assert publish["rows"][1][1] * 50 < publish["rows"][3][1]  # 1% of the rows changed, not all
    rows = {row[0]: row for row in memory["rows"]}
    payload = rows["payload: compact JSON as stored (floor)"][1]
    redis_growth = rows["Redis `used_memory` growth"][1]
    trainer = rows["trainer: all (`WeightTable.nbytes`)"][1]
    assert 800 < payload < 1200  # ~1 KB samples
    assert payload < redis_growth < 4 * payload  # Redis holds the payload, plus its indexes
    assert 8 < trainer < 1000
    md = (tmp_path / "perf.md").read_text()
    assert "## 3. Publishing weights" in md and "## 5. Memory per sample" in md
    assert "| after 1% changed | 1,000 |" in md
    # each table printed as its section finished, then the targets gathered from them
    printed = [line for line in proc.stdout.splitlines() if line.startswith("## ")]
    assert printed == ["## 3. Publishing weights", "## 5. Memory per sample", "## Targets"]
    assert "| 3. Publishing weights | after 1% changed | <= 0.5 s: " in proc.stdout


def test_unknown_section_is_refused_plainly(tmp_path: Path) -> None:
    proc = perf("--only", "publish,nonsense", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "bench/perf.py: unknown section nonsense; choose from "
        "ingest, reads, publish, checkpoint, memory, freshness, step"
    )
    assert not (tmp_path / "perf.json").exists()

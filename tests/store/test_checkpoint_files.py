"""Checkpoint files on disk: a write killed half-way leaves a temp file; the start-up sweep removes exactly
those and never a published file."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from store.checkpoints import checkpoint_path, remove_stale_temp_files, write_atomic
from tests.conftest import REPO_ROOT

# A child that writes a checkpoint bigger than its file-size limit: the kernel kills it with SIGXFSZ in the
# middle of write_atomic's write (Python ignores SIGXFSZ by default, so it is restored first), so the
# function's own cleanup never runs -- the same trace a SIGKILL during a checkpoint write leaves.
KILLED_WRITE = """
import resource, signal, sys
from store.checkpoints import checkpoint_path, write_atomic
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
write_atomic(checkpoint_path(sys.argv[1], int(sys.argv[2])), b"x" * 65536)
"""


def killed_write(data_dir: Path, version: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITE, str(data_dir), str(version)], cwd=REPO_ROOT, check=False
    )
    assert proc.returncode == -signal.SIGXFSZ


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE and SIGXFSZ")
def test_killed_write_leaves_a_temp_file_that_the_sweep_removes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    published = checkpoint_path(tmp_path, 1)
    write_atomic(published, b"the real checkpoint")
    killed_write(tmp_path, 2)
    killed_write(tmp_path, 2)
    directory = published.parent
    left = temp_files(directory)
    assert len(left) == 2 and all(n.startswith(".v00000002.safetensors.") for n in left)
    assert not checkpoint_path(tmp_path, 2).exists()  # a killed write never publishes

    with caplog.at_level(logging.INFO, logger="store.checkpoints"):
        assert remove_stale_temp_files(directory) == 2
    assert "removed 2 temp file(s)" in caplog.text
    assert temp_files(directory) == []
    assert published.read_bytes() == b"the real checkpoint"
    assert remove_stale_temp_files(directory) == 0  # idempotent


def test_sweep_spares_published_files_and_look_alikes(tmp_path: Path) -> None:
    keep = [
        "v00000001.safetensors",  # a published checkpoint
        "state-00000001.safetensors",
        "notes.tmp",  # not hidden: not write_atomic's
        ".v00000001.safetensors.tmp",  # no random part
        ".v00000001.safetensors.abc.tmp",  # random part of the wrong length
        ".v00000001.safetensors.ABCDEFGH.tmp",  # mkstemp's names are lower case
        ".v00000001.safetensors.abcd1234.part",  # the client's download temp, not ours
    ]
    for name in keep:
        (tmp_path / name).write_bytes(b"keep")
    (tmp_path / ".dir.abcd1234.tmp").mkdir()  # the pattern, but a directory
    (tmp_path / ".link.abcd1234.tmp").symlink_to(tmp_path / "v00000001.safetensors")  # the pattern, a link
    (tmp_path / ".v00000003.safetensors.k9_x2abc.tmp").write_bytes(b"half")

    assert remove_stale_temp_files(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*keep, ".dir.abcd1234.tmp", ".link.abcd1234.tmp"]
    )
    assert (tmp_path / "v00000001.safetensors").read_bytes() == b"keep"  # the link's target too


def test_sweep_spares_temp_files_younger_than_asked(tmp_path: Path) -> None:
    old, fresh = tmp_path / ".a.safetensors.old12345.tmp", tmp_path / ".b.safetensors.new12345.tmp"
    old.write_bytes(b"old")
    fresh.write_bytes(b"fresh")
    os.utime(old, (0, 0))
    assert remove_stale_temp_files(tmp_path, older_than_s=60) == 1
    assert not old.exists() and fresh.exists()


def test_sweep_of_a_missing_directory_removes_nothing(tmp_path: Path) -> None:
    assert remove_stale_temp_files(tmp_path / "never-created") == 0

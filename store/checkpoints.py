"""Checkpoint files on disk: atomic writes, hashing and the directory layout. No torch here.

Layout: ``<data_dir>/checkpoints/v{version:08d}.safetensors``; a file appears under its final name only
once it is complete and on disk (``write_atomic``), so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_SUFFIX = ".safetensors"


def checkpoint_path(data_dir: str | os.PathLike[str], version: int) -> Path:
    """Where checkpoint ``version`` lives: ``<data_dir>/checkpoints/v00000042.safetensors``."""
    if version < 0:
        raise ValueError(f"checkpoint version must be >= 0, got {version}")
    return Path(data_dir) / CHECKPOINT_DIR / f"v{version:08d}{CHECKPOINT_SUFFIX}"


def write_atomic(path: str | os.PathLike[str], data: bytes) -> str:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    Temp file in the same directory -> write, flush, fsync -> os.replace -> fsync the directory (so the
    rename itself survives a crash). Creates missing parent directories. Returns the hex sha256 of ``data``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; checkpoints are meant to be read by others
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    digest = hashlib.sha256(data).hexdigest()
    logger.debug("wrote %s (%d bytes, sha256 %s)", target, len(data), digest)
    return digest


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename inside it is durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

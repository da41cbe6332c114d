"""Checkpoint files on disk: atomic writes, hashing and the directory layout. No torch here.

Layout: ``<data_dir>/checkpoints/v{version:08d}.safetensors``; a file appears under its final name only
once it is complete and on disk (``write_atomic``), so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_SUFFIX = ".safetensors"
# write_atomic's temp files: "." + the target's name + "." + mkstemp's 8 random characters + ".tmp"
_TEMP_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def checkpoint_path(data_dir: str | os.PathLike[str], version: int) -> Path:
    """Where checkpoint ``version`` lives: ``<data_dir>/checkpoints/v00000042.safetensors``."""
    if version < 0:
        raise ValueError(f"checkpoint version must be >= 0, got {version}")
    return Path(data_dir) / CHECKPOINT_DIR / f"v{version:08d}{CHECKPOINT_SUFFIX}"


def write_atomic(path: str | os.PathLike[str], data: bytes, *, replace: bool = True) -> str:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    Temp file in the same directory -> write, flush, fsync -> os.replace -> fsync the directory (so the
    rename itself survives a crash). Creates missing parent directories. Returns the hex sha256 of ``data``.
    With ``replace=False`` an existing ``path`` is never replaced: the temp file is hard-linked to its
    final name, which fails atomically with FileExistsError when the name is taken (a published
    checkpoint is immutable, whoever else writes).
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
        if replace:
            os.replace(tmp_name, target)
        else:
            os.link(tmp_name, target)  # link(2) never overwrites: EEXIST when the name is taken
            os.unlink(tmp_name)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    digest = hashlib.sha256(data).hexdigest()
    logger.debug("wrote %s (%d bytes, sha256 %s)", target, len(data), digest)
    return digest


def remove_stale_temp_files(directory: str | os.PathLike[str], *, older_than_s: float = 0.0) -> int:
    """Delete the temp files that killed ``write_atomic`` calls left in ``directory``; returns how many.

    Only names of write_atomic's pattern (``.<name>.<8 random chars>.tmp``) that are regular files are
    touched, never a published file. Call it when no writer can be mid-write in ``directory`` (at start,
    holding the trainer's lease), or pass ``older_than_s`` to spare files modified that recently. A
    missing directory holds nothing: 0.
    """
    root = Path(directory)
    if not root.is_dir():
        return 0
    cutoff = time.time() - older_than_s
    removed = 0
    for entry in root.iterdir():
        if not _TEMP_FILE.match(entry.name):
            continue
        try:
            st = entry.lstat()
            if not stat.S_ISREG(st.st_mode) or st.st_mtime > cutoff:  # not a symlink, not a directory
                continue
            entry.unlink()
        except FileNotFoundError:  # its writer finished (renamed it) or someone else removed it
            continue
        removed += 1
    if removed:
        logger.info("removed %d temp file(s) of interrupted writes in %s", removed, root)
    return removed


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

"""Checkpoint download: skipped when the local copy is current, resumed with ``Range`` after a break,
saved only when its sha256 equals the server's ``ETag``, and never over a file of another version unless
asked to (``Client.pull``)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import quote

import httpx

from datadiet.errors import DatadietError
from datadiet.retry import RetryPolicy
from store.checkpoints import sha256_file

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.safetensors"
VERSION_KEY = "datadiet.version"  # the checkpoint version in a safetensors header (trainer/checkpoint.py)
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Pulled:
    """What a pull did. ``path``: the checkpoint file; ``version``: the version it holds (None when the
    server did not say); ``size``: its size in bytes; ``downloaded``: False when the file there was
    already current (the server answered 304) and was left untouched; ``replaced``: the version of the
    file this download replaced (None when there was no file, or it held no datadiet version)."""

    path: Path
    version: int | None
    size: int
    downloaded: bool
    replaced: int | None = None


def pull_checkpoint(
    retry: RetryPolicy, dest: str | os.PathLike[str], version: int | str = "latest", *, force: bool = False
) -> Pulled:
    """Download checkpoint ``version`` to ``dest`` unless it is current there (``Client.pull``).

    Nothing is created before the server answers with the file: a failed pull leaves no directory, no
    temp file, and the old file as it was. Without ``force`` an existing file is replaced only by a newer
    version of ``latest``; anything else (an explicit other version, an older or a different file of the
    same version, a file that is not a datadiet checkpoint) raises DatadietError type ``WouldReplace``
    (``body``: ``path``, ``held``, ``served``) before a byte is written.
    """
    path = checkpoint_target(dest)
    url = f"/v1/checkpoints/{quote(str(version), safe='')}/file"
    headers = {"Accept": "application/octet-stream"}
    held: int | None = None
    if path.is_file():
        held = held_version(path)
        headers["If-None-Match"] = f'"{sha256_file(path)}"'
    made = _missing_dirs(path.parent)
    tmp: Path | None = None
    out: IO[bytes] | None = None

    def open_body(served: int | None) -> IO[bytes]:
        """At each whole body (200): may it replace the file there? Then the temp file, made once."""
        nonlocal tmp, out
        if path.exists() and not force:
            _check_replace(path, held, served, latest=str(version) == "latest")
        if out is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
            tmp, out = Path(tmp_name), os.fdopen(fd, "wb")
        return out

    done = False
    try:
        fresh = _download(retry, url, headers, open_body)
        if fresh is None:
            log.debug("%s is current (304); not downloaded", path)
            done = True
            return Pulled(path, held, path.stat().st_size, downloaded=False)
        served, sha, size = fresh
        assert out is not None and tmp is not None
        out.flush()
        os.fsync(out.fileno())
        out.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        done = True
        log.info("checkpoint v%s -> %s (sha256 %s)", served, path, sha[:12])
        return Pulled(path, served, size, downloaded=True, replaced=held)
    finally:
        if out is not None:
            out.close()
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if not done:
            for d in reversed(made):  # innermost first; only the ones this pull made, only when empty
                try:
                    d.rmdir()
                except OSError:
                    break


def held_version(path: Path) -> int | None:
    """The checkpoint version in ``path``'s safetensors header, or None when it holds none (not a
    safetensors file, or not a datadiet checkpoint). Reads the header only."""
    from safetensors import SafetensorError, safe_open  # numpy, on first use only

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        return int(meta[VERSION_KEY])
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


def _check_replace(path: Path, held: int | None, served: int | None, *, latest: bool) -> None:
    """Raise WouldReplace unless ``served`` may replace the file at ``path`` holding ``held``."""
    if latest and held is not None and served is not None and served > held:
        return
    what = f"v{served}" if served is not None else "a checkpoint of unknown version"
    there = f"holds v{held}" if held is not None else "is not a datadiet checkpoint"
    if held is not None and held == served:
        there = f"holds another file of v{held} (a different sha256)"
    elif latest and held is not None and served is not None:
        there = f"holds v{held}, newer than the server's latest"
    raise DatadietError(
        f"{path} {there}; not replaced by {what}",
        type="WouldReplace",
        note="force=True replaces it",
        body={"path": str(path), "held": held, "served": served},
    )


def _missing_dirs(directory: Path) -> list[Path]:
    """The directories ``mkdir(parents=True)`` would create for ``directory``, outermost first."""
    missing = []
    for d in [directory, *directory.parents]:
        if d.exists():
            break
        missing.append(d)
    return missing[::-1]


def _download(
    retry: RetryPolicy, url: str, headers: dict[str, str], open_body: Callable[[int | None], IO[bytes]]
) -> tuple[int | None, str, int] | None:
    """Stream ``url`` into the file ``open_body(served version)`` gives at each whole body (200), resuming
    a broken one with ``Range``; verified: (served version, sha256, bytes), or None on 304."""
    etag: str | None = None
    digest = hashlib.sha256()
    written = 0
    out: IO[bytes] | None = None
    for attempt in range(retry.retries + 1):
        request_headers = dict(headers)
        if etag is not None and written:  # resume, but only if the file is still the same one
            request_headers.update({"Range": f"bytes={written}-", "If-Range": f'"{etag}"'})
        response = retry.send("GET", url, headers=request_headers, stream=True)
        try:
            if response.status_code == 304:
                return None
            if response.status_code not in (200, 206):
                response.read()
                raise DatadietError.from_response(response)
            served = _strong_sha256_etag(response)
            if response.status_code == 206:  # the rest of the same file, from where we stopped
                start = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
                if served != etag or start != str(written):
                    raise DatadietError(
                        f"asked to resume {url} at byte {written} of {etag}, the server sent "
                        f"{response.headers.get('Content-Range')!r} of {served}",
                        status=206,
                        type="ResumeMismatch",
                    )
            else:  # a whole body (first try, or the file changed since): start over
                out = open_body(_served_version(response))
                out.seek(0)
                out.truncate()
                digest, written, etag = hashlib.sha256(), 0, served
            assert out is not None  # a 206 answers a resume, which follows a 200
            try:
                for chunk in response.iter_bytes():  # as it arrives: a break loses nothing
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
            except httpx.TransportError as e:
                if attempt >= retry.retries:
                    raise DatadietError.unreachable(retry.url, e, attempt + 1) from e
                log.warning("download of %s broke after %d bytes (%s); resuming", url, written, e)
                time.sleep(retry.delay(attempt, None))
                continue
        finally:
            response.close()
        if digest.hexdigest() != etag:
            raise DatadietError(
                f"downloaded {written} bytes of {url} hash to {digest.hexdigest()}, but the server's "
                f"ETag is {etag}; the file was not saved",
                type="ChecksumMismatch",
            )
        return _served_version(response), etag, written
    raise AssertionError("unreachable")  # the loop returns or raises


def checkpoint_target(dest: str | os.PathLike[str]) -> Path:
    """The file ``dest`` names: ``dest/model.safetensors`` when it is a directory or ends with a separator."""
    text = os.fspath(dest)
    path = Path(text)
    if path.is_dir() or text.endswith(("/", os.sep)):
        return path / CHECKPOINT_FILE
    return path


def cache_dir(url: str) -> Path:
    """A per-server cache directory under ``$XDG_CACHE_HOME/datadiet`` (or ``~/.cache/datadiet``), created."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "datadiet"
    dest = cache / re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def _served_version(response: httpx.Response) -> int | None:
    """The version the server says it sends (``X-Checkpoint-Version``), or None."""
    try:
        return int(response.headers.get("X-Checkpoint-Version", ""))
    except ValueError:
        return None


def _strong_sha256_etag(response: httpx.Response) -> str:
    """The sha256 in a checkpoint download's strong ``ETag: "<sha256>"``."""
    raw = response.headers.get("ETag", "")
    etag = raw.strip().strip('"').lower()
    if raw.startswith("W/") or not _SHA256_RE.fullmatch(etag):
        raise DatadietError(
            f"the server's ETag {raw!r} is not a quoted sha256; cannot verify the download",
            status=response.status_code,
            type="ChecksumMismatch",
        )
    return etag

"""Checkpoint download: skipped when the local copy is current, resumed with ``Range`` after a break,
and saved only when its sha256 equals the server's ``ETag`` (``Client.pull_checkpoint``)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import IO
from urllib.parse import quote

import httpx

from datadiet.errors import DatadietError
from datadiet.retry import RetryPolicy
from store.checkpoints import sha256_file

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.safetensors"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def pull_checkpoint(retry: RetryPolicy, dest: str | os.PathLike[str], version: int | str = "latest") -> Path:
    """Download checkpoint ``version`` to ``dest`` unless it is current there (``Client.pull_checkpoint``)."""
    path = checkpoint_target(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    url = f"/v1/checkpoints/{quote(str(version), safe='')}/file"
    headers = {"Accept": "application/octet-stream"}
    if path.is_file():
        headers["If-None-Match"] = f'"{sha256_file(path)}"'
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            fresh = _download(retry, url, headers, out)
            if fresh is None:
                log.debug("%s is current (304); not downloaded", path)
                return path
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        log.info("checkpoint v%s -> %s (sha256 %s)", fresh[0], path, fresh[1][:12])
        return path
    finally:
        tmp.unlink(missing_ok=True)


def _download(
    retry: RetryPolicy, url: str, headers: dict[str, str], out: IO[bytes]
) -> tuple[str, str] | None:
    """Stream ``url`` into the open file ``out``, verified: (served version, sha256), or None on 304."""
    etag: str | None = None
    digest = hashlib.sha256()
    written = 0
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
                out.seek(0)
                out.truncate()
                digest, written, etag = hashlib.sha256(), 0, served
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
        return response.headers.get("X-Checkpoint-Version", "?"), etag
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

"""The CLI's client commands: ``datadiet push``, ``weights`` and ``pull`` against a running API.

Each talks to the API through :class:`datadiet.Client` and says what happened in a line or two; the
errors they raise are rendered by :func:`app.cli.main` (one or two plain lines, ``--debug`` for the
traceback). ``push`` reads and checks the whole file before it sends anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from app.text_table import print_table
from datadiet.contract import MAX_SAMPLES_PER_REQUEST

if TYPE_CHECKING:
    from datadiet import Client, DatadietError

BODY_BUDGET = 8 << 20  # bytes of JSON per request that push aims at: half the API's 16 MiB limit
ID_OVERHEAD = 80  # bytes the client adds to a sample's JSON: ',"id":"<64 hex digits>"'
SHOWN_PROBLEMS = 10  # bad lines listed before "... and N more"
SHORT_ID = 12  # characters of a long id shown in the weights table (as git shortens a hash)
PREVIEW_CHARS = 60  # of a sample's "input -> target" in the weights table
PREVIEW_THREADS = 8  # concurrent GET /v1/samples/{id} for the weights table's previews


class CommandError(Exception):
    """A failure the command has already put in words: ``lines`` go to stderr as they are."""

    def __init__(self, *lines: str) -> None:
        super().__init__(lines[0])
        self.lines = lines


def client_for(args: argparse.Namespace) -> Client:
    """The client for one command: 429/503 are retried, nothing listening fails at once."""
    from datadiet import Client

    return Client(args.url, api_key=args.api_key, connect_retries=0)


# ---------------------------------------------------------------------- push


@dataclass
class SampleFile:
    """A JSON-lines file of samples, read whole: the samples, each one's line number, and the bytes the
    longest takes as the client sends it (ASCII JSON: a non-ASCII line counts 3 times its length)."""

    path: Path
    samples: list[dict[str, Any]]
    lines: list[int]
    longest: int


def read_samples(path: Path) -> SampleFile:
    """Every sample in ``path`` (one JSON object a line; blank lines skipped), or CommandError naming each
    bad line as ``file:line: what is wrong`` (the first SHOWN_PROBLEMS, and how many more)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CommandError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CommandError(f"{path}: is a directory, not a JSON-lines file") from None
    except OSError as e:
        raise CommandError(f"{path}: cannot read it: {e.strerror or e}") from None
    samples: list[dict[str, Any]] = []
    lines: list[int] = []
    problems: list[str] = []
    longest = 0
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            problems.append(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1})")
            continue
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{lineno}: not valid JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(value, dict):
            got = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value))
            problems.append(f"{path}:{lineno}: a sample is a JSON object, got {got or 'a number'}")
            continue
        samples.append(value)
        lines.append(lineno)
        longest = max(longest, len(line) if line.isascii() else 3 * len(line))  # as JSON: \uXXXX escapes
    if problems:
        n = len(problems)
        raise CommandError(
            f"{path}: {n} bad line{'s' if n > 1 else ''}; nothing was sent", *_capped(problems, n)
        )
    if not samples:
        raise CommandError(f"{path}: no samples in it (one JSON object a line); nothing was sent")
    return SampleFile(path, samples, lines, longest)


def _capped(problems: list[str], total: int) -> list[str]:
    shown = problems[:SHOWN_PROBLEMS]
    if total > len(shown):
        shown.append(f"... and {total - len(shown)} more")
    return shown


def auto_batch_size(longest_line: int) -> int:
    """Samples per request when ``--batch-size`` is not given: as many as the contract allows (10,000)
    whose JSON, at the file's longest line each, stays within BODY_BUDGET; so most files go in one
    all-or-nothing request."""
    return max(1, min(MAX_SAMPLES_PER_REQUEST, BODY_BUDGET // (longest_line + ID_OVERHEAD)))


class ProgressBar:
    """Progress of a push on ``stream`` (stderr): a one-line bar on a terminal, a line per request
    elsewhere (a log). Called with the number of samples sent so far (``Client.post_samples``)."""

    def __init__(self, total: int, what: str, stream: TextIO | None = None) -> None:
        self.total, self.what, self.done, self.t0 = total, what, 0, time.monotonic()
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def __call__(self, sent: int) -> None:
        self.done = sent
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        rate = self.done / max(time.monotonic() - self.t0, 1e-9)
        counts = f"{self.done:,}/{self.total:,} {self.what}  {rate:,.0f}/s"
        if not self.tty:
            print(f"sent {counts}", file=self.stream)
            return
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        print(f"\r[{bar}] {counts}", end="", file=self.stream)
        if self.done >= self.total:
            print(file=self.stream)
        self.stream.flush()


def cmd_push(args: argparse.Namespace) -> int:
    from datadiet import DatadietError

    data = read_samples(Path(args.file))
    with client_for(args) as client:
        if args.validation:
            try:
                out = client.set_validation(data.samples, append=args.append)
            except DatadietError as e:
                if (refused := _refused(e, data, start=0, end=len(data.samples))) is None:
                    raise
                raise refused from e
            print(f"validation set v{out['version']}: {out['count']:,} samples")
            return 0
        size = args.batch_size or auto_batch_size(data.longest)
        bar = ProgressBar(len(data.samples), "samples")
        try:
            res = client.post_samples(data.samples, batch_size=size, progress=bar)
        except DatadietError as e:
            if bar.tty and bar.done:
                print(file=sys.stderr)  # end the bar's line
            if (
                refused := _refused(e, data, start=bar.done, end=min(bar.done + size, len(data.samples)))
            ) is None:
                raise
            raise refused from e
    print(f"accepted {res.accepted:,}, duplicates {res.duplicates:,} ({len(data.samples):,} in {data.path})")
    return 0


def _refused(e: DatadietError, data: SampleFile, *, start: int, end: int) -> CommandError | None:
    """The CommandError for a request of samples ``[start, end)`` the API refused (or never answered):
    the bad samples by file:line, what was not stored, and what was stored before it (when ``start``).
    None when there is nothing to add to ``e`` (nothing listening: main() says so, and how to start it)."""
    if e.status is None and not start:
        return None
    whole = not start and end == len(data.samples)
    scope = "this file" if whole else f"lines {data.lines[start]}-{data.lines[end - 1]}"
    stored = (
        f"; lines {data.lines[0]}-{data.lines[start - 1]} ({start:,} samples) were stored before it "
        "(pushing the file again once fixed is safe: they count as duplicates)"
        if start
        else ""
    )
    errors = e.body.get("errors") if e.status == 422 else None
    if not isinstance(errors, list) or not errors:
        return CommandError(f"{data.path}: nothing from {scope} was stored: {e}{stored}")
    from app.schema import MAX_REPORTED_ERRORS  # the API's cap on the bad samples one 422 lists

    problems = []
    for err in errors:
        err = err if isinstance(err, dict) else {"message": str(err)}
        index = err.get("index")
        line = data.lines[start + index] if isinstance(index, int) and 0 <= index < end - start else None
        field = f"{err['field']}: " if err.get("field") else ""
        problems.append(f"{data.path}:{line or '?'}: {field}{err.get('message', '')}")
    n = len(problems)
    count = f"{n} sample{'s' if n > 1 else ''}" + (" or more" if n >= MAX_REPORTED_ERRORS else "")
    head = (
        f"{data.path}: the API refused {count} (HTTP {e.status} {e.type}); nothing from {scope} was "
        f"stored{stored}"
    )
    return CommandError(head, *_capped(problems, n))


# ---------------------------------------------------------------------- weights


def cmd_weights(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        if args.lowest or args.highest:
            doc = client.ranked("asc" if args.lowest else "desc", args.lowest or args.highest)
            ids = list(doc["weights"])
            previews, note = sample_previews(client, ids)
            sources = doc.get("sources", {})
            rows = [(f"{doc['weights'][i]:.4f}", sources.get(i) or "", short_id(i), previews[i]) for i in ids]
            print(f"step {doc.get('step', 0)}: the {len(ids)} {'lowest' if args.lowest else 'highest'}"
                  " weighted samples")  # fmt: skip
            print_table(["weight", "source", "sample", "input -> target"], rows)
            if note:
                print(note)
            return 0
        doc = client.weights()
    stats = doc.get("source_stats", {})
    table: list[tuple[Any, ...]] = [
        (
            name,
            f"{share:.3f}",
            stats.get(name, {}).get("count", ""),
            f"{stats[name]['mean_weight']:.3f}" if name in stats else "",
        )
        for name, share in sorted(doc["sources"].items(), key=lambda kv: -kv[1])
    ]
    print(f"step {doc['step']}  updated {doc.get('updated_at') or 'never'}")
    print_table(["source", "share", "samples", "mean weight"], table)
    s = doc["summary"]
    print(f"\n{s['count']:,} live samples, effective fraction {s['effective_fraction']:.2f}")
    return 0


def sample_previews(client: Client, ids: list[str]) -> tuple[dict[str, str], str]:
    """``input -> target`` of each id, fetched with ``GET /v1/samples/{id}`` (a few at a time), and a note
    for the table's foot: why previews are missing, or ""."""
    from datadiet import DatadietError

    forbidden = False

    def one(sample_id: str) -> str:
        nonlocal forbidden
        if forbidden:
            return ""
        try:
            return preview(client.sample(sample_id))
        except DatadietError as e:
            if e.status == 404:
                return "(evicted since)"
            if e.status in (401, 403):
                forbidden = True
                return ""
            raise

    with ThreadPoolExecutor(PREVIEW_THREADS) as pool:
        previews = dict(zip(ids, pool.map(one, ids), strict=True))
    note = "(previews need an API key with the admin scope: GET /v1/samples/{id})" if forbidden else ""
    return previews, note


def short_id(sample_id: str) -> str:
    """An id of more than 16 characters (a content id is 64) cut to its first SHORT_ID and an ellipsis."""
    return sample_id if len(sample_id) <= 16 else sample_id[:SHORT_ID] + "…"


def preview(sample: dict[str, Any], width: int = PREVIEW_CHARS) -> str:
    """A one-line ``input -> target`` of a stored sample, at most ``width`` characters: text quoted as JSON
    (newlines shown as \\n), a vector as its first numbers and length, a conversation as its last message
    with the number of messages before it."""
    target = _clip(_one_line(sample.get("target")), width // 3)
    room = max(8, width - len(target) - 4)
    return f"{_clip(_one_line(sample.get('input')), room)} -> {target}"


def _one_line(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):  # a conversation
        last = value[-1]
        before = f"(+{len(value) - 1} msgs) " if len(value) > 1 else ""
        return f"{before}{last.get('role', '?')}: {json.dumps(last.get('content'), ensure_ascii=False)}"
    if isinstance(value, list):  # a vector
        head = ", ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in value[:4])
        return f"[{head}{', …' if len(value) > 4 else ''}] ({len(value)} numbers)"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# ---------------------------------------------------------------------- pull


def cmd_pull(args: argparse.Namespace) -> int:
    from datadiet import DatadietError

    with client_for(args) as client:
        try:
            pulled = client.pull(args.dest, version=args.version, force=args.force)
        except DatadietError as e:
            if e.type == "WouldReplace":
                raise CommandError(f"{e.detail}; pass --force to replace it") from e
            if e.status == 404:
                which = "no checkpoint yet" if args.version == "latest" else f"no checkpoint v{args.version}"
                raise CommandError(f"{which} on {args.url}; nothing was written") from e
            raise
    v = f"v{pulled.version}" if pulled.version is not None else "a checkpoint"
    if not pulled.downloaded:
        print(f"{pulled.path} is current ({v})")
    else:
        replaced = f", replacing v{pulled.replaced}" if pulled.replaced not in (None, pulled.version) else ""
        print(f"downloaded {v} ({human_bytes(pulled.size)}) to {pulled.path}{replaced}")
    return 0


def human_bytes(n: int) -> str:
    """``n`` bytes in SI units, 3 significant digits: 512 B, 12.3 kB, 12.3 MB, 1.23 GB."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{size:.3g} {unit}" if size < 100 else f"{size:.0f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")

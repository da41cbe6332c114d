"""The ``datadiet`` command: run the service, and talk to a running one.

datadiet demo                 # the service plus simulated agents; a summary at the end
datadiet up                   # API + trainer on the embedded defaults (Redis, SQLite) until Ctrl-C
datadiet serve | train        # one part alone
datadiet migrate              # bring the database schema up to date (once per deployment and upgrade)
datadiet push samples.jsonl   # post samples (one JSON object a line) to a running API
datadiet weights              # source weights and the weight summary, as a table
datadiet pull ./models/       # the latest checkpoint, downloaded only when it changed
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.text_table import print_table

if TYPE_CHECKING:
    from datadiet import Client
    from store.config import Settings

DEFAULT_URL = os.environ.get("DATADIET_URL", "http://127.0.0.1:8000")


def _check_bind(host: str) -> None:
    """Without API keys the API is open: it must not listen beyond this machine."""
    from store.config import Settings

    if Settings().api_keys:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        sys.exit(
            f"datadiet: refusing to listen on {host} without DATADIET_API_KEYS (the API would be open to "
            "the network); bind to 127.0.0.1, or configure keys"
        )


def _logging() -> None:
    """The process's logs in ``DATADIET_LOG_FORMAT`` (app/logs.py: the API and the trainer use the same)."""
    from app.logs import setup_logging
    from store.config import Settings

    setup_logging(Settings().log_format)


def _settings() -> Settings:
    """The settings, or exit with one line per invalid ``DATADIET_*`` variable."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from app.auth import parse_keys
    from store.config import Settings

    try:
        settings = Settings()
    except SettingsError as e:  # a value that is not even JSON where JSON is expected
        sys.exit(f"datadiet: invalid setting: {e}" + (f" ({e.__cause__})" if e.__cause__ else ""))
    except ValidationError as e:
        problems = []
        for err in e.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            name = name.upper() if name.upper().startswith("DATADIET_") else f"DATADIET_{name.upper()}"
            problems.append(f"{name}={err.get('input')!r}: {err['msg']}")
        sys.exit("datadiet: invalid setting " + "; ".join(problems))
    try:
        parse_keys(settings.api_keys)  # the API would refuse to start on it: say so before starting anything
    except ValueError as e:
        sys.exit(f"datadiet: invalid setting {e}")
    return settings


def cmd_up(args: argparse.Namespace) -> int:
    from app.supervise import Supervisor, run_forever

    settings = _settings()
    _check_bind(args.host)
    _logging()
    return run_forever(Supervisor(settings, args.host, args.port))


def cmd_demo(args: argparse.Namespace) -> int:
    from app.demo.run import run_demo
    from app.supervise import StartError, bind_listener, hold_lock

    settings = _settings()
    _check_bind(args.host)
    settings.ensure_data_dir()
    lock_fd: int | None = None
    try:
        # the demo wipes <data dir>/demo before it starts: never while another demo runs on it
        lock_fd = hold_lock(settings.data_dir / "demo.lock", f"pid {os.getpid()}, datadiet demo")
        bind_listener(args.host, args.port).close()  # a busy port fails here, before anything is wiped
        return run_demo(host=args.host, port=args.port, steps=args.steps, seed=args.seed, rate=args.rate)
    except StartError as e:
        print(f"datadiet: {e}", file=sys.stderr)
        return 1
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from store.config import Settings
    from store.embedded import resolve_redis_url

    _check_bind(args.host)
    _logging()
    settings = Settings()
    settings.ensure_data_dir()
    url, embedded = resolve_redis_url(settings.redis_url, settings.data_dir)
    os.environ["DATADIET_REDIS_URL"] = url  # every worker joins the same Redis
    try:
        uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port, workers=args.workers)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def cmd_migrate(_args: argparse.Namespace) -> int:
    """Alembic upgrade to the newest revision; one log line says which. Exit 1 with one line when the
    database cannot be reached or migrated."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from store.meta import make_engine, migrate
    from store.processes import one_line

    settings = _settings()
    _logging()
    url = settings.resolved_database_url
    try:
        shown = make_url(url).render_as_string(hide_password=True)
        engine = make_engine(url)
    except (SQLAlchemyError, ValueError) as e:
        print(f"datadiet: invalid DATADIET_DATABASE_URL: {one_line(e)}", file=sys.stderr)
        return 1
    try:
        migrate(engine)
    except SQLAlchemyError as e:
        print(f"datadiet: cannot migrate the database at {shown}: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    return 0


def cmd_train(_args: argparse.Namespace) -> int:
    from trainer.__main__ import main

    return main()


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"datadiet: {path}:{lineno}: not valid JSON: {e}")


class ProgressBar:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.done, self.t0 = total, what, 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.done += n
        frac = self.done / self.total if self.total else 1.0
        rate = self.done / max(time.monotonic() - self.t0, 1e-9)
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        print(f"\r[{bar}] {self.done:,}/{self.total:,} {self.what}  {rate:,.0f}/s", end="", file=sys.stderr)
        if self.done >= self.total:
            print(file=sys.stderr)


def _client(args: argparse.Namespace) -> Client:
    """The client for one command: 429/503 are retried, nothing listening fails at once."""
    from datadiet import Client

    return Client(args.url, api_key=args.api_key, connect_retries=0)


def _says_plainly(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """An API error or an unreachable API is one line on stderr and exit 1, not a traceback."""

    @wraps(command)
    def run(args: argparse.Namespace) -> int:
        import httpx

        from datadiet import DatadietError

        try:
            return command(args)
        except DatadietError as e:
            cause = e.__cause__
            if e.status is None and isinstance(cause, httpx.TransportError):
                reason = str(cause) or type(cause).__name__
                if isinstance(cause, httpx.ConnectError) and "refused" in reason.lower():
                    reason = "connection refused"
                elif isinstance(cause, httpx.TimeoutException):
                    reason = "timed out"
                print(f"datadiet: cannot reach the API at {args.url}: {reason}", file=sys.stderr)
            else:
                print(f"datadiet: {e}", file=sys.stderr)
            return 1

    return run


@_says_plainly
def cmd_push(args: argparse.Namespace) -> int:
    samples = list(_read_jsonl(Path(args.file)))
    with _client(args) as client:
        if args.validation:
            out = client.set_validation(samples, append=args.append)
            print(f"validation set v{out['version']}: {out['count']} samples")
            return 0
        res = client.post_samples(
            samples, batch_size=args.batch_size, progress=ProgressBar(len(samples), "samples")
        )
    print(f"accepted {res.accepted:,}, duplicates {res.duplicates:,}")
    return 0


@_says_plainly
def cmd_weights(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.lowest or args.highest:
            doc = client.ranked("asc" if args.lowest else "desc", args.lowest or args.highest)
            sources = doc.get("sources", {})
            ranked = [(i, sources.get(i, ""), f"{w:.4f}") for i, w in doc["weights"].items()]
            print_table(["sample", "source", "weight"], ranked)
            return 0
        doc = client.weights()
    stats = doc.get("source_stats", {})
    rows: list[tuple[Any, ...]] = [
        (
            name,
            f"{share:.3f}",
            stats.get(name, {}).get("count", ""),
            f"{stats[name]['mean_weight']:.3f}" if name in stats else "",
        )
        for name, share in sorted(doc["sources"].items(), key=lambda kv: -kv[1])
    ]
    print(f"step {doc['step']}  updated {doc.get('updated_at') or 'never'}")
    print_table(["source", "share", "samples", "mean weight"], rows)
    s = doc["summary"]
    print(f"\n{s['count']:,} live samples, effective fraction {s['effective_fraction']:.2f}")
    return 0


@_says_plainly
def cmd_pull(args: argparse.Namespace) -> int:
    with _client(args) as client:
        path = client.pull_checkpoint(args.dest, version=args.version)
    print(path)
    return 0


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="datadiet",
        description="Online data selection for models that keep learning from their agents.",
        epilog="Configuration is by DATADIET_* environment variables (or .env); see the README.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def server(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
        sp.add_argument("--port", type=int, default=8000, help="port (default 8000)")
        return sp

    def client(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument(
            "--url", default=DEFAULT_URL, help=f"the API (default {DEFAULT_URL}, or $DATADIET_URL)"
        )
        sp.add_argument("--api-key", default=os.environ.get("DATADIET_API_KEY"), help="or $DATADIET_API_KEY")
        return sp

    server("up", "run the API and the trainer (embedded Redis and SQLite unless configured)").set_defaults(
        fn=cmd_up
    )
    d = server("demo", "run the service with simulated agents of known quality and summarise what it learned")
    d.epilog = (
        "The agents are paced by the trainer's steps, not by the clock: before the first step they post "
        "20 steps' worth, then keep RATE x (step + 20) samples posted, each agent its share of them. The "
        "same seed gives the same table, within noise, on a fast and on a busy machine. The summary is also "
        "written to <data dir>/demo/summary.json."
    )
    d.add_argument("--steps", type=int, default=1500, help="training steps before the summary (default 1500)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--rate",
        type=_positive_float,
        default=32.0,
        help="samples all agents post together per training step (default 32: half the trainer's batch)",
    )
    d.set_defaults(fn=cmd_demo)
    s = server("serve", "run the API alone")
    s.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    s.set_defaults(fn=cmd_serve)
    sub.add_parser("train", help="run the trainer alone", description="run the trainer alone").set_defaults(
        fn=cmd_train
    )
    mig = "upgrade the database schema to this version's (the API and trainer do it themselves unless "
    mig += "DATADIET_AUTO_MIGRATE=false)"
    sub.add_parser("migrate", help=mig, description=mig).set_defaults(fn=cmd_migrate)

    pu = client("push", "post samples from a JSON-lines file (one sample a line)")
    pu.add_argument("file", help="a .jsonl file of samples")
    pu.add_argument("--batch-size", type=int, default=1000)
    pu.add_argument("--validation", action="store_true", help="replace the validation set with these samples")
    pu.add_argument("--append", action="store_true", help="with --validation: append instead of replacing")
    pu.set_defaults(fn=cmd_push)
    w = client("weights", "show source weights and the weight summary")
    w.add_argument("--lowest", type=int, metavar="K", help="show the K lowest-weighted samples instead")
    w.add_argument("--highest", type=int, metavar="K", help="show the K highest-weighted samples instead")
    w.set_defaults(fn=cmd_weights)
    pl = client("pull", "download the latest checkpoint (skipped when unchanged)")
    pl.add_argument("dest", help="a directory (file model.safetensors inside) or a file path")
    pl.add_argument("--version", default="latest", help="a version number, or latest (default)")
    pl.set_defaults(fn=cmd_pull)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``datadiet`` command: run the service, and talk to a running one.

datadiet demo                 # the service plus simulated agents; a summary at the end
datadiet up                   # API + trainer on the embedded defaults (Redis, SQLite) until Ctrl-C
datadiet serve | train        # one part alone (train --nproc 2: two data-parallel ranks)
datadiet migrate              # bring the database schema up to date (once per deployment and upgrade)
datadiet push samples.jsonl   # post samples (one JSON object a line) to a running API
datadiet weights              # source weights and the weight summary, as a table
datadiet pull ./models/       # the latest checkpoint, downloaded only when it changed
datadiet --version            # and --debug on any command: the traceback of an error

An error is one or two plain lines on stderr and exit status 1 (a bad push file: one line per bad line);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING

from app.cli_client import CommandError, cmd_pull, cmd_push, cmd_weights
from datadiet.contract import MAX_SAMPLES_PER_REQUEST

if TYPE_CHECKING:
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


def _settings(*, trainer: bool = False) -> Settings:
    """The settings (with ``trainer``, the trainer's too: a command that starts one checks them before it
    starts anything), or exit with one line per invalid ``DATADIET_*`` variable."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from app.auth import parse_keys
    from store.config import Settings, configuration_error

    try:
        settings = Settings()
        if trainer:
            from trainer.settings import TrainerSettings

            TrainerSettings()
    except SettingsError as e:  # a value that is not even JSON where JSON is expected
        sys.exit(f"datadiet: invalid setting: {e}" + (f" ({e.__cause__})" if e.__cause__ else ""))
    except ValidationError as e:
        sys.exit(f"datadiet: {configuration_error(e) or e}")
    try:
        parse_keys(settings.api_keys)  # the API would refuse to start on it: say so before starting anything
    except ValueError as e:
        sys.exit(f"datadiet: invalid setting {e}")
    return settings


def cmd_up(args: argparse.Namespace) -> int:
    from app.supervise import Supervisor, run_forever

    settings = _settings(trainer=True)
    _check_bind(args.host)
    _logging()
    return run_forever(Supervisor(settings, args.host, args.port))


def cmd_demo(args: argparse.Namespace) -> int:
    from app.demo.run import run_demo
    from app.supervise import StartError, bind_listener, hold_lock

    settings = _settings(trainer=True)
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


def cmd_train(args: argparse.Namespace) -> int:
    _settings(trainer=True)  # an unusable setting is one line here, before torchrun or the trainer starts
    if args.nproc > 1:  # torchrun's ranks (trainer/distributed.py), started by torchrun's own code in this
        # process: its agent installs the signal handlers and passes SIGTERM/SIGINT on to the ranks
        import signal

        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import parse_args, run

        from trainer.distributed import RanksError, check_settings
        from trainer.settings import TrainerSettings

        try:
            check_settings(TrainerSettings())  # what every rank would refuse, said once, before torchrun
        except RanksError as e:
            raise CommandError(str(e)) from None
        try:
            run(parse_args(["--standalone", f"--nproc-per-node={args.nproc}", "-m", "trainer"]))
        except SignalException as e:
            # the agent has passed the signal on and waited for the ranks (they finish the step and write
            # a final checkpoint): a requested stop is a clean exit, as for one trainer process
            if e.sigval in (signal.SIGTERM, signal.SIGINT):
                print(f"datadiet: stopped by {e.sigval.name}; the ranks have finished", file=sys.stderr)
                return 0
            return 128 + int(e.sigval)
        except ChildFailedError as e:  # a rank's exit status is the command's (75: lease lost, 78: config)
            _, failure = e.get_first_failure()
            print(
                f"datadiet: rank {failure.local_rank} exited with status {failure.exitcode}", file=sys.stderr
            )
            return failure.exitcode if failure.exitcode > 0 else 1
        return 0
    from trainer.__main__ import main

    return main()


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    return parse


def _checkpoint_version(text: str) -> str:
    if text == "latest" or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"a version number (1, 2, ...) or latest, got {text!r}")


def _data_dir_now() -> str:
    """Where the data goes with the settings as they are now (environment, .env), for ``--help``."""
    try:
        from store.config import Settings

        return str(Settings().data_dir.resolve())
    except Exception as e:  # an invalid setting: say so, the command itself will refuse to start
        return f"unknown: the settings are invalid ({type(e).__name__})"


class _Parser(argparse.ArgumentParser):
    """Fills in ``{data_dir}`` in the epilog when the help is shown, so the settings are read only then."""

    def format_help(self) -> str:
        if self.epilog and "{data_dir}" in self.epilog:
            self.epilog = self.epilog.replace("{data_dir}", _data_dir_now())
        return super().format_help()


def _version() -> str:
    try:
        return package_version("datadiet")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="datadiet",
        description="Online data selection for models that keep learning from their agents.",
        epilog="Configuration is by DATADIET_* environment variables (or .env); see the README. "
        "Errors are one or two lines; --debug shows the traceback.",
    )
    p.add_argument("--version", action="version", version=f"datadiet {_version()}")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    common = _Parser(add_help=False)  # options every command takes, before or after it
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def server(name: str, help: str, where: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, parents=[common])
        sp.epilog = f"{where} (now: {{data_dir}}; set by --data-dir or DATADIET_DATA_DIR)."
        sp.add_argument(
            "--data-dir",
            metavar="DIR",
            help="where checkpoints, the SQLite metadata and the embedded Redis live "
            "(sets DATADIET_DATA_DIR; default ./datadiet-data)",
        )
        return sp

    def listener(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
        sp.add_argument("--port", type=int, default=8000, help="port (default 8000)")
        return sp

    def client(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, parents=[common])
        sp.add_argument(
            "--url", default=DEFAULT_URL, help=f"the API (default {DEFAULT_URL}, or $DATADIET_URL)"
        )
        sp.add_argument("--api-key", default=os.environ.get("DATADIET_API_KEY"), help="or $DATADIET_API_KEY")
        return sp

    listener(
        server(
            "up",
            "run the API and the trainer (embedded Redis and SQLite unless configured)",
            "Checkpoints, the SQLite metadata and the embedded Redis go to the data dir",
        )
    ).set_defaults(fn=cmd_up)
    d = listener(
        server(
            "demo",
            "run the service with simulated agents of known quality and summarise what it learned",
            "The agents are paced by the trainer's steps, not by the clock: before the first step they post "
            "20 steps' worth, then keep RATE x (step + 20) samples posted, each agent its share of them. The "
            "same seed gives the same table, within noise, on a fast and on a busy machine. Everything goes "
            "to <data dir>/demo, wiped at the start; the summary also to <data dir>/demo/summary.json",
        )
    )
    d.add_argument("--steps", type=int, default=1500, help="training steps before the summary (default 1500)")
    d.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the agents' streams and the trainer (default 0): the same seed gives the same table, "
        "within noise",
    )
    d.add_argument(
        "--rate",
        type=_positive_float,
        default=32.0,
        help="samples all agents post together per training step (default 32: half the trainer's batch)",
    )
    d.set_defaults(fn=cmd_demo)
    s = listener(
        server("serve", "run the API alone", "The SQLite metadata and the embedded Redis go to the data dir")
    )
    s.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    s.set_defaults(fn=cmd_serve)
    tr = server(
        "train",
        "run the trainer alone",
        "Checkpoints, the SQLite metadata and the embedded Redis go to the data dir",
    )
    tr.add_argument(
        "--nproc",
        type=_int_in(1, 1024),
        default=1,
        help="data-parallel trainer ranks on this machine, run by torchrun (default 1: one process; "
        "one rank per GPU, or CPU ranks that share the cores; docs/scaling.md)",
    )
    tr.set_defaults(fn=cmd_train)
    server(
        "migrate",
        "upgrade the database schema to this version's, once per deployment and upgrade (the API and the "
        "trainer do it themselves unless DATADIET_AUTO_MIGRATE=false)",
        "The default SQLite metadata is in the data dir",
    ).set_defaults(fn=cmd_migrate)

    pu = client("push", "post samples from a JSON-lines file (one sample a line)")
    pu.epilog = (
        "The whole file is read and checked first: any line that is not a JSON object is reported as "
        "FILE:LINE and nothing is sent. The samples then go in as few requests as the API takes (up to "
        "10,000 samples and 8 MiB each, unless --batch-size), each all-or-nothing: a file that fits in one "
        "request is stored whole or not at all, and a sample the API refuses is reported as FILE:LINE. If "
        "a later request of a big file is refused, the earlier ones stay stored; pushing the file again is "
        "safe, they count as duplicates."
    )
    pu.add_argument("file", help="a .jsonl file of samples")
    pu.add_argument(
        "--batch-size",
        type=_int_in(1, MAX_SAMPLES_PER_REQUEST),
        metavar="N",
        help="samples per request, 1-10,000 (default: as many as fit in 8 MiB, so usually the whole file)",
    )
    pu.add_argument("--validation", action="store_true", help="replace the validation set with these samples")
    pu.add_argument("--append", action="store_true", help="with --validation: append instead of replacing")
    pu.set_defaults(fn=cmd_push)
    w = client("weights", "show source weights and the weight summary")
    rank = w.add_mutually_exclusive_group()
    k = _int_in(1, 10_000)
    rank.add_argument(
        "--lowest", type=k, metavar="K", help="show the K lowest-weighted samples instead (with a preview)"
    )
    rank.add_argument(
        "--highest", type=k, metavar="K", help="show the K highest-weighted samples instead (with a preview)"
    )
    w.set_defaults(fn=cmd_weights)
    pl = client("pull", "download a checkpoint (skipped when the file there is current)")
    pl.epilog = (
        "Says whether it downloaded the file or found it current. An existing file is replaced by a newer "
        "latest version; any other version (--version N, an older latest, a file that is not a datadiet "
        "checkpoint) is refused unless --force. Nothing is created when the pull fails."
    )
    pl.add_argument("dest", help="a directory (file model.safetensors inside) or a file path")
    pl.add_argument(
        "--version", type=_checkpoint_version, default="latest", help="a version number, or latest (default)"
    )
    pl.add_argument("--force", action="store_true", help="replace a file holding another version")
    pl.set_defaults(fn=cmd_pull)
    return p


def _plain(e: BaseException, args: argparse.Namespace) -> list[str]:
    """What to say on stderr for an error a command raised: one or two lines."""
    import httpx

    from datadiet import DatadietError

    if isinstance(e, CommandError):
        return list(e.lines)
    if isinstance(e, DatadietError):
        cause = e.__cause__
        if e.status is None and isinstance(cause, httpx.TransportError):
            reason = str(cause) or type(cause).__name__
            if isinstance(cause, httpx.ConnectError) and "refused" in reason.lower():
                return [
                    f"cannot reach the API at {args.url}: connection refused",
                    "is it running? start it with `datadiet up` (or `datadiet serve`), or give --url "
                    "or $DATADIET_URL",
                ]
            if isinstance(cause, httpx.TimeoutException):
                reason = "timed out"
            return [f"cannot reach the API at {args.url}: {reason}"]
        return [str(e)]
    if isinstance(e, OSError) and e.filename is not None:
        return [f"{e.filename}: {e.strerror or e}"]
    from store.config import configuration_error

    if (line := configuration_error(e)) is not None:
        return [line]
    return [f"{type(e).__name__}: {e}", "(an unexpected error: --debug shows the traceback)"]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "data_dir", None):  # before anything reads the settings; children inherit it
        os.environ["DATADIET_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if args.debug:
            raise
        first, *more = _plain(e, args)  # more: a hint, or FILE:LINE lines an editor can jump to
        print(f"datadiet: {first}", *more, sep="\n", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Log setup for every datadiet process (the API, the trainer, ``datadiet up`` / ``demo`` / ``serve``).

    DATADIET_LOG_FORMAT=text   (default) 14:02:11 app.main [3f2c...] message
    DATADIET_LOG_FORMAT=json   {"time": "2026-11-30T14:02:11.123+00:00", "level": "INFO",
                                "logger": "app.main", "message": "...", "request_id": "3f2c..."}

One JSON object per line (python-json-logger's ``JsonFormatter``); a traceback goes in ``exc_info`` of the
same object, never on lines of its own. ``request_id`` is there on the lines the API writes while it
answers a request (``X-Request-ID``: taken from the request when well-formed, else generated, and echoed
on the response; ``REQUEST_ID_MIDDLEWARE``), uvicorn's access lines included: uvicorn's own loggers lose
their handlers and propagate to the root logger, so they go out in the same format.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import uuid4

from asgi_correlation_id import CorrelationIdFilter, CorrelationIdMiddleware
from pythonjsonlogger.json import JsonFormatter

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""A well-formed incoming request id: 1-128 characters of the sample id's alphabet (a UUID, a trace id, a
load balancer's id), nothing that could break a log line (spaces, quotes, control characters)."""

UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
QUIET_LOGGERS = ("httpx", "httpcore")  # a line per client request at INFO: only their warnings
_OURS = "datadiet_handler"  # marks the handler this module installed, so that a second setup replaces it


def request_id_is_well_formed(value: str) -> bool:
    return REQUEST_ID.fullmatch(value) is not None


def new_request_id() -> str:
    return uuid4().hex


REQUEST_ID_MIDDLEWARE: dict[str, Any] = {
    "header_name": REQUEST_ID_HEADER,
    "validator": request_id_is_well_formed,
    "generator": new_request_id,
}
"""Keyword arguments of asgi-correlation-id's ``CorrelationIdMiddleware`` for the API:
``app.add_middleware(CorrelationIdMiddleware, **REQUEST_ID_MIDDLEWARE)``. A malformed incoming id is
replaced by a new one (and that is logged at WARNING)."""


class TextFormatter(logging.Formatter):
    """``HH:MM:SS logger [request id] message``; the request id only on lines that have one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s%(request_tag)s %(message)s", datefmt="%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "correlation_id", None)
        record.request_tag = f" [{rid}]" if rid else ""
        return super().formatMessage(record)


class JsonLineFormatter(JsonFormatter):
    """One JSON object per record: ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``,
    ``message``, ``request_id`` when the record has one, ``exc_info`` with a traceback, and any ``extra``
    fields the call passed."""

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s %(correlation_id)s",
            rename_fields={"levelname": "level", "name": "logger", "correlation_id": "request_id"},
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message: dict[str, Any]
    ) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        super().add_fields(log_data, record, message)
        if log_data.get("request_id") is None:
            log_data.pop("request_id", None)
        log_data.pop("color_message", None)  # uvicorn's copy of the message with terminal colours


def setup_logging(log_format: Literal["text", "json"] = "text", level: int = logging.INFO) -> None:
    """Send every log record of this process to stderr in ``log_format`` (``DATADIET_LOG_FORMAT``).

    Idempotent: a second call replaces the handler the first installed (the API's factory calls it in each
    worker) and leaves other handlers on the root logger alone (pytest's, for one). uvicorn's loggers are
    emptied and propagate to the root, so its access and error lines take the same format; one that
    uvicorn silenced (``--no-access-log``: no handler, no propagation) stays silent.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _OURS, True)
    handler.setFormatter(JsonLineFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(CorrelationIdFilter())
    root.addHandler(handler)
    root.setLevel(level)
    for name in UVICORN_LOGGERS:
        uv = logging.getLogger(name)
        if not uv.handlers and not uv.propagate:
            continue  # silenced on purpose (uvicorn --no-access-log): keep it so
        uv.handlers.clear()
        uv.propagate = True
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


__all__ = ["REQUEST_ID_HEADER", "REQUEST_ID_MIDDLEWARE", "CorrelationIdMiddleware", "setup_logging"]

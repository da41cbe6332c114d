"""The agent side of datadiet: the HTTP client and the checkpoint loader, with no server inside.

    from datadiet import Client, load_checkpoint

    with Client("http://127.0.0.1:8000") as dd:
        dd.post_samples(samples)
        path = dd.pull_checkpoint("models/")
    model = load_checkpoint(path)

Importing this package imports httpx and tenacity, never FastAPI, Starlette, Redis, SQLAlchemy, uvicorn
or Alembic (tests/test_agent_imports.py). ``load_checkpoint`` (``trainer.load_checkpoint``) imports torch
on first use, so an agent that only posts samples, and the API (which reads ``datadiet.contract``), never
load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from datadiet.client import Client, IngestSummary, load_latest
from datadiet.errors import DatadietError

if TYPE_CHECKING:
    from trainer.checkpoint import load_checkpoint

__all__ = ["Client", "DatadietError", "IngestSummary", "load_checkpoint", "load_latest"]


def __getattr__(name: str) -> Any:
    if name == "load_checkpoint":  # torch on first use (PEP 562)
        from trainer.checkpoint import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The HTTP face of datadiet: ingest samples, serve weights and checkpoints (``create_app``)."""

from app.main import create_app

__all__ = ["create_app"]

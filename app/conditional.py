"""Conditional GET (RFC 9110 §13): entity tags and ``If-None-Match``, shared by every route that has one.

An agent that polls an unchanged document (the current weights, a checkpoint it holds) sends the ``ETag``
it got back as ``If-None-Match`` and gets a bodiless ``304 Not Modified``.
"""

from __future__ import annotations

import hashlib

from starlette.requests import Request


def etag_of(content: bytes) -> str:
    """A strong entity tag for these exact bytes: the quoted first 128 bits of their BLAKE2b digest."""
    return '"' + hashlib.blake2b(content, digest_size=16).hexdigest() + '"'


def not_modified(request: Request, etag: str) -> bool:
    """Whether ``If-None-Match`` names ``etag`` (or is ``*``): the answer is then 304.

    Weak comparison, as RFC 9110 §13.1.2 asks of If-None-Match: ``W/"x"`` matches ``"x"``."""
    inm = request.headers.get("if-none-match")
    if inm is None:
        return False
    return inm.strip() == "*" or etag in [t.strip().removeprefix("W/") for t in inm.split(",")]

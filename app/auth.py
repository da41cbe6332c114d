"""API keys with scopes (``DATADIET_API_KEYS="key1:ingest,key2:read+ingest,key3:admin"``).

Scopes: ``ingest`` (post samples), ``read`` (weights, checkpoints, stats, metrics, the quarantine list
without sample contents), ``admin`` (the validation set, sample look-ups and contents, and everything
else; admin holds every scope). With no keys configured
(unset or empty) the API is open, and the CLI refuses to bind beyond 127.0.0.1; a spec that is set but
holds no key is a start-up error.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Depends, Request

from app.errors import Forbidden, Unauthorized

SCOPES = frozenset({"ingest", "read", "admin"})


def parse_keys(spec: str | None) -> dict[str, frozenset[str]]:
    """``"k1:ingest+read,k2:admin"`` -> {"k1": {"ingest", "read"}, "k2": {"admin"}}; errors name the entry.

    Unset (None) or empty: {} (no auth). Anything else must hold at least one key: a spec such as
    ``" , "`` is a mistake (an unfilled template, a lost secret), and reading it as "no auth" would open
    the API, so it is an error at start-up.
    """
    keys: dict[str, frozenset[str]] = {}
    if not spec:
        return keys
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            continue
        key, sep, scopes = entry.partition(":")
        wanted = frozenset(s.strip() for s in scopes.split("+") if s.strip())
        if not sep or not key or not wanted or not wanted <= SCOPES:
            raise ValueError(
                f"DATADIET_API_KEYS entry {entry!r}: expected key:scope[+scope], scopes {sorted(SCOPES)}"
            )
        keys[key] = wanted
    if not keys:
        raise ValueError(
            f"DATADIET_API_KEYS={spec!r} holds no key: give key:scope[+scope],... or unset it for no auth"
        )
    return keys


def may(request: Request, scope: str) -> bool:
    """Whether this request's key holds ``scope`` (or admin); True when auth is off. For a route that
    any ``read`` key may call but whose answer holds more for some keys (sample contents, admin only)."""
    keys: dict[str, frozenset[str]] = request.app.state.api_keys
    if not keys:
        return True
    scopes = _scopes_of(request, keys)
    return scope in scopes or "admin" in scopes


def _scopes_of(request: Request, keys: dict[str, frozenset[str]]) -> frozenset[str]:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("this API needs a key: send 'Authorization: Bearer <key>'")
    for key, scopes in keys.items():  # compare every key in constant time
        if hmac.compare_digest(key.encode(), token.strip().encode()):
            return scopes
    raise Unauthorized("unknown API key")


def require(scope: str) -> Any:
    """A dependency that lets the request through when auth is off or its key holds ``scope`` (or admin)."""

    async def check(request: Request) -> None:
        keys: dict[str, frozenset[str]] = request.app.state.api_keys
        if not keys:
            return
        scopes = _scopes_of(request, keys)
        if scope not in scopes and "admin" not in scopes:
            raise Forbidden(f"this API key lacks the {scope!r} scope", scope=scope)

    dep: Callable[[Request], Coroutine[Any, Any, None]] = check
    return Depends(dep)

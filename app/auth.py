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
    """``"k1:ingest+read,k2:admin"`` -> {"k1": {"ingest", "read"}, "k2": {"admin"}}; errors name the entry
    by its position and scopes, never the key itself (a secret: error lines end up in logs).

    Unset (None) or empty: {} (no auth). Anything else must hold at least one key: a spec such as
    ``" , "`` is a mistake (an unfilled template, a lost secret), and reading it as "no auth" would open
    the API, so it is an error at start-up. A key listed twice is an error too: which entry's scopes
    were meant cannot be guessed (the last silently won before).
    """
    keys: dict[str, frozenset[str]] = {}
    position: dict[str, int] = {}
    if not spec:
        return keys
    for n, entry in enumerate(spec.split(","), start=1):
        entry = entry.strip()
        if not entry:
            continue
        key, sep, scopes = entry.partition(":")
        wanted = frozenset(s.strip() for s in scopes.split("+") if s.strip())
        shown = f"entry {n} ({_masked(key)}:{scopes})"
        if not sep or not key or not wanted or not wanted <= SCOPES:
            raise ValueError(
                f"DATADIET_API_KEYS {shown}: expected key:scope[+scope], scopes {sorted(SCOPES)}"
            )
        if key in keys:
            raise ValueError(
                f"DATADIET_API_KEYS {shown}: the same key as entry {position[key]}; give a key once, "
                "its scopes joined by '+' (key:ingest+read)"
            )
        keys[key], position[key] = wanted, n
    if not keys:
        raise ValueError(
            f"DATADIET_API_KEYS={spec!r} holds no key: give key:scope[+scope],... or unset it for no auth"
        )
    return keys


def _masked(key: str) -> str:
    """A key as error messages show it: its first two characters, the rest elided."""
    return f"{key[:2]}..." if len(key) > 2 else "..."


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
        if not may(request, scope):
            raise Forbidden(f"this API key lacks the {scope!r} scope", scope=scope)

    dep: Callable[[Request], Coroutine[Any, Any, None]] = check
    return Depends(dep)

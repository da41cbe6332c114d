"""The one error the agent side raises: an error answer from the API, or no answer at all."""

from __future__ import annotations

from typing import Any

import httpx


class DatadietError(Exception):
    """An error answer from the API, or no answer at all.

    ``status`` is the HTTP status (None when the server could not be reached); ``type`` and ``detail``
    are the server's, from the contract's error body ``{"error": {"type", "detail", ...}}``, and ``body``
    is that ``error`` object whole (e.g. ``errors``: the index and field of each rejected sample).
    ``request`` names the call (``"POST /v1/samples"``) and ``note`` what the client added to it.
    """

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        type: str = "Error",
        body: dict[str, Any] | None = None,
        request: str = "",
        note: str = "",
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.type = type
        self.detail = detail
        self.body: dict[str, Any] = body or {}
        self.request = request
        self.note = note

    def __str__(self) -> str:
        where = f"HTTP {self.status} " if self.status is not None else ""
        context = "; ".join(filter(None, [self.request, self.note]))
        return f"{where}{self.type}: {self.detail}" + (f" ({context})" if context else "")

    @classmethod
    def from_response(cls, response: httpx.Response, note: str = "") -> DatadietError:
        """The error a (read) response carries, whatever shape its body has."""
        try:
            body = response.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            kind, detail = str(error.get("type", "HTTPError")), str(error.get("detail", ""))
        else:
            kind, detail, error = "HTTPError", response.text[:500] or response.reason_phrase, {}
        request = f"{response.request.method} {response.request.url.path}"
        return cls(detail, status=response.status_code, type=kind, body=error, request=request, note=note)

    @classmethod
    def unreachable(cls, url: str, exc: httpx.TransportError, tries: int) -> DatadietError:
        """The error for a request that got no answer (connection refused, timed out, dropped)."""
        reason = str(exc) or type(exc).__name__
        request = f"{exc.request.method} {exc.request.url.path}" if _has_request(exc) else ""
        return cls(
            f"cannot reach the datadiet API at {url}: {reason}",
            type=type(exc).__name__,
            request=request,
            note=f"gave up after {tries} {'try' if tries == 1 else 'tries'}",
        )


def _has_request(exc: httpx.TransportError) -> bool:
    try:
        exc.request  # noqa: B018 -- httpx raises RuntimeError when the error has no request
    except RuntimeError:
        return False
    return True

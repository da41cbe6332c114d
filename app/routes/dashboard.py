"""The live dashboard: ``GET /`` serves one static page, ``/static/...`` its script, styles and uPlot.

The page (``app/static/``: no build step) polls the public read endpoints every 2 s and draws them: source
weights over steps (``GET /v1/weights/history`` plus live ``GET /v1/weights``), the histogram of sample
weights, validation loss over steps (checkpoint metrics plus ``/v1/stats``), buffer size and ingest rate
(counters from ``/v1/stats``, the rate computed in the browser), the effective fraction, the quarantine,
the lowest- and highest-weighted samples with their content, and the checkpoints with download links.

The page and its files carry no data and need no key, so a user can open it and paste one: with API keys
configured the page sends ``Authorization: Bearer <key>`` (kept in the tab's ``sessionStorage``) on every
API call, and each call is checked by its own route as usual. Sample content is untrusted agent data: the
script only ever writes it as text (``textContent``), and a Content Security Policy (W3C CSP Level 3) lets
the page run no script and load nothing but this server's own files, so injected markup could not run
even if it reached the page.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# self-hosted everything; 'none' for what the page never needs (frames, forms, <base>, plugins)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag) so an upgraded server's page is seen at once
}

router = APIRouter(include_in_schema=False)
router.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


@router.get("/")
async def dashboard() -> FileResponse:
    """The dashboard page (HTML); its data comes from the API, fetched by the page itself."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)

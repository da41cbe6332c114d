"""The API's own description: ``/openapi.json``, Swagger UI at ``/docs``, ReDoc at ``/redoc``.

FastAPI serves these unguarded; here they carry the ``read`` scope like every other read, so with API keys
configured the schema of a private deployment is not public (without keys, ``require`` lets all through).

Both pages work offline: their scripts, styles and icons are served by this server from files vendored
under ``app/static/docs`` (npm ``swagger-ui-dist``, Apache-2.0) and ``app/static/redoc`` (npm ``redoc``,
MIT), each folder with its licence and a README saying how to update it; ReDoc runs without Google Fonts.
The asset folders carry no data and need no key (a browser's ``<script>`` sends no ``Authorization``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.staticfiles import StaticFiles

from app.auth import require

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
OPENAPI_URL = "/openapi.json"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
SWAGGER_ASSETS = "/docs/assets"  # app/static/docs
REDOC_ASSETS = "/redoc/assets"  # app/static/redoc

router = APIRouter(include_in_schema=False, dependencies=[require("read")])
# the router's dependencies apply to its routes, not to a mount: the assets stay unguarded (a test pins it)
router.mount(SWAGGER_ASSETS, StaticFiles(directory=STATIC_DIR / "docs"), name="swagger-ui-assets")
router.mount(REDOC_ASSETS, StaticFiles(directory=STATIC_DIR / "redoc"), name="redoc-assets")


@router.get(OPENAPI_URL)
async def openapi(*, request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger_ui(*, request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=OPENAPI_URL,
        title=f"{request.app.title} - Swagger UI",
        oauth2_redirect_url=OAUTH2_REDIRECT_URL,
        swagger_js_url=f"{SWAGGER_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{SWAGGER_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{SWAGGER_ASSETS}/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from validator.swagger.io
    )


@router.get(OAUTH2_REDIRECT_URL)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(*, request: Request) -> HTMLResponse:
    return get_redoc_html(
        openapi_url=OPENAPI_URL,
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{REDOC_ASSETS}/redoc.standalone.js",
        redoc_favicon_url=f"{SWAGGER_ASSETS}/favicon-32x32.png",
        with_google_fonts=False,
    )

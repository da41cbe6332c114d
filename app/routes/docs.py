"""The API's own description: ``/openapi.json``, Swagger UI at ``/docs``, ReDoc at ``/redoc``.

FastAPI serves these unguarded; here they carry the ``read`` scope like every other read, so with API keys
configured the schema of a private deployment is not public (without keys, ``require`` lets all through).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse

from app.auth import require

router = APIRouter(include_in_schema=False, dependencies=[require("read")])
OPENAPI_URL = "/openapi.json"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"


@router.get(OPENAPI_URL)
async def openapi(*, request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger_ui(*, request: Request) -> HTMLResponse:
    title = f"{request.app.title} - Swagger UI"
    return get_swagger_ui_html(openapi_url=OPENAPI_URL, title=title, oauth2_redirect_url=OAUTH2_REDIRECT_URL)


@router.get(OAUTH2_REDIRECT_URL)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(*, request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=OPENAPI_URL, title=f"{request.app.title} - ReDoc")

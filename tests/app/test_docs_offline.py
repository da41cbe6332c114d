"""``/docs`` and ``/redoc`` work without the internet: every URL the pages load is this server's, and each
answers 200 with JavaScript, CSS or an image, with or without API keys (a ``<script>`` sends no key)."""

from __future__ import annotations

from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from store.config import Settings

STATIC = Path(__file__).resolve().parents[2] / "app" / "static"
KIND = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


class Loads(HTMLParser):
    """The URLs a page loads by itself: ``<script src>``, ``<link href>``, ``<img src>``, and any
    ``http(s)://`` written in its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        url = a.get("src") if tag in ("script", "img") else a.get("href") if tag == "link" else None
        if url:
            self.urls.append(url)
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False if tag == "script" else self._in_script

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.urls += [w.strip("'\",;") for w in data.split() if "http://" in w or "https://" in w]


def loaded_by(page: str) -> list[str]:
    parser = Loads()
    parser.feed(page)
    return parser.urls


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_the_docs_pages_load_only_this_servers_files(app_client: TestClient, path: str) -> None:
    page = app_client.get(path)
    assert page.status_code == 200

    urls = loaded_by(page.text)

    assert urls, f"{path} loads nothing?"
    assert all(url.startswith("/") and not url.startswith("//") for url in urls), urls
    for url in urls:
        asset = app_client.get(url)
        assert asset.status_code == 200, url
        kind = KIND[Path(url).suffix]
        assert kind in asset.headers["content-type"], (url, asset.headers["content-type"])
        assert len(asset.content) > 100


def test_swagger_ui_asks_no_outside_validator(app_client: TestClient) -> None:
    assert '"validatorUrl": null' in app_client.get("/docs").text


def test_the_assets_need_no_key_while_the_pages_do(
    make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]
) -> None:
    api = make_client(make_settings(api_keys="reader:read"))
    assert api.get("/docs").status_code == 401
    page = api.get("/docs", headers={"Authorization": "Bearer reader"}).text
    for url in loaded_by(page):
        assert api.get(url).status_code == 200, url


def test_the_vendored_files_carry_their_licences() -> None:
    for folder, licence in (("docs", "Apache License"), ("redoc", "MIT License")):
        assert licence in (STATIC / folder / "LICENSE").read_text()
        assert "npm" in (STATIC / folder / "README.md").read_text()

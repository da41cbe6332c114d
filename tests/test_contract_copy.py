"""docs/contract.md is the public contract as this release implements it: the shared CONTRACT.md verbatim,
under a comment saying so. Where the shared file is beside the checkout (CI copies it there), the two must
not drift."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SHARED = REPO_ROOT.parent / "shared" / "CONTRACT.md"
COPY = REPO_ROOT / "docs" / "contract.md"


def test_the_contract_copy_is_the_shared_contract_verbatim() -> None:
    if not SHARED.is_file():
        pytest.skip(f"no shared contract at {SHARED}")
    text = COPY.read_text()
    assert text.startswith("<!--") and "-->\n\n" in text
    body = text.split("-->\n\n", 1)[1]
    assert body == SHARED.read_text(), "docs/contract.md differs from the shared CONTRACT.md: copy it again"


def test_the_readme_links_the_copy_a_clone_holds() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert "](docs/contract.md)" in readme and Path(COPY).is_file()

"""Plain-text tables on stdout, for the CLI's ``weights`` and the demo's summary."""

from __future__ import annotations

from typing import Any


def print_table(header: list[str], rows: list[tuple[Any, ...]]) -> None:
    """Columns padded to their widest cell, a dashed line under the header."""
    cells = [header, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))

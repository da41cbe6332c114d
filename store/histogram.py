"""The bins of the weight histogram that ``GET /v1/weights`` reports (torch-free: the API and the trainer
both import it).

``HIST_EDGES`` are the lower edges; the last bin is closed at the largest weight (at least the last edge)
plus 1e-9, so every weight falls in a bin. The trainer bins the weights it publishes with these edges; the
API, before the trainer's first publication, reports every live sample at weight 1.0 in the same bins.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any

HIST_EDGES = [0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0]
TOP_MARGIN = 1e-9  # above the largest weight, so that it falls in the last (closed) bin


def uniform_histogram(count: int) -> dict[str, Any]:
    """``{"edges", "counts"}`` for ``count`` samples that all weigh 1.0 (what the trainer would publish)."""
    edges = [*HIST_EDGES, HIST_EDGES[-1] + TOP_MARGIN]
    counts = [0] * len(HIST_EDGES)
    counts[bisect_right(HIST_EDGES, 1.0) - 1] = count
    return {"edges": edges, "counts": counts}

"""The contract's rules an agent applies before it sends anything (CONTRACT.md, "Sample", "Ingest").

The API checks the same rules with these same definitions (``app.schema`` imports them), so a sample the
client gives an id is stored under exactly that id. Standard library and orjson only: no server imports.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

MAX_SAMPLES_PER_REQUEST = 10_000


def content_id(source: Any, input: Any, target: Any) -> str:
    """The contract's default id: sha256 of the canonical JSON of (source, input, target)."""
    canon = orjson.dumps({"input": input, "source": source, "target": target}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canon).hexdigest()


def with_id(sample: dict[str, Any]) -> dict[str, Any]:
    """``sample`` with its contract id filled in when it has none (a copy; the input is not modified).

    A sample lacking ``input`` or ``target`` is returned as is, for the server to reject by name.
    """
    if "id" in sample or "input" not in sample or "target" not in sample:
        return sample
    return {**sample, "id": content_id(sample.get("source", ""), sample["input"], sample["target"])}

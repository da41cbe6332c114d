"""The contract's Sample rules (CONTRACT.md, "Sample"), checked by hand for speed and precise messages.

Every rejected sample is reported as ``samples[i].field: what is wrong``; a request with any error stores
nothing. Accepted samples become compact records for the buffer.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson

from app.errors import ValidationError
from store.buffer import SampleRecord

ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_SAMPLES_PER_REQUEST = 10_000
MAX_TEXT_BYTES = 8_192
MAX_META_BYTES = 4_096
MAX_REPORTED_ERRORS = 20
SIMHASH_BITS = 128  # near-duplicate vectors: the signs of this many fixed random projections agree
SIMHASH_SEED = 0x5EED  # the projections are the same in every process and release: groups are stable
FIELDS = frozenset({"id", "source", "input", "target", "reward", "meta"})

# The request body as OpenAPI shows it (the handler parses and checks the body itself, for speed).
INGEST_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["samples"],
                "properties": {"samples": {"type": "array", "minItems": 1, "maxItems": 10000}},
            }
        }
    },
}


@dataclass(frozen=True, slots=True)
class InputSpec:
    """What ``input``/``target`` must look like for the configured model kind."""

    kind: Literal["text", "vector", "any"] = "text"
    n_features: int | None = None
    n_classes: int | None = None

    @classmethod
    def from_settings(cls, input_kind: Literal["text", "vector", "any"], params: dict[str, Any]) -> InputSpec:
        if input_kind == "vector":
            return cls("vector", int(params.get("n_features", 64)), int(params.get("n_classes", 10)))
        return cls(input_kind)


def content_id(source: Any, input: Any, target: Any) -> str:
    """The contract's default id: sha256 of the canonical JSON of (source, input, target)."""
    canon = orjson.dumps({"input": input, "source": source, "target": target}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canon).hexdigest()


def _normal_text(s: str) -> str:
    """Case-folded, with runs of whitespace collapsed (the split/join only when there is any to collapse)."""
    s = s.strip().lower()
    if "  " in s or "\t" in s or "\n" in s or "\r" in s:
        s = " ".join(s.split())
    return s


def content_group(input: Any, target: Any) -> str:
    """A 64-bit key shared by identical or near-identical content, whatever its id or source.

    Text is compared case- and whitespace-insensitively. Vectors by SimHash (Charikar 2002): the signs of
    128 fixed random projections, so two vectors differ in a given bit with probability angle / pi. A
    digits image with faint pixel noise (~0.005 rad away) keeps all 128 bits with probability ~0.8; two
    distinct images (>= 0.16 rad apart in scikit-learn's digits) share them with probability < 0.2%
    (none of its 1,797 images collide). Rounding each element instead splits every copy with one element
    near a rounding boundary: it grouped 54% of the digits flood's copies (its verbatim half), this 92%.
    Copies share one weight in the trainer instead of multiplying it.
    """
    h = hashlib.blake2b(digest_size=8)
    if isinstance(input, str):
        h.update(_normal_text(input).encode())
    else:
        bits = _projections(len(input)) @ np.asarray(input, dtype=np.float64) >= 0.0  # (SIMHASH_BITS,)
        h.update(np.packbits(bits).tobytes())
    h.update(b"\x00")  # input and target apart
    h.update(_normal_text(target).encode() if isinstance(target, str) else str(target).encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=16)
def _projections(n: int) -> np.ndarray:
    """(SIMHASH_BITS, n) standard normal directions for vectors of length n, the same everywhere."""
    return np.random.default_rng([SIMHASH_SEED, n]).standard_normal((SIMHASH_BITS, n))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_text(value: Any, what: str) -> str | None:
    if not isinstance(value, str):
        return f"{what} must be a string for this model kind, got {type(value).__name__}"
    if not value:
        return f"{what} must not be empty"
    size = len(value.encode("utf-8"))
    if size > MAX_TEXT_BYTES:
        return f"{what} is {size} UTF-8 bytes; the limit is {MAX_TEXT_BYTES}"
    return None


def _check_input(value: Any, spec: InputSpec) -> str | None:
    if spec.kind == "text" or (spec.kind == "any" and isinstance(value, str)):
        return _check_text(value, "input")
    if not isinstance(value, list):
        return f"input must be an array of numbers for this model kind, got {type(value).__name__}"
    if spec.n_features is not None and len(value) != spec.n_features:
        return f"input has {len(value)} numbers; this model takes exactly {spec.n_features}"
    if not value:
        return "input must not be empty"
    for j, x in enumerate(value):
        if not _is_number(x) or not math.isfinite(x):
            return f"input[{j}] must be a finite number, got {x!r}"
    return None


def _check_target(value: Any, spec: InputSpec) -> str | None:
    if spec.kind == "text" or (spec.kind == "any" and isinstance(value, str)):
        return _check_text(value, "target")
    if not isinstance(value, int) or isinstance(value, bool):
        return f"target must be an integer class for this model kind, got {value!r}"
    if spec.n_classes is not None and not 0 <= value < spec.n_classes:
        return f"target {value} is outside [0, {spec.n_classes})"
    if value < 0:
        return f"target {value} must not be negative"
    return None


def _check_sample(s: Any, spec: InputSpec, require_source: bool) -> tuple[str, str] | None:
    """The first problem with one sample as (field, message), or None."""
    if not isinstance(s, dict):
        return "", f"a sample must be an object, got {type(s).__name__}"
    unknown = s.keys() - FIELDS
    if unknown:
        return sorted(unknown)[0], f"unknown field(s) {sorted(unknown)}; allowed: {sorted(FIELDS)}"
    if "id" in s and (not isinstance(s["id"], str) or not ID_RE.fullmatch(s["id"])):
        return "id", "id must be 1-128 characters of [A-Za-z0-9._:-]"
    if "source" in s or require_source:
        src = s.get("source")
        if src is None:
            return "source", "source is required"
        if not isinstance(src, str) or not ID_RE.fullmatch(src):
            return "source", "source must be 1-128 characters of [A-Za-z0-9._:-]"
    if "input" not in s:
        return "input", "input is required"
    if (msg := _check_input(s["input"], spec)) is not None:
        return "input", msg
    if "target" not in s:
        return "target", "target is required"
    if (msg := _check_target(s["target"], spec)) is not None:
        return "target", msg
    if "reward" in s and s["reward"] is not None:
        r = s["reward"]
        if not _is_number(r) or not math.isfinite(r):
            return "reward", f"reward must be a finite number, got {r!r}"
    if "meta" in s and s["meta"] is not None:
        if not isinstance(s["meta"], dict):
            return "meta", "meta must be an object"
        size = len(orjson.dumps(s["meta"]))
        if size > MAX_META_BYTES:
            return "meta", f"meta is {size} bytes as JSON; the limit is {MAX_META_BYTES}"
    return None


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) > sys.float_info.max  # 1e999 written out as an integer
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_non_finite(v) for v in value)
    return False


def non_finite_error(body: Any) -> ValidationError | None:
    """For a body that strict JSON refused but a lenient parse read (NaN, Infinity, 1e999): the error
    naming the first sample and field that holds such a number, or None when no sample does."""
    samples = body.get("samples") if isinstance(body, dict) else None
    for i, s in enumerate(samples if isinstance(samples, list) else []):
        for field, value in s.items() if isinstance(s, dict) else ():
            if _has_non_finite(value):
                message = f"{field} holds NaN, Infinity or a number beyond the float range"
                return ValidationError(
                    f"samples[{i}].{field}: {message}; nothing was stored",
                    errors=[{"index": i, "field": field, "message": message}],
                )
    return None


def samples_list(body: Any, max_samples: int = MAX_SAMPLES_PER_REQUEST) -> list[Any]:
    """The ``samples`` array of a request body, checked for shape and count."""
    if not isinstance(body, dict):
        raise ValidationError('the body must be a JSON object {"samples": [...]}', field="body")
    extra = body.keys() - {"samples"}
    if extra:
        raise ValidationError(f"unknown top-level field(s) {sorted(extra)}", field=sorted(extra)[0])
    samples = body.get("samples")
    if not isinstance(samples, list):
        raise ValidationError('"samples" must be an array of samples', field="samples")
    if not 1 <= len(samples) <= max_samples:
        raise ValidationError(
            f"a request carries 1-{max_samples} samples, got {len(samples)}",
            field="samples",
            count=len(samples),
        )
    return samples


def validate_samples(samples: Sequence[Any], spec: InputSpec, *, require_source: bool = True) -> None:
    """Raise one ValidationError listing every bad sample (up to a limit) by index and field."""
    errors = []
    for i, s in enumerate(samples):
        problem = _check_sample(s, spec, require_source)
        if problem is not None:
            errors.append({"index": i, "field": problem[0], "message": problem[1]})
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
    if errors:
        first = errors[0]
        where = f"samples[{first['index']}]" + (f".{first['field']}" if first["field"] else "")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ValidationError(f"{where}: {first['message']}{more}; nothing was stored", errors=errors)


def to_record(s: dict[str, Any]) -> SampleRecord:
    """A validated sample as the buffer stores it (id filled in, compact payload)."""
    source = s.get("source", "")
    sid = s.get("id") or content_id(source, s["input"], s["target"])
    doc = {"id": sid, "source": source, "input": s["input"], "target": s["target"]}  # id first: see INGEST
    if s.get("reward") is not None:
        doc["reward"] = s["reward"]
    if s.get("meta") is not None:
        doc["meta"] = s["meta"]
    return SampleRecord(sid, source, content_group(s["input"], s["target"]), orjson.dumps(doc))

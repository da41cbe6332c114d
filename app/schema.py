"""The contract's Sample rules (CONTRACT.md, "Sample"), checked by hand for speed and precise messages.

Every rejected sample is reported as ``samples[i].field: what is wrong``; a request with any error stores
nothing. Accepted samples become compact records for the buffer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson

from app.errors import InvalidInput
from datadiet.contract import MAX_SAMPLES_PER_REQUEST, content_id
from store.buffer import SampleRecord

ID_PATTERN = r"[A-Za-z0-9._:-]{1,128}"
ID_RE = re.compile(ID_PATTERN)
MAX_TEXT_BYTES = 8_192
MAX_META_BYTES = 4_096
MAX_JSON_DEPTH = 64  # levels of objects/arrays in meta: orjson.dumps refuses past 254, repr near 1,000
MAX_VECTOR_LENGTH = 4_096  # numbers in an input when the model kind names no n_features
FLOAT32_MAX = float(np.finfo(np.float32).max)  # 3.4028234663852886e38: torch refuses to cast beyond it
INT64_MAX = 2**63 - 1  # a class label becomes an int64 tensor
INT_RANGE = (-(2**63), 2**64 - 1)  # what orjson reads exactly; beyond, it reads a float and drops digits
MAX_REPORTED_ERRORS = 20
MAX_SHOWN = 60  # characters of a value or a field name quoted in an error message
SIMHASH_BITS = 128  # near-duplicate vectors: the signs of this many fixed random projections agree
SIMHASH_SEED = 0x5EED  # the projections are the same in every process and release: groups are stable
FIELDS = frozenset({"id", "source", "input", "target", "reward", "meta"})
# A conversation (chat-shaped input, model kinds that render a chat template: hf-causal-lm). The contract
# names the roles; the bounds are ours: a conversation of at most MAX_MESSAGES messages whose contents
# together hold at most MAX_CONVERSATION_BYTES UTF-8 bytes (4x a text input: a system message that lists a
# few tools' JSON schemas plus the question fits; the model's max_length truncates what it cannot read).
CHAT_ROLES = ("system", "user", "assistant", "tool")
MESSAGE_FIELDS = frozenset({"role", "content"})
MAX_MESSAGES = 64
MAX_CONVERSATION_BYTES = 32_768

_ID_SCHEMA = {"type": "string", "pattern": f"^{ID_PATTERN}$", "minLength": 1, "maxLength": 128}
_SAMPLE_PROPERTIES: dict[str, Any] = {
    "id": {**_ID_SCHEMA, "description": "default: sha256 of the canonical JSON of (source, input, target)"},
    "source": _ID_SCHEMA,
    "input": {
        "description": "text models: a string of at most 8,192 UTF-8 bytes; hf-causal-lm also a "
        f"conversation: 1-{MAX_MESSAGES} messages {{role, content}} whose contents hold at most "
        f"{MAX_CONVERSATION_BYTES} UTF-8 bytes in all; mlp: exactly n_features numbers, each within "
        f"float32's range (other kinds: at most {MAX_VECTOR_LENGTH} numbers)",
        "anyOf": [
            {"type": "string", "minLength": 1},
            {
                "type": "array",
                "minItems": 1,
                "items": {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX},
            },
            {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_MESSAGES,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["role", "content"],
                    "properties": {
                        "role": {"enum": list(CHAT_ROLES)},
                        "content": {"type": "string", "minLength": 1},
                    },
                },
            },
        ],
    },
    "target": {
        "description": "text models: a string of at most 8,192 UTF-8 bytes; mlp: a class in [0, n_classes)",
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "integer", "minimum": 0, "maximum": INT64_MAX},
        ],
    },
    "reward": {"type": ["number", "null"], "description": "finite; an outcome signal"},
    "meta": {
        "type": ["object", "null"],
        "description": f"stored and returned, never interpreted; at most {MAX_META_BYTES} bytes as JSON, "
        f"{MAX_JSON_DEPTH} levels deep, integers within 64 bits",
    },
}


def _samples_body(required: list[str], max_items: int | None) -> dict[str, Any]:
    """The OpenAPI request body of a list of samples (the handlers parse and check it by hand, for speed)."""
    sample = {"type": "object", "additionalProperties": False, "required": required}
    samples: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {**sample, "properties": _SAMPLE_PROPERTIES},
    }
    if max_items is not None:
        samples["maxItems"] = max_items
    schema = {"type": "object", "additionalProperties": False, "required": ["samples"]}
    return {
        "required": True,
        "content": {"application/json": {"schema": {**schema, "properties": {"samples": samples}}}},
    }


INGEST_BODY = _samples_body(["source", "input", "target"], MAX_SAMPLES_PER_REQUEST)
VALIDATION_BODY = _samples_body(["input", "target"], None)  # at most DATADIET_VALIDATION_MAX_SAMPLES in all


@dataclass(frozen=True, slots=True)
class InputSpec:
    """What ``input``/``target`` must look like for the configured model kind: ``text`` (strings),
    ``chat`` (a string or a conversation in, a string out), ``vector`` (numbers in, a class out), ``any``
    (a kind the API does not know: text or numbers)."""

    kind: Literal["text", "vector", "chat", "any"] = "text"
    n_features: int | None = None
    n_classes: int | None = None

    @classmethod
    def from_settings(
        cls, input_kind: Literal["text", "vector", "chat", "any"], params: dict[str, Any]
    ) -> InputSpec:
        if input_kind == "vector":
            return cls("vector", int(params.get("n_features", 64)), int(params.get("n_classes", 10)))
        return cls(input_kind)


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
    Copies share one weight in the trainer instead of multiplying it. A conversation is compared message
    by message: the same roles in the same order, each content case- and whitespace-insensitively.
    """
    chat = isinstance(input, list) and bool(input) and isinstance(input[0], dict)
    h = hashlib.blake2b(digest_size=8, person=b"chat" if chat else b"")  # conversations: their own domain
    if isinstance(input, str):
        h.update(_normal_text(input).encode())
    elif chat:  # each message's role and normal text, in order; lengths keep the boundaries unambiguous
        for m in input:
            content = _normal_text(m["content"]).encode()
            h.update(f"{m['role']}:{len(content)}:".encode() + content)
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


def _show(value: Any) -> str:
    """A value as an error message quotes it: bounded, and never recursive (``repr`` of an array nested
    ~1,000 levels raises, and a big one would fill the response): containers by their kind alone."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    text = repr(value)  # ASCII escapes for a lone surrogate: the response stays encodable
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def _name(key: str) -> str:
    """A field name as an error names it: at most MAX_SHOWN characters, a lone surrogate escaped."""
    key = key if len(key) <= MAX_SHOWN else key[:MAX_SHOWN] + "..."
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _names(keys: set[str]) -> str:
    shown = [_name(k) for k in sorted(keys)[:5]]
    return f"{shown}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects and arrays more than ``limit`` levels (a walk without recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        for c in children:
            if isinstance(c, (dict, list)):
                if depth >= limit:
                    return True
                stack.append((c, depth + 1))
    return False


def _check_text(value: Any, what: str) -> str | None:
    if not isinstance(value, str):
        return f"{what} must be a string for this model kind, got {type(value).__name__}"
    if not value:
        return f"{what} must not be empty"
    size = len(value.encode("utf-8"))
    if size > MAX_TEXT_BYTES:
        return f"{what} is {size} UTF-8 bytes; the limit is {MAX_TEXT_BYTES}"
    return None


def _check_conversation(value: list[Any]) -> tuple[str, str] | None:
    """The first problem with a conversation as (field, message): ``input[j].role`` names the message and
    its field, ``input`` the conversation as a whole (empty, too many messages, too many bytes)."""
    if not value:
        return "input", "a conversation must hold at least one message"
    if len(value) > MAX_MESSAGES:
        return "input", f"the conversation has {len(value)} messages; the limit is {MAX_MESSAGES}"
    total = 0
    for j, m in enumerate(value):
        where = f"input[{j}]"
        if not isinstance(m, dict):
            return where, f'a message must be an object {{"role": ..., "content": ...}}, got {_show(m)}'
        unknown = m.keys() - MESSAGE_FIELDS
        if unknown:
            return (
                f"{where}.{_name(min(unknown))}",
                f"unknown field(s) {_names(unknown)} in a message; allowed: {sorted(MESSAGE_FIELDS)}",
            )
        if "role" not in m:
            return f"{where}.role", "role is required"
        if m["role"] not in CHAT_ROLES:
            return f"{where}.role", f"role must be one of {', '.join(CHAT_ROLES)}, got {_show(m['role'])}"
        if "content" not in m:
            return f"{where}.content", "content is required"
        content = m["content"]
        if not isinstance(content, str):
            return f"{where}.content", f"content must be a string, got {_show(content)}"
        if not content:
            return f"{where}.content", "content must not be empty"
        total += len(content.encode("utf-8"))
    if total > MAX_CONVERSATION_BYTES:
        return "input", (
            f"the messages' contents are {total} UTF-8 bytes in all; the limit is {MAX_CONVERSATION_BYTES}"
        )
    return None


def _check_input(value: Any, spec: InputSpec) -> tuple[str, str] | None:
    """The first problem with ``input`` as (field, message): the field is ``input``, or a message's
    ``input[j].role`` / ``input[j].content`` in a conversation."""
    if spec.kind == "chat":
        if isinstance(value, list):
            return _check_conversation(value)
        if not isinstance(value, str):
            got = type(value).__name__
            return "input", f"input must be a string or an array of messages for this model kind, got {got}"
    msg = _check_vector_or_text(value, spec)
    return None if msg is None else ("input", msg)


def _check_vector_or_text(value: Any, spec: InputSpec) -> str | None:
    if spec.kind in ("text", "chat") or (spec.kind == "any" and isinstance(value, str)):
        return _check_text(value, "input")
    if not isinstance(value, list):
        return f"input must be an array of numbers for this model kind, got {type(value).__name__}"
    if spec.n_features is not None and len(value) != spec.n_features:
        return f"input has {len(value)} numbers; this model takes exactly {spec.n_features}"
    if spec.n_features is None and len(value) > MAX_VECTOR_LENGTH:
        return f"input has {len(value)} numbers; the limit is {MAX_VECTOR_LENGTH}"
    if not value:
        return "input must not be empty"
    for j, x in enumerate(value):
        if not _is_number(x) or not math.isfinite(x):
            return f"input[{j}] must be a finite number, got {_show(x)}"
        if not -FLOAT32_MAX <= x <= FLOAT32_MAX:  # the model casts to float32, which overflows beyond
            return f"input[{j}] = {_show(x)} is outside float32's finite range (magnitude <= {FLOAT32_MAX!r})"
    return None


def _check_target(value: Any, spec: InputSpec) -> str | None:
    if spec.kind in ("text", "chat") or (spec.kind == "any" and isinstance(value, str)):
        return _check_text(value, "target")
    if not isinstance(value, int) or isinstance(value, bool):
        return f"target must be an integer class for this model kind, got {_show(value)}"
    if spec.n_classes is not None and not 0 <= value < spec.n_classes:
        return f"target {value} is outside [0, {spec.n_classes})"
    if value < 0:
        return f"target {value} must not be negative"
    if value > INT64_MAX:  # a class label becomes an int64 tensor
        return f"target {value} is beyond int64 (at most {INT64_MAX})"
    return None


def _check_sample(s: Any, spec: InputSpec, require_source: bool) -> tuple[str, str] | None:
    """The first problem with one sample as (field, message), or None."""
    if not isinstance(s, dict):
        return "", f"a sample must be an object, got {type(s).__name__}"
    unknown = s.keys() - FIELDS
    if unknown:
        return _name(min(unknown)), f"unknown field(s) {_names(unknown)}; allowed: {sorted(FIELDS)}"
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
    if (problem := _check_input(s["input"], spec)) is not None:
        return problem
    if "target" not in s:
        return "target", "target is required"
    if (msg := _check_target(s["target"], spec)) is not None:
        return "target", msg
    if "reward" in s and s["reward"] is not None:
        r = s["reward"]
        if not _is_number(r) or not math.isfinite(r):
            return "reward", f"reward must be a finite number, got {_show(r)}"
    if "meta" in s and s["meta"] is not None:
        if not isinstance(s["meta"], dict):
            return "meta", "meta must be an object"
        if _deeper_than(s["meta"], MAX_JSON_DEPTH):  # before orjson.dumps, which raises past 254 levels
            return "meta", f"meta nests objects and arrays deeper than {MAX_JSON_DEPTH} levels"
        size = len(orjson.dumps(s["meta"]))
        if size > MAX_META_BYTES:
            return "meta", f"meta is {size} bytes as JSON; the limit is {MAX_META_BYTES}"
    return None


def _refused_by_strict_json(value: Any) -> str | None:
    """What, in a leniently parsed value, strict JSON refused: NaN, Infinity or 1e999, or a string (or
    key) that is not Unicode (a lone surrogate escape, which no UTF-8 text can hold). A walk without
    recursion: the lenient parser nests as deep as Python's stack allows."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return "holds NaN, Infinity or a number beyond the float range"
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > sys.float_info.max:
            return "holds NaN, Infinity or a number beyond the float range"  # 1e999 written out as an integer
        if isinstance(v, str) and not _is_unicode(v):
            return "holds a string with a lone surrogate (\\ud800-\\udfff unpaired): it is not Unicode text"
        if isinstance(v, dict):
            stack += v.keys()
            stack += v.values()
        elif isinstance(v, list):
            stack += v
    return None


def _beyond_64_bits(value: Any) -> str | None:
    """Whether an exactly parsed value holds an integer orjson would have rounded to a float."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, int) and not isinstance(v, bool) and not INT_RANGE[0] <= v <= INT_RANGE[1]:
            return f"holds an integer beyond 64 bits ({_show(v)}); send it as a string or a float"
        if isinstance(v, dict):
            stack += v.values()
        elif isinstance(v, list):
            stack += v
    return None


def _is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_field_error(body: Any, problem: Callable[[Any], str | None]) -> InvalidInput | None:
    """The 422 naming the first sample and field of ``body`` whose value has a ``problem``, or None."""
    samples = body.get("samples") if isinstance(body, dict) else None
    for i, s in enumerate(samples if isinstance(samples, list) else []):
        for field, value in s.items() if isinstance(s, dict) else ():
            message = problem(value) or (problem(field) and "the field name is not Unicode text")
            if message:
                name = _name(field)
                return InvalidInput(
                    f"samples[{i}].{name}: {message}; nothing was stored",
                    errors=[{"index": i, "field": name, "message": message}],
                )
    return None


def non_finite_error(body: Any) -> InvalidInput | None:
    """For a body that strict JSON refused but a lenient parse read: the error naming the first sample
    and field that holds what strict JSON refuses (NaN, Infinity, 1e999, a lone surrogate), or None when
    no sample does."""
    return _first_field_error(body, _refused_by_strict_json)


# the shortest integer orjson rounds, -(2**63) - 1, has 19 digits: a body with no run of 19 digits has none.
# Found by mapping every digit to "0" and searching for 19 zeros (C-speed translate and find: ~1 us per KB,
# where re's search for \d{19} took ~17)
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_DIGIT_RUN = b"0" * 19


def wide_integer_error(raw: bytes | bytearray) -> InvalidInput | None:
    """For a body orjson parsed: orjson reads an integer beyond 64 bits as a float, silently dropping its
    digits, so ``meta`` would not be returned as sent. The error naming the first sample and field that
    holds one, or None. An exact second parse runs only when the bytes hold a run of 19 digits."""
    if raw.translate(_DIGITS_TO_ZERO).find(_LONG_DIGIT_RUN) < 0:
        return None
    try:
        exact = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return _first_field_error(exact, _beyond_64_bits)


def samples_list(body: Any, max_samples: int = MAX_SAMPLES_PER_REQUEST) -> list[Any]:
    """The ``samples`` array of a request body, checked for shape and count."""
    if not isinstance(body, dict):
        raise InvalidInput('the body must be a JSON object {"samples": [...]}', field="body")
    extra = body.keys() - {"samples"}
    if extra:
        raise InvalidInput(f"unknown top-level field(s) {_names(extra)}", field=_name(min(extra)))
    samples = body.get("samples")
    if not isinstance(samples, list):
        raise InvalidInput('"samples" must be an array of samples', field="samples")
    if not 1 <= len(samples) <= max_samples:
        raise InvalidInput(
            f"a request carries 1-{max_samples} samples, got {len(samples)}",
            field="samples",
            count=len(samples),
        )
    return samples


def validate_samples(samples: Sequence[Any], spec: InputSpec, *, require_source: bool = True) -> None:
    """Raise one InvalidInput listing every bad sample (up to a limit) by index and field."""
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
        raise InvalidInput(f"{where}: {first['message']}{more}; nothing was stored", errors=errors)


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

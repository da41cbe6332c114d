"""Properties of ingest, checked with Hypothesis on the real app (real redis-server, real SQLite).

- Whatever ``POST /v1/samples`` accepts, ``GET /v1/samples/{id}`` returns exactly as sent: every field,
  ``meta`` included, with the same JSON types (an integer stays an integer, -0.0 stays -0.0, 1e-300 and
  integers past 2**53 keep every digit, any Unicode text survives).
- Whatever a write rejects (``POST /v1/samples``, ``PUT`` and ``POST /v1/validation``) leaves no trace:
  Redis holds exactly what it held before (every key and value: buffer, counters, ids, stream, validation
  set), so the request was all or nothing.

Bounded for CI by the ``properties-ci`` profile: a fixed, derandomized number of examples, no deadline.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.schema import FIELDS, FLOAT32_MAX, ID_RE, INT_RANGE, MAX_JSON_DEPTH, MAX_META_BYTES
from store.config import Settings

settings.register_profile(
    "properties-ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CI = settings.get_profile("properties-ci")
MLP = {"model": "mlp", "model_params": {"n_features": 4, "n_classes": 3}}
ID_ALPHABET = "ABCXYZabcxyz0123456789._:-"

# --- what a valid sample can hold -------------------------------------------------------------------------

ids = st.text(ID_ALPHABET, min_size=1, max_size=40)
texts = st.text(min_size=1, max_size=60)  # any Unicode scalar value (Hypothesis leaves out surrogates)
json_ints = st.integers(*INT_RANGE) | st.sampled_from([2**53 + 1, -(2**53) - 1, 2**63, 2**64 - 1, -(2**63)])
json_floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from([-0.0, 1e-300, 5e-324])
json_scalars = st.none() | st.booleans() | json_ints | json_floats | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
metas = st.dictionaries(st.text(max_size=10), json_values, max_size=5).filter(
    lambda m: len(json.dumps(m, ensure_ascii=False).encode()) <= MAX_META_BYTES
)
rewards = json_ints | json_floats


@st.composite
def samples(draw: st.DrawFn, input: st.SearchStrategy[Any], target: st.SearchStrategy[Any]) -> dict[str, Any]:
    """A sample the contract accepts, optional fields sometimes left out."""
    sample: dict[str, Any] = {"source": draw(ids), "input": draw(input), "target": draw(target)}
    if draw(st.booleans()):
        sample["reward"] = draw(rewards)
    if draw(st.booleans()):
        sample["meta"] = draw(metas)
    return sample


text_samples = samples(texts, texts)
float32s = st.floats(-FLOAT32_MAX, FLOAT32_MAX) | st.integers(*INT_RANGE) | st.just(-0.0)
vector_samples = samples(st.lists(float32s, min_size=4, max_size=4), st.integers(0, 2))


def same(sent: Any, got: Any) -> bool:
    """JSON equality that also tells 1 from 1.0 and 0.0 from -0.0 (what ``==`` forgives)."""
    if type(sent) is not type(got):
        return False
    if isinstance(sent, float):
        return sent == got and math.copysign(1.0, sent) == math.copysign(1.0, got)
    if isinstance(sent, dict):
        return sent.keys() == got.keys() and all(same(v, got[k]) for k, v in sent.items())
    if isinstance(sent, list):
        return len(sent) == len(got) and all(same(a, b) for a, b in zip(sent, got, strict=True))
    return bool(sent == got)


def post(client: TestClient, path: str, body: Any, method: str = "POST") -> Any:
    """``body`` as JSON text (floats written by repr: every digit), with the JSON content type."""
    content = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    return client.request(
        method, path, content=content.encode(), headers={"Content-Type": "application/json"}
    )


@pytest.fixture
def text_client(make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(make_settings(), raise_server_exceptions=False)


@pytest.fixture
def mlp_client(make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(make_settings(**MLP), raise_server_exceptions=False)


# --- accepted: returned exactly as sent -------------------------------------------------------------------


EXAMPLES = itertools.count()  # Redis outlives one Hypothesis example: each example's sources are its own


def assert_returned_as_sent(client: TestClient, batch: list[dict[str, Any]], with_ids: list[bool]) -> None:
    k = next(EXAMPLES)
    sent = [{**s, "source": f"{s['source']}.{k}"} for s in batch]
    sent = [
        {**s, "id": f"{s['source']}-{n}"} if keep else s
        for n, (s, keep) in enumerate(zip(sent, with_ids, strict=False))
    ]
    response = post(client, "/v1/samples", {"samples": sent})

    assert response.status_code == 202, response.text[:1000]
    returned_ids = response.json()["ids"]
    assert len(returned_ids) == len(sent)
    first: dict[str, dict[str, Any]] = {}
    for sid, sample in zip(returned_ids, sent, strict=True):
        first.setdefault(sid, sample)  # a repeated id is a duplicate: the first one is kept
    for sid, sample in first.items():
        got = client.get(f"/v1/samples/{sid}")
        assert got.status_code == 200, got.text[:1000]
        doc = got.json()
        assert isinstance(doc.pop("weight"), float)
        assert same({**sample, "id": sid}, doc), (sample, doc)


@CI
@given(batch=st.lists(text_samples, min_size=1, max_size=4), with_ids=st.lists(st.booleans(), min_size=4))
def test_an_accepted_text_sample_is_returned_exactly_as_sent(
    text_client: TestClient, batch: list[dict[str, Any]], with_ids: list[bool]
) -> None:
    assert_returned_as_sent(text_client, batch, with_ids)


@CI
@given(batch=st.lists(vector_samples, min_size=1, max_size=4), with_ids=st.lists(st.booleans(), min_size=4))
def test_an_accepted_vector_sample_is_returned_exactly_as_sent(
    mlp_client: TestClient, batch: list[dict[str, Any]], with_ids: list[bool]
) -> None:
    assert_returned_as_sent(mlp_client, batch, with_ids)


# --- rejected: no trace -----------------------------------------------------------------------------------


def raw(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def nested(depth: int, leaf: str = "1") -> str:
    """``leaf`` inside ``depth`` levels of arrays and objects, alternating, as JSON text."""
    half = depth // 2
    return '[{"k": ' * half + "[" * (depth % 2) + leaf + "]" * (depth % 2) + "}]" * half


def in_field(field: str, literal: str) -> tuple[str, str]:
    """A raw JSON literal placed where ``field`` can hold it (inside an object for meta)."""
    return field, f'{{"x": {literal}}}' if field == "meta" else literal


deep = st.integers(960, 1019) | st.integers(1, 959)  # near the parser's 1,024 (past Python's stack), or below
not_an_id = st.text(max_size=200).filter(lambda t: not ID_RE.fullmatch(t)) | st.sampled_from(
    ["a b", "x" * 129]
)
non_strings = json_values.filter(lambda v: not isinstance(v, str))
surrogates = st.sampled_from([r"\ud800", r"\udbff", r"\udc00", r"\udfff"])
# Each kind of bad value a sample can carry, as (field, the value as JSON text): what a client library
# writes, and what only a hand-written body holds (NaN, 1e999, a lone surrogate, nesting past every parser)
BAD_TEXT_SAMPLE_VALUES: dict[str, st.SearchStrategy[tuple[str, str]]] = {
    "id_or_source_outside_the_alphabet": st.tuples(st.sampled_from(["id", "source"]), not_an_id.map(raw)),
    "id_or_source_not_a_string": st.tuples(st.sampled_from(["id", "source"]), non_strings.map(raw)),
    "text_empty_or_too_long": st.tuples(
        st.sampled_from(["input", "target"]), st.sampled_from(["", "\u00e9" * 4097, "t" * 8193]).map(raw)
    ),
    "text_not_a_string": st.tuples(st.sampled_from(["input", "target"]), non_strings.map(raw)),
    "reward_not_a_number": st.tuples(
        st.just("reward"), (st.text() | st.booleans() | st.lists(json_scalars, max_size=3)).map(raw)
    ),
    "meta_not_an_object": st.tuples(
        st.just("meta"), (json_scalars.filter(lambda v: v is not None) | st.lists(json_scalars)).map(raw)
    ),
    "meta_too_big": st.tuples(
        st.just("meta"), st.integers(MAX_META_BYTES, 4 * MAX_META_BYTES).map(lambda n: raw({"b": "x" * n}))
    ),
    "meta_too_deep": (deep.filter(lambda d: d >= MAX_JSON_DEPTH) | st.just(MAX_JSON_DEPTH)).map(
        lambda d: in_field("meta", nested(d))
    ),
    "nested_where_a_scalar_belongs": st.tuples(
        st.sampled_from(["id", "source", "input", "target", "reward"]), deep.map(nested)
    ),
    "unknown_field": st.tuples(
        st.text(min_size=1, max_size=300).filter(lambda f: f not in FIELDS), st.just("1")
    ),
    "non_finite_number": st.builds(
        in_field,
        st.sampled_from(["input", "target", "reward", "meta"]),
        st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1" + "0" * 400]),
    ),
    "lone_surrogate": st.builds(
        lambda field, escape: in_field(field, f'"a{escape}"'),
        st.sampled_from(["id", "source", "input", "target", "meta"]),
        surrogates,
    ),
    "nan_nested_deep": deep.map(lambda d: in_field("meta", nested(d, "NaN"))),
}
beyond_float32 = st.floats(min_value=FLOAT32_MAX, exclude_min=True, allow_infinity=False)
BAD_VECTOR_SAMPLE_VALUES: dict[str, st.SearchStrategy[tuple[str, str]]] = {
    "nested_where_a_number_belongs": st.builds(
        lambda field, depth: (field, f"[0, {nested(depth)}, 0, 0]" if field == "input" else nested(depth)),
        st.sampled_from(["input", "target", "reward"]),
        deep,
    ),
    "feature_beyond_float32": st.tuples(
        st.just("input"),
        st.tuples(beyond_float32, st.booleans()).map(lambda t: raw([0.0, -t[0] if t[1] else t[0], 0, 0])),
    ),
    "feature_not_a_number": st.tuples(
        st.just("input"),
        non_strings.filter(lambda v: not isinstance(v, (int, float)) or isinstance(v, bool)).map(
            lambda v: raw([0, v, 0, 0])
        ),
    ),
    "wrong_length": st.tuples(
        st.just("input"), st.lists(st.floats(-1, 1), max_size=9).filter(lambda v: len(v) != 4).map(raw)
    ),
    "class_out_of_range": st.tuples(
        st.just("target"),
        (st.integers(max_value=-1) | st.integers(3, 2**64 - 1) | st.floats(0, 2) | st.text()).map(raw),
    ),
}


def redis_snapshot(r: redis.Redis) -> dict[bytes, Any]:
    """Every key and its serialized value: equal snapshots mean nothing at all was written."""
    return {key: r.dump(key) for key in sorted(r.keys("*"))}


@st.composite
def bodies_with_one_bad(
    draw: st.DrawFn, good: st.SearchStrategy[dict[str, Any]], bad: st.SearchStrategy[tuple[str, str]]
) -> tuple[str, int]:
    """(a body of valid samples with one bad sample somewhere, as JSON text; the bad one's index)."""
    field, value = draw(bad)
    batch = [{**s, "id": f"g{n}-{s['source']}"} for n, s in enumerate(draw(st.lists(good, max_size=5)))]
    index = draw(st.integers(0, len(batch)))
    victim = {k: v for k, v in draw(good).items() if k != field}
    parts = [raw(s) for s in batch]
    parts.insert(index, raw(victim)[:-1] + f", {raw(field)}: {value}}}")
    return '{"samples": [' + ", ".join(parts) + "]}", index


WRITES = st.sampled_from([("POST", "/v1/samples"), ("PUT", "/v1/validation"), ("POST", "/v1/validation")])


def assert_rejected_without_trace(
    client: TestClient, r: redis.Redis, body: str, index: int, where: tuple[str, str]
) -> None:
    method, path = where
    before, stats = redis_snapshot(r), client.get("/v1/stats").json()

    response = post(client, path, body, method)

    assert response.status_code in (400, 422), response.text[:1000]
    assert len(response.content) < 8_192, "the error echoes the bad value unbounded"
    error = response.json()["error"]
    if response.status_code == 422 and "errors" in error:
        assert error["errors"][0]["index"] == index, error
    assert redis_snapshot(r) == before
    assert client.get("/v1/stats").json() == stats


PER_KIND = settings(CI, max_examples=8)  # every kind runs: 8 examples each instead of 60 over all kinds


@pytest.mark.parametrize("kind", sorted(BAD_TEXT_SAMPLE_VALUES))
@PER_KIND
@given(data=st.data(), where=WRITES)
def test_a_rejected_text_write_leaves_no_trace(
    text_client: TestClient, redis_client: redis.Redis, kind: str, data: st.DataObject, where: tuple[str, str]
) -> None:
    post(
        text_client, "/v1/samples", {"samples": [{"id": "keep", "source": "a", "input": "q", "target": "t"}]}
    )
    body, index = data.draw(bodies_with_one_bad(text_samples, BAD_TEXT_SAMPLE_VALUES[kind]))

    assert_rejected_without_trace(text_client, redis_client, body, index, where)


@pytest.mark.parametrize("kind", sorted(BAD_VECTOR_SAMPLE_VALUES))
@PER_KIND
@given(data=st.data(), where=WRITES)
def test_a_rejected_vector_write_leaves_no_trace(
    mlp_client: TestClient, redis_client: redis.Redis, kind: str, data: st.DataObject, where: tuple[str, str]
) -> None:
    post(
        mlp_client,
        "/v1/samples",
        {"samples": [{"id": "keep", "source": "a", "input": [1, 2, 3, 4], "target": 0}]},
    )
    body, index = data.draw(bodies_with_one_bad(vector_samples, BAD_VECTOR_SAMPLE_VALUES[kind]))

    assert_rejected_without_trace(mlp_client, redis_client, body, index, where)


def test_redis_snapshot_sees_a_write(text_client: TestClient, redis_client: redis.Redis) -> None:
    """The no-trace property is only as strong as the snapshot: an accepted sample must change it."""
    before = redis_snapshot(redis_client)

    post(text_client, "/v1/samples", {"samples": [{"source": "a", "input": "q", "target": "t"}]})

    assert redis_snapshot(redis_client) != before

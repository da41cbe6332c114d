"""Every path, query and body value is bounded before it reaches a library that can throw.

Each kind of hostile or odd value gets a 4xx naming the field (``samples[i].field`` for a sample), never a
500, and stores nothing: values nested past what a serializer or ``repr`` can take, numbers the model kind
cannot represent (float32 features, int64 classes), strings that are not Unicode, ids that cannot be ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.schema import FLOAT32_MAX, MAX_JSON_DEPTH, MAX_VECTOR_LENGTH, wide_integer_error
from store.config import Settings

MLP = {"model": "mlp", "model_params": {"n_features": 4, "n_classes": 3}}
ANY = {"model": "some-future-kind"}  # a kind the API does not know: it takes text or numeric vectors


def text_sample(i: int = 0, **fields: Any) -> dict[str, Any]:
    return {"id": f"s{i}", "source": "agent-a", "input": f"what is {i}+1?", "target": f"{i + 1}", **fields}


def vector_sample(i: int = 0, **fields: Any) -> dict[str, Any]:
    return {"id": f"v{i}", "source": "sensor", "input": [0.5, -1.0, 2.0, float(i)], "target": i % 3, **fields}


def nested(depth: int, leaf: Any = 1) -> Any:
    """``leaf`` inside ``depth`` levels of objects and arrays (alternating), as JSON text."""
    text = json.dumps(leaf)
    for level in range(depth):
        text = f'{{"k": {text}}}' if level % 2 else f"[{text}]"
    return text


def post_raw(client: TestClient, body: str | bytes, path: str = "/v1/samples") -> httpx.Response:
    return client.post(path, content=body, headers={"Content-Type": "application/json"})


def body_with(sample_json: str, good: dict[str, Any] | None = None) -> str:
    """An ingest body: a good sample, then the sample given as JSON text."""
    return f'{{"samples": [{json.dumps(good or text_sample(0))}, {sample_json}]}}'


def assert_rejected_naming(response: httpx.Response, index: int, field: str, status: int = 422) -> None:
    assert response.status_code == status, response.text[:2000]
    error = response.json()["error"]
    assert error["detail"].startswith(f"samples[{index}].{field}:"), error["detail"][:500]
    assert error["errors"][0] == {**error["errors"][0], "index": index, "field": field}
    assert len(response.content) < 8_192, "the error echoes an unbounded value"


def buffer_stats(client: TestClient) -> dict[str, Any]:
    return client.get("/v1/stats").json()["buffer"]


@pytest.fixture
def mlp_client(make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(make_settings(**MLP), raise_server_exceptions=False)


@pytest.fixture
def any_client(make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(make_settings(**ANY), raise_server_exceptions=False)


@pytest.fixture
def text_client(make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(make_settings(), raise_server_exceptions=False)


# --- nesting: the parser takes 1,024 levels, orjson.dumps 254, repr ~1,000 minus the stack ---------------


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 255, 300, 1000])
def test_meta_nested_too_deep_is_422_naming_meta(text_client: TestClient, depth: int) -> None:
    sample = json.dumps(text_sample(1))[:-1] + f', "meta": {{"trace": {nested(depth - 1)}}}}}'

    assert_rejected_naming(post_raw(text_client, body_with(sample)), 1, "meta")
    assert buffer_stats(text_client)["size"] == 0


def test_meta_nested_to_the_limit_is_stored_and_returned(text_client: TestClient) -> None:
    meta = json.loads(f'{{"trace": {nested(MAX_JSON_DEPTH - 1)}}}')

    response = text_client.post("/v1/samples", json={"samples": [text_sample(0, meta=meta)]})

    assert response.status_code == 202, response.text
    assert text_client.get("/v1/samples/s0").json()["meta"] == meta


@pytest.mark.parametrize("depth", [2, 900])
def test_validation_set_meta_nested_too_deep_is_422(text_client: TestClient, depth: int) -> None:
    bound = nested(MAX_JSON_DEPTH + depth)
    sample = f'{{"input": "q", "target": "t", "meta": {{"x": {bound}}}}}'

    for method in ("PUT", "POST"):
        response = text_client.request(
            method, "/v1/validation", content=f'{{"samples": [{sample}]}}',
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        assert_rejected_naming(response, 0, "meta")
    assert text_client.get("/v1/validation").json() == {"count": 0, "version": 0}


@pytest.mark.parametrize("field", ["input", "target", "reward"])
def test_a_deeply_nested_value_where_a_number_belongs_is_422(mlp_client: TestClient, field: str) -> None:
    deep = nested(950)
    value = f"[1.0, {deep}, 3.0, 4.0]" if field == "input" else deep
    sample = json.dumps(vector_sample(1))[:-1] + f', "{field}": {value}}}'
    if field != "reward":  # replace the field rather than repeat it
        sample = json.dumps({k: v for k, v in vector_sample(1).items() if k != field})[:-1]
        sample += f', "{field}": {value}}}'

    assert_rejected_naming(post_raw(mlp_client, body_with(sample, vector_sample(0))), 1, field)


def test_a_deeply_nested_non_finite_number_is_422_not_500(text_client: TestClient) -> None:
    # orjson refuses NaN; the lenient second parse that finds it must not recurse past Python's stack
    sample = json.dumps(text_sample(1))[:-1] + f', "meta": {{"x": {nested(900, "NaN")}}}}}'
    sample = sample.replace('"NaN"', "NaN")

    response = post_raw(text_client, body_with(sample))

    assert response.status_code in (400, 422), response.text[:500]
    if response.status_code == 422:
        assert_rejected_naming(response, 1, "meta")


def test_a_huge_value_is_not_echoed_in_the_error(mlp_client: TestClient) -> None:
    sample = {**vector_sample(1), "input": [1.0, ["x"] * 200_000, 3.0, 4.0]}

    response = mlp_client.post("/v1/samples", json={"samples": [vector_sample(0), sample]})

    assert_rejected_naming(response, 1, "input")


def test_a_huge_unknown_field_name_is_not_echoed_in_full(text_client: TestClient) -> None:
    name = "x" * 100_000
    response = text_client.post(
        "/v1/samples", json={"samples": [text_sample(0), {**text_sample(1), name: 1}]}
    )

    assert response.status_code == 422
    assert len(response.content) < 8_192
    top = text_client.post("/v1/samples", json={"samples": [text_sample(0)], name: 1})
    assert top.status_code == 422
    assert len(top.content) < 8_192


# --- numbers the model kind cannot represent --------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [1e39, -1e39, 3.5e38, float(np.nextafter(np.float32(FLOAT32_MAX), np.float64(np.inf), dtype=np.float64)),
     1.7976931348623157e308],
    ids=["1e39", "-1e39", "3.5e38", "just_past_float32_max", "float64_max"],
)  # fmt: skip
def test_mlp_input_outside_float32_is_422_naming_input(mlp_client: TestClient, value: float) -> None:
    bad = {**vector_sample(1), "input": [0.0, value, 0.0, 0.0]}

    response = mlp_client.post("/v1/samples", json={"samples": [vector_sample(0), bad]})

    assert_rejected_naming(response, 1, "input")
    assert "float32" in response.json()["error"]["detail"]
    assert buffer_stats(mlp_client)["size"] == 0


def test_mlp_input_at_float32_extremes_is_accepted(mlp_client: TestClient) -> None:
    values = [FLOAT32_MAX, -FLOAT32_MAX, 1e-300, -0.0]  # tiny values round to 0 in float32: representable

    response = mlp_client.post("/v1/samples", json={"samples": [{**vector_sample(0), "input": values}]})

    assert response.status_code == 202, response.text
    assert mlp_client.get("/v1/samples/v0").json()["input"] == values


@pytest.mark.parametrize("value", [2**63, 2**64 - 1], ids=["2**63", "2**64-1"])
def test_integer_target_beyond_int64_is_422_naming_target(any_client: TestClient, value: int) -> None:
    bad = {"source": "a", "input": [1.0, 2.0], "target": value}

    response = any_client.post("/v1/samples", json={"samples": [{**bad, "target": 1}, bad]})

    assert_rejected_naming(response, 1, "target")
    assert buffer_stats(any_client)["size"] == 0


def test_integer_target_at_int64_max_is_accepted_by_a_kind_without_classes(any_client: TestClient) -> None:
    response = any_client.post(
        "/v1/samples", json={"samples": [{"id": "i", "source": "a", "input": [1.0], "target": 2**63 - 1}]}
    )

    assert response.status_code == 202, response.text
    assert any_client.get("/v1/samples/i").json()["target"] == 2**63 - 1


def test_numeric_input_longer_than_the_bound_is_422_for_a_kind_without_n_features(
    any_client: TestClient,
) -> None:
    bad = {"source": "a", "input": [0.5] * (MAX_VECTOR_LENGTH + 1), "target": 1}

    response = any_client.post("/v1/samples", json={"samples": [{**bad, "input": [0.5]}, bad]})

    assert_rejected_naming(response, 1, "input")


# --- strings that are not Unicode ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["input", "target", "source", "id"])
@pytest.mark.parametrize("escape", [r"\ud800", r"\udfff", r"x\udc00y"], ids=["high", "low", "inner_low"])
def test_a_lone_surrogate_in_a_sample_string_is_422_naming_the_field(
    text_client: TestClient, field: str, escape: str
) -> None:
    sample = json.dumps(text_sample(1)).replace(f'"{field}": "', f'"{field}": "{escape}', 1)

    assert_rejected_naming(post_raw(text_client, body_with(sample)), 1, field)
    assert buffer_stats(text_client)["size"] == 0


def test_a_lone_surrogate_in_meta_is_422_naming_meta(text_client: TestClient) -> None:
    for meta in (r'{"note": "\ud83d"}', r'{"\ud83d": 1}', r'{"a": [[{"b": "\udead"}]]}'):
        sample = json.dumps(text_sample(1))[:-1] + f', "meta": {meta}}}'
        assert_rejected_naming(post_raw(text_client, body_with(sample)), 1, "meta")


def test_a_surrogate_pair_is_a_character_and_accepted(text_client: TestClient) -> None:
    sample = json.dumps(text_sample(0)).replace('"input": "', r'"input": "\ud83d\ude00', 1)

    assert post_raw(text_client, f'{{"samples": [{sample}]}}').status_code == 202
    assert text_client.get("/v1/samples/s0").json()["input"].startswith("\U0001f600")


def test_a_lone_surrogate_in_a_validation_sample_is_422(text_client: TestClient) -> None:
    body = r'{"samples": [{"input": "q", "target": "\ud800"}]}'

    assert_rejected_naming(post_raw(text_client, body, "/v1/validation"), 0, "target")


def test_invalid_utf8_bytes_are_malformed_json(text_client: TestClient) -> None:
    body = b'{"samples": [{"source": "a", "input": "\xff\xfe", "target": "t"}]}'

    response = post_raw(text_client, body)

    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "MalformedJSON"


# --- path and query values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sample_id",
    ["x" * 129, "x" * 20_000, "a b", "caf%C3%A9", "%00", "%ED%A0%80", "a%09b", "%F0%9F%98%80", "a;b", "a'b"],
    ids=["129_chars", "20000_chars", "space", "non_ascii", "nul", "encoded_surrogate", "tab", "emoji",
         "semicolon", "quote"],
)  # fmt: skip
def test_a_sample_id_that_cannot_be_an_id_is_422(text_client: TestClient, sample_id: str) -> None:
    response = text_client.get(f"/v1/samples/{sample_id}")

    assert response.status_code == 422, response.text[:500]
    error = response.json()["error"]
    assert error["type"] == "ValidationError"
    assert "sample_id" in error["detail"]
    assert len(response.content) < 8_192


def test_a_sample_id_of_128_id_chars_is_looked_up(text_client: TestClient) -> None:
    sid = "a.b:c-d_" * 16
    assert text_client.post("/v1/samples", json={"samples": [text_sample(0, id=sid)]}).status_code == 202

    assert text_client.get(f"/v1/samples/{sid}").json()["id"] == sid
    assert text_client.get(f"/v1/samples/{sid[:-1]}").status_code == 404


@pytest.mark.parametrize(
    "params",
    [{"order": "asc", "limit": "10000000000000000000000000"}, {"order": "asc", "limit": "-1"},
     {"order": "asc", "limit": "0"}, {"order": "desc", "limit": "10001"}, {"order": "asc", "limit": "1e3"},
     {"order": "asc", "limit": ""}, {"order": "sideways"}, {"order": ""}, {},
     {"ids": "x" * 129}, {"ids": "a,b c"}, {"ids": "a,\x00"}, {"ids": "ok,caf\u00e9"}],
    ids=["limit_huge", "limit_negative", "limit_zero", "limit_10001", "limit_float", "limit_empty",
         "order_unknown", "order_empty", "neither", "id_129_chars", "id_with_space", "id_with_nul",
         "id_non_ascii"],
)  # fmt: skip
def test_weights_query_values_out_of_bounds_are_422(text_client: TestClient, params: dict[str, str]) -> None:
    response = text_client.get("/v1/weights/samples", params=params)

    assert response.status_code == 422, response.text[:500]
    assert response.json()["error"]["type"] == "ValidationError"
    assert len(response.content) < 8_192


def test_more_than_10000_ids_is_422(text_client: TestClient) -> None:
    ids = ",".join(str(n) for n in range(10_001))  # commas unescaped: the query stays under httpx's 64 KiB

    response = text_client.get(f"/v1/weights/samples?ids={ids}")

    assert response.status_code == 422, response.text[:500]
    assert response.json()["error"]["field"] == "ids"


def test_weights_query_values_at_their_bounds_are_answered(text_client: TestClient) -> None:
    text_client.post("/v1/samples", json={"samples": [text_sample(i) for i in range(3)]})

    assert (
        text_client.get("/v1/weights/samples", params={"order": "asc", "limit": "10000"}).status_code == 200
    )
    ids = ",".join(["s0", "y" * 128, *(str(n) for n in range(9_998))])
    by_ids = text_client.get(f"/v1/weights/samples?ids={ids}")
    assert by_ids.status_code == 200, by_ids.text[:500]
    assert by_ids.json()["weights"] == {"s0": 1.0}
    assert text_client.get("/v1/weights/samples", params={"ids": "s1,,s2,"}).json()["weights"] == {
        "s1": 1.0,
        "s2": 1.0,
    }


# --- integers orjson would round ----------------------------------------------------------------------------


@pytest.mark.parametrize("literal", [str(2**64), str(-(2**63) - 1), "1" + "0" * 40])
def test_an_integer_beyond_64_bits_in_meta_is_422_not_rounded(text_client: TestClient, literal: str) -> None:
    sample = json.dumps(text_sample(1))[:-1] + f', "meta": {{"trace_id": {literal}}}}}'

    assert_rejected_naming(post_raw(text_client, body_with(sample)), 1, "meta")


@pytest.mark.parametrize("literal", [str(2**64), str(-(2**63) - 1), "1" + "0" * 40])
def test_wide_integer_error_names_the_sample_and_field(literal: str) -> None:
    body = body_with(json.dumps(text_sample(1))[:-1] + f', "meta": {{"a": [1, {literal}]}}}}').encode()

    error = wide_integer_error(body)

    assert error is not None
    assert error.detail.startswith("samples[1].meta: holds an integer beyond 64 bits")


@pytest.mark.parametrize(
    "literal", [str(2**64 - 1), str(-(2**63)), "12345678901234567890.5", '"123456789012345678901234"']
)
def test_wide_integer_error_passes_what_orjson_reads_exactly(literal: str) -> None:
    body = body_with(json.dumps(text_sample(1))[:-1] + f', "meta": {{"a": {literal}}}}}').encode()

    assert wide_integer_error(body) is None

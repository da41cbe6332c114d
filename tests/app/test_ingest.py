"""``POST /v1/samples``: the Sample rules, all-or-nothing requests, dedup, capacity, concurrency."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from store.config import Settings
from store.feed import TrainerFeed
from store.keys import Keys

MLP = {"model": "mlp", "model_params": {"n_features": 4, "n_classes": 3}}


def text_sample(i: int = 0, **fields: Any) -> dict[str, Any]:
    return {"id": f"s{i}", "source": "agent-a", "input": f"what is {i}+1?", "target": f"{i + 1}", **fields}


def vector_sample(i: int = 0, **fields: Any) -> dict[str, Any]:
    return {"id": f"v{i}", "source": "sensor", "input": [0.5, -1.0, 2.0, float(i)], "target": i % 3, **fields}


def post(client: TestClient, samples: list[Any]) -> httpx.Response:
    return client.post("/v1/samples", json={"samples": samples})


def post_raw(client: TestClient, body: str | bytes) -> httpx.Response:
    return client.post("/v1/samples", content=body, headers={"Content-Type": "application/json"})


def buffer_stats(client: TestClient) -> dict[str, Any]:
    return client.get("/v1/stats").json()["buffer"]


def error_of(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    """The ``error`` object of a response that must be ``status`` with the contract's error shape."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind
    assert isinstance(error["detail"], str) and error["detail"]
    return error


@pytest.fixture
def mlp_client(make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(make_settings(**MLP))


# --- the Sample table: each bad input is a 422 naming the sample and the field, and stores nothing ---------

TEXT_REJECTIONS: dict[str, tuple[dict[str, Any], str]] = {
    # case: (fields replacing those of a good sample; None removes the field), field named in the error
    "missing_source": ({"source": None}, "source"),
    "empty_source": ({"source": ""}, "source"),
    "source_with_space": ({"source": "agent a"}, "source"),
    "source_of_129_chars": ({"source": "a" * 129}, "source"),
    "source_not_a_string": ({"source": 7}, "source"),
    "id_with_slash": ({"id": "a/b"}, "id"),
    "id_of_129_chars": ({"id": "x" * 129}, "id"),
    "empty_id": ({"id": ""}, "id"),
    "id_not_a_string": ({"id": 12}, "id"),
    "unknown_field": ({"label": "spam"}, "label"),
    "missing_input": ({"input": None}, "input"),
    "empty_input": ({"input": ""}, "input"),
    "input_a_number": ({"input": 5}, "input"),
    "input_a_vector_for_a_text_model": ({"input": [1.0, 2.0]}, "input"),
    "input_over_8192_utf8_bytes": ({"input": "é" * 4097}, "input"),  # 4,097 characters, 8,194 bytes
    "missing_target": ({"target": None}, "target"),
    "empty_target": ({"target": ""}, "target"),
    "target_an_integer_for_a_text_model": ({"target": 3}, "target"),
    "target_over_8192_bytes": ({"target": "t" * 8193}, "target"),
    "reward_a_string": ({"reward": "0.5"}, "reward"),
    "reward_a_boolean": ({"reward": True}, "reward"),
    "meta_not_an_object": ({"meta": ["a", "b"]}, "meta"),
    "meta_over_4_kib": ({"meta": {"note": "m" * 4100}}, "meta"),
}


def with_fields(sample: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    out = {**sample, **fields}
    return {k: v for k, v in out.items() if v is not None}


def assert_rejected_naming(response: httpx.Response, index: int, field: str) -> None:
    error = error_of(response, 422, "ValidationError")
    assert error["detail"].startswith(f"samples[{index}].{field}:"), error["detail"]
    assert "nothing was stored" in error["detail"]
    assert error["errors"][0]["index"] == index
    assert error["errors"][0]["field"] == field


@pytest.mark.parametrize(("fields", "field"), TEXT_REJECTIONS.values(), ids=TEXT_REJECTIONS.keys())
def test_ingest_rejects_bad_text_sample_naming_index_and_field(
    app_client: TestClient, fields: dict[str, Any], field: str
) -> None:
    before = buffer_stats(app_client)
    batch = [text_sample(0), text_sample(1), with_fields(text_sample(2), fields)]

    assert_rejected_naming(post(app_client, batch), 2, field)
    assert buffer_stats(app_client) == before


VECTOR_REJECTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "input_of_3_numbers_for_4_features": ({"input": [1.0, 2.0, 3.0]}, "input"),
    "input_of_5_numbers_for_4_features": ({"input": [1.0, 2.0, 3.0, 4.0, 5.0]}, "input"),
    "input_with_a_string_element": ({"input": [1.0, "2", 3.0, 4.0]}, "input"),
    "input_with_a_boolean_element": ({"input": [1.0, True, 3.0, 4.0]}, "input"),
    "input_with_a_null_element": ({"input": [1.0, None, 3.0, 4.0]}, "input"),
    "input_a_string_for_mlp": ({"input": "1,2,3,4"}, "input"),
    "target_equal_to_n_classes": ({"target": 3}, "target"),
    "target_negative": ({"target": -1}, "target"),
    "target_a_float": ({"target": 1.0}, "target"),
    "target_a_string": ({"target": "1"}, "target"),
}


@pytest.mark.parametrize(("fields", "field"), VECTOR_REJECTIONS.values(), ids=VECTOR_REJECTIONS.keys())
def test_ingest_rejects_bad_vector_sample_naming_index_and_field(
    mlp_client: TestClient, fields: dict[str, Any], field: str
) -> None:
    before = buffer_stats(mlp_client)
    batch = [vector_sample(0), vector_sample(1), {**vector_sample(2), **fields}]

    assert_rejected_naming(post(mlp_client, batch), 2, field)
    assert buffer_stats(mlp_client) == before


def test_ingest_accepts_a_good_vector_sample_for_mlp(mlp_client: TestClient) -> None:
    response = post(mlp_client, [vector_sample(0), vector_sample(2)])

    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 2
    assert mlp_client.get("/v1/samples/v2").json()["input"] == [0.5, -1.0, 2.0, 2.0]


NON_FINITE_LITERALS = {
    "nan": "NaN",
    "infinity": "Infinity",
    "minus_infinity": "-Infinity",
    "overflow": "1e999",
}


@pytest.mark.parametrize("literal", NON_FINITE_LITERALS.values(), ids=NON_FINITE_LITERALS.keys())
def test_ingest_rejects_non_finite_reward_naming_index_and_field(
    app_client: TestClient, literal: str
) -> None:
    good = json.dumps(text_sample(0))
    bad = json.dumps(text_sample(1))[:-1] + f', "reward": {literal}}}'
    before = buffer_stats(app_client)

    assert_rejected_naming(post_raw(app_client, f'{{"samples": [{good}, {bad}]}}'), 1, "reward")
    assert buffer_stats(app_client) == before


@pytest.mark.parametrize("literal", NON_FINITE_LITERALS.values(), ids=NON_FINITE_LITERALS.keys())
def test_ingest_rejects_non_finite_feature_naming_index_and_field(
    mlp_client: TestClient, literal: str
) -> None:
    good = json.dumps(vector_sample(0))
    bad = f'{{"source": "sensor", "input": [1.0, {literal}, 3.0, 4.0], "target": 0}}'

    assert_rejected_naming(post_raw(mlp_client, f'{{"samples": [{good}, {bad}]}}'), 1, "input")
    assert buffer_stats(mlp_client)["size"] == 0


def test_ingest_rejects_nan_inside_meta_naming_index_and_field(app_client: TestClient) -> None:
    bad = '{"source": "a", "input": "q", "target": "t", "meta": {"scores": [1.0, NaN]}}'

    assert_rejected_naming(post_raw(app_client, f'{{"samples": [{bad}]}}'), 0, "meta")


def test_ingest_rejects_a_sample_that_is_not_an_object(app_client: TestClient) -> None:
    error = error_of(post(app_client, [text_sample(0), "what is 2+2?"]), 422, "ValidationError")

    assert error["detail"].startswith("samples[1]")
    assert error["errors"][0]["index"] == 1
    assert buffer_stats(app_client)["size"] == 0


def test_ingest_reports_every_bad_sample_of_a_request(app_client: TestClient) -> None:
    batch = [text_sample(0, source=""), text_sample(1), text_sample(2, target=""), text_sample(3, reward="x")]

    errors = error_of(post(app_client, batch), 422, "ValidationError")["errors"]

    assert [(e["index"], e["field"]) for e in errors] == [(0, "source"), (2, "target"), (3, "reward")]


def test_a_batch_whose_last_sample_is_bad_stores_none_of_it(app_client: TestClient) -> None:
    post(app_client, [text_sample(i) for i in range(5)])
    before = buffer_stats(app_client)
    batch = [text_sample(i) for i in range(5, 105)] + [text_sample(105, input="")]

    assert_rejected_naming(post(app_client, batch), 100, "input")
    assert buffer_stats(app_client) == before
    assert app_client.get("/v1/samples/s5").status_code == 404
    assert post(app_client, batch[:-1]).json()["accepted"] == 100  # none of them was half-stored


# --- request-level limits and errors ---------------------------------------------------------------------


def test_ingest_accepts_10000_samples_and_rejects_10001(app_client: TestClient) -> None:
    many = [{"source": "a", "input": f"q{i}", "target": "t"} for i in range(10_001)]

    error = error_of(post(app_client, many), 422, "ValidationError")
    assert error["field"] == "samples"
    assert buffer_stats(app_client)["size"] == 0

    assert post(app_client, many[:10_000]).json()["accepted"] == 10_000


@pytest.mark.parametrize(
    ("body", "field"),
    [({"samples": []}, "samples"), ({"samples": "x"}, "samples"), ({}, "samples"), ([], "body"),
     ({"samples": [text_sample()], "extra": 1}, "extra")],
    ids=["empty_list", "not_a_list", "missing", "not_an_object", "unknown_top_level_field"],
)  # fmt: skip
def test_ingest_rejects_a_body_of_the_wrong_shape(app_client: TestClient, body: Any, field: str) -> None:
    error = error_of(app_client.post("/v1/samples", json=body), 422, "ValidationError")
    assert error["field"] == field


def big_body() -> bytes:
    """A well-formed ingest body of valid samples, just over 16 MiB."""
    samples = [text_sample(i, input="x" * 8000) for i in range(2100)]
    body = json.dumps({"samples": samples}).encode()
    assert len(body) > 16 * 1024 * 1024
    return body


def test_ingest_refuses_a_body_over_16_mib_and_stores_nothing(app_client: TestClient) -> None:
    error_of(post_raw(app_client, big_body()), 413, "PayloadTooLarge")
    assert buffer_stats(app_client)["size"] == 0
    assert buffer_stats(app_client)["ingested"] == 0


def test_ingest_refuses_a_streamed_body_over_16_mib_without_content_length(app_client: TestClient) -> None:
    body = big_body()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 1 << 20):
            yield body[i : i + (1 << 20)]

    response = app_client.post("/v1/samples", content=chunks(), headers={"Content-Type": "application/json"})

    error_of(response, 413, "PayloadTooLarge")
    assert buffer_stats(app_client)["size"] == 0


@pytest.mark.parametrize(
    "body", ['{"samples": [', "samples=1", '{"samples": [{"id": "a",}]}', ""],
    ids=["truncated", "form_data", "trailing_comma", "empty"],
)  # fmt: skip
def test_ingest_answers_malformed_json_with_400(app_client: TestClient, body: str) -> None:
    error_of(post_raw(app_client, body), 400, "MalformedJSON")
    assert buffer_stats(app_client)["size"] == 0


# --- storing, dedup, idempotency -------------------------------------------------------------------------


def test_ingested_sample_is_returned_with_its_fields_and_uniform_weight(app_client: TestClient) -> None:
    sample = text_sample(0, reward=0.25, meta={"episode": 3, "tags": ["a"]})

    response = post(app_client, [sample])

    assert response.status_code == 202
    assert response.json() == {"accepted": 1, "duplicates": 0, "ids": ["s0"]}
    assert app_client.get("/v1/samples/s0").json() == {**sample, "weight": 1.0}
    assert app_client.get("/v1/samples/never-posted").status_code == 404


def canonical_id(source: str, input: Any, target: Any) -> str:
    """The contract's default id, computed independently of the server's code."""
    canon = json.dumps({"source": source, "input": input, "target": target},
                       sort_keys=True, separators=(",", ":"), ensure_ascii=False)  # fmt: skip
    return hashlib.sha256(canon.encode()).hexdigest()


def test_sample_without_id_gets_the_sha256_of_its_canonical_json(app_client: TestClient) -> None:
    sample = {"source": "agent-b", "input": "Größe von 2+2?", "target": "4"}

    ids = post(app_client, [sample]).json()["ids"]

    assert ids == [canonical_id("agent-b", "Größe von 2+2?", "4")]
    assert app_client.get(f"/v1/samples/{ids[0]}").json()["input"] == "Größe von 2+2?"


def test_same_content_without_id_is_a_duplicate_and_other_content_is_not(app_client: TestClient) -> None:
    sample = {"source": "agent-b", "input": "2+2=", "target": "4"}
    post(app_client, [sample])

    again = post(app_client, [dict(sample)]).json()
    other_source = post(app_client, [{**sample, "source": "agent-c"}]).json()

    assert (again["accepted"], again["duplicates"]) == (0, 1)
    assert (other_source["accepted"], other_source["duplicates"]) == (1, 0)
    assert other_source["ids"] != again["ids"]


def test_a_known_id_is_a_duplicate_even_with_other_content(app_client: TestClient) -> None:
    post(app_client, [text_sample(0)])

    result = post(app_client, [text_sample(0, input="something else")]).json()

    assert (result["accepted"], result["duplicates"], result["ids"]) == (0, 1, ["s0"])
    assert app_client.get("/v1/samples/s0").json()["input"] == text_sample(0)["input"]  # the first one stays


def test_reposting_a_batch_is_idempotent(app_client: TestClient) -> None:
    batch = [text_sample(i) for i in range(50)] + [
        {"source": "x", "input": f"q{i}", "target": "t"} for i in range(50)
    ]
    first = post(app_client, batch).json()
    stats_after_first = buffer_stats(app_client)

    second = post(app_client, batch).json()

    assert (first["accepted"], first["duplicates"]) == (100, 0)
    assert (second["accepted"], second["duplicates"]) == (0, 100)
    assert second["ids"] == first["ids"]
    stats = buffer_stats(app_client)
    assert (stats["size"], stats["ingested"]) == (stats_after_first["size"], stats_after_first["ingested"])
    assert stats["duplicates"] == 100


def test_duplicates_inside_one_request_are_counted(app_client: TestClient) -> None:
    no_id = {"source": "x", "input": "same", "target": "t"}
    batch = [text_sample(0), text_sample(1), text_sample(0), no_id, dict(no_id)]

    result = post(app_client, batch).json()

    assert (result["accepted"], result["duplicates"]) == (3, 2)
    assert result["ids"][:3] == ["s0", "s1", "s0"]
    assert result["ids"][3] == result["ids"][4]
    assert buffer_stats(app_client)["size"] == 3


def test_a_full_buffer_evicts_the_oldest_and_their_ids_can_be_posted_again(
    make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]
) -> None:
    client = make_client(make_settings(buffer_max_samples=10))
    for start in (0, 10, 20):
        post(client, [text_sample(i) for i in range(start, min(start + 10, 25))])

    stats = buffer_stats(client)
    assert (stats["size"], stats["ingested"], stats["evicted"]) == (10, 25, 15)
    assert all(client.get(f"/v1/samples/s{i}").status_code == 404 for i in range(15))
    assert all(client.get(f"/v1/samples/s{i}").status_code == 200 for i in range(15, 25))

    again = post(client, [text_sample(0), text_sample(24)]).json()
    assert (again["accepted"], again["duplicates"]) == (1, 1)  # s0 is new again; s24 is still held
    assert client.get("/v1/samples/s0").status_code == 200


# --- many clients at once, against the real server --------------------------------------------------------


def test_concurrent_clients_lose_nothing_and_count_exactly(live_api: str, redis_url: str) -> None:
    n_clients, per_client, batch_size = 8, 1000, 100
    shared = [f"shared-{k}" for k in range(per_client // 2)]  # every app_client posts these 500 ids

    def client_ids(c: int) -> list[str]:
        ids = shared + [f"own-{c}-{k}" for k in range(per_client // 2)]
        random.Random(c).shuffle(ids)
        return ids

    def run_client(c: int) -> tuple[int, int, list[str]]:
        accepted, duplicates, returned = 0, 0, []
        ids = client_ids(c)
        with httpx.Client(base_url=live_api, timeout=30) as http:
            for b in range(0, per_client, batch_size):
                batch = [{"id": i, "source": f"agent-{c}", "input": f"input of {i}", "target": "t"}
                         for i in ids[b : b + batch_size]]  # fmt: skip
                response = http.post("/v1/samples", json={"samples": batch})
                assert response.status_code == 202, response.text
                body = response.json()
                accepted, duplicates = accepted + body["accepted"], duplicates + body["duplicates"]
                returned += body["ids"]
        assert returned == ids
        return accepted, duplicates, ids

    with ThreadPoolExecutor(n_clients) as pool:
        results = list(pool.map(run_client, range(n_clients)))

    distinct = {i for _, _, ids in results for i in ids}
    posted = n_clients * per_client
    assert len(distinct) == per_client // 2 * (n_clients + 1)
    assert sum(a for a, _, _ in results) == len(distinct)
    assert sum(a + d for a, d, _ in results) == posted
    stats = httpx.get(f"{live_api}/v1/stats").json()["buffer"]
    assert (stats["size"], stats["ingested"], stats["duplicates"]) == (
        len(distinct), len(distinct), posted - len(distinct)
    )  # fmt: skip
    feed = TrainerFeed(redis.Redis.from_url(redis_url), Keys())
    feed.ensure_group()
    delivered = feed.read_new(count=10 * posted)
    assert len({e.ordinal for e in delivered}) == len(delivered) == len(distinct)

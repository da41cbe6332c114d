"""Chat-shaped samples: for ``hf-causal-lm`` an ``input`` may be a conversation (CONTRACT.md, "Sample").

A conversation is a list of ``{"role": "system"|"user"|"assistant"|"tool", "content": str}`` messages: at
least one, at most ``MAX_MESSAGES``, contents of at most ``MAX_CONVERSATION_BYTES`` UTF-8 bytes in all.
What is wrong is named down to the message and its field (``samples[3].input[1].role``), a request with one
bad sample stores nothing, and the validation set takes the same shapes. Kinds without a chat template
reject a list of messages exactly as before. On the real app: real redis-server, real SQLite.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.schema import CHAT_ROLES, MAX_CONVERSATION_BYTES, MAX_MESSAGES, content_group
from datadiet import Client
from datadiet.contract import content_id, with_id
from store.config import Settings
from store.feed import TrainerFeed
from store.keys import Keys

settings.register_profile(
    "chat-ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CI = settings.get_profile("chat-ci")
CHAT = {"model": "hf-causal-lm"}
MLP = {"model": "mlp", "model_params": {"n_features": 4, "n_classes": 3}}
TOOLS = json.dumps([{"name": "get_weather", "parameters": {"type": "dict", "properties": {"city": {}}}}])


def conversation(question: str = "What is the weather in Paris?") -> list[dict[str, str]]:
    return [
        {"role": "system", "content": f"You can call these functions: {TOOLS}"},
        {"role": "user", "content": question},
    ]


def chat_sample(i: int = 0, **fields: Any) -> dict[str, Any]:
    target = json.dumps({"name": "get_weather", "arguments": {"city": f"city-{i}"}})
    return {"source": "agent-a", "input": conversation(f"weather in city-{i}?"), "target": target, **fields}


def post(
    client: TestClient, samples: list[Any], path: str = "/v1/samples", method: str = "POST"
) -> httpx.Response:
    return client.request(method, path, json={"samples": samples})


def stored(client: TestClient) -> int:
    return int(client.get("/v1/stats").json()["buffer"]["ingested"])


def assert_rejected_naming(response: httpx.Response, index: int, field: str) -> str:
    """The 422 names ``samples[index].field`` first, in the detail and in ``errors``; its message."""
    assert response.status_code == 422, response.text[:2000]
    error = response.json()["error"]
    assert error["type"] == "ValidationError"
    assert error["detail"].startswith(f"samples[{index}].{field}:"), error["detail"][:500]
    assert error["detail"].endswith("nothing was stored")
    assert error["errors"][0]["index"] == index and error["errors"][0]["field"] == field
    assert len(response.content) < 8_192, "the error echoes an unbounded value"
    return str(error["errors"][0]["message"])


@pytest.fixture
def chat_client(make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(make_settings(**CHAT), raise_server_exceptions=False)


# --- accepted ---------------------------------------------------------------------------------------------


def test_a_conversation_is_stored_and_returned_as_sent_under_its_canonical_json_id(
    chat_client: TestClient,
) -> None:
    sample = chat_sample(0)

    response = post(chat_client, [sample, {**sample, "source": "agent-b"}, sample])

    assert response.status_code == 202, response.text
    ids = response.json()["ids"]
    assert response.json()["accepted"] == 2 and response.json()["duplicates"] == 1
    assert ids[0] == content_id("agent-a", sample["input"], sample["target"]) == with_id(sample)["id"]
    assert ids[0] != ids[1] and ids[2] == ids[0]
    doc = chat_client.get(f"/v1/samples/{ids[0]}").json()
    assert {k: doc[k] for k in ("id", "source", "input", "target")} == {**sample, "id": ids[0]}


def test_the_id_does_not_depend_on_the_order_of_a_messages_keys(chat_client: TestClient) -> None:
    sample = chat_sample(1)
    reordered = {**sample, "input": [{"content": m["content"], "role": m["role"]} for m in sample["input"]]}

    ids = post(chat_client, [sample, reordered]).json()["ids"]

    assert ids[0] == ids[1]


def test_a_plain_string_input_is_still_accepted_for_a_chat_kind(chat_client: TestClient) -> None:
    response = post(chat_client, [{"source": "a", "input": "2+3=", "target": "5"}, chat_sample(2)])

    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 2


def test_every_role_and_the_bounds_themselves_are_accepted(chat_client: TestClient) -> None:
    every_role = [{"role": role, "content": f"{role} says hi"} for role in CHAT_ROLES]
    longest = [{"role": "user", "content": "x"}] * MAX_MESSAGES
    biggest = [
        {"role": "system", "content": "é" * (MAX_CONVERSATION_BYTES // 4)},
        {"role": "user", "content": "ü" * (MAX_CONVERSATION_BYTES // 4)},
    ]

    response = post(
        chat_client, [{"source": "a", "input": c, "target": "ok"} for c in (every_role, longest, biggest)]
    )

    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == 3


def test_the_python_client_posts_conversations_to_the_api_process(start_api: Callable[..., str]) -> None:
    url = start_api(model="hf-causal-lm")
    samples = [chat_sample(i) for i in range(5)]

    with Client(url) as client:
        summary = client.post_samples(samples, batch_size=2)
        assert client.set_validation([{"input": conversation("hold-out?"), "target": "{}"}]) == {
            "count": 1,
            "version": 1,
        }
        got = httpx.get(f"{url}/v1/samples/{summary.ids[3]}").json()

    assert summary.accepted == 5 and summary.ids == [with_id(s)["id"] for s in samples]
    assert got["input"] == samples[3]["input"]


# --- rejected, naming the message and its field -----------------------------------------------------------


def with_input(value: Any) -> dict[str, Any]:
    return {"source": "agent-a", "input": value, "target": "{}"}


USER = {"role": "user", "content": "hi"}
BAD_CONVERSATIONS: dict[str, tuple[Any, str, str]] = {
    # name: (input, the field named, a word the message holds)
    "unknown_role": (
        [USER, {"role": "robot", "content": "x"}],
        "input[1].role",
        "system, user, assistant, tool",
    ),
    "role_not_a_string": ([{"role": 3, "content": "x"}], "input[0].role", "must be one of"),
    "role_missing": ([USER, USER, {"content": "x"}], "input[2].role", "required"),
    "content_missing": ([{"role": "user"}], "input[0].content", "required"),
    "content_not_a_string": (
        [USER, {"role": "tool", "content": {"ok": 1}}],
        "input[1].content",
        "must be a string",
    ),
    "content_empty": ([{"role": "assistant", "content": ""}], "input[0].content", "must not be empty"),
    "unknown_field": ([{**USER, "name": "bob"}], "input[0].name", "unknown field"),
    "message_not_an_object": ([USER, "hi"], "input[1]", "must be an object"),
    "message_a_list": ([[USER]], "input[0]", "must be an object"),
    "no_messages": ([], "input", "at least one message"),
    "too_many_messages": ([USER] * (MAX_MESSAGES + 1), "input", f"limit is {MAX_MESSAGES}"),
    "too_many_bytes": (
        [{"role": "system", "content": "s" * MAX_CONVERSATION_BYTES}, USER],
        "input",
        f"limit is {MAX_CONVERSATION_BYTES}",
    ),
    "neither_text_nor_messages": (42, "input", "a string or an array of messages"),
    "an_object": ({"role": "user", "content": "hi"}, "input", "a string or an array of messages"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONVERSATIONS))
def test_a_bad_conversation_is_422_naming_the_message_and_field_and_stores_nothing(
    chat_client: TestClient, name: str
) -> None:
    value, field, words = BAD_CONVERSATIONS[name]
    before = stored(chat_client)

    response = post(chat_client, [chat_sample(0), chat_sample(1), chat_sample(2), with_input(value)])

    message = assert_rejected_naming(response, 3, field)
    assert words in message
    assert stored(chat_client) == before


def test_every_bad_sample_of_a_request_is_listed(chat_client: TestClient) -> None:
    bad_role = with_input([USER, {"role": "bot", "content": "x"}])
    bad_content = with_input([{"role": "user", "content": None}])

    response = post(chat_client, [chat_sample(0), bad_role, chat_sample(1), bad_content])

    assert_rejected_naming(response, 1, "input[1].role")
    assert [(e["index"], e["field"]) for e in response.json()["error"]["errors"]] == [
        (1, "input[1].role"),
        (3, "input[0].content"),
    ]


def test_a_chat_target_must_still_be_a_string(chat_client: TestClient) -> None:
    response = post(chat_client, [chat_sample(0, target=3)])

    assert "must be a string" in assert_rejected_naming(response, 0, "target")


def test_nan_in_a_message_is_422_naming_the_input(chat_client: TestClient) -> None:
    body = '{"samples": [{"source": "a", "input": [{"role": "user", "content": NaN}], "target": "x"}]}'

    response = chat_client.post("/v1/samples", content=body, headers={"Content-Type": "application/json"})

    assert response.status_code == 422
    assert response.json()["error"]["detail"].startswith("samples[0].input:")


# --- kinds without a chat template: as before ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, "input must be a string for this model kind, got list"),  # tiny-gpt
        ({"model": "some-future-kind"}, "input[0] must be a finite number, got an object"),
        (MLP, "input has 2 numbers; this model takes exactly 4"),
    ],
    ids=["tiny-gpt", "unknown-kind", "mlp"],
)
def test_kinds_without_a_chat_template_reject_a_conversation_as_before(
    make_settings: Callable[..., Settings],
    make_client: Callable[..., TestClient],
    overrides: dict[str, Any],
    message: str,
) -> None:
    client = make_client(make_settings(**overrides), raise_server_exceptions=False)

    response = post(client, [with_input([USER, USER])])

    assert assert_rejected_naming(response, 0, "input") == message


def test_input_kind_chat_can_be_set_for_a_kind_the_api_does_not_know(
    make_settings: Callable[..., Settings], make_client: Callable[..., TestClient]
) -> None:
    client = make_client(make_settings(model="mypkg.models:factory", input_kind="chat"))

    assert post(client, [chat_sample(0)]).status_code == 202


# --- the validation set takes the same shapes -------------------------------------------------------------


def test_the_validation_set_takes_conversations_and_strings(
    chat_client: TestClient, redis_client: redis.Redis
) -> None:
    body = [{"input": conversation("hold-out 1"), "target": "{}"}, {"input": "plain?", "target": "yes"}]

    assert post(chat_client, body, "/v1/validation", "PUT").json() == {"count": 2, "version": 1}
    assert post(chat_client, body[:1], "/v1/validation", "POST").json() == {"count": 3, "version": 2}

    version, samples = TrainerFeed(redis_client, Keys()).validation()
    assert version == 2
    assert [s["input"] for s in samples] == [body[0]["input"], "plain?", body[0]["input"]]


@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_a_bad_validation_conversation_is_422_naming_it_and_changes_nothing(
    chat_client: TestClient, method: str
) -> None:
    post(chat_client, [{"input": conversation(), "target": "{}"}], "/v1/validation", "PUT")
    body = [
        {"input": conversation(), "target": "{}"},
        {"input": [USER, {"role": "User", "content": "x"}], "target": "{}"},
    ]

    response = post(chat_client, body, "/v1/validation", method)

    assert_rejected_naming(response, 1, "input[1].role")
    assert chat_client.get("/v1/validation").json() == {"count": 1, "version": 1}


# --- content groups: copies of a conversation share one -----------------------------------------------------


def test_copies_of_a_conversation_share_a_content_group_and_others_do_not() -> None:
    convo = conversation("What is the weather in Paris?")
    shouted = [{**m, "content": "  " + m["content"].upper().replace(" ", "   ")} for m in convo]
    other_roles = [{**convo[0], "role": "user"}, convo[1]]
    as_one_string = "\n".join(m["content"] for m in convo)
    split_differently = [
        {"role": "system", "content": convo[0]["content"] + " " + convo[1]["content"][:4]},
        {"role": "user", "content": convo[1]["content"][4:]},
    ]

    group = content_group(convo, "t")

    assert content_group(shouted, "t") == group
    assert content_group(convo, "T ") == group
    assert content_group(convo, "u") != group
    assert content_group(other_roles, "t") != group
    assert content_group(as_one_string, "t") != group
    assert content_group(split_differently, "t") != group
    assert content_group(convo[::-1], "t") != group


# --- properties ---------------------------------------------------------------------------------------------

contents = st.text(min_size=1, max_size=40)  # any Unicode scalar value
messages = st.fixed_dictionaries({"role": st.sampled_from(CHAT_ROLES), "content": contents})
conversations = st.lists(messages, min_size=1, max_size=6)
ROUNDS = iter(range(10**9))  # Redis outlives one example: each example's sources are its own


@CI
@given(batch=st.lists(st.tuples(conversations, contents), min_size=1, max_size=4))
def test_an_accepted_conversation_is_returned_exactly_as_sent_under_the_clients_id(
    chat_client: TestClient, batch: list[tuple[list[dict[str, str]], str]]
) -> None:
    k = next(ROUNDS)
    sent = [{"source": f"agent.{k}", "input": convo, "target": target} for convo, target in batch]

    response = post(chat_client, sent)

    assert response.status_code == 202, response.text[:1000]
    ids = response.json()["ids"]
    assert ids == [with_id(s)["id"] for s in sent]
    for sid, sample in zip(ids, sent, strict=True):
        doc = chat_client.get(f"/v1/samples/{sid}").json()
        assert {k: doc[k] for k in ("id", "source", "input", "target")} == {**sample, "id": sid}


def redis_snapshot(r: redis.Redis) -> dict[bytes, Any]:
    """Every key and its serialized value: equal snapshots mean nothing at all was written."""
    return {key: r.dump(key) for key in sorted(r.keys("*"))}


BAD_MESSAGE_EDITS: dict[str, tuple[str, st.SearchStrategy[Any]]] = {
    # how a message goes wrong: (the field named after input[j], a strategy for the edit)
    "role": (
        "role",
        st.text(max_size=12).filter(lambda r: r not in CHAT_ROLES)
        | st.integers(-(2**63), 2**63 - 1)
        | st.none(),
    ),
    "content": (
        "content",
        st.just("")
        | st.integers(-(2**63), 2**63 - 1)
        | st.none()
        | st.lists(st.text(max_size=3), max_size=2),
    ),
    "extra": ("", st.text(min_size=1, max_size=8).filter(lambda f: f not in ("role", "content"))),
}


@CI
@given(
    convos=st.lists(conversations, min_size=1, max_size=3),
    where=st.tuples(st.integers(0, 2), st.integers(0, 5)),
    how=st.sampled_from(sorted(BAD_MESSAGE_EDITS)),
    data=st.data(),
)
def test_one_bad_message_anywhere_is_named_and_leaves_no_trace(
    chat_client: TestClient,
    redis_client: redis.Redis,
    convos: list[list[dict[str, str]]],
    where: tuple[int, int],
    how: str,
    data: st.DataObject,
) -> None:
    i, j = where[0] % len(convos), where[1] % len(convos[where[0] % len(convos)])
    field, edits = BAD_MESSAGE_EDITS[how]
    edit = data.draw(edits)
    bad = [dict(m) for m in convos[i]]
    if how == "extra":
        bad[j][edit] = "x"
        field = edit
    else:
        bad[j][field] = edit
    sent = [{"source": "agent", "input": c, "target": "t"} for c in convos]
    sent[i] = {**sent[i], "input": bad}
    before = redis_snapshot(redis_client)

    response = post(chat_client, sent)

    assert response.status_code == 422, response.text[:1000]
    error = response.json()["error"]["errors"][0]
    assert (error["index"], error["field"]) == (i, f"input[{j}].{field}")
    assert redis_snapshot(redis_client) == before

"""bench/agents.py's two judges: the BFCL-style call checker, and the traffic whose agents' quality it
labels. The checker's rules are pinned on hand-written calls; the traffic on bfcl-eval's real data files
(skipped when bfcl-eval is not installed: ``pip install --no-deps bfcl-eval``)."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from typing import Any

import pytest

from app.schema import InputSpec, validate_samples
from bench.agents_check import output_correct, parse_calls, render_calls, standardize_string

FUNCTION = {
    "name": "calculate_triangle_area",
    "parameters": {
        "type": "dict",
        "properties": {
            "base": {"type": "integer"},
            "height": {"type": "float"},
            "unit": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "round": {"type": "boolean"},
        },
        "required": ["base", "height"],
    },
}
ITEM: dict[str, Any] = {
    "functions": [FUNCTION, {"name": "other", "parameters": {"type": "dict", "properties": {}}}],
    "answer": {
        "calculate_triangle_area": {
            "base": [10],
            "height": [5.0],
            "unit": ["units", "cm", ""],
            "tags": [["Right Angle"], ""],
            "round": [True],
        }
    },
}
IRRELEVANT: dict[str, Any] = {"functions": [FUNCTION], "answer": None}


def call(**arguments: Any) -> str:
    return render_calls([{"name": "calculate_triangle_area", "arguments": arguments}])


def test_the_accepted_call_matches_with_optional_arguments_left_out_or_given() -> None:
    assert output_correct(call(base=10, height=5.0, round=True), ITEM)
    assert output_correct(call(base=10, height=5, round=True, unit="CM", tags=["right-angle"]), ITEM)


@pytest.mark.parametrize(
    "output",
    [
        call(base=11, height=5.0, round=True),  # a wrong value
        call(base=10, height=5.0),  # an argument the answer does not let be left out
        call(height=5.0, round=True),  # a required argument missing
        call(base=10, height=5.0, round=True, unit="inches"),  # an optional value not accepted
        call(base=10, height=5.0, round=True, colour="red"),  # an argument the schema lacks
        call(base="10", height=5.0, round=True),  # the wrong type
        call(base=True, height=5.0, round=True),  # a boolean is not an integer
        render_calls([{"name": "other", "arguments": {}}]),  # the wrong function
        "[]",  # no call where one was needed
        call(base=10, height=5.0, round=True)[:-3],  # not JSON
        render_calls([json.loads(call(base=10, height=5.0, round=True))[0]] * 2),  # two calls
    ],
    ids=[
        "wrong-value",
        "left-out",
        "required-missing",
        "optional-wrong",
        "unknown-arg",
        "type",
        "bool-for-int",
        "wrong-function",
        "no-call",
        "not-json",
        "two-calls",
    ],
)
def test_a_call_that_breaks_one_rule_does_not_match(output: str) -> None:
    assert not output_correct(output, ITEM)


def test_an_irrelevance_question_is_answered_by_no_call_or_no_decodable_call() -> None:
    assert output_correct("[]", IRRELEVANT)
    assert output_correct("I cannot help with that.", IRRELEVANT)
    assert not output_correct(call(base=1, height=1.0), IRRELEVANT)


def test_parse_reads_one_call_object_and_ignores_trailing_text() -> None:
    one = {"name": "f", "arguments": {"x": 1}}
    assert parse_calls(json.dumps(one) + " done") == [one]
    assert parse_calls('[{"name": 3}]') is None
    assert standardize_string("April 1, 2024") == standardize_string("april 1 2024") == "april12024"


# --- the traffic, on bfcl-eval's data -----------------------------------------------------------------------

needs_bfcl = pytest.mark.skipif(
    importlib.util.find_spec("bfcl_eval") is None, reason="bfcl-eval not installed"
)


@needs_bfcl
def test_each_agent_posts_what_its_quality_says_and_held_out_questions_stay_out() -> None:
    from bench.agents_traffic import AGENTS, build_traffic, load_items

    per_agent = {"good": 60, "sloppy": 60, "wrong-function": 30, "eager": 20, "repeater": 20}
    traffic = build_traffic(load_items(), seed=3, per_agent=per_agent, n_validation=20, n_test=40)

    clean: dict[str, list[bool]] = {a: [] for a in AGENTS}
    for sample, ok in zip(traffic.stream, traffic.clean, strict=True):
        clean[sample["source"]].append(ok)
    assert Counter(s["source"] for s in traffic.stream) == per_agent
    assert all(clean["good"]) and all(clean["repeater"])
    assert not any(clean["wrong-function"]) and not any(clean["eager"])
    assert 0.1 < sum(clean["sloppy"]) / len(clean["sloppy"]) < 0.6
    held_out = {it.id for it in traffic.test} | {json.dumps(v["input"]) for v in traffic.validation}
    assert not {s["meta"]["bfcl"] for s in traffic.stream} & held_out
    assert not {json.dumps(s["input"]) for s in traffic.stream} & held_out
    assert len({s["target"] for s in traffic.stream if s["source"] == "repeater"}) <= 4
    assert all(s["source"] != "repeater" for s in traffic.oracle())
    # every sample is one the API takes for hf-causal-lm (chat-shaped input, string target)
    validate_samples(traffic.stream, InputSpec("chat"))
    validate_samples(traffic.validation, InputSpec("chat"), require_source=False)

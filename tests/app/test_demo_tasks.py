"""The simulated data behind ``datadiet demo`` and the quality benchmark (app/demo)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any

import numpy as np
import pytest

from app.demo.scenarios import FLOOD_SWEEP, SCENARIOS, Scenario, build_scenario, drift_scenario
from app.demo.tasks import ABSDIFF, ADD, ADD_REVERSED, Source, exact_match
from app.schema import content_group

ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # CONTRACT.md, Sample: id and source
TEXT_SCENARIOS = ["noisy", "noisy-carry", "redundancy", "misaligned", "drift", "demo"]


@pytest.fixture(scope="module")
def scenarios() -> dict[str, Scenario]:
    return {name: build_scenario(name, seed=0) for name in SCENARIOS}


@pytest.fixture(scope="module")
def streams(scenarios: dict[str, Scenario]) -> dict[str, list[dict[str, Any]]]:
    return {name: list(sc.stream(5000, seed=0)) for name, sc in scenarios.items()}


def _all_samples(sc: Scenario, stream: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [*stream, *sc.validation, *sc.test, *sc.validation_v2, *sc.test_v2]


def _problem(sample: dict[str, Any]) -> Any:
    """What identifies a held-out problem: the input text, or the image's pixels."""
    x = sample["input"]
    return x if isinstance(x, str) else tuple(x)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_sample_satisfies_the_contract(name, scenarios, streams) -> None:
    sc = scenarios[name]
    for s in _all_samples(sc, streams[name]):
        assert set(s) <= {"id", "source", "input", "target", "reward", "meta"}
        assert ID_RE.fullmatch(s["id"]), s["id"]
        assert ID_RE.fullmatch(s["source"]), s["source"]
        assert len(json.dumps(s["meta"]).encode()) <= 4096
        assert isinstance(s["meta"]["corrupted"], bool)
        assert s["meta"]["kind"] in {"clean", "noisy", "flood", "offtask"}
        if sc.model == "tiny-gpt":
            assert isinstance(s["input"], str) and 0 < len(s["input"].encode()) <= 8192
            assert isinstance(s["target"], str) and 0 < len(s["target"].encode()) <= 8192
        else:
            assert isinstance(s["target"], int) and not isinstance(s["target"], bool)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_ids_are_unique_and_deterministic_for_a_seed(name, scenarios, streams) -> None:
    sc = scenarios[name]
    ids = [s["id"] for s in _all_samples(sc, streams[name])]
    assert len(ids) == len(set(ids))
    again = list(build_scenario(name, seed=0).stream(5000, seed=0))
    assert again == streams[name]
    other = [s["id"] for s in sc.stream(200, seed=1)]
    assert not set(other) & set(ids)


def test_a_shorter_stream_is_a_prefix_of_a_longer_one(scenarios, streams) -> None:
    assert list(scenarios["noisy"].stream(4500, seed=0)) == streams["noisy"][:4500]  # across a chunk


def test_noisy_scenario_corrupts_forty_percent_of_a_long_stream(scenarios) -> None:
    sc = scenarios["noisy"]
    assert sc.corrupted_fraction == pytest.approx(0.40)
    stream = list(sc.stream(20_000, seed=3))
    corrupted = sum(s["meta"]["corrupted"] for s in stream) / len(stream)
    assert corrupted == pytest.approx(0.40, abs=0.02)
    assert {s["source"] for s in stream} == {"clean-a", "clean-b", "noisy-50", "noisy-90"}


def test_noisy_slips_are_scattered_and_noisy_carry_slips_are_one_consistent_carry_error(streams) -> None:
    def slips(name: str) -> list[int]:
        return [
            int(s["target"]) - int(ADD.solve(s["input"])) for s in streams[name] if s["meta"]["corrupted"]
        ]

    careless = Counter(slips("noisy"))
    assert set(careless) <= {-10, -1, 1, 10} and min(careless.values()) > 0.1 * sum(careless.values())
    for s in streams["noisy-carry"]:
        if s["meta"]["corrupted"]:
            a, b = (int(x) for x in s["input"].rstrip("=").split("+"))
            assert int(s["target"]) == (a + b - 10 if a % 10 + b % 10 >= 10 else a + b + 10)


@pytest.mark.parametrize("name", TEXT_SCENARIOS)
def test_clean_samples_are_correct_and_corrupted_ones_wrong_for_the_task(name, scenarios, streams) -> None:
    sc = scenarios[name]
    for i, s in enumerate(streams[name]):
        task = ADD_REVERSED if sc.switch_at is not None and i >= sc.switch_at else ADD
        right = task.solve(s["input"])
        assert (s["target"] != right) == s["meta"]["corrupted"], s
        if s["meta"]["kind"] == "offtask":
            assert s["target"] == ABSDIFF.solve(s["input"])


def test_off_task_samples_are_wrong_for_the_main_task(scenarios, streams) -> None:
    for name in ["misaligned", "demo", "digits"]:
        off = [s for s in streams[name] if s["meta"]["kind"] == "offtask"]
        assert off and all(s["meta"]["corrupted"] for s in off)
        if name == "digits":
            truth = {tuple(s["input"]): s["target"] for s in streams[name] if s["meta"]["kind"] == "clean"}
            checked = [s for s in off if tuple(s["input"]) in truth]
            assert checked and all(s["target"] != truth[tuple(s["input"])] for s in checked)
        else:
            assert all(s["target"] != ADD.solve(s["input"]) for s in off)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_validation_and_test_are_clean_disjoint_and_held_out_of_the_stream(name, scenarios, streams) -> None:
    sc = scenarios[name]
    assert len(sc.validation) == 100 and len(sc.test) == 500
    val, test = {_problem(s) for s in sc.validation}, {_problem(s) for s in sc.test}
    assert len(val) == 100 and len(test) == 500 and not val & test
    seen = {_problem(s) for s in streams[name] if s["meta"]["kind"] != "flood"}  # floods jitter pixels
    assert not seen & (val | test)
    for s in [*sc.validation, *sc.test, *sc.validation_v2, *sc.test_v2]:
        assert s["meta"] == {"corrupted": False, "kind": "clean", "task": s["meta"]["task"]}
        if sc.model == "tiny-gpt":
            task = ADD_REVERSED if s["meta"]["task"] == ADD_REVERSED.name else ADD
            assert s["target"] == task.solve(s["input"])


def test_redundancy_flood_repeats_a_few_problems_at_ten_times_the_volume(streams) -> None:
    per_source = Counter(s["source"] for s in streams["redundancy"])
    assert per_source["flood"] > 8 * per_source["clean-a"]
    flood = [s for s in streams["redundancy"] if s["source"] == "flood"]
    assert len({s["input"].strip() for s in flood}) == 20
    assert any(s["input"] != s["input"].strip() for s in flood)  # some copies vary in whitespace
    assert all(not s["meta"]["corrupted"] for s in flood)


def test_drift_stream_switches_task_at_the_given_index() -> None:
    sc = drift_scenario(seed=0, switch_at=300)
    stream = list(sc.stream(600, seed=0))
    assert {s["meta"]["task"] for s in stream[:300]} == {"add"}
    assert {s["meta"]["task"] for s in stream[300:]} == {"add-reversed"}
    assert [s["input"] for s in sc.validation_v2] == [s["input"] for s in sc.validation]
    assert all(s["target"] == ADD_REVERSED.solve(s["input"]) for s in sc.validation_v2 + sc.test_v2)


def test_digits_inputs_are_64_finite_floats_in_unit_range_and_labels_classes(scenarios, streams) -> None:
    sc = scenarios["digits"]
    assert sc.model == "mlp" and sc.model_config == {"n_features": 64, "n_classes": 10}
    samples = _all_samples(sc, streams["digits"])
    assert len(sc.pool) + len(sc.validation) + len(sc.test) == 1797
    for s in samples:
        x = s["input"]
        assert len(x) == 64 and all(isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0 for v in x)
        assert 0 <= s["target"] < 10
    kinds = Counter(s["meta"]["kind"] for s in streams["digits"])
    assert set(kinds) == {"clean", "noisy", "offtask", "flood"}
    noisy = [s for s in streams["digits"] if s["meta"]["kind"] == "noisy"]
    assert sum(s["meta"]["corrupted"] for s in noisy) / len(noisy) == pytest.approx(0.6, abs=0.05)


def test_demo_sources_have_readable_names_and_known_quality(scenarios) -> None:
    sc = scenarios["demo"]
    assert sc.true_quality == {
        "agent-good": 1.0,
        "agent-sloppy": 0.6,
        "agent-spammy": 1.0,
        "agent-offtask": 0.0,
    }


def test_scenario_rejects_shares_that_do_not_sum_to_one(scenarios) -> None:
    sc = scenarios["noisy"]
    with pytest.raises(ValueError, match="sum to 1"):
        Scenario(sc.name, sc.model, sc.model_config, [(Source.clean("a"), 0.5)], [], [], ADD, np.arange(10))


def test_exact_match_counts_equal_targets() -> None:
    samples = [{"target": "85"}, {"target": "9"}, {"target": 3}]
    assert exact_match(["85", "19", 3], samples) == pytest.approx(2 / 3)
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["1"], [])


def test_unknown_scenario_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown scenario"):
        build_scenario("nope")


def _flood_groups(name: str) -> tuple[int, int]:
    """(flood problems, content groups the service sees among their copies) in a 3,000-sample stream."""
    flood = [s for s in build_scenario(name, seed=0).stream(3000, seed=0) if s["meta"]["kind"] == "flood"]
    return 20, len({content_group(s["input"], s["target"]) for s in flood})


def test_flood_sweep_copies_drift_apart_as_the_level_grows_and_keep_their_target() -> None:
    for base, levels in FLOOD_SWEEP.items():
        groups = [_flood_groups(f"{base}@{level:g}")[1] for level in levels]
        assert groups[0] == 20  # exact copies: one group per problem
        assert groups == sorted(groups) and groups[-1] > 40 * 20 / 2, (base, groups)
    sc = build_scenario("redundancy@0.5", seed=0)
    flood = [s for s in sc.stream(3000, seed=0) if s["meta"]["kind"] == "flood"]
    for s in flood:  # every variation keeps the problem: the same two operands, the same sum
        a, b = (int(x) for x in re.findall(r"\d+", s["input"]))
        assert s["target"] == str(a + b) and not s["meta"]["corrupted"]
        assert ID_RE.fullmatch(s["id"])
    assert any(s["input"] != s["input"].lower() for s in flood)  # case
    assert any("?" in s["input"] or "." in s["input"] for s in flood)  # punctuation

"""Tool-calling traffic from agents of known quality, built from the Berkeley Function Calling Leaderboard.

The questions, function schemas and accepted answers are bfcl-eval's data files (``bfcl_eval/data/`` and
``data/possible_answer/``, Apache-2.0; ``pip install --no-deps bfcl-eval``: only its data is read, the
package is never imported). Categories: simple_python, multiple, live_simple, live_multiple (one accepted
call each) and irrelevance (no offered function fits; the right answer is no call).

A sample is chat-shaped: ``input`` = [a system message listing the offered functions' JSON schemas, the
user's question], ``target`` = the call in the fixed format of bench/agents_check.py, a JSON array of
``{"name", "arguments"}`` objects (``[]`` for no call). Five agents post:

- ``good``: the accepted call (the smallest one: every argument the answer requires, each at its first
  accepted value), and ``[]`` on irrelevance questions;
- ``sloppy``: the right function, but in SLOPPY_WRONG of its calls one or two argument values are wrong
  (a number moved, a boolean flipped, a string from another question);
- ``wrong-function``: calls another of the functions offered (questions that offer two or more);
- ``eager``: calls the offered function on irrelevance questions, arguments made up from the question;
- ``repeater``: the accepted calls of REPEATED questions over and over, each copy's question retyped
  (case and spacing: the same content group, a new id).

Every stream sample is labelled by the checker (``clean``: its target is a correct answer). Test and
validation questions are held out of the stream.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.agents_check import Call, output_correct, render_calls

CALL_CATEGORIES = ("simple_python", "multiple", "live_simple", "live_multiple")
IRRELEVANCE = "irrelevance"
AGENTS = ("good", "sloppy", "wrong-function", "eager", "repeater")
SLOPPY_WRONG = 0.7  # share of the sloppy agent's calls with a wrong argument value
REPEATED = 4  # questions the repeater keeps asking
SYSTEM = (
    "You are a function-calling assistant. These functions are available (JSON schemas):\n{functions}\n"
    'Answer with a JSON array of calls, [{{"name": <function name>, "arguments": '
    "{{<parameter>: <value>}}}}], or [] when none of the functions fits the request."
)


@dataclass(frozen=True)
class Item:
    """One BFCL question: its messages, the functions offered and the accepted answer
    ({function name: {param: accepted values}}; None for an irrelevance question)."""

    id: str
    category: str
    question: list[dict[str, str]]
    functions: list[dict[str, Any]]
    answer: dict[str, dict[str, list[Any]]] | None

    def prompt(self) -> list[dict[str, str]]:
        """The conversation a sample carries: our system message (the functions, the answer format), the
        question's own system message appended to it where it has one, then the question."""
        system = SYSTEM.format(
            functions=json.dumps(self.functions, ensure_ascii=False, separators=(",", ":"))
        )
        own = [m["content"] for m in self.question if m["role"] == "system"]
        rest = [{"role": m["role"], "content": m["content"]} for m in self.question if m["role"] != "system"]
        return [{"role": "system", "content": "\n\n".join([system, *own])}, *rest]


@dataclass
class Traffic:
    """The stream (sample dicts as posted), each sample's label, the validation set and the test items."""

    stream: list[dict[str, Any]] = field(default_factory=list)
    clean: list[bool] = field(default_factory=list)  # the checker accepts the sample's target
    validation: list[dict[str, Any]] = field(default_factory=list)
    test: list[Item] = field(default_factory=list)

    def oracle(self) -> list[dict[str, Any]]:
        """The clean-only stream: the samples the checker accepts, without the repeater's copies."""
        return [s for s, ok in zip(self.stream, self.clean, strict=True) if ok and s["source"] != "repeater"]


def bfcl_data_dir() -> Path:
    """bfcl-eval's data folder, found without importing the package (its __init__ pulls in SDKs)."""
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bfcl-eval is not installed: pip install --no-deps bfcl-eval (its data files only)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_items(categories: tuple[str, ...] = (*CALL_CATEGORIES, IRRELEVANCE)) -> list[Item]:
    """Every single-turn question of ``categories`` with at most one accepted call."""
    data = bfcl_data_dir()
    items = []
    for cat in categories:
        answers: dict[str, Any] = {}
        if cat != IRRELEVANCE:
            answers = {
                a["id"]: a["ground_truth"] for a in _jsonl(data / "possible_answer" / f"BFCL_v4_{cat}.json")
            }
        for q in _jsonl(data / f"BFCL_v4_{cat}.json"):
            truth = answers.get(q["id"])
            if len(q["question"]) != 1 or (cat != IRRELEVANCE and (not truth or len(truth) != 1)):
                continue
            if truth and any(not accepted for params in truth[0].values() for accepted in params.values()):
                continue  # a parameter with no accepted value (a few live questions): nothing is right
            items.append(Item(q["id"], cat, q["question"][0], q["function"], truth[0] if truth else None))
    return items


def _first(accepted: list[Any]) -> Any:
    """The first accepted value that is not BFCL's "may be left out" marker, its nested answers resolved
    (a dict parameter's accepted value maps each key to its own accepted values)."""
    value = next(v for v in accepted if v != "")
    if isinstance(value, dict) and all(isinstance(vs, list) for vs in value.values()):
        return {k: _first(vs) for k, vs in value.items() if any(v != "" for v in vs)}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [_first([d]) for d in value]
    return value


def correct_call(item: Item) -> list[Call]:
    """The smallest accepted answer: the arguments the schema requires or the answer does not let be
    left out, each at its first accepted value."""
    if item.answer is None:
        return []
    ((name, params),) = item.answer.items()
    function = next((f for f in item.functions if f["name"] == name), {})
    required = set(function.get("parameters", {}).get("required", []))
    given = {
        p: vs for p, vs in params.items() if ("" not in vs or p in required) and any(v != "" for v in vs)
    }
    return [{"name": name, "arguments": {p: _first(vs) for p, vs in given.items()}}]


def answerable(item: Item) -> bool:
    """Whether the checker accepts ``correct_call(item)``: not so for a few live questions whose answer
    names a parameter the schema lacks, or leaves out one the schema requires."""
    return output_correct(
        render_calls(correct_call(item)), {"answer": item.answer, "functions": item.functions}
    )


# --- how the bad agents go wrong --------------------------------------------------------------------------


def _numbers_in(text: str) -> list[str]:
    return re.findall(r"-?\d+(?:\.\d+)?", text)


def _made_up(schema: dict[str, Any], question: str, rng: random.Random) -> Any:
    """A value of the schema's type taken from the question where it can be (a number it mentions, a
    capitalised word), else a type default: what an over-eager agent fills in."""
    kind = schema.get("type")
    numbers = _numbers_in(question)
    if kind == "integer":
        return int(float(rng.choice(numbers))) if numbers else 1
    if kind in ("float", "number"):
        return float(rng.choice(numbers)) if numbers else 1.0
    if kind == "boolean":
        return rng.random() < 0.5
    if kind in ("array", "tuple"):
        return []
    if kind in ("dict", "object"):
        return {}
    if schema.get("enum"):
        return rng.choice(schema["enum"])
    words = re.findall(r"\b[A-Z][a-z]+\b", question) or question.split()[:3]
    return rng.choice(words) if words else "value"


def _wrong_value(value: Any, rng: random.Random, strings: list[str]) -> Any:
    """A plausible wrong value of the same type: a number moved, a boolean flipped, another question's
    string, a list cut short or with one element changed."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10]) if rng.random() < 0.8 else value * 10 + 7
    if isinstance(value, float):
        return round(value * rng.choice([0.5, 2.0, 3.0]) + rng.choice([-1.5, 1.5]), 2)
    if isinstance(value, str):
        return rng.choice([s for s in strings if s.lower() != value.lower()] or [value + " x"])
    if isinstance(value, list) and value:
        if len(value) > 1 and rng.random() < 0.5:
            return value[:-1]
        i = rng.randrange(len(value))
        return [*value[:i], _wrong_value(value[i], rng, strings), *value[i + 1 :]]
    if isinstance(value, dict) and value:
        k = rng.choice(sorted(value))
        return {**value, k: _wrong_value(value[k], rng, strings)}
    return value


def sloppy_call(item: Item, rng: random.Random, strings: list[str]) -> list[Call]:
    """The right function; in SLOPPY_WRONG of calls one or two argument values are wrong."""
    ((call),) = correct_call(item)
    args = dict(call["arguments"])
    if args and rng.random() < SLOPPY_WRONG:
        for p in rng.sample(sorted(args), min(len(args), rng.choice([1, 1, 2]))):
            args[p] = _wrong_value(args[p], rng, strings)
    return [{"name": call["name"], "arguments": args}]


def wrong_function_call(item: Item, rng: random.Random) -> list[Call]:
    """Another offered function, its required arguments taken from the right call where the names agree,
    else made up from the question."""
    ((right),) = correct_call(item)
    other = rng.choice([f for f in item.functions if f["name"] != right["name"]])
    schema = other.get("parameters", {})
    text = " ".join(m["content"] for m in item.question)
    args = {
        p: right["arguments"].get(p, _made_up(schema.get("properties", {}).get(p, {}), text, rng))
        for p in schema.get("required", [])
    }
    return [{"name": other["name"], "arguments": args}]


def eager_call(item: Item, rng: random.Random) -> list[Call]:
    """A call to the (unfitting) offered function, required arguments made up from the question."""
    function = rng.choice(item.functions)
    schema = function.get("parameters", {})
    text = " ".join(m["content"] for m in item.question)
    props = schema.get("properties", {})
    return [
        {
            "name": function["name"],
            "arguments": {p: _made_up(props.get(p, {}), text, rng) for p in schema.get("required", [])},
        }
    ]


def retyped(messages: list[dict[str, str]], copy: int) -> list[dict[str, str]]:
    """The question of a repeated conversation retyped: case and spacing change (the content group, which
    folds both, stays the same; the id changes)."""
    *head, last = messages
    words = last["content"].split(" ")
    text = ["  ".join(words), last["content"].lower(), last["content"].upper(), last["content"] + " "][
        copy % 4
    ]
    return [*head, {**last, "content": text + " " * (copy // 4)}]


# --- the stream -------------------------------------------------------------------------------------------


def _cycle(pool: list[Item], rng: random.Random) -> Iterator[Item]:
    if not pool:
        raise ValueError("an agent has no questions to answer")
    while True:
        order = pool[:]
        rng.shuffle(order)
        yield from order


def build_traffic(
    items: list[Item],
    *,
    seed: int,
    per_agent: dict[str, int],
    n_validation: int,
    n_test: int,
    fits: Callable[[list[dict[str, str]], str], bool] = lambda prompt, target: True,
) -> Traffic:
    """Split ``items`` (those ``answerable`` whose prompt and correct target ``fits``) into held-out test
    questions (``n_test``, a fifth of them irrelevance), a validation set of correct answers
    (``n_validation``, a fifth irrelevance) and the pool the agents answer; each agent posts
    ``per_agent[name]`` samples, the agents interleaved in a seeded random order."""
    rng = random.Random(seed)
    usable = [it for it in items if answerable(it) and fits(it.prompt(), render_calls(correct_call(it)))]
    calls = [it for it in usable if it.answer is not None]
    irrelevant = [it for it in usable if it.answer is None]
    rng.shuffle(calls)
    rng.shuffle(irrelevant)
    n_test_irr, n_val_irr = n_test // 5, n_validation // 5
    test = calls[: n_test - n_test_irr] + irrelevant[:n_test_irr]
    calls, irrelevant = calls[n_test - n_test_irr :], irrelevant[n_test_irr:]
    val_items = calls[: n_validation - n_val_irr] + irrelevant[:n_val_irr]
    calls, irrelevant = calls[n_validation - n_val_irr :], irrelevant[n_val_irr:]
    if len(calls) < REPEATED + 2 or not irrelevant:
        raise ValueError(f"too few questions fit: {len(calls)} with calls, {len(irrelevant)} irrelevance")
    strings = sorted(
        {v for it in calls for c in correct_call(it) for v in c["arguments"].values() if isinstance(v, str)}
    )
    multi = [it for it in calls if len(it.functions) >= 2] or calls
    repeated = calls[:REPEATED]
    good_pool = calls + irrelevant
    draws = {
        "good": _cycle(good_pool, rng),
        "sloppy": _cycle(calls, rng),
        "wrong-function": _cycle([it for it in multi if len(it.functions) >= 2], rng),
        "eager": _cycle(irrelevant, rng),
        "repeater": _cycle(repeated, rng),
    }
    order = [name for name in AGENTS for _ in range(per_agent.get(name, 0))]
    rng.shuffle(order)
    traffic = Traffic(test=test)
    copies = 0
    for name in order:
        item = next(draws[name])
        prompt = item.prompt()
        if name == "good" or name == "repeater":
            target = correct_call(item)
        elif name == "sloppy":
            target = sloppy_call(item, rng, strings)
        elif name == "wrong-function":
            target = wrong_function_call(item, rng)
        else:
            target = eager_call(item, rng)
        if name == "repeater":
            prompt, copies = retyped(prompt, copies), copies + 1
        text = render_calls(target)
        traffic.stream.append({"source": name, "input": prompt, "target": text, "meta": {"bfcl": item.id}})
        traffic.clean.append(output_correct(text, {"answer": item.answer, "functions": item.functions}))
    traffic.validation = [
        {"input": it.prompt(), "target": render_calls(correct_call(it))} for it in val_items
    ]
    return traffic

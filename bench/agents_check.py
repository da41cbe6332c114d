"""Whether a generated tool call matches an accepted answer: a small port of BFCL's AST checker.

Calls are rendered in one fixed format, a JSON array of calls (``[]`` when no function fits)::

    [{"name": "math.factorial", "arguments": {"number": 5}}]

bfcl-eval's own checker (``bfcl_eval/eval_checker/ast_eval/ast_checker.py``) cannot be imported without
its model handlers' SDKs (anthropic, openai, ...), so this file re-implements the rules of its
``simple_function_checker`` for Python and its irrelevance rule, on decoded JSON instead of a parsed
Python call. Source: bfcl-eval 2026.3.23, ``ast_checker.py`` (Apache-2.0). A call is correct when

- it is exactly one call, to the function the accepted answer names;
- every parameter the function schema marks ``required`` is given;
- every parameter given is in the schema and in the accepted answer;
- each value has the schema's type (an ``int`` passes for a ``float``; ``any`` passes anything), or the
  type of an accepted value (BFCL's "variable" case: a few answers disagree with their schema), and is
  among the accepted values: strings compared after BFCL's ``standardize_string`` (lower case, without
  spaces and ``,./-_*^``, ``'`` read as ``"``), lists element by element the same way, dicts key by key
  (``dict_checker``), lists of dicts dict by dict in order;
- every accepted-answer parameter whose accepted values do not include ``""`` (BFCL's "may be left
  out") is given.

An irrelevance question (no function fits) is answered correctly when no call decodes from the output
(BFCL: "the model output cannot be decoded into function calls, or is empty").
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

Call = dict[str, Any]  # {"name": str, "arguments": {param: value}}
# BFCL's PYTHON_TYPE_MAPPING, with JSON Schema's own names beside it
PYTHON_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "integer": int,
    "float": float,
    "number": float,
    "boolean": bool,
    "array": list,
    "tuple": list,  # a tuple is a JSON array once encoded (BFCL converts tuples to lists too)
    "dict": dict,
    "object": dict,
}
_STANDARDIZE = re.compile(r"[ \,\.\/\-\_\*\^]")


def render_calls(calls: list[Call]) -> str:
    """The fixed format a target is written in: a JSON array of ``{"name", "arguments"}`` objects."""
    return json.dumps([{"name": c["name"], "arguments": c["arguments"]} for c in calls], ensure_ascii=False)


def parse_calls(text: str) -> list[Call] | None:
    """The calls in a model's output (the JSON array above; a single call object is read as one call), or
    None when it is not that shape. Text after the first complete JSON value is ignored."""
    try:
        value, _ = json.JSONDecoder().raw_decode(text.strip())
    except ValueError:
        return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return None
    calls = []
    for c in value:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            return None
        args = c.get("arguments", {})
        if not isinstance(args, dict):
            return None
        calls.append({"name": c["name"], "arguments": args})
    return calls


def standardize_string(s: str) -> str:
    """BFCL's ``standardize_string``: lower case, no spaces or ``,./-_*^``, single quotes as double."""
    return _STANDARDIZE.sub("", s).lower().replace("'", '"')


def _std(v: Any) -> Any:
    return standardize_string(v) if isinstance(v, str) else v


def _same_type(value: Any, wanted: type | tuple[type, ...]) -> bool:
    if wanted is int or wanted is float:  # bool is an int to Python, never to a schema
        return not isinstance(value, bool) and isinstance(value, int if wanted is int else (int, float))
    return isinstance(value, wanted)


def _dict_ok(value: Mapping[str, Any], accepted: list[Any]) -> bool:
    """BFCL's ``dict_checker``: some accepted dict holds every key given (with an accepted value) and
    every key it does not mark optional."""
    for option in accepted:
        if not isinstance(option, dict):
            continue
        given_ok = all(
            k in option and isinstance(option[k], list) and _std(v) in [_std(a) for a in option[k]]
            for k, v in value.items()
        )
        if given_ok and all(k in value or (isinstance(vs, list) and "" in vs) for k, vs in option.items()):
            return True
    return False


def _value_ok(value: Any, accepted: list[Any], schema_type: str | None) -> bool:
    if schema_type in ("dict", "object") and isinstance(value, dict):
        return _dict_ok(value, accepted)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return any(  # BFCL's list_dict_checker: same length, dict by dict in order
            isinstance(option, list)
            and len(option) == len(value)
            and all(_dict_ok(v, [o]) for v, o in zip(value, option, strict=True))
            for option in accepted
        )
    if isinstance(value, list):
        got = [_std(v) for v in value]
        return any(isinstance(option, list) and got == [_std(a) for a in option] for option in accepted)
    if isinstance(value, str):
        return standardize_string(value) in [standardize_string(a) for a in accepted if isinstance(a, str)]
    return any(isinstance(value, bool) == isinstance(a, bool) and value == a for a in accepted)  # 5 == 5.0


def call_matches(call: Call, function: Mapping[str, Any], answer: Mapping[str, list[Any]]) -> bool:
    """Whether ``call`` is to ``function`` with arguments an accepted ``answer`` (param -> accepted values,
    ``""`` among them when it may be left out) allows; the rules are in the module docstring."""
    if call["name"] != function["name"]:
        return False
    schema = function.get("parameters", {})
    props: Mapping[str, Any] = schema.get("properties", {})
    args: Mapping[str, Any] = call["arguments"]
    if any(p not in args for p in schema.get("required", [])):
        return False
    for param, value in args.items():
        if param not in props or param not in answer:
            return False
        schema_type = props[param].get("type")
        wanted = PYTHON_TYPES.get(schema_type) if isinstance(schema_type, str) else None
        answer_types = {type(a) for a in answer[param] if a != ""}  # BFCL: a value typed like the answer
        if wanted is not None and not _same_type(value, wanted) and type(value) not in answer_types:
            return False
        if not _value_ok(value, answer[param], schema_type):
            return False
    return all(param in args or "" in accepted for param, accepted in answer.items())


def output_correct(output: str, item: Mapping[str, Any]) -> bool:
    """Whether a generated ``output`` answers ``item`` correctly: one matching call for a question with an
    accepted answer (``item["answer"]``: {function name: {param: accepted values}}), no decodable call
    for an irrelevance question (``item["answer"]`` None)."""
    calls = parse_calls(output)
    if item["answer"] is None:
        return not calls
    if calls is None or len(calls) != 1:
        return False
    ((name, answer),) = item["answer"].items()
    functions = {f["name"]: f for f in item["functions"]}
    return name in functions and call_matches(calls[0], functions[name], answer)

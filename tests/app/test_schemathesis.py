"""Schemathesis against the app's own OpenAPI schema: nothing it generates gets a 5xx.

Every operation the schema lists is called with cases generated from its schema (positive: what the schema
allows; negative: what it forbids), on the real app (real redis-server, real SQLite and PostgreSQL), and
each response is checked: never a server error, its content type and body as the schema says, and what
the schema forbids is refused with a 4xx. Bounded for CI: a fixed, derandomized number of examples per
operation and mode; no example database, no deadline.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, reject, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
)

from app.schema import FLOAT32_MAX
from store.config import Settings

settings.register_profile(
    "schemathesis-ci",
    max_examples=25,  # per operation and generation mode: ~15 operations x 2 modes, well under a minute
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
)
CI = settings.get_profile("schemathesis-ci")
# what counts as rejecting a request that breaks the schema: schemathesis's list plus 413 (a generated body
# of many samples can pass the body size limit (app/deps.py MAX_BODY_BYTES) before the samples' count is
# read: refusing it as too large is a rejection too)
REJECTIONS = SchemathesisConfig.from_str(
    """
[checks.negative_data_rejection]
expected-statuses = [
    "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx",
]
"""
)
CHECKS = [not_a_server_error, content_type_conformance, response_schema_conformance, negative_data_rejection]
TEXT: dict[str, Any] = {}
MLP = {"model": "mlp", "model_params": {"n_features": 4, "n_classes": 3}}
# What input and target are for each configured kind: the documented Sample allows every kind's (a string
# or an array of numbers); narrowed to the app's kind, positive cases are samples it can accept.
TEXT_FIELD = {"type": "string", "minLength": 1}
NARROWED: dict[str, dict[str, Any]] = {
    "tiny-gpt": {"input": TEXT_FIELD, "target": TEXT_FIELD},
    "mlp": {
        "input": {
            "type": "array",
            "minItems": 4,
            "maxItems": 4,
            "items": {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX},
        },
        "target": {"enum": [0, 1, 2]},  # JSON Schema's integer allows 1.0, which a class label is not
    },
}
SAMPLE_BODIES = [("/v1/samples", "post"), ("/v1/validation", "put"), ("/v1/validation", "post")]
MODES = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]


def narrowed_to(doc: dict[str, Any], model: str) -> dict[str, Any]:
    """The app's OpenAPI document with each sample's ``input`` and ``target`` narrowed to ``model``'s."""
    for path, method in SAMPLE_BODIES:
        body = doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        body["properties"]["samples"]["items"]["properties"].update(NARROWED[model])
    return doc


def send(client: TestClient, case: schemathesis.Case) -> httpx.Response:
    """The case as the in-process client sends it (the app's lifespan is the test's, not Schemathesis').
    A JSON body is written here, so that a ``null`` body is sent as ``null``, not left out."""
    kwargs = case.as_transport_kwargs(base_url=str(client.base_url))
    content = kwargs.get("data")
    if "json" in kwargs:
        content = json.dumps(kwargs["json"], ensure_ascii=False, allow_nan=False).encode()
    try:
        return client.request(
            kwargs["method"],
            kwargs["url"],
            headers=kwargs.get("headers"),
            params=kwargs.get("params"),
            cookies=kwargs.get("cookies") or None,
            content=content,
        )
    except (httpx.InvalidURL, httpx.LocalProtocolError, UnicodeEncodeError):
        reject()  # no HTTP client could send it (a header with a newline...): no server would see it
        raise AssertionError("unreachable") from None


def negatable(operation: Any) -> bool:
    """Whether the schema constrains anything of the operation a negative case could break."""
    return any(len(group) for group in (operation.path_parameters, operation.query, operation.body))


def run_operation(client: TestClient, operation: Any, mode: schemathesis.GenerationMode) -> None:
    @CI
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        case.validate_response(send(client, case), checks=CHECKS)

    check()


@pytest.mark.parametrize(
    ("database_url", "model"),
    [("sqlite", TEXT), ("postgresql", MLP)],
    ids=["sqlite-tiny_gpt", "postgresql-mlp"],
    indirect=["database_url"],
)
def test_no_generated_request_gets_a_server_error(
    make_settings: Callable[..., Settings],
    make_client: Callable[..., TestClient],
    database_url: str,
    model: dict[str, Any],
) -> None:
    app_settings = make_settings(database_url=database_url, **model)
    client = make_client(app_settings, raise_server_exceptions=False)
    schema = schemathesis.openapi.from_dict(
        narrowed_to(client.get("/openapi.json").json(), app_settings.model), config=REJECTIONS
    )
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in MODES:
            if mode.is_negative and not negatable(operation):
                continue
            try:
                run_operation(client, operation, mode)
            except Exception as e:  # every operation runs; the failures are reported together
                failures.append(f"{operation.label} ({mode.value}):\n{e}")

    assert not failures, "\n\n".join(failures)

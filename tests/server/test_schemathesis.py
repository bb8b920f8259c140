"""Fuzzing from /openapi.json (schemathesis): whatever a client sends to any route, the server answers with no 5xx,
a documented status, and a body that matches the documented schema. Bounded: a few examples per operation."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, \
    status_code_conformance

MODEL = "tiny-llama"
EXAMPLES_PER_OPERATION = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(base_url: str):
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, base_url: str) -> None:
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = MODEL  # reach generation, not only the unknown-model 404
    case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=60)

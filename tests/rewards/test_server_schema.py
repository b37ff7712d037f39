"""schemathesis against a real reward server's own OpenAPI schema, on loopback.

The schema describes the real ``/score`` body (prompts, uint8 image arrays at the
server's image size, optional sources) and every status the endpoint answers, so
generated requests reach the endpoint's input space: schema-valid bodies (positive)
and bodies that break one constraint (negative). Every answer must be no 5xx, a
documented status with a JSON body of the documented shape, and a negative body must
be refused. Bounded: a fixed number of examples per mode, derandomised.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from flowrl.rewards.server import ServerProcess, free_port, launch_server
from tests.rewards.conftest import FAKES, ROOT, TOKEN, TOKEN_ENV, server_env

IMAGE_SIZE = (8, 8)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    process = launch_server(
        {"t2i": f"{FAKES}:brightness", "edit": f"{FAKES}:source_similarity"}, port=free_port(),
        log_path=tmp_path_factory.mktemp("schema-server") / "server.log", max_batch=4, image_size=IMAGE_SIZE,
        token_env=TOKEN_ENV, env=server_env(), cwd=ROOT,
    )
    try:
        process.wait_until_healthy()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def schema(server):
    # 413 (body or batch too large) is how this server refuses an over-long prompts list
    config = schemathesis.Config.from_dict({"checks": {"negative_data_rejection": {
        "expected-statuses": ["400", "401", "404", "413", "422"]}}})
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json", config=config)


def test_schema_describes_the_score_body_and_every_status(schema):
    operation = schema.raw_schema["paths"]["/score/{name}"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["prompts", "images"] and body["additionalProperties"] is False
    shape = body["properties"]["images"]["properties"]["shape"]["prefixItems"]
    assert [part.get("const") for part in shape] == [None, *IMAGE_SIZE, 3]
    assert {"200", "400", "401", "404", "413", "422", "500"} <= set(operation["responses"])
    assert operation["security"] == [{"bearer": []}]


@pytest.mark.parametrize("name", ["t2i", "edit"])
def test_the_schema_examples_are_scored(schema, server, name):
    operation = schema["/score/{name}"]["POST"]
    examples = schema.raw_schema["paths"]["/score/{name}"]["post"]["requestBody"]["content"]["application/json"]
    case = operation.Case(path_parameters={"name": name}, body=examples["examples"][name]["value"],
                          media_type="application/json")
    response = case.call_and_validate(base_url=server.base_url, headers=AUTH, checks=CHECKS)
    assert response.status_code == 200, response.text
    assert len(response.json()["scores"]) == 1


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
@FUZZ
@given(data=st.data())
def test_generated_score_requests_get_documented_answers(schema, server, mode, data):
    case = data.draw(schema["/score/{name}"]["POST"].as_strategy(generation_mode=mode))
    case.call_and_validate(base_url=server.base_url, headers=AUTH, checks=CHECKS, timeout=10)


@settings(FUZZ, max_examples=5)
@given(data=st.data())
def test_health_conforms(schema, server, data):
    case = data.draw(schema["/health"]["GET"].as_strategy())
    response = case.call_and_validate(base_url=server.base_url, checks=CHECKS, timeout=10)
    assert response.status_code == 200

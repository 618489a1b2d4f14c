"""``GET /openapi.json`` is the truth about the server.

* The document (built from the app, no model loaded): no route lists FastAPI's 422 (validation errors are
  400s); every route lists 413 and 431 (the size limits run before any route), and each route the other
  statuses it answers (400, 404, 500, 503, 504 ...), all with OpenAI's error object as JSON; /health's 200
  is ``text/plain``, /metrics' ``text/plain; version=0.0.4``; 401 and the bearer scheme appear on exactly the
  routes behind ``--api-key``, and only when it is set. The request models carry the bounds the server
  enforces: ``n`` up to ``--max-n``, non-empty prompts, tools and ``tool_choice`` in OpenAI's shapes, no deprecated ``functions``,
  the shapes of ``response_format`` and vLLM's ``structured_outputs`` (no option it does not know),
  integers within 64 bits (written as integers, not floats); embeddings' ``input`` takes the prompt shapes
  of completions, ``encoding_format`` ``float`` or ``base64``, ``dimensions`` only null (refused), and its
  200 is the list of embeddings (floats or a base64 string).
* The server sends the content types the document names for /health and /metrics.
* A schema-driven fuzzer (schemathesis) sends requests valid by the document to every route of a live
  server (``--max-n 4 --max-model-len 64``, so no request runs long): no 5xx, and every answer's status,
  content type, headers and body (streamed events included) are as documented. Bounded and reproducible:
  a fixed number of examples per route, derandomized. (Valid by the schema may still mean a documented
  400 for what depends on the model: a token id at or over the vocabulary size, prompt + max_tokens over
  the context, a chat template that renders nothing.)
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import FailureGroup

from llmserve.config import EngineConfig
from llmserve.entrypoints.openai.app import ServerState, build_app
from llmserve.entrypoints.openai.server_args import ServerConfig

EXAMPLES_PER_ROUTE = 60
GUARDED = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings",
            "/tokenize", "/detokenize"}


def document(**config) -> dict:
    return build_app(ServerState(ServerConfig(**config), EngineConfig())).openapi()


def operations(doc: dict) -> dict[str, dict]:
    return {path: op for path, ops in doc["paths"].items() for op in ops.values()}


def error_statuses(operation: dict) -> set[str]:
    return {status for status, response in operation["responses"].items() if status != "200"}


def test_every_route_documents_its_statuses_with_the_error_object():
    ops = operations(document())
    expected = {
        "/health": {"413", "431", "503"}, "/version": {"413", "431"}, "/metrics": {"413", "431"},
        "/v1/models": {"413", "431", "503"},
        "/v1/completions": {"400", "404", "413", "431", "500", "503", "504"},
        "/v1/chat/completions": {"400", "404", "413", "431", "500", "503", "504"},
        "/v1/responses": {"400", "404", "413", "431", "500", "503", "504"},
        "/v1/embeddings": {"400", "404", "413", "431", "500", "503", "504"},
        "/tokenize": {"400", "404", "413", "431", "503"}, "/detokenize": {"400", "404", "413", "431", "503"},
    }
    assert {path: error_statuses(op) for path, op in ops.items()} == expected
    for op in ops.values():
        for status in error_statuses(op):
            assert op["responses"][status]["content"] == {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def test_content_types_of_health_metrics_and_completions():
    ops = operations(document())
    assert list(ops["/health"]["responses"]["200"]["content"]) == ["text/plain"]
    assert list(ops["/metrics"]["responses"]["200"]["content"]) == ["text/plain; version=0.0.4"]
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses"):
        assert set(ops[path]["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    named_event = ops["/v1/responses"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert named_event["required"] == ["event", "data"]


def test_api_key_adds_401_and_the_bearer_scheme_to_the_guarded_routes_only():
    assert not any("401" in op["responses"] for op in operations(document()).values())
    doc = document(api_key="sekret")
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, op in operations(doc).items():
        assert ("401" in op["responses"]) == (path in GUARDED) == ("security" in op), path


def test_request_bounds_are_in_the_schema():
    schemas = document(max_n=4)["components"]["schemas"]
    completion, chat = schemas["CompletionRequest"]["properties"], schemas["ChatCompletionRequest"]["properties"]
    assert completion["n"]["maximum"] == chat["n"]["maximum"] == 4
    prompt_shapes = completion["prompt"]["anyOf"]
    assert prompt_shapes[0] == {"type": "string", "minLength": 1}
    assert all(shape["minItems"] == 1 for shape in prompt_shapes[1:])
    assert completion["max_tokens"]["anyOf"][0]["minimum"] == 0 and chat["max_tokens"]["anyOf"][0]["minimum"] == 1
    seed = completion["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (-(2**63), 2**63 - 1)
    assert schemas["ChatMessage"]["properties"]["role"]["enum"] == ["system", "developer", "user", "assistant", "tool"]
    assert schemas["ResponseFormat"]["properties"]["type"]["enum"] == ["text", "json_object", "json_schema"]
    assert set(schemas["JsonSchemaResponseFormat"]["properties"]) == {"name", "description", "schema", "strict"}
    assert schemas["JsonSchemaResponseFormat"]["required"] == ["name"]
    structured = schemas["StructuredOutputsParams"]
    assert structured["additionalProperties"] is False
    assert {"json", "regex", "choice", "grammar", "json_object"} <= set(structured["properties"])
    assert chat["tools"]["anyOf"][0]["items"] == {"$ref": "#/components/schemas/ChatTool"}
    assert schemas["FunctionDefinition"]["properties"]["name"]["pattern"] == "^[A-Za-z0-9_.\\-]{1,64}$"
    assert chat["functions"]["anyOf"][0]["maxItems"] == 0 and chat["function_call"]["anyOf"][0]["const"] == "none"
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    embedding = schemas["EmbeddingRequest"]
    assert embedding["required"] == ["input"]
    assert embedding["properties"]["input"]["anyOf"] == prompt_shapes
    assert embedding["properties"]["encoding_format"]["enum"] == ["float", "base64"]
    assert embedding["properties"]["dimensions"]["type"] == "null"


def test_embeddings_answer_is_documented():
    doc = document()
    ok = operations(doc)["/v1/embeddings"]["responses"]["200"]["content"]
    assert ok == {"application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingResponse"}}}
    data = doc["components"]["schemas"]["Embedding"]["properties"]
    assert data["object"]["const"] == "embedding"
    assert data["embedding"]["anyOf"] == [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]


@pytest.fixture(scope="module")
def fuzz_server(start_server):
    return start_server("--max-n", "4", "--max-model-len", "64")


def test_health_and_metrics_send_the_documented_content_types(fuzz_server):
    health = httpx.get(f"{fuzz_server.base_url}/health")
    assert health.status_code == 200 and health.headers["content-type"] == "text/plain; charset=utf-8"
    metrics = httpx.get(f"{fuzz_server.base_url}/metrics")
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"


def test_fuzzed_requests_get_documented_answers_and_never_a_server_error(fuzz_server):
    checks = {name: {"enabled": True} for name in ("not_a_server_error", "status_code_conformance",
                                                    "content_type_conformance", "response_headers_conformance",
                                                    "response_schema_conformance")}
    config = schemathesis.Config.from_dict({"checks": {"enabled": False, **checks}})
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json", config=config)
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, database=None, derandomize=True,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(timeout=60)

        try:
            check()
        except FailureGroup as exc:
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)

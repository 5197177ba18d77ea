"""Schema-driven fuzzing of the real server (issue 12): never a 5xx, always the API's shape.

Bodies for /generate, /generate_stream, POST /, /v1/completions and /v1/chat/completions are drawn
by hypothesis from the request schemas the app itself publishes (its OpenAPI document): every field
of the schema, each value either from the field's own schema (with its bounds and the values just
beyond them) or a hostile one (NaN, infinities, 2**64, lone surrogates, wrong types, deep nesting,
huge strings). Some bodies are then cut short or corrupted as bytes. Each goes to a real
`kvserve serve` (demo model), streaming or not, and:

* the status is never a 5xx and the connection is never dropped;
* a 200 body is a whole answer (SSE that ends properly), a 4xx body is the API's error shape
  (TGI `{"error", "error_type"}`, OpenAI `{"error": {"message", "type", "param", "code"}}`);
* /health stays 200 and the server process stays up.

Hypothesis runs derandomized (the same examples on every run) with no deadline and no database.
"""
from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvserve.server.app import create_app
from test_server_api import sse_events, start_server, stop_server

MAX_MODEL_LEN = 32          # keeps every in-bounds generation short
EXAMPLES = 25               # per route (5 routes); about a minute here on 2 shared, busy cores

OPENAPI = create_app().openapi()   # no engine: the documents only (imports no torch)
SCHEMAS = OPENAPI["components"]["schemas"]
ROUTES = {"/generate": "GenerateRequest", "/generate_stream": "GenerateRequest", "/": "GenerateRequest",
          "/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest"}


def nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


HOSTILE = st.sampled_from([
    math.nan, math.inf, -math.inf, 2**64, -(2**64), 2**63, -(2**63) - 1, 10**400, 1e-50, -1e-50, 1e308, -0.0,
    0, -1, 1.5, "", "\ud800", "a\udfffb", "\x00", "x" * 20_000, None, True, False, [], {}, [None], ["\ud800"],
    list(range(2000)), [-1], {"\ud800": 1}, {"1": math.nan}, nested(200), "NaN", "1e999",
])


def resolve(schema: dict) -> dict:
    while "$ref" in schema:
        schema = SCHEMAS[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def around(low: float | None, high: float | None, integer: bool) -> st.SearchStrategy:
    """Values inside the bounds, at them and just beyond them."""
    edges: list[float] = []
    for bound in (low, high):
        if bound is not None:
            edges += [bound, bound - 1, bound + 1] if integer else [bound, bound - 1e-9, bound + 1e-9,
                                                                  math.nextafter(bound, math.inf),
                                                                  math.nextafter(bound, -math.inf)]
    if integer:
        edges = [int(e) for e in edges if abs(e) < 2**80]
        inside = st.integers(min_value=None if low is None else int(low),
                             max_value=None if high is None else int(high))
        return st.one_of(st.sampled_from(edges or [0]), inside, st.integers(-3, 300))
    inside = st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False)
    return st.one_of(st.sampled_from(edges or [0.0]), inside)


def from_schema(schema: dict, depth: int = 0) -> st.SearchStrategy:
    """Values for a JSON schema: mostly valid ones, the bounds and their neighbours, sometimes hostile."""
    schema = resolve(schema)
    own = own_values(schema, depth)
    return st.one_of(own, own, own, HOSTILE)


def own_values(schema: dict, depth: int) -> st.SearchStrategy:
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return st.one_of(*(own_values(resolve(s), depth) for s in schema[key]))
    kind = schema.get("type")
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        return around(low, high, kind == "integer")
    if kind == "string":
        return st.one_of(st.sampled_from(["hello", "demo", "\n", "stop", "text", "user", "assistant", "none"]),
                         st.text(max_size=12))
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = schema.get("items", {})
        low = schema.get("minItems", 0)
        high = schema.get("maxItems")
        sizes = [low, 1, 2] + ([high, high + 1] if high is not None else [5])
        return st.sampled_from(sorted(set(sizes))).flatmap(
            lambda n: st.lists(from_schema(items, depth + 1) if depth < 3 else HOSTILE, min_size=n, max_size=n))
    if kind == "object" or "properties" in schema:
        return an_object(schema, depth)
    return st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8))


def an_object(schema: dict, depth: int) -> st.SearchStrategy:
    """Required fields usually present, optional ones sometimes; now and then an unknown field."""
    properties = schema.get("properties", {})
    required = set(schema.get("required", []))
    if depth > 3:
        return st.just({})
    fields = {name: from_schema(sub, depth + 1) for name, sub in properties.items()}

    @st.composite
    def build(draw):
        body = {}
        for name, values in fields.items():
            if draw(st.integers(0, 19)) < (19 if name in required else 4):
                body[name] = draw(values)
        if draw(st.integers(0, 9)) == 0:
            body[draw(st.sampled_from(["zz_unknown", "chat_template", "logit_bias", "metadata"]))] = draw(HOSTILE)
        return body
    return build()


def tune(route: str, body: Any) -> Any:
    """Route-specific: streaming where the route decides it, the model name, token budgets."""
    if isinstance(body, dict) and route == "/generate_stream":
        body.pop("stream", None)
    return body


@st.composite
def requests(draw, route: str) -> tuple[bytes, str | None]:
    body = tune(route, draw(an_object(resolve(SCHEMAS[ROUTES[route]]), 0)))
    raw = json.dumps(body).encode()   # NaN / Infinity tokens and \ud800 escapes, as a hostile client sends
    how = draw(st.sampled_from(["json"] * 8 + ["cut", "garbage", "content-type"]))
    content_type: str | None = "application/json"
    if how == "cut":
        raw = raw[:draw(st.integers(0, max(0, len(raw) - 1)))]
    elif how == "garbage":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\x00", b"}", b'"', b"\\", b"[" * 5000])) + raw[at:]
    elif how == "content-type":
        content_type = draw(st.sampled_from([None, "text/plain", "application/x-www-form-urlencoded"]))
    return raw, content_type


@pytest.fixture(scope="module")
def server(demo_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server-fuzz") / "kvserve.log"
    s = start_server(demo_model_dir, log, "--num-kv-blocks", "256", "--max-model-len", str(MAX_MODEL_LEN),
                     "--log-level", "warning")
    yield s
    stop_server(s)


def check_error(route: str, status: int, raw: bytes) -> None:
    body = json.loads(raw)
    if route.startswith("/v1/"):
        assert isinstance(body, dict) and set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    else:
        assert isinstance(body, dict) and set(body) == {"error", "error_type"}, body
        assert isinstance(body["error"], str) and body["error"], body


def check_stream(route: str, raw: bytes) -> None:
    events, _ = sse_events(raw.decode().splitlines())
    assert events, "an empty stream"
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    for error in errors:   # an error after the stream started comes last, in the API's shape
        assert error is events[-1] or (route.startswith("/v1/") and error is events[-2]), events[-3:]
        check_error(route, 400, json.dumps(error).encode())
    if route.startswith("/v1/"):
        assert events[-1] == "[DONE]", events[-3:]
    elif not errors:
        assert events[-1]["generated_text"] is not None and events[-1]["details"], events[-1]


def check_body(route: str, raw: bytes) -> None:
    body = json.loads(raw)
    if route == "/":
        assert isinstance(body, list) and len(body) == 1, body
        body = body[0]
    if route.startswith("/v1/"):
        assert body["choices"][0]["finish_reason"] in ("stop", "length"), body
    else:
        assert isinstance(body["generated_text"], str), body


@pytest.mark.parametrize("route", list(ROUTES))
def test_fuzzed_bodies_never_break_the_server(server, route):
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much, HealthCheck.large_base_example])
    @given(request=requests(route))
    def run(request: tuple[bytes, str | None]) -> None:
        raw, content_type = request
        headers = {"content-type": content_type} if content_type else {}
        try:
            with httpx.Client(base_url=server.base, timeout=60) as client:
                with client.stream("POST", route, content=raw, headers=headers) as r:
                    status, answer = r.status_code, r.read()
                    answer_type = r.headers.get("content-type", "")
        except httpx.TransportError as exc:
            pytest.fail(f"the connection failed instead of an answer: {exc!r}")
        finally:
            assert server.proc.poll() is None, f"the server exited:\n{server.log_tail()}"
            health = httpx.get(f"{server.base}/health", timeout=30)
            assert health.status_code == 200, health.text
        assert status < 500, f"{status}: {answer[:500]!r}"
        if status == 200:
            if answer_type.startswith("text/event-stream"):
                check_stream(route, answer)
            else:
                check_body(route, answer)
        else:
            assert 400 <= status < 500, status
            assert answer_type.startswith("application/json"), answer_type
            check_error(route, status, answer)

    run()

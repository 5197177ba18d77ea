"""The API edge's validation (issue 12): no request body takes kvserve down.

Both API families share one path (kvserve.server.inputs): documented bounds per field, refusals that
name the field in the API's own shape (OpenAI 400, TGI 422), lenient about fields that change nothing,
model aliases and huggingface_hub's placeholder, client text checked for lone surrogates, chat templates
rendered on a worker thread with a time bound, readable messages for malformed JSON.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from test_server_api import MAX_MODEL_LEN, running_server

ALIASES = ("demo", "alias")
MESSAGES = [{"role": "user", "content": "hi"}]
SURROGATE = "\ud800"


@pytest.fixture(scope="module")
def server(demo_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server-validation") / "kvserve.log"
    with running_server(demo_model_dir, log, "--num-kv-blocks", "64", "--max-model-len", str(MAX_MODEL_LEN),
                        "--max-num-seqs", "8", "--log-level", "warning", "--served-model-name", *ALIASES) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.base, timeout=60) as c:
        yield c


def post(client: httpx.Client, path: str, body, stream: bool = False) -> httpx.Response:
    """POST `body` (encoded here, so lone surrogates travel as JSON escapes), streaming if asked."""
    if stream and isinstance(body, dict):
        body = {**body, "stream": True}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=content, headers={"content-type": "application/json"})


def openai_error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def tgi_error(r: httpx.Response) -> str:
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == "validation"
    return body["error"]


def completion(**fields) -> dict:
    return {"prompt": "x", "max_tokens": 2, **fields}


def chat(**fields) -> dict:
    return {"messages": MESSAGES, "max_tokens": 2, **fields}


# 1. one validation path: documented bounds, the API's 4xx naming the field

OPENAI_OUT_OF_RANGE = [
    ({"temperature": 2.5}, "temperature"), ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": 2.1}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"5": -100.5}}, "logit_bias"),
    ({"logit_bias": {"five": 1}}, "logit_bias"), ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"), ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ({"seed": 2**63}, "seed"), ({"seed": -2**63 - 1}, "seed"), ({"n": 17}, "n"), ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"), ({"stop": ["s"] * 65}, "stop"), ({"stop": ""}, "stop"),
    ({"stop": "x" * 1025}, "stop"), ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 3}, "min_tokens"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [10**6]}, "stop_token_ids"), ({"stop_token_ids": [1] * 1025}, "stop_token_ids"),
    ({"temperature": "hot"}, "temperature"), ({"stop": [1, 2]}, "stop"), ({"seed": 1.5}, "seed"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fields, param", OPENAI_OUT_OF_RANGE)
def test_openai_fields_out_of_range_are_400_naming_the_field(client, fields, param, stream):
    for path, body in (("/v1/completions", completion(**fields)), ("/v1/chat/completions", chat(**fields))):
        error = openai_error(post(client, path, body, stream))
        assert error["param"] == param and param in error["message"], error
        assert error["type"] == "invalid_request_error"


def test_chat_names_the_max_tokens_field_it_was_given(client):
    for name in ("max_tokens", "max_completion_tokens"):
        body = {"messages": MESSAGES, name: 2, "min_tokens": 5}
        error = openai_error(post(client, "/v1/chat/completions", body))
        assert error["param"] == "min_tokens" and "2" in error["message"]
        error = openai_error(post(client, "/v1/chat/completions", {"messages": MESSAGES, name: 0}))
        assert error["param"] == name
        error = openai_error(post(client, "/v1/chat/completions", {"messages": MESSAGES, name: MAX_MODEL_LEN}))
        assert error["param"] == name and error["code"] == "context_length_exceeded"


TGI_OUT_OF_RANGE = [
    ({"temperature": 0}, "temperature"), ({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.0}, "top_p"), ({"typical_p": 1.0}, "typical_p"),
    ({"typical_p": 0.5}, "typical_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 10**30}, "max_new_tokens"), ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"), ({"stop": ["x" * 1025]}, "stop"),
    ({"truncate": 0}, "truncate"), ({"best_of": 0}, "best_of"), ({"best_of": 2}, "best_of"),
    ({"temperature": "warm"}, "temperature"), ({"unknown_knob": 1}, "unknown_knob"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"five": 1}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
]


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/"])
@pytest.mark.parametrize("parameters, field", TGI_OUT_OF_RANGE)
def test_tgi_fields_out_of_range_are_422_naming_the_field(client, path, parameters, field):
    message = tgi_error(post(client, path, {"inputs": "x", "parameters": parameters}))
    assert f"parameters.{field}" in message


def test_edge_values_inside_the_bounds_are_served(client):
    for fields in ({"seed": 2**63 - 1}, {"seed": -2**63}, {"temperature": 2, "top_p": 1}, {"top_k": 10**30},
                   {"presence_penalty": -2, "frequency_penalty": 2}, {"stop": ["s"] * 64},
                   {"logit_bias": {"5": 100, "6": -100}}, {"min_tokens": 2}, {"stop_token_ids": [0, 319]}):
        for path, body in (("/v1/completions", completion(**fields)), ("/v1/chat/completions", chat(**fields))):
            assert post(client, path, body).status_code == 200, (path, fields)
    for parameters in ({"seed": 2**64 - 1, "do_sample": True}, {"top_p": 0.999, "top_k": 10**30},
                       {"stop": ["a", "b", "c", "d"]}, {"truncate": 10**9}):
        r = post(client, "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2, **parameters}})
        assert r.status_code == 200, (parameters, r.text)


def test_logit_bias_steers_the_output(client, demo_model_dir):
    from test_server_api import raw_tokenizer
    token = raw_tokenizer(demo_model_dir).encode("Z", add_special_tokens=False).ids[0]
    body = completion(max_tokens=6, temperature=1.0, seed=3, logit_bias={str(token): 100}, logprobs=0)
    choice = post(client, "/v1/completions", body).json()["choices"][0]
    assert choice["text"] == "Z" * 6
    chunks = [line for line in post(client, "/v1/chat/completions", {**chat(max_tokens=6, logit_bias={
        str(token): 100}), "stream": True}).text.splitlines() if line.startswith("data: {")]
    assert "".join(json.loads(c[6:])["choices"][0]["delta"].get("content", "") for c in chunks) == "Z" * 6


# 2. lenient where clients are, strict where silence would mislead

def test_fields_that_change_nothing_are_accepted(client):
    ignored = {"store": True, "metadata": {"k": "v"}, "service_tier": "auto", "parallel_tool_calls": False,
               "prompt_cache_key": "key", "prompt_cache_retention": "24h", "safety_identifier": "id", "user": "u",
               "modalities": ["text"], "reasoning_effort": None, "verbosity": None, "prediction": None,
               "audio": None, "tools": [], "tool_choice": "none", "function_call": "none", "functions": None,
               "response_format": {"type": "text"}, "top_logprobs": 0, "web_search_options": None}
    for stream in (False, True):
        r = post(client, "/v1/chat/completions", chat(**ignored), stream)
        assert r.status_code == 200, r.text
        r = post(client, "/v1/completions", completion(store=False, metadata={"a": "b"}, user="u",
                                                       service_tier="default", safety_identifier="s"), stream)
        assert r.status_code == 200, r.text
    options = {"include_usage": True, "include_obfuscation": False}
    r = post(client, "/v1/chat/completions", chat(stream_options=options), stream=True)
    assert r.status_code == 200 and '"usage": {' in r.text.replace('"usage":{', '"usage": {')


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fields, param", [
    ({"modalities": ["text", "audio"]}, "modalities"), ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
    ({"reasoning_effort": "high"}, "reasoning_effort"), ({"verbosity": "low"}, "verbosity"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"functions": [{"name": "f"}]}, "functions"), ({"function_call": "auto"}, "function_call"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"some_new_knob": 1}, "some_new_knob"),
])
def test_fields_that_would_change_the_output_are_refused(client, fields, param, stream):
    error = openai_error(post(client, "/v1/chat/completions", chat(**fields), stream))
    assert error["param"] == param and param in error["message"]


@pytest.mark.parametrize("path, body", [("/v1/completions", completion()), ("/v1/chat/completions", chat())])
def test_stream_options_need_stream_true(client, path, body):
    for stream_field in ({}, {"stream": False}):
        error = openai_error(post(client, path, {**body, **stream_field, "stream_options": {"include_usage": True}}))
        assert error["param"] == "stream_options" and "stream" in error["message"]
    assert post(client, path, {**body, "stream": False, "stream_options": None}).status_code == 200


# 3. model names: aliases, the model path, huggingface_hub's placeholder; else 404

def test_every_alias_the_path_and_the_placeholder_are_accepted(client, demo_model_dir):
    for model in (*ALIASES, demo_model_dir, "dummy", "tgi"):
        for stream in (False, True):
            for path, body in (("/v1/completions", completion(model=model)), ("/v1/chat/completions",
                                                                              chat(model=model))):
                r = post(client, path, body, stream)
                assert r.status_code == 200, (model, r.text)
                assert f'"model":"{ALIASES[0]}"' in r.text.replace('"model": "', '"model":"')
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [ALIASES[0]]


@pytest.mark.parametrize("model", ["gpt-4o", "", "Dummy", "demo ", "x" * 5000])
def test_any_other_model_is_404_model_not_found(client, model):
    for stream in (False, True):
        for path, body in (("/v1/completions", completion(model=model)), ("/v1/chat/completions",
                                                                          chat(model=model))):
            error = openai_error(post(client, path, body, stream), 404)
            assert error["code"] == "model_not_found" and error["param"] == "model" and len(error["message"]) < 400


def test_huggingface_hub_inference_client_works_unchanged(server, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)   # a loopback server, not the hub
    client = hub.InferenceClient(base_url=server.base)
    out = client.chat_completion(MESSAGES, max_tokens=4)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 4
    chunks = list(client.chat_completion(MESSAGES, max_tokens=4, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    generated = client.text_generation("Hello", max_new_tokens=4, details=True)
    assert generated.details.generated_tokens == 4
    events = list(client.text_generation("Hello", max_new_tokens=4, stream=True, details=True))
    assert events[-1].details.generated_tokens == 4 and events[-1].generated_text == generated.generated_text
    with pytest.raises(Exception, match="temperature"):
        client.text_generation("Hello", max_new_tokens=4, temperature=-1.0)
    with pytest.raises(Exception, match="model_not_found|does not exist"):
        client.chat_completion(MESSAGES, model="not-served", max_tokens=4)


# 4. client text is data

SURROGATE_BODIES = [
    ("/generate", {"inputs": "a" + SURROGATE}, "inputs"),
    ("/generate_stream", {"inputs": "x", "parameters": {"stop": ["ok", SURROGATE]}}, "parameters.stop.1"),
    ("/", {"inputs": SURROGATE + "b"}, "inputs"),
    ("/v1/completions", completion(prompt="a" + SURROGATE), "prompt"),
    ("/v1/completions", completion(prompt=[SURROGATE]), "prompt.0"),
    ("/v1/completions", completion(stop=SURROGATE), "stop"),
    ("/v1/completions", completion(model=SURROGATE), "model"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": SURROGATE}]), "messages.0.content"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]),
     "messages.0.content.0.text"),
    ("/v1/chat/completions", chat(messages=[{"role": SURROGATE, "content": "x"}]), "messages.0.role"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "x", "name": SURROGATE}]),
     "messages.0.name"),
    ("/v1/chat/completions", chat(stop=["a", SURROGATE]), "stop.1"),
    ("/v1/chat/completions", chat(model="demo" + SURROGATE), "model"),
    ("/v1/chat/completions", chat(chat_template_kwargs={"x": SURROGATE}), "chat_template_kwargs.x"),
    ("/v1/chat/completions", chat(user=SURROGATE), "user"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, body, param", SURROGATE_BODIES)
def test_lone_surrogates_are_refused_naming_the_field(server, client, path, body, param, stream):
    r = post(client, path, body, stream)
    message = tgi_error(r) if not path.startswith("/v1/") else openai_error(r)["message"]
    if path.startswith("/v1/"):
        assert r.json()["error"]["param"] == param
    assert message.startswith(param) and "surrogate" in message
    assert "Traceback" not in server.log_tail(20000)


@pytest.mark.parametrize("kwargs_, param", [
    ({"chat_template": "{{ 'x' }}"}, "chat_template_kwargs.chat_template"),
    ({"tokenize": True}, "chat_template_kwargs.tokenize"),
    ({"return_dict": True}, "chat_template_kwargs.return_dict"),
    ({"big": "x" * 70_000}, "chat_template_kwargs"),
    ({"deep": json.loads("[" * 20 + "]" * 20)}, "chat_template_kwargs"),
])
def test_chat_templates_from_requests_are_refused_and_kwargs_bounded(client, kwargs_, param):
    error = openai_error(post(client, "/v1/chat/completions", chat(chat_template_kwargs=kwargs_)))
    assert error["param"] == param
    error = openai_error(post(client, "/v1/chat/completions", chat(chat_template="{{ 'x' }}"), stream=True))
    assert error["param"] == "chat_template" and "--trust-request-chat-template" in error["message"]
    ok = chat(chat_template_kwargs={"enable_thinking": False, "nested": {"a": [1, 2.5, None, True, "s"]}})
    assert post(client, "/v1/chat/completions", ok).status_code == 200


# 6. readable errors for malformed bodies

@pytest.mark.parametrize("raw, expected", [
    (b'{"inputs": "x" "parameters": {}}', "the body is not valid JSON: Expecting ',' delimiter at line 1 column 16"),
    (b'{\n  "prompt": "x",,\n}', "the body is not valid JSON: Expecting property name enclosed in double quotes "
                                 "at line 2 column 17"),
    (b'{"inputs": "\xff\xfe"}', "not UTF-8"),
    (b"[" * 100_000, "nested too deeply"),
])
@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_malformed_bodies_get_readable_messages(client, path, raw, expected):
    r = post(client, path, raw)
    message = openai_error(r)["message"] if path.startswith("/v1/") else tgi_error(r)
    assert expected in message


@pytest.mark.parametrize("path, body, field", [
    ("/generate", {"inputs": 5}, "inputs"),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": "many"}}, "parameters.max_new_tokens"),
    ("/generate", {"inputs": "x", "parameters": []}, "parameters"),
    ("/v1/completions", {"prompt": {"a": 1}}, "prompt"),
    ("/v1/completions", completion(temperature=[1]), "temperature"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content"),
    ("/v1/chat/completions", chat(logit_bias=[1, 2]), "logit_bias"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', "temperature"),
    ("/generate", b'{"inputs": "x", "parameters": {"top_p": Infinity}}', "parameters.top_p"),
])
def test_wrong_types_name_the_field(client, path, body, field):
    r = post(client, path, body)
    if path.startswith("/v1/"):
        error = openai_error(r)
        assert error["param"].startswith(field) and error["message"].startswith(field), error
    else:
        assert tgi_error(r).startswith(field)


# 5. CPU work off the event loop, bounded in time

def test_too_long_prompts_print_no_tokenizer_warning(server, client):
    long = "a" * 3000    # longer than the demo tokenizer's model_max_length (2048)
    assert "parameters.max_new_tokens" not in tgi_error(post(client, "/generate", {"inputs": long}))
    assert openai_error(post(client, "/v1/completions", {"prompt": long}))["param"] == "prompt"
    assert openai_error(post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": long}]}))[
        "param"] == "messages"
    truncated = post(client, "/generate", {"inputs": long, "parameters": {"truncate": 8, "max_new_tokens": 2}})
    assert truncated.status_code == 200, truncated.text    # tokenized whole, then truncated
    assert "Token indices sequence length" not in server.log_tail(100_000)


@pytest.mark.parametrize("path, body, param", [
    ("/generate", {"inputs": "x" * 3 * 2**20}, "inputs"),
    ("/v1/completions", {"prompt": "x" * 3 * 2**20}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 3 * 2**20}]}, "messages"),
])
def test_megabytes_of_text_are_refused_before_tokenizing(client, path, body, param):
    began = time.monotonic()
    r = post(client, path, body)
    message = openai_error(r)["message"] if path.startswith("/v1/") else tgi_error(r)
    assert message.startswith(param) and "characters" in message and time.monotonic() - began < 1.5


class FakeEngine:
    """Just enough of AsyncEngine for kvserve.server.inputs: a real tokenizer, no model."""
    max_model_len = 4096
    model_id = "fake"
    is_running = True

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


@pytest.fixture
def fake_state(demo_model_dir):
    from transformers import AutoTokenizer

    from kvserve.server.serving import ServerSettings, ServerState
    engine = FakeEngine(AutoTokenizer.from_pretrained(demo_model_dir))
    return ServerState(served_model_name="demo", engine=engine,
                       settings=ServerSettings(served_model_names=("demo",), trust_request_chat_template=True))


def test_a_trusted_request_template_is_rendered(fake_state):
    from kvserve.server import inputs
    from kvserve.server.schemas_openai import ChatCompletionRequest
    body = ChatCompletionRequest(messages=MESSAGES, chat_template="<{{ messages[0].content }}|{{ greeting }}>",
                                 chat_template_kwargs={"greeting": "hello"})
    ids = asyncio.run(inputs.chat_prompt(fake_state, body))
    assert fake_state.engine.tokenizer.decode(ids) == "<hi|hello>"
    body = ChatCompletionRequest(messages=MESSAGES, chat_template_kwargs={"chat_template": "{{ 'k' }}"})
    assert fake_state.engine.tokenizer.decode(asyncio.run(inputs.chat_prompt(fake_state, body))) == "k"
    sandboxed = ChatCompletionRequest(messages=MESSAGES, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(inputs.APIError) as refused:
        asyncio.run(inputs.chat_prompt(fake_state, sandboxed))
    assert refused.value.status("openai") == 400 and "chat template" in refused.value.message


def test_a_runaway_template_is_stopped_and_the_loop_keeps_running(fake_state, monkeypatch):
    from kvserve.server import inputs
    from kvserve.server.schemas_openai import ChatCompletionRequest
    monkeypatch.setattr(inputs, "CPU_WORK_TIMEOUT_S", 1.0)
    monkeypatch.setattr(inputs, "_pool", ThreadPoolExecutor(1))   # one worker: it must come back
    runaway = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    body = ChatCompletionRequest(messages=MESSAGES, chat_template=runaway)
    threads_before = threading.active_count()

    async def main() -> tuple[inputs.APIError, int, float]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        task = asyncio.create_task(ticker())
        began = time.monotonic()
        with pytest.raises(inputs.APIError) as refused:
            await inputs.chat_prompt(fake_state, body)
        elapsed = time.monotonic() - began
        task.cancel()
        return refused.value, ticks, elapsed

    error, ticks, elapsed = asyncio.run(main())
    assert error.status("openai") == 400 and error.code == "timeout" and "1 s" in error.message
    assert 0.9 < elapsed < 3 and ticks >= 10      # the event loop ran all along
    normal = ChatCompletionRequest(messages=MESSAGES)
    assert asyncio.run(inputs.chat_prompt(fake_state, normal))   # the only worker is free again
    assert threading.active_count() <= threads_before + 1

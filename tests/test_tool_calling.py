"""Tool calling on /v1/chat/completions through the official openai client, streamed and not.

"required" and a named function are enforced by the grammar engine: with random weights sampling at
temperature 1, every call names a given tool and its arguments fit that tool's parameters schema.
"auto" parses the model's own format (here Hermes' <tool_call> JSON, recognised from the chat
template): the model's reply is scripted in the engine process (a sitecustomize), since random
weights never write a tool call by themselves. History with assistant tool_calls and tool results
goes through the chat template. Bad tools and tool_choice values are 400s naming the field."""
from __future__ import annotations

import json
import os
import shutil

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from test_server_api import MODEL, running_server

# Hermes-style tools in a ChatML template (what Qwen2.5's template does, written small)
TOOLS_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call functions. Write each call as <tool_call>{"name": ..., "arguments": ...}</tool_call>.
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{{ message.content or "" }}
{%- for call in message.tool_calls %}<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# In the engine process: a prompt holding REPLY[[text]] gets `text` then EOS as its reply, whatever
# the logits say (the server, parsing and streaming are what is under test)
SCRIPTED_REPLIES = """
import kvserve.engine, kvserve.isolation
_add, _sample, _scripts = kvserve.engine.EngineCore.add_request, kvserve.isolation.sample, {}
def add_request(self, prompt_ids, params, request_id=None, arrival_time=None, parent_request_id=None):
    request_id = _add(self, prompt_ids, params, request_id, arrival_time, parent_request_id)
    text = self.tokenizer.decode(prompt_ids)
    if "REPLY[[" in text:
        reply = text.rsplit("REPLY[[", 1)[1].split("]]", 1)[0]
        _scripts[request_id] = self.tokenizer.encode(reply, add_special_tokens=False) + [min(self.eos_token_ids)]
    return request_id
def sample(sampler, logits, seqs):
    results = _sample(sampler, logits, seqs)
    for i, seq in enumerate(seqs):
        script = _scripts.get(seq.request_id)
        if script is not None and not isinstance(results[i], Exception):
            results[i] = (script[min(seq.num_output_tokens, len(script) - 1)], 0.0, None)
    return results
kvserve.engine.EngineCore.add_request = add_request
kvserve.isolation.sample = sample
"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 16},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"enum": ["UTC", "CET", "PST"]}}, "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_call(name: str, arguments: str) -> dict:
    args = json.loads(arguments)
    if name == "get_weather":
        assert set(args) == {"city", "unit"} and 1 <= len(args["city"]) <= 16 and args["unit"] in ("celsius",
                                                                                                  "fahrenheit")
    else:
        assert name == "get_time" and args == {"zone": args["zone"]} and args["zone"] in ("UTC", "CET", "PST")
    return args


@pytest.fixture(scope="module")
def tools_model_dir(demo_model_dir, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tools-model") / "model"
    shutil.copytree(demo_model_dir, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TOOLS_TEMPLATE
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def server(tools_model_dir, tmp_path_factory):
    inject = tmp_path_factory.mktemp("inject")
    (inject / "sitecustomize.py").write_text(SCRIPTED_REPLIES)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(inject), old]))
    try:
        with running_server(tools_model_dir, tmp_path_factory.mktemp("tools") / "server.log",
                            "--num-kv-blocks", "256") as s:
            yield s
    finally:
        os.environ.pop("PYTHONPATH") if old is None else os.environ.__setitem__("PYTHONPATH", old)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="none")


def streamed(client, **kwargs) -> tuple[str, dict[int, dict], str, list]:
    """(content, calls by index {id, name, arguments}, finish_reason, chunks) of a streamed reply."""
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, **kwargs))
    content, calls, finish = "", {}, None
    for c in chunks:
        if not c.choices:
            continue
        delta = c.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            if call.index not in calls:
                assert call.id and call.type == "function" and call.function.name, call   # the first fragment
                calls[call.index] = {"id": call.id, "name": call.function.name, "arguments": ""}
            else:
                assert call.id is None and call.function.name is None
            calls[call.index]["arguments"] += call.function.arguments or ""
        finish = c.choices[0].finish_reason or finish
    return content, calls, finish, chunks


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_calls_fit_the_tools(client, seed):
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=seed, max_tokens=400)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        check_call(call.function.name, call.function.arguments)
    assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)


@pytest.mark.parametrize("seed", [1, 4])
def test_required_streams_call_deltas(client, seed):
    content, calls, finish, _ = streamed(client, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0,
                                         seed=seed, max_tokens=400)
    assert finish == "tool_calls" and content == "" and sorted(calls) == list(range(len(calls))) and calls
    for call in calls.values():
        check_call(call["name"], call["arguments"])
    whole = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=seed, max_tokens=400)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.choices[0].message.tool_calls] == \
        [(c["name"], json.loads(c["arguments"])) for c in calls.values()]


def test_parallel_tool_calls_false_makes_one_call(client):
    for seed in range(3):
        reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                               parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=300)
        assert len(reply.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_named_function(client, stream):
    choice = {"type": "function", "function": {"name": "get_time"}}
    kwargs = dict(messages=ASK, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=5, max_tokens=100)
    if stream:
        content, calls, finish, _ = streamed(client, **kwargs)
        assert finish == "tool_calls" and list(calls) == [0] and calls[0]["name"] == "get_time"
        check_call("get_time", calls[0]["arguments"])
        return
    reply = client.chat.completions.create(model=MODEL, **kwargs)
    calls = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and len(calls) == 1 and calls[0].function.name == "get_time"
    check_call("get_time", calls[0].function.arguments)


SCRIPTED_CALL = ('Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
                 '\n</tool_call>')


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_the_models_own_format(client, stream):
    messages = [{"role": "user", "content": f"Weather? REPLY[[{SCRIPTED_CALL}]]"}]
    if stream:
        content, calls, finish, _ = streamed(client, messages=messages, tools=TOOLS, max_tokens=200)
        assert content == "Let me look." and finish == "tool_calls"
        assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
            [("get_weather", {"city": "Paris", "unit": "celsius"})]
        return
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="auto",
                                           max_tokens=200)
    message = reply.choices[0].message
    assert message.content == "Let me look." and reply.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
        [("get_weather", {"city": "Paris", "unit": "celsius"})]


@pytest.mark.parametrize("stream", [False, True])
def test_auto_plain_reply_has_no_calls(client, stream):
    messages = [{"role": "user", "content": "Hi REPLY[[Hello <tool and a plain answer.]]"}]
    if stream:
        content, calls, finish, _ = streamed(client, messages=messages, tools=TOOLS, max_tokens=100)
        assert (content, calls, finish) == ("Hello <tool and a plain answer.", {}, "stop")
        return
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=100)
    assert reply.choices[0].message.content == "Hello <tool and a plain answer."
    assert not reply.choices[0].message.tool_calls and reply.choices[0].finish_reason == "stop"


def test_history_with_calls_and_results_is_rendered(server, client):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}]
    r = httpx.post(f"{server.base}/tokenize", json={"model": MODEL, "messages": history, "tools": TOOLS}, timeout=60)
    assert r.status_code == 200, r.text
    text = httpx.post(f"{server.base}/detokenize", json={"model": MODEL, "tokens": r.json()["tokens"]},
                      timeout=60).json()["prompt"]
    assert '"name": "get_time"' in text.split("</tools>")[0]      # the tools, in the system part
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    assert "<tool_response>\n21 degrees and sunny\n</tool_response>" in text
    reply = client.chat.completions.create(model=MODEL, messages=history + [
        {"role": "user", "content": "REPLY[[It is 21 degrees.]]"}], tools=TOOLS, max_tokens=50)
    assert reply.choices[0].message.content == "It is 21 degrees."


def test_tool_choice_none_hides_the_tools(server):
    r = httpx.post(f"{server.base}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "REPLY[[" + SCRIPTED_CALL + "]]"}],
        "tools": TOOLS, "tool_choice": "none", "max_tokens": 200}, timeout=60)
    assert r.status_code == 200
    message = r.json()["choices"][0]["message"]
    assert message["content"] == SCRIPTED_CALL and message["tool_calls"] == []


@pytest.mark.parametrize("fields,param,words", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "must be"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name", "letters"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "another tool"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools[0].function.parameters",
     "JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/x"}}}],
      "tool_choice": "required"}, "tools", "cannot be compiled"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]", "function"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools", "at most 128"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
      "tools": TOOLS}, "messages.tool_calls[0].function.arguments", "not valid JSON"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[" * 100_000}}]}],
      "tools": TOOLS}, "messages.tool_calls[0].function.arguments", "not valid JSON"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_tool_requests_are_400s_naming_the_field(server, fields, param, words, stream):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, "stream": stream, **fields}
    r = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_auto_without_a_known_format_names_the_flag(demo_model_dir, tmp_path):
    with running_server(demo_model_dir, tmp_path / "server.log", "--num-kv-blocks", "64") as s:
        r = httpx.post(f"{s.base}/v1/chat/completions", json={"model": MODEL, "messages": ASK, "tools": TOOLS},
                       timeout=60)
        assert r.status_code == 400 and "--tool-call-parser" in r.json()["error"]["message"]
        # required needs no format: the grammar writes the calls
        r = httpx.post(f"{s.base}/v1/chat/completions", json={
            "model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 300,
            "temperature": 1.0, "seed": 1}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "tool_calls"

"""Structured outputs: a JSON schema or a regex constrains every sampled token (llguidance).

In the engine: sampled outputs of a bounded schema are valid JSON that ends well within max_tokens
(no endless whitespace), a regex is matched, constrained rows leave free rows' greedy outputs
unchanged, preemption keeps a request's grammar state, compiled grammars are cached by schema.
Over HTTP, through the official openai client and huggingface_hub: response_format json_schema and
json_object on chat and completions, TGI's grammar json / json_schema / regex, streaming and not;
a schema that cannot compile is a 400 (TGI: 422), never a 5xx, and the server keeps serving."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from kvserve import LLM, SamplingParams, StructuredOutput
from test_server_api import MODEL, running_server, sse_events

PET = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "kind": {"enum": ["cat", "dog", "fish"]},
    "age": {"type": "integer", "minimum": 0, "maximum": 30},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "kind", "age", "tags"], "additionalProperties": False}


def check_pet(text: str) -> dict:
    pet = json.loads(text)
    assert set(pet) == {"name", "kind", "age", "tags"}
    assert isinstance(pet["name"], str) and 1 <= len(pet["name"]) <= 12
    assert pet["kind"] in ("cat", "dog", "fish") and 0 <= pet["age"] <= 30 and len(pet["tags"]) <= 3
    return pet


@pytest.fixture(scope="module")
def llm(demo_model_dir):
    return LLM(demo_model_dir, num_kv_blocks=64)


def test_sampled_json_is_valid_and_finishes(llm):
    spec = StructuredOutput.json_schema(PET)
    outs = llm.generate(["pet:"] * 8, [SamplingParams(max_tokens=120, temperature=1.0, seed=s, structured=spec)
                                       for s in range(8)])
    for out in outs:
        assert out.finish_reason == "grammar", out.text
        check_pet(out.text)
        assert "  " not in out.text and "\n" not in out.text      # compact layout: no whitespace to wander in


def test_regex_is_matched(llm):
    spec = StructuredOutput("regex", r"[0-9]{3}-[a-z]{2,4}")
    for out in llm.generate(["code:"] * 4, [SamplingParams(max_tokens=20, temperature=1.0, seed=s, structured=spec)
                                            for s in range(4)]):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", out.text), out.text


def test_free_rows_unchanged_beside_constrained_ones(llm):
    free = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = ["alpha beta", "gamma", "the quick brown fox"]
    alone = [o.token_ids for o in llm.generate(prompts, free)]
    spec = StructuredOutput.json_schema(PET)
    mixed = llm.generate(prompts + ["pet:"] * 3,
                         [free] * 3 + [SamplingParams(max_tokens=120, temperature=1.0, seed=s, structured=spec)
                                       for s in range(3)])
    assert [o.token_ids for o in mixed[:3]] == alone
    for out in mixed[3:]:
        check_pet(out.text)


def test_greedy_constrained_is_deterministic_and_survives_preemption(demo_model_dir, llm):
    spec = StructuredOutput.json_schema(PET)
    params = SamplingParams(max_tokens=100, temperature=0, structured=spec)
    prompts = [f"pet number {i}: " * 3 for i in range(6)]
    reference = [o.token_ids for o in llm.generate(prompts, params)]
    small = LLM(demo_model_dir, num_kv_blocks=24, block_size=8, max_num_seqs=6)   # too few blocks for all six
    outs = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == reference
    for out in outs:
        check_pet(out.text)


def test_min_tokens_does_not_fight_the_grammar(llm):
    """EOS is banned before min_tokens only while the grammar allows something else."""
    spec = StructuredOutput("regex", "ab")
    out = llm.generate(["x"], SamplingParams(max_tokens=10, min_tokens=5, temperature=0, structured=spec))[0]
    assert out.text == "ab"


def test_grammars_are_cached_by_schema(llm):
    grammars = llm.engine.grammars
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9, "minimum": 0}},
              "required": ["n"], "additionalProperties": False}
    before = len(grammars._templates)
    llm.generate(["a", "b"], SamplingParams(max_tokens=20, temperature=0, structured=StructuredOutput.json_schema(schema)))
    llm.generate(["c"], SamplingParams(max_tokens=20, temperature=0, structured=StructuredOutput.json_schema(schema)))
    assert len(grammars._templates) == before + 1


def test_a_grammar_that_does_not_compile_fails_its_request_alone(llm):
    bad = StructuredOutput("regex", "a(b")
    free = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = llm.generate(["x", "y"], [SamplingParams(max_tokens=8, structured=bad), free])
    assert outs[0].finish_reason == "error" and "regex" in outs[0].error
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 8


def test_a_failed_compile_beside_other_constrained_requests_is_reported(llm):
    """Every request ends, the one whose grammar does not compile with its error (a second structured
    request admitted right after it must not swallow that failure)."""
    bad, good = StructuredOutput("regex", "(a"), StructuredOutput("regex", "[ab]{3}")
    outs = llm.generate(["x", "y", "z"], [SamplingParams(max_tokens=8, structured=bad),
                                          SamplingParams(max_tokens=8, structured=good),
                                          SamplingParams(max_tokens=8, structured=bad)])
    assert [o.finish_reason for o in outs] == ["error", "grammar", "error"]


def test_structured_params_are_bounded():
    with pytest.raises(ValueError, match="structured.kind"):
        SamplingParams(structured=StructuredOutput("lark", "start: x"))
    with pytest.raises(ValueError, match="at most 65536"):
        SamplingParams(structured=StructuredOutput("regex", "a" * 70000))


# over HTTP

@pytest.fixture(scope="module")
def server(demo_model_dir, tmp_path_factory):
    with running_server(demo_model_dir, tmp_path_factory.mktemp("structured") / "server.log",
                        "--num-kv-blocks", "128") as s:
        yield s


def response_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}}


@pytest.mark.parametrize("stream", [False, True])
def test_chat_json_schema_through_openai_client(server, stream):
    import openai
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="none")
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "a pet please"}], max_tokens=150,
                  temperature=1.0, seed=7, response_format=response_format(PET))
    if not stream:
        reply = client.chat.completions.create(**kwargs)
        check_pet(reply.choices[0].message.content)
        assert reply.choices[0].finish_reason == "stop"
        return
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check_pet(text)
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_completions_json_object(server, stream):
    body = {"model": MODEL, "prompt": "{", "max_tokens": 60, "temperature": 0,
            "response_format": {"type": "json_object"}, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            events, _ = sse_events(r.iter_lines())
        text = "".join(e["choices"][0]["text"] for e in events if e != "[DONE]" and e["choices"])
    else:
        r = httpx.post(f"{server.base}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
    # greedy on random weights may run out of tokens inside the object: what there is is a JSON prefix
    assert text.startswith("{")


def test_tgi_grammar_through_huggingface_hub(server, monkeypatch):
    import huggingface_hub as hub
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)   # a loopback server, not the hub
    client = hub.InferenceClient(base_url=server.base)
    text = client.text_generation("pet:", max_new_tokens=150, seed=3, do_sample=True,
                                  grammar={"type": "json", "value": PET})
    check_pet(text)
    text = client.text_generation("code:", max_new_tokens=20, grammar={"type": "regex", "value": "[0-9]{4}"})
    assert re.fullmatch("[0-9]{4}", text)
    streamed = "".join(client.text_generation("pet:", max_new_tokens=150, seed=3, do_sample=True, stream=True,
                                              grammar={"type": "json", "value": PET}))
    assert streamed == text or check_pet(streamed)


def test_tgi_grammar_json_schema_and_json_text(server):
    for grammar in ({"type": "json_schema", "value": {"name": "pet", "schema": PET}},
                    {"type": "json", "value": json.dumps(PET)}):
        r = httpx.post(f"{server.base}/generate", json={"inputs": "pet:", "parameters": {
            "max_new_tokens": 150, "do_sample": True, "seed": 1, "grammar": grammar}}, timeout=60)
        assert r.status_code == 200, r.text
        check_pet(r.json()["generated_text"])


BAD_FORMATS = [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
     "response_format", "cannot be compiled"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "(unclosed"}}}}}, "response_format", "cannot be compiled"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema", "required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format.json_schema.schema",
     "JSON schema"),
    ({"type": "json_schema", "json_schema": "nope"}, "response_format.json_schema", "object"),
    ({"type": "json_schema", "json_schema": {"schema": {}, "oops": 1}}, "response_format.json_schema.oops", "field"),
    ({"type": "xml"}, "response_format.type", "one of"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["a" * 1000] * 100}}},
     "response_format.json_schema.schema", "larger than"),
]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("fmt,param,words", BAD_FORMATS)
def test_bad_response_format_is_a_400_naming_it(server, route, fmt, param, words):
    body = {"model": MODEL, "max_tokens": 4, "response_format": fmt}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "hi"}
    for stream in (False, True):
        r = httpx.post(f"{server.base}{route}", json={**body, "stream": stream}, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and words in error["message"], error


def test_deeply_nested_schema_is_refused(server):
    schema: dict = {"type": "object"}
    for _ in range(200):
        schema = {"type": "object", "properties": {"a": schema}}
    r = httpx.post(f"{server.base}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "response_format": response_format(schema)}, timeout=60)
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]


@pytest.mark.parametrize("grammar,param", [
    ({"type": "regex", "value": "a(b"}, "parameters.grammar"),
    ({"type": "regex", "value": ""}, "parameters.grammar.value"),
    ({"type": "json", "value": "{not json"}, "parameters.grammar.value"),
    ({"type": "json", "value": 5}, "parameters.grammar.value"),
    ({"type": "lark", "value": "start: x"}, "parameters.grammar.type"),
    ({"type": "json"}, "parameters.grammar"),
    ({"type": "json_schema", "value": {"name": "x"}}, "parameters.grammar.value"),
])
def test_bad_tgi_grammar_is_a_422_naming_it(server, grammar, param):
    for path in ("/generate", "/generate_stream"):
        r = httpx.post(f"{server.base}{path}", json={"inputs": "hi", "parameters": {
            "max_new_tokens": 4, "grammar": grammar}}, timeout=60)
        assert r.status_code == 422, r.text
        assert param in r.json()["error"], r.json()


def test_constrained_and_hostile_requests_leave_free_clients_alone(server):
    """Free greedy requests get the same tokens while constrained and refused ones run beside them."""
    free = {"model": MODEL, "prompt": "steady as she goes", "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    alone = httpx.post(f"{server.base}/v1/completions", json=free, timeout=60).json()["choices"][0]["text"]

    def constrained(i: int) -> int:
        fmt = response_format(PET) if i % 2 else {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/x"}}}
        r = httpx.post(f"{server.base}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": f"pet {i}"}], "max_tokens": 150,
            "temperature": 1.0, "seed": i, "response_format": fmt}, timeout=120)
        if r.status_code == 200:
            check_pet(r.json()["choices"][0]["message"]["content"])
        return r.status_code

    with ThreadPoolExecutor(8) as pool:
        frees = [pool.submit(httpx.post, f"{server.base}/v1/completions", json=free, timeout=120) for _ in range(4)]
        codes = list(pool.map(constrained, range(8)))
    assert sorted(set(codes)) == [200, 400]
    assert all(f.result().json()["choices"][0]["text"] == alone for f in frees)

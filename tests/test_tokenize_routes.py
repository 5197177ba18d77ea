"""The tokenizer and metadata routes through a real server: POST /tokenize in TGI's and vLLM's body styles,
POST /detokenize, GET /version and GET /v1/models/{id}; their ids against the tokenizer's own and the
generate routes', their bounds, their error shapes and the API key."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from test_server_api import raw_tokenizer, running_server

MAX_MODEL_LEN = 256
VOCAB_SIZE = 320            # the demo's 261 tokens, rounded up to 64 (ids 261..319 have no entry)
KEY = "tokenize-key"
TEXT = "héllo <|im_start|>wörld 😀 ok\n"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"}]
CHATML = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 😀<|im_end|>\n"


@pytest.fixture(scope="module")
def server(demo_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("tokenize") / "kvserve.log"
    with running_server(demo_model_dir, log, "--served-model-name", "demo", "alias", "--api-key", KEY,
                        "--num-kv-blocks", "64", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "4",
                        "--log-level", "warning") as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.base, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def tok(demo_model_dir):
    return raw_tokenizer(demo_model_dir)


def post(client: httpx.Client, path: str, body) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return client.post(path, content=body, headers={"content-type": "application/json"})
    return client.post(path, json=body)


def tgi_error(r: httpx.Response, status: int = 422) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"}, body
    return body["error"]


def openai_error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def vllm_tokens(client: httpx.Client, **body) -> dict:
    r = post(client, "/tokenize", {"model": "demo", **body})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"count", "max_model_len", "tokens", "token_strs"} and out["max_model_len"] == MAX_MODEL_LEN
    assert out["count"] == len(out["tokens"])
    return out


# TGI's body

def test_tgi_tokens_are_the_tokenizers_and_generates_with_offsets_into_the_input(client, tok):
    r = post(client, "/tokenize", {"inputs": TEXT})
    assert r.status_code == 200, r.text
    tokens = r.json()
    assert [t["id"] for t in tokens] == tok.encode(TEXT).ids
    assert all(set(t) == {"id", "text", "start", "stop"} for t in tokens)
    for t in tokens:                          # character offsets: each token's text is its slice of the input
        assert TEXT[t["start"]:t["stop"]] == t["text"] and t["text"]
    spans = dict.fromkeys((t["start"], t["stop"]) for t in tokens)     # the bytes of a character share its span
    assert "".join(TEXT[start:stop] for start, stop in spans) == TEXT
    special = next(t for t in tokens if t["text"] == "<|im_start|>")
    assert special["id"] == tok.token_to_id("<|im_start|>")
    emoji = [t for t in tokens if t["text"] == "😀"]
    assert len(emoji) == 4 and len({t["id"] for t in emoji}) == 4     # 4 byte tokens, one character each
    generated = post(client, "/generate", {"inputs": TEXT, "parameters": {
        "max_new_tokens": 1, "details": True, "decoder_input_details": True}}).json()
    assert [t["id"] for t in generated["details"]["prefill"]] == [t["id"] for t in tokens]


def test_tgi_truncate_keeps_the_last_tokens_as_generate_does(client, tok):
    full = [t["id"] for t in post(client, "/tokenize", {"inputs": TEXT}).json()]
    last = post(client, "/tokenize", {"inputs": TEXT, "parameters": {"truncate": 3}}).json()
    assert [t["id"] for t in last] == full[-3:] and all(TEXT[t["start"]:t["stop"]] == t["text"] for t in last)
    long = "a" * (MAX_MODEL_LEN * 3)           # too long untruncated; fine once truncated, as on /generate
    r = post(client, "/tokenize", {"inputs": long, "parameters": {"truncate": 5}})
    assert r.status_code == 200 and [t["start"] for t in r.json()] == list(range(len(long) - 5, len(long)))
    assert [t["id"] for t in post(client, "/tokenize", {"inputs": "abc", "parameters": {"truncate": 9}}).json()] \
        == tok.encode("abc").ids


def test_tgi_bounds(client):
    at = post(client, "/tokenize", {"inputs": "a" * MAX_MODEL_LEN})
    assert at.status_code == 200 and len(at.json()) == MAX_MODEL_LEN
    message = tgi_error(post(client, "/tokenize", {"inputs": "a" * (MAX_MODEL_LEN + 1)}))
    assert message.startswith("inputs") and f"{MAX_MODEL_LEN + 1} tokens" in message and str(MAX_MODEL_LEN) in message
    message = tgi_error(post(client, "/tokenize", {"inputs": "a" * (MAX_MODEL_LEN + 1),
                                                   "parameters": {"truncate": MAX_MODEL_LEN + 1}}))
    assert message.startswith("inputs") and "max_model_len" in message
    began = time.monotonic()                    # megabytes are refused by their length, before tokenizing
    message = tgi_error(post(client, "/tokenize", {"inputs": "a" * 2_000_000}))
    assert message.startswith("inputs") and "characters" in message and time.monotonic() - began < 1.5
    r = post(client, "/tokenize", b'{"inputs": "' + b"a" * (9 * 2**20) + b'"}')
    assert "--max-request-bytes" in tgi_error(r, 413) and r.json()["error_type"] == "payload_too_large"


def test_tgi_empty_input_has_no_tokens(client):
    r = post(client, "/tokenize", {"inputs": ""})     # as TGI: only generation refuses an empty prompt
    assert r.status_code == 200 and r.json() == []


@pytest.mark.parametrize("body,field", [
    ({"inputs": 5}, "inputs"), ({"inputs": ["a"]}, "inputs"), ({"inputs": None}, "inputs"), ({}, "inputs"),
    ([1, 2], None), ('"text"', None), (b'{"inputs": "\\ud800"}', "inputs"), (b'{"inputs": ', None),
    ({"inputs": "a", "stream": True}, "stream"), ({"inputs": "a", "parameters": {"truncate": 0}}, "truncate"),
    ({"inputs": "a", "parameters": {"truncate": "5"}}, "truncate"), ({"inputs": "a", "parameters": {"zz": 1}}, "zz"),
    ({"inputs": "a", "parameters": {"truncate": 2.0}}, "truncate"), ({"inputs": "a", "parameters": 1}, "parameters"),
])
def test_tgi_refusals_are_422_in_tgis_shape(client, body, field):
    message = tgi_error(post(client, "/tokenize", body))
    if field:
        assert field in message, message


# vLLM's bodies

def test_vllm_prompt_tokens_are_the_tokenizers_and_completions(client, tok):
    out = vllm_tokens(client, prompt=TEXT)
    assert out["tokens"] == tok.encode(TEXT).ids and out["token_strs"] is None
    assert vllm_tokens(client, prompt=TEXT, add_special_tokens=False)["tokens"] == \
        tok.encode(TEXT, add_special_tokens=False).ids
    named = vllm_tokens(client, prompt=TEXT, return_token_strs=True)
    assert named["token_strs"] == [tok.id_to_token(i) for i in out["tokens"]]
    usage = post(client, "/v1/completions", {"model": "alias", "prompt": TEXT, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == out["count"]
    assert vllm_tokens(client, prompt="")["tokens"] == []                # as vLLM: nothing to count
    assert vllm_tokens(client, prompt="hi", model=None)["count"] == 2     # model is optional


def test_vllm_messages_render_as_chat_completions_does(client, tok):
    out = vllm_tokens(client, messages=MESSAGES)
    assert out["tokens"] == tok.encode(CHATML + "<|im_start|>assistant\n").ids
    usage = post(client, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == out["count"]
    assert vllm_tokens(client, messages=MESSAGES, add_generation_prompt=False)["tokens"] == tok.encode(CHATML).ids
    prefill = [*MESSAGES, {"role": "assistant", "content": "Hel"}]
    out = vllm_tokens(client, messages=prefill, add_generation_prompt=False, continue_final_message=True)
    assert out["tokens"] == tok.encode(CHATML + "<|im_start|>assistant\nHel").ids
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "😀"}]}]
    assert vllm_tokens(client, messages=parts, add_generation_prompt=False)["tokens"] == \
        tok.encode("<|im_start|>user\nHi 😀<|im_end|>\n").ids


def test_vllm_bounds(client):
    assert vllm_tokens(client, prompt="a" * MAX_MODEL_LEN)["count"] == MAX_MODEL_LEN
    error = openai_error(post(client, "/tokenize", {"prompt": "a" * (MAX_MODEL_LEN + 1)}))
    assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"
    assert f"{MAX_MODEL_LEN + 1} tokens" in error["message"] and f"({MAX_MODEL_LEN})" in error["message"]
    many = [{"role": "user", "content": "a" * 100}] * 3
    error = openai_error(post(client, "/tokenize", {"messages": many}))
    assert error["param"] == "messages" and error["code"] == "context_length_exceeded"
    began = time.monotonic()
    for body in ({"prompt": "a" * 2_000_000}, {"messages": [{"role": "user", "content": "a" * 2_000_000}]}):
        error = openai_error(post(client, "/tokenize", body))
        assert "characters" in error["message"] and error["param"] in ("prompt", "messages")
    assert time.monotonic() - began < 3


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "hi", "model": "other"}, 404, "model"), ({"messages": MESSAGES, "model": "x" * 5000}, 404, "model"),
    ({"prompt": 5}, 400, "prompt"), ({"prompt": ["hi"]}, 400, "prompt"), ({"prompt": [1, 2]}, 400, "prompt"),
    ({"prompt": "hi", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    ({"prompt": "hi", "add_special_tokens": 1}, 400, "add_special_tokens"),
    ({"prompt": "hi", "return_token_strs": 0}, 400, "return_token_strs"),
    ({"prompt": "hi", "temperature": 0.5}, 400, "temperature"),
    ({"prompt": "hi", "messages": MESSAGES}, 400, "prompt"),
    (b'{"prompt": "\\udc00x"}', 400, "prompt"), (b'{"prompt": "a", "model": "\\ud800"}', 400, "model"),
    ({"messages": "hi"}, 400, "messages"), ({"messages": []}, 400, "messages"),
    ({"messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages.0.content"),
    ({"messages": MESSAGES, "continue_final_message": True}, 400, "continue_final_message"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, 400,
     "tools[0].function.name"),
    ({"messages": MESSAGES, "mm_processor_kwargs": {"a": 1}}, 400, "mm_processor_kwargs"),
    ({"messages": MESSAGES, "chat_template": "{{ 'x' }}"}, 400, "chat_template"),
    ({"messages": MESSAGES, "chat_template_kwargs": {"add_generation_prompt": True}}, 400,
     "chat_template_kwargs.add_generation_prompt"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": Infinity}}', 400,
     "chat_template_kwargs"),
])
def test_vllm_refusals_are_in_openais_shape(client, body, status, param):
    error = openai_error(post(client, "/tokenize", body), status)
    if param:
        assert error["param"] == param, error
    if status == 404:
        assert error["code"] == "model_not_found" and len(error["message"]) < 400


# /detokenize

def test_detokenize_round_trips(client, tok):
    ids = vllm_tokens(client, prompt=TEXT, add_special_tokens=False)["tokens"]
    r = post(client, "/detokenize", {"model": "demo", "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": TEXT}
    chat = vllm_tokens(client, messages=MESSAGES)["tokens"]
    assert post(client, "/detokenize", {"tokens": chat}).json()["prompt"] == CHATML + "<|im_start|>assistant\n"
    assert post(client, "/detokenize", {"tokens": []}).json() == {"prompt": ""}
    assert post(client, "/detokenize", {"tokens": [VOCAB_SIZE - 1]}).json() == {"prompt": ""}   # no entry: ""
    assert post(client, "/detokenize", {"tokens": [0] * MAX_MODEL_LEN}).status_code == 200


@pytest.mark.parametrize("body,status,message", [
    ({"tokens": [5, -1]}, 400, "tokens[1]: token id -1 is outside the vocabulary [0, 320)"),
    ({"tokens": [VOCAB_SIZE]}, 400, "tokens[0]: token id 320 is outside the vocabulary [0, 320)"),
    ({"tokens": [2**70]}, 400, "outside the vocabulary"), ({"tokens": [-(10**40)]}, 400, "..."),
    ({"tokens": [0] * (MAX_MODEL_LEN + 1)}, 400, f"{MAX_MODEL_LEN + 1} token ids"),
    ({"tokens": [1.0]}, 400, "tokens.0"), ({"tokens": ["5"]}, 400, "tokens.0"), ({"tokens": [True]}, 400, "tokens.0"),
    ({"tokens": [None]}, 400, "tokens.0"), ({"tokens": 5}, 400, "tokens"), ({}, 400, "tokens"),
    ({"tokens": [1], "model": "other"}, 404, "does not exist"), ({"tokens": [1], "zz": 1}, 400, "zz"),
    (b'{"tokens": [1', 400, "not valid JSON"), (b'{"tokens": [1], "model": "\\ud800"}', 400, "surrogate"),
])
def test_detokenize_refusals_are_in_openais_shape(client, body, status, message):
    error = openai_error(post(client, "/detokenize", body), status)
    assert message in error["message"], error
    assert len(error["message"]) < 400


# /version, /v1/models/{id}, the API key

def test_version_and_model_retrieval(server, client, demo_model_dir):
    import kvserve
    assert httpx.get(f"{server.base}/version").json() == {"version": kvserve.__version__}   # open, as in vLLM
    entry = client.get("/v1/models").json()["data"][0]
    for name in ("demo", "alias", demo_model_dir):
        r = client.get(f"/v1/models/{name}")
        assert r.status_code == 200 and r.json() == entry, r.text
    assert entry["id"] == "demo" and entry["object"] == "model" and entry["max_model_len"] == MAX_MODEL_LEN
    for name in ("other", "demo%2Fx", "x" * 3000, "%ED%A0%80"):
        error = openai_error(client.get(f"/v1/models/{name}"), 404)
        assert error["code"] == "model_not_found" and error["param"] == "model" and len(error["message"]) < 400
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/tokenize", "/detokenize", "/version", "/v1/models/{model}"} <= set(paths)


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/tokenize", {"inputs": "hi"}), ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [1]}), ("GET", "/v1/models/demo", None),
])
def test_the_api_key_is_required(server, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.request(method, f"{server.base}{path}", json=body, headers=headers, timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        if path == "/tokenize":               # the key is checked before the body is read: the path's shape
            assert r.json()["error_type"] == "unauthorized"
        else:
            assert r.json()["error"]["code"] == "invalid_api_key"


# logit_bias with the ids /tokenize gives

def test_logit_bias_on_a_tokenized_id_forces_it(client):
    target = vllm_tokens(client, prompt="Z", add_special_tokens=False)["tokens"]
    assert len(target) == 1
    r = post(client, "/v1/completions", {"prompt": "hello", "max_tokens": 4, "temperature": 0,
                                         "logit_bias": {str(target[0]): 100}})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ZZZZ", r.text
    r = post(client, "/generate", {"inputs": "hello", "parameters": {"max_new_tokens": 4,
                                                                     "logit_bias": {str(target[0]): 100}}})
    assert r.json() == {"generated_text": "ZZZZ"}      # TGI's parameters have none: a kvserve extension


# the worker pool and its time bound; a tokenizer without offsets (no server: a stand-in engine)

class SlowTokenizer:
    """A tokenizer without offsets (like transformers' Python tokenizers): ids are letters' positions."""
    is_fast = False
    chat_template = "{{ messages }}"

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "b": 1}

    def encode(self, text, add_special_tokens=True, verbose=True) -> list[int]:
        return [ord(c) - ord("a") for c in text]


class RunawayTokenizer(SlowTokenizer):
    def encode(self, text, add_special_tokens=True, verbose=True) -> list[int]:
        while True:
            pass

    def apply_chat_template(self, *args, **kwargs) -> str:
        while True:
            pass


def stand_in(tokenizer):
    from kvserve.server.serving import ServerState

    class Engine:
        max_model_len, model_id, is_running = 8, "stand-in", True

    Engine.tokenizer = tokenizer
    return ServerState(served_model_name="demo", engine=Engine())


def test_a_tokenizer_without_offsets_answers_as_tgi_does():
    from kvserve.server.routes_tokenize import tgi_tokens
    from kvserve.server.schemas_tgi import GenerateRequest

    assert asyncio.run(tgi_tokens(stand_in(SlowTokenizer()), GenerateRequest(inputs="ab"))) == [
        {"id": 0, "text": "", "start": 0, "stop": 0}, {"id": 1, "text": "", "start": 0, "stop": 0}]


def test_tokenization_runs_on_the_worker_pool_within_its_time_bound(monkeypatch):
    from kvserve.server import inputs
    from kvserve.server.routes_tokenize import tgi_tokens, vllm_tokens
    from kvserve.server.schemas_openai import TokenizeChatRequest, TokenizeCompletionRequest
    from kvserve.server.schemas_tgi import GenerateRequest

    monkeypatch.setattr(inputs, "CPU_WORK_TIMEOUT_S", 0.4)
    monkeypatch.setattr(inputs, "_pool", ThreadPoolExecutor(1))   # one worker: each runaway must give it back
    state = stand_in(RunawayTokenizer())

    async def refused(call) -> tuple[inputs.APIError, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        task = asyncio.create_task(ticker())
        with pytest.raises(inputs.APIError) as error:
            await call
        task.cancel()
        return error.value, ticks

    for call, param in ((tgi_tokens(state, GenerateRequest(inputs="ab")), "inputs"),
                        (vllm_tokens(state, TokenizeCompletionRequest(prompt="ab")), "prompt"),
                        (vllm_tokens(state, TokenizeChatRequest(messages=MESSAGES)), "messages")):
        error, ticks = asyncio.run(refused(call))
        assert error.code == "timeout" and error.param == param and error.status("openai") == 400
        assert ticks >= 10                      # the event loop ran all along

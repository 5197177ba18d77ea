"""The HTTP server end to end: `kvserve serve` on the demo model in a subprocess, spoken to over HTTP.

Covers both APIs (plain and SSE), error shapes, exact streamed text (multi-byte UTF-8 included),
prompt caching in usage, and client disconnects freeing KV blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

MODEL = "demo"
MAX_MODEL_LEN = 256


# harness (also used by test_server_lifecycle.py)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; returns whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@dataclass
class Server:
    proc: subprocess.Popen
    base: str
    log: Path

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stats(self) -> dict:
        return httpx.get(f"{self.base}/info", timeout=5).json()["stats"]


def start_server(model_dir: str, log: Path, *flags: str, timeout: float = 150) -> Server:
    """`python -m server.cli serve` on a free loopback port; returns once /health says 200."""
    port = free_port()
    argv = [sys.executable, "-m", "kvserve", "serve", "--model", model_dir, "--served-model-name", MODEL,
            "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *flags]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    statuses: list[tuple[int, str]] = []

    def healthy() -> bool:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{server.log_tail()}"
        try:
            r = httpx.get(f"{server.base}/health", timeout=2)
        except httpx.TransportError:
            return False
        statuses.append((r.status_code, r.json()["status"]))
        return r.status_code == 200

    if not wait_until(healthy, timeout, interval=0.2):
        stop_server(server)
        pytest.fail(f"server not healthy after {timeout} s:\n{server.log_tail()}")
    assert all(s == (503, "loading") for s in statuses[:-1]), statuses
    return server


@contextlib.contextmanager
def running_server(model_dir: str, log: Path, *flags: str) -> Iterator[Server]:
    """start_server for a `with` block (a module fixture's body): stopped however the block ends."""
    server = start_server(model_dir, log, *flags)
    try:
        yield server
    finally:
        stop_server(server)


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def sse_events(lines: Iterable[str]) -> tuple[list, list[str]]:
    """(parsed `data:` payloads, comment lines); `[DONE]` stays a string."""
    events, comments = [], []
    for line in lines:
        if line.startswith(":"):
            comments.append(line)
        elif line.startswith("data:"):
            payload = line[5:].strip()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events, comments


def stream(client: httpx.Client, path: str, body: dict) -> tuple[list, list[str]]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.iter_lines())


def raw_tokenizer(model_dir: str):
    """The model's own tokenizer.json through the `tokenizers` library (no torch in the test process)."""
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def byte_decoder(model_dir: str) -> Callable[[list[int]], str]:
    tok = raw_tokenizer(model_dir)
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


# fixtures

@pytest.fixture(scope="module")
def server(demo_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server-api") / "kvserve.log"
    with running_server(demo_model_dir, log, "--num-kv-blocks", "64", "--max-model-len", str(MAX_MODEL_LEN),
                        "--max-num-seqs", "8", "--log-level", "warning") as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.base, timeout=60) as c:
        yield c


def greedy_tgi(client: httpx.Client, inputs: str, n: int, **params) -> dict:
    body = {"inputs": inputs, "parameters": {"max_new_tokens": n, "details": True, **params}}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


# system routes

def test_health_info_metrics_models_openapi(client):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["served_model_name"] == MODEL and info["demo"] is True and "RANDOM" in info["note"]
    assert info["max_model_len"] == MAX_MODEL_LEN and info["kv_cache"]["num_blocks"] == 64
    assert info["model_dtype"] == "float32" and info["model_device_type"] == "cpu" and info["version"]
    assert info["limits"]["max_num_seqs"] == 8
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and 'kvserve_request_failure_total{model_name="demo"' in metrics.text
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in ("GenerateRequest", "GenerateParameters", "GenerateResponse", "StreamResponse",
                 "CompletionRequest", "ChatCompletionRequest", "ChatCompletionResponse",
                 "TGIErrorResponse", "OpenAIErrorResponse"):
        assert name in schemas, name
    assert {"/generate", "/generate_stream", "/", "/v1/completions", "/v1/chat/completions"} <= set(spec["paths"])


# TGI

def test_tgi_generate_details_and_compat_route(client):
    out = greedy_tgi(client, "Hello", 12, decoder_input_details=True)
    details = out["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 12
    assert details["seed"] is None  # greedy
    assert out["generated_text"] == "".join(t["text"] for t in details["tokens"])
    assert [p["text"] for p in details["prefill"]] == list("Hello")
    assert all(isinstance(t["logprob"], float) and t["logprob"] <= 0 for t in details["tokens"])
    plain = client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 12}}).json()
    assert plain == {"generated_text": out["generated_text"]}
    compat = client.post("/", json={"inputs": "Hello", "parameters": {"max_new_tokens": 12}}).json()
    assert compat == [plain]
    full = client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 12,
                                                                           "return_full_text": True}}).json()
    assert full["generated_text"] == "Hello" + out["generated_text"]


def test_tgi_logit_bias_steers_greedy_output(client, demo_model_dir):
    """kvserve's TGI extension, as OpenAI's logit_bias: +100 on one token makes greedy pick it."""
    target = raw_tokenizer(demo_model_dir).encode("Z", add_special_tokens=False).ids[0]
    out = client.post("/generate", json={"inputs": "Hello", "parameters": {
        "max_new_tokens": 4, "logit_bias": {str(target): 100}}}).json()
    assert out == {"generated_text": "ZZZZ"}


def test_tgi_sampling_reports_and_honours_seed(client):
    params = {"max_new_tokens": 10, "do_sample": True, "temperature": 0.9, "top_k": 50, "top_p": 0.95}
    first = greedy_tgi(client, "Seeded", 10, **params)
    seed = first["details"]["seed"]
    assert isinstance(seed, int)
    again = greedy_tgi(client, "Seeded", 10, **{**params, "seed": seed})
    assert again["generated_text"] == first["generated_text"] and again["details"]["seed"] == seed


def stream_async(base: str, requests: list[tuple[str, dict]]) -> list[list]:
    """Run several SSE requests at once; the parsed events of each."""
    async def one(client: httpx.AsyncClient, path: str, body: dict) -> list:
        async with client.stream("POST", path, json=body) as r:
            assert r.status_code == 200, await r.aread()
            return sse_events([line async for line in r.aiter_lines()])[0]

    async def main() -> list[list]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            return await asyncio.gather(*(one(client, path, body) for path, body in requests))

    return asyncio.run(main())


def test_tgi_stream_concatenates_to_generated_text(server, client, demo_model_dir):
    decode = byte_decoder(demo_model_dir)
    reference = greedy_tgi(client, "Stream me", 24)
    body = {"inputs": "Stream me", "parameters": {"max_new_tokens": 24}}
    routes = [("/generate_stream", body), ("/generate", {**body, "stream": True}), ("/", {**body, "stream": True})]
    for events in stream_async(server.base, routes):
        assert [e["index"] for e in events] == list(range(1, 25))
        assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
        last = events[-1]
        text = "".join(e["token"]["text"] for e in events)
        assert last["generated_text"] == text == reference["generated_text"]
        assert text == decode([e["token"]["id"] for e in events])
        assert last["details"] == {"finish_reason": "length", "generated_tokens": 24, "seed": None,
                                   "input_length": len("Stream me")}
        assert "[DONE]" not in events


def test_multibyte_utf8_never_breaks_mid_stream(server, client, demo_model_dir):
    """Random byte-level weights emit partial UTF-8: the streamed pieces must still add up to the exact
    decode of all ids, so no U+FFFD appears where a character was merely split across tokens."""
    decode = byte_decoder(demo_model_dir)
    bodies = [{"inputs": f"héllo wörld {seed} ✓", "parameters": {"max_new_tokens": 40, "do_sample": True,
                                                                  "seed": seed, "temperature": 1.0}}
              for seed in range(8)]
    texts = []
    for events in stream_async(server.base, [("/generate_stream", body) for body in bodies]):
        text = "".join(e["token"]["text"] for e in events)
        assert text == events[-1]["generated_text"] == decode([e["token"]["id"] for e in events])
        texts.append(text)
    assert any(ord(c) > 127 and c != "\ufffd" for text in texts for c in text), \
        "no multi-byte character was generated; the test did not exercise splitting"
    best = max(range(len(texts)), key=lambda i: sum(ord(c) > 127 and c != "\ufffd" for c in texts[i]))
    completion = {"prompt": bodies[best]["inputs"], "max_tokens": 40, "seed": best, "temperature": 1.0}
    chunks, _ = stream(client, "/v1/completions", {**completion, "stream": True})
    streamed = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    plain = client.post("/v1/completions", json=completion).json()
    assert streamed == plain["choices"][0]["text"]


def test_tgi_stop_sequence_is_included_and_ends_generation(client):
    reference = greedy_tgi(client, "Stop here", 32)["generated_text"]
    stop = next(reference[k:k + 2] for k in range(5, len(reference) - 1)
                if "\ufffd" not in reference[k:k + 2] and reference.find(reference[k:k + 2]) == k)
    out = greedy_tgi(client, "Stop here", 32, stop=[stop])
    text, details = out["generated_text"], out["details"]
    assert details["finish_reason"] == "stop_sequence"
    assert text == "".join(t["text"] for t in details["tokens"])
    assert stop in text and reference.startswith(text) and text.find(stop) == reference.find(stop)
    events, _ = stream(client, "/generate_stream", {"inputs": "Stop here",
                                                    "parameters": {"max_new_tokens": 32, "stop": [stop]}})
    assert events[-1]["generated_text"] == text and events[-1]["details"]["finish_reason"] == "stop_sequence"
    chat_like = client.post("/v1/completions", json={"prompt": "Stop here", "max_tokens": 32, "temperature": 0,
                                                     "stop": stop}).json()
    assert chat_like["choices"][0]["text"] == reference[:reference.find(stop)]
    assert chat_like["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("parameters, field", [
    ({"temperature": 0}, "parameters.temperature"),
    ({"typical_p": 0.5}, "parameters.typical_p"),
    ({"top_n_tokens": 21}, "parameters.top_n_tokens"),
    ({"best_of": 2}, "parameters.best_of"),
    ({"watermark": True}, "parameters.watermark"),
    ({"grammar": {"type": "regex", "value": "a(b"}}, "parameters.grammar"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "parameters.stop"),
    ({"no_such_knob": 1}, "parameters.no_such_knob"),
    ({"max_new_tokens": MAX_MODEL_LEN}, "parameters.max_new_tokens"),
])
def test_tgi_validation_errors_are_422_naming_the_field(client, parameters, field):
    r = client.post("/generate", json={"inputs": "x", "parameters": parameters})
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == "validation"
    assert field in body["error"]


def test_tgi_accepts_unsupported_fields_at_their_defaults_and_nulls(client):
    params = {"max_new_tokens": 2, "typical_p": None, "top_n_tokens": 0, "best_of": 1, "watermark": False,
              "grammar": None, "truncate": None, "adapter_id": None, "some_future_field": None}
    assert client.post("/generate", json={"inputs": "x", "parameters": params}).status_code == 200
    # what huggingface_hub's InferenceClient.text_generation sends to POST /: every field, unset ones null
    hub = {"inputs": "x", "stream": False, "parameters": {
        "max_new_tokens": 2, "details": True, "decoder_input_details": False, "do_sample": False, "stop": [],
        "return_full_text": False, "seed": None, "temperature": None, "top_k": None, "top_p": None,
        "repetition_penalty": None, "frequency_penalty": None, "typical_p": None, "truncate": None,
        "watermark": False, "best_of": None, "top_n_tokens": None, "grammar": None, "adapter_id": None}}
    r = client.post("/", json=hub)
    assert r.status_code == 200 and r.json()[0]["details"]["generated_tokens"] == 2
    nulls = {"inputs": "x", "stream": None, "parameters": {"max_new_tokens": 2, "stop": None, "details": None}}
    assert client.post("/generate", json=nulls).json().keys() == {"generated_text"}


def test_prompt_too_long_names_both_lengths(client):
    long = "a" * (MAX_MODEL_LEN + 10)
    r = client.post("/generate", json={"inputs": long})
    assert r.status_code == 422 and str(MAX_MODEL_LEN + 10) in r.json()["error"]
    assert str(MAX_MODEL_LEN - 1) in r.json()["error"]
    r = client.post("/v1/completions", json={"prompt": long})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "prompt" and error["code"] == "context_length_exceeded"
    assert str(MAX_MODEL_LEN + 10) in error["message"] and str(MAX_MODEL_LEN) in error["message"]
    truncated = client.post("/generate", json={"inputs": long, "parameters": {"truncate": 20, "max_new_tokens": 2,
                                                                             "details": True}})
    assert truncated.status_code == 200


def test_tgi_stream_refuses_decoder_input_details(client):
    r = client.post("/generate_stream", json={"inputs": "x", "parameters": {"decoder_input_details": True}})
    assert r.status_code == 422 and "decoder_input_details" in r.json()["error"]


# OpenAI

def test_completions_plain_and_streamed_agree(client, demo_model_dir):
    body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 12, "temperature": 0, "logprobs": 0}
    plain = client.post("/v1/completions", json=body).json()
    choice = plain["choices"][0]
    assert plain["object"] == "text_completion" and plain["model"] == MODEL
    assert choice["finish_reason"] == "length" and len(choice["logprobs"]["token_logprobs"]) == 12
    tokens = choice["logprobs"]["tokens"]   # each token's own text (U+FFFD in a piece of a character)
    if "\ufffd" not in "".join(tokens):
        assert "".join(tokens) == choice["text"]
    usage = plain["usage"]
    assert usage["completion_tokens"] == 12 and usage["total_tokens"] == usage["prompt_tokens"] + 12
    chunks, _ = stream(client, "/v1/completions", {**body, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    assert chunks[-1] == "[DONE]"
    usage_chunk, text_chunks = chunks[-2], chunks[:-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 12
    assert len({c["id"] for c in chunks[:-1]}) == 1
    assert all(c["usage"] is None for c in text_chunks)
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == choice["text"]
    ids = raw_tokenizer(demo_model_dir).encode("Once upon").ids
    token_prompt = client.post("/v1/completions", json={**body, "prompt": [ids]}).json()
    assert token_prompt["choices"][0]["text"] == choice["text"]


def test_completions_echo(client):
    body = {"prompt": "Echo me", "max_tokens": 4, "temperature": 0, "echo": True}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    chunks, _ = stream(client, "/v1/completions", {**body, "stream": True})
    assert text.startswith("Echo me") and "".join(c["choices"][0]["text"] for c in chunks[:-1]) == text


def test_chat_completions_plain_and_streamed(client):
    body = {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_completion_tokens": 16, "temperature": 0, "ignore_eos": True, "logprobs": True}
    plain = client.post("/v1/chat/completions", json=body).json()
    choice = plain["choices"][0]
    assert plain["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length" and len(choice["logprobs"]["content"]) == 16
    chunks, _ = stream(client, "/v1/chat/completions", {**body, "stream": True})
    assert chunks[-1] == "[DONE]" and all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["delta"] == {} and chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks[:-1])
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert content == choice["message"]["content"]


def test_cached_tokens_reported_on_repeated_prompt(client):
    body = {"prompt": "A shared prefix that spans several KV blocks of sixteen tokens each. " * 2,
            "max_tokens": 2, "temperature": 0}
    client.post("/v1/completions", json=body)
    usage = client.post("/v1/completions", json=body).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 16


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", {"prompt": "x", "n": 17}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": ["a", ""]}, 400, "prompt[1]"),
    ("/v1/completions", {"prompt": "x", "frobnicate": True}, 400, "frobnicate"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools[0]"),
])
def test_openai_errors_use_openai_shape(client, path, body, status, param):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]


def test_no_chat_template_is_a_400():
    from kvserve.server.errors import APIError
    from kvserve.server.inputs import chat_prompt
    from kvserve.server.schemas_openai import ChatCompletionRequest
    from kvserve.server.serving import ServerState

    class Engine:
        tokenizer = type("Tok", (), {"chat_template": None})()
        is_running = True

    state = ServerState(served_model_name=MODEL, engine=Engine())
    with pytest.raises(APIError) as err:
        asyncio.run(chat_prompt(state, ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])))
    assert err.value.status("openai") == 400 and err.value.param == "messages"


# concurrency and disconnects

def test_many_concurrent_streams_and_a_stalled_reader(server):
    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, str]:
        body = {"inputs": f"prompt {i}", "parameters": {"max_new_tokens": 12}}
        async with client.stream("POST", "/generate_stream", json=body) as r:
            events, _ = sse_events([line async for line in r.aiter_lines()])
        return "".join(e["token"]["text"] for e in events), events[-1]["generated_text"]

    async def main() -> None:
        async with httpx.AsyncClient(base_url=server.base, timeout=60) as client:
            stalled = {"inputs": "stalled", "parameters": {"max_new_tokens": 30, "ignore_eos": True}}
            async with client.stream("POST", "/generate_stream", json=stalled) as r:
                lines = r.aiter_lines()
                assert (await anext(lines)).startswith("data:")   # then stop reading for a while
                results = await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(8))), 60)
                assert all(a == b for a, b in results)
                rest, _ = sse_events([line async for line in lines])
                assert rest[-1]["details"]["generated_tokens"] == 30

    asyncio.run(main())


def test_a_client_whose_socket_fills_gets_every_chunk_in_order(server, client):
    """A client that reads nothing until its request has finished (some 290 kB of chunks wait in the
    sockets' buffers): other streams are served meanwhile, and then every chunk arrives once and in
    order, the same tokens as the answer without streaming. (On loopback the kernel takes all of it;
    a send that has to wait is test_direct_chunks_and_the_reader_s_chunks_go_out_in_order_...)"""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Once upon"}], "max_tokens": 200,
            "ignore_eos": True, "temperature": 0, "logprobs": True, "top_logprobs": 20}   # big chunks
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    request = json.dumps({**body, "stream": True}).encode()
    port = int(server.base.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # before connecting: a small window
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(request), request))
        assert wait_until(lambda: server.stats()["blocks_used"] == 0, 30)   # generated, mostly unread
        others, _ = stream(client, "/v1/chat/completions", {**body, "max_tokens": 8, "stream": True})
        assert others[-1] == "[DONE]"                                       # served meanwhile
        sock.settimeout(30)
        raw = b""
        while chunk := sock.recv(1 << 16):
            raw += chunk
    finally:
        sock.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    data = b""
    while True:                                  # undo the chunked transfer encoding
        size, _, payload = payload.partition(b"\r\n")
        if int(size, 16) == 0:
            break
        data, payload = data + payload[:int(size, 16)], payload[int(size, 16) + 2:]
    assert len(data) > 200_000
    events, _ = sse_events(data.decode().split("\n"))
    assert events[-1] == "[DONE]"
    choices = [e["choices"][0] for e in events[:-1] if e["choices"]]
    assert "".join(c["delta"].get("content") or "" for c in choices) == whole["message"]["content"]
    streamed = [t for c in choices if c.get("logprobs") for t in c["logprobs"]["content"]]
    expected = whole["logprobs"]["content"]
    # every token once, in order; logprobs to float32 rounding (the streamed prompt is a prefix-cache hit,
    # computed in other chunks than the first time, so near-ties among the top 20 may swap)
    assert [(t["token"], t["bytes"], len(t["top_logprobs"])) for t in streamed] == \
        [(t["token"], t["bytes"], len(t["top_logprobs"])) for t in expected]
    assert [t["logprob"] for t in streamed] == pytest.approx([t["logprob"] for t in expected], abs=1e-4)


def aborted_count(server: Server) -> float:
    text = httpx.get(f"{server.base}/metrics", timeout=5).text
    line = next(x for x in text.splitlines() if x.startswith("kvserve_request_failure_total") and "aborted" in x)
    return float(line.rsplit(" ", 1)[1])


def blocks_freed_within_a_second(server: Server) -> bool:
    return wait_until(lambda: server.stats()["blocks_used"] == 0 and server.stats()["requests_in_flight"] == 0, 1.0)


@pytest.mark.parametrize("path", ["/generate_stream", "/v1/completions"])
def test_streaming_disconnect_frees_blocks(server, path):
    assert wait_until(lambda: server.stats()["blocks_used"] == 0, 10)
    before = aborted_count(server)
    body = ({"inputs": "Long story", "parameters": {"max_new_tokens": 200, "ignore_eos": True}}
            if path == "/generate_stream" else
            {"prompt": "Long story", "max_tokens": 200, "ignore_eos": True, "stream": True})
    with httpx.Client(base_url=server.base, timeout=30) as client:
        with client.stream("POST", path, json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data:")
            assert wait_until(lambda: server.stats()["blocks_used"] > 0, 5)
    assert blocks_freed_within_a_second(server), server.stats()
    assert wait_until(lambda: aborted_count(server) == before + 1, 2)


def test_a_departure_aborts_the_requests_even_if_their_reader_misses_its_cancel():
    """A non-streamed request's client leaves: its requests are aborted, not left to run to the end,
    even when the reader swallows the cancel (Python 3.11's asyncio.wait_for can, when an output
    arrives at the same moment: the 4-output disconnect test below lost about 1 run in 8 to it)."""
    from types import SimpleNamespace

    from kvserve.server.serving import collect_outputs

    aborted = []

    async def outputs():
        while not aborted:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue       # the cancel is lost
            yield None

    class Departed:            # a request whose client leaves after 50 ms
        async def receive(self):
            await asyncio.sleep(0.05)
            return {"type": "http.disconnect"}

    async def main():
        return await collect_outputs(SimpleNamespace(draining=False), outputs(), Departed(),
                                     lambda: aborted.append(True))

    assert asyncio.run(asyncio.wait_for(main(), 5)) is None
    assert aborted


@pytest.mark.parametrize("stream", [True, False])
def test_a_disconnect_aborts_every_output_of_an_n_request(server, stream):
    """n outputs (and lists of prompts) are several engine requests: a client that goes away aborts all."""
    assert wait_until(lambda: server.stats()["blocks_used"] == 0, 10)
    before = aborted_count(server)
    # as long as MAX_MODEL_LEN allows; the client leaves after the first chunk, or after 0.1 s
    body = {"prompt": ["Long story", "Another one"], "n": 2, "max_tokens": MAX_MODEL_LEN - 16, "ignore_eos": True,
            "stream": stream}
    timeout = httpx.Timeout(30) if stream else httpx.Timeout(30, read=0.1)
    with httpx.Client(base_url=server.base, timeout=timeout) as client:
        if stream:
            with client.stream("POST", "/v1/completions", json=body) as r:
                assert next(r.iter_lines()).startswith("data:")
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/completions", json=body)
    assert blocks_freed_within_a_second(server), server.stats()
    assert wait_until(lambda: aborted_count(server) == before + 4, 2), (aborted_count(server), before)


def test_non_streaming_disconnect_frees_blocks(server):
    assert wait_until(lambda: server.stats()["blocks_used"] == 0, 10)
    # as long as MAX_MODEL_LEN allows (~0.3 s even on a fast CPU); the client gives up after 0.1 s
    body = {"prompt": "Never read", "max_tokens": MAX_MODEL_LEN - 16, "ignore_eos": True}
    with httpx.Client(base_url=server.base, timeout=httpx.Timeout(30, read=0.1)) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=body)
    assert server.stats()["generation_tokens"] > 0
    assert blocks_freed_within_a_second(server), server.stats()


def test_a_stream_interval_writes_fewer_larger_chunks_of_the_same_tokens(client, demo_model_dir, tmp_path):
    """--stream-interval 4: the same tokens and text as the default server (both APIs); OpenAI's chunks
    carry 4 tokens or more after the first, the rest with the end; TGI's events are still one per token.
    (That the first token goes at once is tests/test_streaming.py's.)"""
    completion = {"model": MODEL, "prompt": "Once upon", "max_tokens": 14, "temperature": 0, "ignore_eos": True,
                  "logprobs": 0, "stream": True}
    tgi = {"inputs": "Once upon", "parameters": {"max_new_tokens": 14, "details": True}}
    want, _ = stream(client, "/v1/completions", completion)
    want_tgi, _ = stream(client, "/generate_stream", tgi)
    with running_server(demo_model_dir, tmp_path / "kvserve.log", "--num-kv-blocks", "64", "--max-model-len",
                        str(MAX_MODEL_LEN), "--stream-interval", "4", "--log-level", "warning") as server, \
            httpx.Client(base_url=server.base, timeout=60) as c:
        got, _ = stream(c, "/v1/completions", completion)
        got_tgi, _ = stream(c, "/generate_stream", tgi)
    assert got[-1] == want[-1] == "[DONE]"

    def tokens(chunks):
        return [t for chunk in chunks[:-1] for t in chunk["choices"][0]["logprobs"]["tokens"]]
    assert tokens(got) == tokens(want) and len(tokens(got)) == 14
    assert "".join(ch["choices"][0]["text"] for ch in got[:-1]) == "".join(ch["choices"][0]["text"] for ch in want[:-1])
    sizes = [len(chunk["choices"][0]["logprobs"]["tokens"]) for chunk in got[:-1]]
    # at least 4 tokens a chunk but the first and the last (a reader that falls behind gets more at once)
    assert sum(sizes) == 14 and all(size >= 4 for size in sizes[1:-1]) and len(sizes) <= 5, sizes
    assert [e["token"]["id"] for e in got_tgi] == [e["token"]["id"] for e in want_tgi]
    assert got_tgi[-1]["generated_text"] == want_tgi[-1]["generated_text"]

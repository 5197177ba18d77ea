"""Log probabilities over HTTP, exactly: one entry per generated token, each equal to the
log-softmax of transformers' own forward pass (to 1e-3), with the most likely tokens at each
position when asked for: chat `logprobs` + `top_logprobs`, completions `logprobs` (an int), TGI
`top_n_tokens`; streaming and not; bounds refused naming the field."""
from __future__ import annotations

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_server_api import MODEL, running_server, sse_events


@pytest.fixture(scope="module")
def server(demo_model_dir, tmp_path_factory):
    with running_server(demo_model_dir, tmp_path_factory.mktemp("logprobs") / "server.log",
                        "--num-kv-blocks", "128") as s:
        yield s


@pytest.fixture(scope="module")
def reference(demo_model_dir):
    """fn(prompt ids, output ids) -> per output position, the log-softmax row [V] of transformers'
    forward pass; fn(prompt ids, n) -> the same for transformers' own n greedy tokens (and the ids)."""
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()

    def rows(prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + output_ids])).logits[0].float()
        return torch.log_softmax(logits, -1)[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(output_ids)]

    def greedy(prompt_ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        ids = out[0, len(prompt_ids):].tolist()
        return ids, rows(prompt_ids, ids)

    rows.greedy = greedy
    return rows


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    return AutoTokenizer.from_pretrained(demo_model_dir)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base}{path}", json=body, timeout=60)


def stream_chunks(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.base}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200
        events, _ = sse_events(r.iter_lines())
    return [e for e in events if e != "[DONE]"]


def completion_logprobs(server, body: dict, stream: bool) -> tuple[dict, str]:
    """A completion's logprobs and text; streamed, each chunk's logprobs lists joined."""
    if not stream:
        r = post(server, "/v1/completions", body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["logprobs"], r.json()["choices"][0]["text"]
    chunks = stream_chunks(server, "/v1/completions", {**body, "stream": True})
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0].get("logprobs")]
    logprobs = {k: [v for p in parts for v in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs",
                                                              "text_offset")}
    return logprobs, "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 10,
        "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 5}


def chat_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_one_entry_per_token_with_top_logprobs(server, reference, tokenizer, stream):
    if stream:
        chunks = stream_chunks(server, "/v1/chat/completions", {**CHAT, "stream": True})
        entries = [e for c in chunks for ch in c["choices"] if ch.get("logprobs") for e in ch["logprobs"]["content"]]
        content = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    else:
        r = post(server, "/v1/chat/completions", CHAT)
        assert r.status_code == 200, r.text
        entries = r.json()["choices"][0]["logprobs"]["content"]
        content = r.json()["choices"][0]["message"]["content"]
        assert len(entries) == r.json()["usage"]["completion_tokens"] == 10
    assert len(entries) == 10
    # exact bytes: the tokens' bytes concatenate to the content, even across pieces of a character
    # (a random-weight model writes invalid UTF-8 too: both sides replace it the same way)
    assert bytes(b for e in entries for b in e["bytes"]).decode("utf-8", errors="replace") == content
    ids, rows = reference.greedy(chat_ids(tokenizer, CHAT["messages"]), 10)
    assert [e["bytes"] for e in entries] == [list(tokenizer.decode([i]).encode()) if i < 0 else e["bytes"]
                                             for i, e in zip(ids, entries)]
    for i, entry in enumerate(entries):
        assert entry["logprob"] == pytest.approx(rows[i, ids[i]].item(), abs=1e-3)
        top = entry["top_logprobs"]
        assert len(top) == 5 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert [t["logprob"] for t in top] == pytest.approx(rows[i].topk(5).values.tolist(), abs=1e-3)
        assert top[0]["bytes"] == entry["bytes"]


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_int_gives_top_tokens(server, reference, tokenizer, stream):
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "logprobs": 3}
    logprobs, text = completion_logprobs(server, body, stream)
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 8
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    ids, rows = reference.greedy(tokenizer.encode(body["prompt"]), 8)
    for i, (lp, top) in enumerate(zip(logprobs["token_logprobs"], logprobs["top_logprobs"])):
        assert lp == pytest.approx(rows[i, ids[i]].item(), abs=1e-3)
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(lp, abs=1e-6)


@pytest.mark.parametrize("stream", [False, True])
def test_tgi_top_n_tokens(server, reference, tokenizer, stream):
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 6, "details": True, "top_n_tokens": 4,
                                                         "ignore_eos": True}}
    if stream:
        with httpx.stream("POST", f"{server.base}/generate_stream", json=body, timeout=60) as r:
            events, _ = sse_events(r.iter_lines())
        tokens = [e["token"] for e in events]
        tops = [e["top_tokens"] for e in events]
    else:
        r = post(server, "/generate", body)
        assert r.status_code == 200, r.text
        details = r.json()["details"]
        tokens, tops = details["tokens"], details["top_tokens"]
    assert len(tokens) == len(tops) == 6
    rows = reference(tokenizer.encode(body["inputs"]), [t["id"] for t in tokens])
    for i, (tok, top) in enumerate(zip(tokens, tops)):
        assert len(top) == 4 and top[0]["id"] == tok["id"]
        assert [t["logprob"] for t in top] == pytest.approx(rows[i].topk(4).values.tolist(), abs=1e-3)
        assert tok["logprob"] == pytest.approx(rows[i, tok["id"]].item(), abs=1e-3)


@pytest.mark.parametrize("path,body,status,field", [
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": -1}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "logprobs": False, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": "5"}, 400, "top_logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/generate", {"inputs": "hi", "parameters": {"top_n_tokens": 21}}, 422, "top_n_tokens"),
    ("/generate", {"inputs": "hi", "parameters": {"top_n_tokens": 1.5}}, 422, "top_n_tokens"),
])
def test_logprob_bounds_are_refused_naming_the_field(server, path, body, status, field):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    assert field in message or (isinstance(error, dict) and field in (error.get("param") or "")), r.text


def test_twenty_top_logprobs_at_the_bound(server):
    r = post(server, "/v1/chat/completions", {**CHAT, "top_logprobs": 20, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert all(len(e["top_logprobs"]) == 20 for e in r.json()["choices"][0]["logprobs"]["content"])


@pytest.mark.parametrize("stream", [False, True])
def test_completion_echo_with_logprobs_scores_the_prompt(server, reference, tokenizer, stream):
    """echo + logprobs (what evaluation harnesses send): the prompt's tokens come first, the first
    with a null logprob, each other equal to transformers' log-softmax, then the generated ones."""
    prompt = "The capital of France is Paris"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "logprobs": 2, "echo": True}
    logprobs, text = completion_logprobs(server, body, stream)
    prompt_ids = tokenizer.encode(prompt)
    n = len(prompt_ids)
    assert text.startswith(prompt) and len(logprobs["tokens"]) == n + 3
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    with torch.no_grad():
        rows = reference(prompt_ids[:1], prompt_ids[1:])
    for p in range(1, n):
        assert logprobs["token_logprobs"][p] == pytest.approx(rows[p - 1, prompt_ids[p]].item(), abs=1e-3)
        assert len(logprobs["top_logprobs"][p]) <= 2
    assert logprobs["text_offset"][:n] == sorted(logprobs["text_offset"][:n]) and logprobs["text_offset"][n] == len(
        prompt)


def test_tgi_decoder_input_details_carry_prompt_logprobs(server, reference, tokenizer):
    body = {"inputs": "Once upon a time there", "parameters": {"max_new_tokens": 2, "details": True,
                                                              "decoder_input_details": True}}
    r = post(server, "/generate", body)
    assert r.status_code == 200, r.text
    prefill = r.json()["details"]["prefill"]
    ids = [t["id"] for t in prefill]
    assert ids == tokenizer.encode(body["inputs"]) and prefill[0]["logprob"] is None
    rows = reference(ids[:1], ids[1:])
    assert [t["logprob"] for t in prefill[1:]] == pytest.approx([rows[p - 1, ids[p]].item()
                                                                  for p in range(1, len(ids))], abs=1e-3)


# the official clients, unchanged, against this server

def test_openai_client_logprobs_echo_and_model_retrieval(server, tokenizer):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 5
    assert all(len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == entry.logprob for entry in content)
    streamed = [c for c in client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=5,
                                                          temperature=0, logprobs=True, top_logprobs=3, stream=True)
                if c.choices and c.choices[0].logprobs]
    # (the second request hits the prefix cache: the same values to float rounding)
    assert [e.logprob for c in streamed for e in c.choices[0].logprobs.content] == pytest.approx(
        [e.logprob for e in content], abs=1e-4)
    completion = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, temperature=0,
                                           logprobs=2, echo=True)
    logprobs = completion.choices[0].logprobs
    n = len(tokenizer.encode("Hello there"))
    assert len(logprobs.tokens) == n + 3 and logprobs.token_logprobs[0] is None
    assert completion.choices[0].text.startswith("Hello there")
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=2, logprobs=True,
                                       top_logprobs=21)


def test_huggingface_hub_client_top_n_tokens_and_prompt_logprobs(server, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)   # a loopback server, not the hub
    client = hub.InferenceClient(base_url=server.base)
    out = client.text_generation("Once upon a time", max_new_tokens=3, details=True, top_n_tokens=2,
                                 decoder_input_details=True)
    assert len(out.details.top_tokens) == 3 and all(len(top) == 2 for top in out.details.top_tokens)
    assert out.details.prefill[0].logprob is None and all(t.logprob is not None for t in out.details.prefill[1:])
    events = list(client.text_generation("Once upon a time", max_new_tokens=3, stream=True, details=True,
                                         top_n_tokens=2))
    assert all(len(e.top_tokens) == 2 for e in events)

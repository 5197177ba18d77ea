"""Hostile input (issue 12): no request, however hostile, takes kvserve down, stalls other clients or
changes their outputs.

One real server (`kvserve serve` on the demo model). While bystander clients stream (a greedy TGI
/generate_stream, a greedy OpenAI chat stream and a seeded sampled /v1/completions stream, restarted
round after round), every hostile case below is sent once, CONCURRENCY at a time, streaming and not
(the module fixture `hostile_run` sends them all; each parametrized test then checks its own case,
so a failure names the input). After each one:

* the answer is never a 5xx nor a dropped connection: out-of-bounds input gets a 4xx in the API's
  shape (TGI 422 `{"error", "error_type"}`, OpenAI 400 `{"error": {"message", "type", "param",
  "code"}}`) that names the field at fault, in-bounds input gets a 200 with a whole answer;
* /health answers 200 and a fresh small request is served.

The last test compares every bystander round with an undisturbed round of the same requests: whole
(every token, a proper end), equal text, and no gap between two events over STALL_S. A failure
names the hostile cases that were in flight while the disturbed round ran.

Bodies are serialized with json.dumps, so NaN / Infinity go out as the raw JSON tokens `NaN` /
`Infinity` and lone surrogates as the escapes `"\\ud800"`.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from test_server_api import MODEL, running_server, sse_events

NAN, INF = float("nan"), float("inf")
U64 = 2**64
I64 = 2**63
STALL_S = 8.0                 # the longest a bystander may wait between two events (2 shared, saturated CPUs)
MAX_ERROR_BYTES = 16 * 1024   # a clear error names the problem; it does not echo a huge input back
BYSTANDER_TOKENS = 48
MAX_REQUEST_BYTES = 8 * 2**20
CONCURRENCY = 16            # hostile requests in flight at once
DROP = object()               # a field to remove from the base body


# ---------------------------------------------------------------------------------------------
# the cases

@dataclass(frozen=True)
class Case:
    id: str
    api: str                  # "tgi" (/generate, /generate_stream), "cmpl" (/v1/completions), "chat"
    body: Any                 # a JSON value (serialized with json.dumps) or raw bytes
    expect: str               # "ok" (200), "bad" (4xx naming `field`), "any" (< 500; a 4xx in shape)
    field: str | None = None  # what the error must name (in OpenAI's param or message, TGI's error)
    status: int | None = None # the exact 4xx when it is not the API's validation status
    content_type: str | None = "application/json"
    modes: tuple[str, ...] = ("plain", "stream")
    path: str | None = None   # a route other than the API's usual one


def merge(base: dict, fields: dict) -> dict:
    out = dict(base)
    for key, value in fields.items():
        if value is DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def tgi_body(params: dict | None = None, **top) -> dict:
    return merge({"inputs": "hello", "parameters": merge({"max_new_tokens": 2}, params or {})}, top)


def cmpl_body(**fields) -> dict:
    return merge({"model": MODEL, "prompt": "hello", "max_tokens": 2}, fields)


def chat_body(**fields) -> dict:
    return merge({"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}, fields)


def vid(value: Any) -> str:
    """A short readable id for a value."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**6:
        for name, ref in (("2**64", U64), ("2**63", I64)):
            for delta, suffix in ((-1, "-1"), (0, ""), (1, "+1")):
                if abs(value) == ref + delta:
                    return f"{name}{suffix}" if value > 0 else f"-({name}{suffix})"
        return f"{'-' if value < 0 else ''}10**{len(str(abs(value))) - 1}"
    if isinstance(value, float):
        return repr(value)
    text = json.dumps(value)
    if isinstance(value, (list, dict)) and len(text) > 40:
        text = f"{type(value).__name__}[{len(value)}]:{text[:44]}..."
    return text[:72]


def tgi_cases() -> list[Case]:
    cases: list[Case] = []

    def param(name: str, ok: list, bad: list, any_: list = (), extra: dict | None = None) -> None:
        """Each value goes out once, streaming or not in turn."""
        for expect, values in (("ok", ok), ("bad", bad), ("any", any_)):
            for i, value in enumerate(values):
                modes = (("plain",), ("stream",))[(i + len(cases)) % 2]
                cases.append(Case(f"{name}={vid(value)}", "tgi", tgi_body({**(extra or {}), name: value}), expect,
                                  field=None if expect == "ok" else name, modes=modes))

    numbers_bad = [NAN, INF, "hot", [1], True]
    param("temperature", [1e-50, 0.7, 1e300], [0, -0.0, -1e-50, -1, 10**400, *numbers_bad])
    param("top_k", [1, 50, 320, 321, 10**6], [0, -1, -U64, 1.5, NAN, "5"], any_=[U64, I64 - 1])
    param("top_p", [1e-50, 0.5, 0.999], [0, -0.5, 1.0, 1.0001, *numbers_bad])
    param("typical_p", [], [0, 0.5, 1.0, 1.5, NAN, INF, -1])   # (0, 1), and not supported by kvserve
    param("repetition_penalty", [1e-50, 1.0, 2.0, 1e300], [0, -1e-50, -1, *numbers_bad])
    param("frequency_penalty", [-2, 2, 0.5], [-2.0001, 2.0001, -U64, *numbers_bad])
    param("max_new_tokens", [1, 3], [0, -1, U64, -U64, 10**100, 1.5, "x", NAN, INF])
    param("seed", [0, 1, U64 - 1], [-1, U64, -U64, 10**100, 1.5, "x", NAN], extra={"do_sample": True})
    param("stop", [["a"], ["a", "b", "c", "d"], ["\n"], ["\u00e9\U0001f600"]],
          [["a"] * 5, ["a"] * 100_000, [""], ["\ud800"], ["ok", "\udfff"], [1, 2], "a", [None], [["a"]],
           ["x" * 100_000]])
    param("truncate", [1, 5, 10**6], [0, -1, -U64, 1.5, "x"], any_=[U64])
    param("do_sample", [True, False], ["x", 2, [1]])
    param("details", [True], ["x", 2])
    param("decoder_input_details", [], ["x"])
    param("return_full_text", [True], ["x"])
    param("best_of", [1], [2, 0, -1, 17, U64])
    param("best_of", [], [], any_=[2, 16], extra={"do_sample": True})    # streaming: refused
    param("top_n_tokens", [0, 20], [21, -1, U64])
    param("watermark", [False], [True])
    param("grammar", [{"type": "json", "value": {}}, {"type": "regex", "value": "[a-z]+"}],
          [{"type": "regex", "value": "a(b"}, {"type": "json", "value": 5}, {"type": "json", "value": "{"},
           {"type": "lark", "value": "x"}, {"type": "json", "value": {"$ref": "#/none"}}, "x"])
    param("adapter_id", [], ["x", "\ud800"])
    param("ignore_eos", [True], ["x"])
    param("logit_bias", [{"65": 100}, {}], [{"x": 1}, {"65": 100.5}, {"100000": 1}, {"5": NAN}, [1], "x"])
    param("unknown_knob", [], [1, "x", {"a": [1]}])
    cases.append(Case("decoder_input_details=true", "tgi", tgi_body({"decoder_input_details": True, "details": True}),
                      "ok", modes=("plain",)))
    cases.append(Case("decoder_input_details=true-stream", "tgi",
                      tgi_body({"decoder_input_details": True}), "bad", field="decoder_input_details",
                      modes=("stream",)))

    def top(name: str, body: Any, expect: str, fld: str | None = None, **kw) -> None:
        cases.append(Case(name, "tgi", body, expect, field=fld, **kw))

    # inputs
    top("inputs=lone-surrogate", tgi_body(inputs="\ud800"), "bad", "inputs")
    top("inputs=low-surrogate-inside", tgi_body(inputs="ab\udfffcd"), "bad", "inputs")
    top("inputs=empty", tgi_body(inputs=""), "bad", "inputs")
    top("inputs=null", tgi_body(inputs=None), "bad", "inputs")
    top("inputs=int", tgi_body(inputs=123), "bad", "inputs")
    top("inputs=list", tgi_body(inputs=["a", "b"]), "bad", "inputs")
    top("inputs=missing", tgi_body(inputs=DROP), "bad", "inputs")
    top("inputs=NUL-and-emoji", tgi_body(inputs="a\x00b\U0001f600\u200b"), "ok")
    top("inputs=3MiB", tgi_body(inputs="x" * (3 * 2**20)), "bad", "inputs", modes=("plain",))
    # the body itself
    top("parameters=string", tgi_body(parameters="x"), "bad", "parameters")
    top("parameters=list", tgi_body(parameters=[1]), "bad", "parameters")
    top("parameters=null", tgi_body(parameters=None), "ok")
    top("stream=5", tgi_body(stream=5), "bad", "stream", modes=("plain",))
    top("top-level-unknown-field", tgi_body(frobnicate=1), "any")
    top("body=[]", [], "bad")
    top("body=string", "hello", "bad")
    top("body=null", None, "bad")
    top("body=1", 1, "bad")
    top("body={}", {}, "bad", "inputs")
    raw_cases(cases, ("tgi",))
    # the compatibility route POST /
    top("compat-route-temperature=NaN", tgi_body({"temperature": NAN}), "bad", "temperature", path="/",
        modes=("plain",))
    top("compat-route-ok", tgi_body(), "ok", path="/", modes=("plain",))
    return cases


def raw_cases(cases: list[Case], apis: tuple[str, ...]) -> None:
    """Bodies that are not a JSON object of the right shape, each to one of `apis` in turn (TGI's
    alternate between /generate and /generate_stream)."""
    turn = iter(range(10**6))

    def raw(name: str, body: bytes | dict, expect: str = "bad", fld: str | None = None, **kw) -> None:
        i = next(turn)
        api = apis[i % len(apis)]
        main = {"tgi": "inputs", "cmpl": "prompt", "chat": "messages"}[api]
        good = json.dumps({"tgi": tgi_body(), "cmpl": cmpl_body(), "chat": chat_body()}[api]).encode()
        if callable(body):
            body = body(good, main)
        modes = kw.pop("modes", (("plain",), ("stream",))[i // len(apis) % 2] if api == "tgi" else ("plain",))
        cases.append(Case(name, api, body, expect, field=fld, modes=modes, **kw))

    raw("raw=empty", b"")
    raw("raw=not-json", b"this is not json")
    raw("raw=truncated-json", lambda good, main: good[:-5])
    raw("raw=trailing-comma", lambda good, main: good[:-1] + b",}")
    raw("raw=invalid-utf8", lambda good, main: b'{"' + main.encode() + b'": "\xff\xfe\xc3(", "max_tokens": 2}')
    raw("raw=utf8-bom", lambda good, main: b"\xef\xbb\xbf" + good, "any")
    raw("raw=deep-nesting-top", b"[" * 100_000 + b"]" * 100_000)
    raw("raw=deep-nesting-field",
        lambda good, main: b'{"' + main.encode() + b'": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
    raw("raw=deep-nesting-unknown-field",
        lambda good, main: good[:-1] + b', "zz": ' + b'{"a":' * 20_000 + b"1" + b"}" * 20_000 + b"}")
    raw("raw=duplicate-keys", lambda good, main: good[:-1] + b", " + good[1:], "any")
    raw("raw=1e999-max-tokens", lambda good, main: good[:-1] + (
        b', "parameters": {"max_new_tokens": 1e999}}' if main == "inputs" else b', "max_tokens": 1e999}'), fld="max")
    raw("content-type=text/plain", lambda good, main: good, "any", content_type="text/plain")
    raw("content-type=missing", lambda good, main: good, "any", content_type=None)
    raw("content-type=form", b"inputs=hello&prompt=hello", "any", content_type="application/x-www-form-urlencoded")
    raw("content-type=json-latin1", lambda good, main: good, "any", content_type="application/json; charset=latin-1")
    for api in apis:   # each API family answers 413 in its own shape
        main = {"tgi": "inputs", "cmpl": "prompt", "chat": "messages"}[api]
        cases.append(Case("body=over-max-request-bytes", api,
                          b'{"' + main.encode() + b'": "' + b"x" * (MAX_REQUEST_BYTES + 2**20) + b'"}', "bad",
                          status=413, modes=("plain",)))


def openai_cases() -> list[Case]:
    cases: list[Case] = []

    def both(name: str, fields: dict, expect: str, fld: str | None = None, apis=("cmpl", "chat"), **kw) -> None:
        for api in apis:
            body = cmpl_body(**fields) if api == "cmpl" else chat_body(**fields)
            cases.append(Case(name, api, body, expect, field=fld, **kw))

    rotation = [("cmpl", "plain"), ("chat", "stream"), ("cmpl", "stream"), ("chat", "plain")]

    def param(name: str, ok: list, bad: list, any_: list = (), extra: dict | None = None, apis=("cmpl", "chat")):
        """Each value goes to one endpoint and mode, in turn, so every field meets both APIs (where it
        applies) and both modes."""
        turns = [(api, mode) for api, mode in rotation if api in apis]
        for expect, values in (("ok", ok), ("bad", bad), ("any", any_)):
            for i, value in enumerate(values):
                api, mode = turns[(i + len(cases)) % len(turns)]
                both(f"{name}={vid(value)}", {**(extra or {}), name: value}, expect,
                     None if expect == "ok" else name, apis=(api,), modes=(mode,))

    numbers_bad = [NAN, INF, -INF, "hot", {"a": 1}]
    param("temperature", [0, 2, 1e-50, 1.0], [-0.0001, -1e-50, 2.0001, 10**400, U64, *numbers_bad])
    param("top_p", [1, 1e-50, 0.5], [0, -0.1, 1.0001, *numbers_bad])
    param("presence_penalty", [-2, 2], [-2.0001, 2.0001, U64, *numbers_bad])
    param("frequency_penalty", [-2, 2], [-2.0001, 2.0001, -U64, *numbers_bad])
    param("logit_bias", [{"0": 100}, {"260": -100}, {"5": 0.5, "6": -0.5}, {}],
          [{"-1": 1}, {"100000": 1}, {str(U64): 1}, {"abc": 1}, {"1.5": 1}, {"": 1}, {"5": 100.5},
           {"5": -100.0001}, {"5": NAN}, {"5": INF}, {"5": "x"}, {"5": None}, {"5": [1]},
           {str(i): 1 for i in range(1025)}, [1, 2], "x", {"\ud800": 1}])
    param("seed", [0, I64 - 1, -I64], [I64, U64, -I64 - 1, -U64, 10**100, 1.5, "x", NAN],
          extra={"temperature": 1.0})
    param("stop", [["\n"], "x", ["a", "b", "c", "d"]],
          [["a"] * 100_000, [""], "", ["\ud800"], "\ud800", ["ok", "\udfff"], 5, [1], [None], ["x" * 100_000]])
    param("stop_token_ids", [[5], [0, 260]], [[-1], [-U64], [U64], [10**6], [1.5], ["5"], list(range(100_000)),
                                               5, [None]])
    param("top_k", [-1, 0, 1, 320, 10**6], [-2, -U64, 1.5, "x", NAN], any_=[U64, I64 - 1])
    param("min_p", [0, 1, 0.5], [-0.1, 1.1, *numbers_bad])
    param("repetition_penalty", [1e-50, 2.0, 1e300], [0, -1, *numbers_bad])
    param("min_tokens", [0, 2], [-1, -U64, U64, 3, 1.5, "x"])
    param("n", [1, 2, 16], [17, 0, -1, U64, "x"])
    param("max_tokens", [1], [0, -1, U64, -U64, 10**100, 1.5, "x", NAN, INF])
    param("max_completion_tokens", [1], [0, -1, U64, -U64, "x"], apis=("chat",))
    param("model", [MODEL], ["\ud800", "no-such-model", 5, ["demo"]])
    param("user", ["someone", None], ["\ud800", 5])
    param("ignore_eos", [True], ["x", 3])
    param("skip_special_tokens", [False], ["x"])
    param("include_stop_str_in_output", [True], ["x"])
    param("unknown_knob", [], [1, "x", {"a": [1]}, NAN])
    # harmless fields OpenAI clients send: accepted and ignored
    param("metadata", [{"k": "v"}], [])
    param("store", [False], [])
    param("parallel_tool_calls", [True, False], [], apis=("chat",))
    # completions only
    param("echo", [True], ["x"], apis=("cmpl",))
    param("suffix", [], ["x", "\ud800"], apis=("cmpl",))
    param("best_of", [1], [0, 17, U64], any_=[2, 16], apis=("cmpl",))
    param("logprobs", [0, 20], [21, -1, U64, "x"], apis=("cmpl",))
    param("prompt", [[1, 2, 3], [319], ["hello"], [[1, 2]], "\u00e9\U0001f600\x00", ["a", "b"], [[1], [2]]],
          ["\ud800", "a\udfffb", ["\ud800"], "", [], [-1], [-U64], [U64], [320], [10**6], [1.5], [None],
           {}, None, 5, True, "x" * (3 * 2**20)], apis=("cmpl",))
    # chat only
    param("logprobs", [True], ["x", 5], apis=("chat",))
    param("top_logprobs", [0], [21, -1, U64], apis=("chat",))
    param("tools", [[]], [[{"type": "function", "function": {"name": "f", "parameters": {}}}], "x"], apis=("chat",))
    param("tool_choice", ["none"], ["auto", {"type": "function"}], apis=("chat",))
    param("response_format", [{"type": "text"}, {"type": "json_object"}],
          [{"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/none"}}},
           {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(("}}}, {"type": 5}, "x"])
    param("add_generation_prompt", [False], ["x"], apis=("chat",))
    param("chat_template", [], ["{{ 'injected' }}", "{% for x in range(10**9) %}{% endfor %}",
                                "{{ ''.__class__.__mro__[1].__subclasses__() }}", 5], apis=("chat",))
    both("chat_template_kwargs.chat_template", {"chat_template_kwargs": {"chat_template": "{{ 'injected' }}"}},
         "bad", "chat_template", apis=("chat",))
    both("chat_template_kwargs.tokenize", {"chat_template_kwargs": {"tokenize": True}}, "bad", "tokenize",
         apis=("chat",))
    both("chat_template_kwargs=string", {"chat_template_kwargs": "x"}, "bad", "chat_template_kwargs",
         apis=("chat",))
    msg = {"role": "user", "content": "hello"}
    param("messages", [[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                       [{"role": "system", "content": "s"}, msg, {"role": "assistant", "content": "a"}, msg],
                       [{"role": "user", "content": "hi", "name": "bob"}]],
          [[], "hello", None, [{"content": "hi"}], [{"role": 5, "content": "hi"}],
           [{"role": "user", "content": "\ud800"}], [{"role": "\ud800", "content": "hi"}],
           [{"role": "user", "content": "hi", "name": "\ud800"}],
           [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}],
           [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
           [{"role": "user", "content": 5}], [msg] * 10_000,
           [{"role": "user", "content": "x" * (3 * 2**20)}]],
          apis=("chat",))
    # streaming options
    both("stream_options-without-stream", {"stream_options": {"include_usage": True}}, "bad", "stream_options",
         modes=("plain",))
    both("stream_options.include_usage=x", {"stream_options": {"include_usage": "x"}}, "bad", "include_usage",
         modes=("stream",))
    both("stream_options=string", {"stream_options": "x"}, "bad", "stream_options", modes=("stream",))
    both("stream_options.unknown", {"stream_options": {"include_usage": True, "zz": 1}}, "any",
         modes=("stream",))
    both("stream=5", {"stream": 5}, "bad", "stream", modes=("plain",))
    for api in ("cmpl", "chat"):
        for name, body in (("body=[]", []), ("body=string", "hello"), ("body=null", None), ("body=1", 1)):
            cases.append(Case(name, api, body, "bad", modes=("plain",)))
        cases.append(Case("body={}", api, {}, "bad", field="prompt" if api == "cmpl" else "messages",
                          modes=("plain",)))
    raw_cases(cases, ("cmpl", "chat"))
    return cases


def expand(cases: list[Case]) -> list[tuple[Case, str]]:
    out = []
    for case in cases:
        for mode in case.modes:
            out.append(pytest.param(case, mode, id=f"{case.api}-{case.id}-{mode}"))
    return out


CASES = expand(tgi_cases() + openai_cases())


# ---------------------------------------------------------------------------------------------
# the server and the bystanders

@pytest.fixture(scope="module")
def server(demo_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server-hostile") / "kvserve.log"
    with running_server(demo_model_dir, log, "--num-kv-blocks", "512", "--max-num-seqs", "32",
                        "--log-level", "warning") as s:
        yield s


BYSTANDERS: list[tuple[str, str, dict]] = [
    ("tgi-greedy", "/generate_stream",
     {"inputs": "The bystander", "parameters": {"max_new_tokens": BYSTANDER_TOKENS, "ignore_eos": True}}),
    ("chat-greedy", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "a bystander"}], "max_tokens": BYSTANDER_TOKENS,
      "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}),
    ("cmpl-seeded", "/v1/completions",
     {"model": MODEL, "prompt": "seeded bystander", "max_tokens": BYSTANDER_TOKENS, "temperature": 0.9,
      "top_p": 0.95, "seed": 1234, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}),
]


async def bystander(client: httpx.AsyncClient, name: str, path: str, body: dict) -> dict:
    """One stream: its text, whether it is whole, its longest gap between events, or what went wrong."""
    events, times, problem = [], [], None
    began = time.monotonic()
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return {"name": name, "problem": f"status {r.status_code}: {(await r.aread())[:300]!r}"}
            lines = []
            async for line in r.aiter_lines():
                lines.append(line)
                if line.startswith("data:"):
                    times.append(time.monotonic())
            events, _ = sse_events(lines)
    except (httpx.HTTPError, ValueError) as exc:
        return {"name": name, "problem": f"{type(exc).__name__}: {exc}"}
    stamps = [began, *times]
    gap, window = max(((b - a, (a, b)) for a, b in zip(stamps, stamps[1:])), default=(0.0, (began, began)))
    text, whole = None, False
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    if errors:
        problem = f"error event {errors[0]}"
    elif path == "/generate_stream":
        last = events[-1] if events else {}
        tokens = [e["token"]["text"] for e in events]
        whole = (len(events) == BYSTANDER_TOKENS and last.get("details", {}).get("finish_reason") == "length"
                 and last.get("generated_text") == "".join(tokens))
        text = "".join(tokens)
    else:
        chunks = [e for e in events if isinstance(e, dict)]
        pieces = [c["choices"][0].get("delta", {}).get("content") or c["choices"][0].get("text") or ""
                  for c in chunks if c.get("choices")]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")
                  and c["choices"][0].get("finish_reason")]
        usage = [c["usage"] for c in chunks if c.get("usage")]
        whole = (events[-1:] == ["[DONE]"] and finish == ["length"] and len(usage) == 1
                 and usage[0]["completion_tokens"] == BYSTANDER_TOKENS)
        text = "".join(pieces)
    if problem is None and not whole:
        problem = f"not whole: last events {events[-2:]}"
    return {"name": name, "text": text, "gap": gap, "window": window, "problem": problem}


@dataclass
class Outcome:
    """What one hostile request got, and whether the server kept serving right after it."""
    status: int | None = None
    raw: bytes = b""
    content_type: str = ""
    transport_error: str | None = None
    span: tuple[float, float] = (0.0, 0.0)             # monotonic start and end of the hostile request
    after: list[str] = field(default_factory=list)    # what was wrong just after it (health, fresh request)


@dataclass
class Run:
    outcomes: dict[str, Outcome]
    reference: list[dict]
    rounds: list[tuple[list[dict], list[str]]]   # bystander results, hostile cases in flight meanwhile
    seconds: float




def request_of(case: Case, mode: str) -> tuple[str, bytes, dict]:
    stream = mode == "stream"
    if case.api == "tgi":
        path = case.path or ("/generate_stream" if stream else "/generate")
    else:
        path = case.path or ("/v1/completions" if case.api == "cmpl" else "/v1/chat/completions")
    body = case.body
    if not isinstance(body, bytes):
        if case.api != "tgi" and isinstance(body, dict) and stream:
            body = merge(body, {"stream": True})
        elif case.path == "/" and isinstance(body, dict) and stream:
            body = merge(body, {"stream": True})
        body = json.dumps(body).encode()   # NaN / Infinity tokens, \ud800 escapes, huge ints verbatim
    headers = {"content-type": case.content_type} if case.content_type else {}
    return path, body, headers


def check_error_shape(case: Case, status: int, raw: bytes) -> str:
    """The 4xx body is the API's error shape; returns the text that must name the field."""
    assert len(raw) <= MAX_ERROR_BYTES, f"a {len(raw)}-byte error body (echoes the input?): {raw[:300]!r}"
    try:
        body = json.loads(raw)
    except ValueError:
        pytest.fail(f"status {status} with a body that is not JSON: {raw[:300]!r}")
    if case.api == "tgi":
        assert isinstance(body, dict) and set(body) == {"error", "error_type"}, body
        assert isinstance(body["error"], str) and body["error"].strip(), body
        assert isinstance(body["error_type"], str), body
        return body["error"]
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert isinstance(error["type"], str), error
    assert error["param"] is None or isinstance(error["param"], str), error
    return f"{error['param'] or ''} {error['message']}"


def check_ok(case: Case, mode: str, raw: bytes, content_type: str) -> None:
    if mode == "stream":
        assert content_type.startswith("text/event-stream"), content_type
        events, _ = sse_events(raw.decode().splitlines())
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        assert not errors, f"an in-bounds request streamed an error: {errors}"
        if case.api == "tgi":
            assert events and events[-1]["generated_text"] is not None and events[-1]["details"], events[-1:]
            assert events[-1]["generated_text"].endswith("".join(e["token"]["text"] for e in events)), events
        else:
            assert events[-1] == "[DONE]", events[-2:]
            finish = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in events[:-1]
                      if c["choices"] and c["choices"][0]["finish_reason"]]
            indices = {c["choices"][0]["index"] for c in events[:-1] if c["choices"]}
            # one finish per choice (n > 1 and lists of prompts answer several)
            assert sorted(i for i, _ in finish) == sorted(indices), events
            assert all(reason in ("stop", "length") for _, reason in finish), events
        return
    body = json.loads(raw)
    if case.api == "tgi":
        if case.path == "/":
            assert isinstance(body, list) and len(body) == 1, body
            body = body[0]
        assert isinstance(body.get("generated_text"), str), body
    elif case.api == "cmpl":
        assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str), body
        assert body["choices"][0]["finish_reason"] in ("stop", "length"), body
    else:
        assert body["object"] == "chat.completion", body
        assert isinstance(body["choices"][0]["message"]["content"], str), body
        assert body["choices"][0]["finish_reason"] in ("stop", "length"), body


async def serving_after(client: httpx.AsyncClient, case: Case) -> list[str]:
    """/health says 200 and a fresh small request of the same API is served."""
    problems = []
    try:
        health = await client.get("/health")
        if health.status_code != 200:
            problems.append(f"/health answers {health.status_code}: {health.text[:200]}")
        if case.api == "tgi":
            fresh = await client.post("/generate", json={"inputs": "fresh", "parameters": {"max_new_tokens": 1}})
            ok = fresh.status_code == 200 and isinstance(fresh.json().get("generated_text"), str)
        else:
            fresh = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "fresh"}],
                                                                    "max_tokens": 1})
            ok = fresh.status_code == 200 and bool(fresh.json()["choices"][0]["finish_reason"])
        if not ok:
            problems.append(f"a fresh request got {fresh.status_code}: {fresh.text[:200]}")
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        problems.append(f"a fresh request failed: {exc!r}")
    return problems


async def send(base: str, case: Case, mode: str, checker: httpx.AsyncClient) -> Outcome:
    path, content, headers = request_of(case, mode)
    outcome = Outcome()
    began = time.monotonic()
    # a client of its own: the server may close the connection after an error
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        try:
            async with client.stream("POST", path, content=content, headers=headers) as r:
                outcome.status, outcome.content_type = r.status_code, r.headers.get("content-type", "")
                outcome.raw = await r.aread()
        except httpx.HTTPError as exc:
            outcome.transport_error = repr(exc)
    outcome.span = (began, time.monotonic())
    outcome.after = await serving_after(checker, case)
    return outcome


async def run_all(base: str, selected: list[tuple[str, Case, str]]) -> Run:
    """Every selected case, CONCURRENCY at a time, while the bystanders stream round after round."""
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        for _ in range(2):   # the first round warms the server up; the second is the reference
            reference = list(await asyncio.gather(*(bystander(client, *b) for b in BYSTANDERS)))
    began = time.monotonic()
    in_flight: dict[str, None] = {}
    seen: dict[str, None] = {}
    rounds: list[tuple[list[dict], list[str]]] = []
    done = asyncio.Event()
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(name: str, case: Case, mode: str) -> tuple[str, Outcome]:
        async with limit:
            in_flight[name] = None
            seen[name] = None
            try:
                return name, await send(base, case, mode, checker)
            finally:
                del in_flight[name]

    async def keep_streaming() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            while not done.is_set():
                seen.clear()
                seen.update(in_flight)
                results = await asyncio.gather(*(bystander(client, *b) for b in BYSTANDERS))
                rounds.append((list(results), list(seen)))

    streaming = asyncio.create_task(keep_streaming())
    await asyncio.sleep(0.05)
    async with httpx.AsyncClient(base_url=base, timeout=120) as checker:   # benign requests share a pool
        outcomes = dict(await asyncio.gather(*(one(*selection) for selection in selected)))
    done.set()
    await streaming
    return Run(outcomes, reference, rounds, time.monotonic() - began)


@pytest.fixture(scope="module")
def hostile_run(server, request) -> Run:
    """Sends every hostile case selected in this session (all at once, see run_all), once."""
    selected = [(item.callspec.id, item.callspec.params["case"], item.callspec.params["mode"])
                for item in request.session.items
                if item.originalname == "test_hostile_request" and item.module is request.module]
    return asyncio.run(run_all(server.base, selected))


@pytest.mark.parametrize("case,mode", CASES)
def test_hostile_request(server, hostile_run, request, case: Case, mode: str):
    outcome = hostile_run.outcomes[request.node.callspec.id]
    status, raw = outcome.status, outcome.raw
    assert server.proc.poll() is None, f"the server exited with {server.proc.returncode}:\n{server.log_tail()}"
    assert outcome.transport_error is None, f"the connection failed instead of an answer: {outcome.transport_error}"
    assert status is not None and status < 500, f"{status}: {raw[:500]!r}"
    if case.expect == "ok":
        assert status == 200, f"an in-bounds request got {status}: {raw[:500]!r}"
        check_ok(case, mode, raw, outcome.content_type)
    elif case.expect == "bad" or status != 200:
        assert 400 <= status < 500, f"an out-of-bounds request got {status}: {raw[:300]!r}"
        named = check_error_shape(case, status, raw)
        if case.status is not None:
            assert status == case.status, f"expected {case.status}, got {status}: {raw[:300]!r}"
        elif case.field == "model" and case.api != "tgi":
            assert status in (400, 404), status
        elif case.api == "tgi" and isinstance(case.body, bytes):
            assert status in (400, 422), f"a malformed body gets 400 or 422, got {status}: {raw[:300]!r}"
        else:
            expected = 422 if case.api == "tgi" else 400
            assert status == expected, f"validation errors are {expected} here, got {status}: {raw[:300]!r}"
        if case.expect == "bad" and case.field:
            assert case.field in named, f"the error does not name {case.field!r}: {named[:300]!r}"
    assert not outcome.after, f"after this request the server did not serve: {outcome.after}"


def test_bystanders_were_not_disturbed(server, hostile_run):
    """Every round of the bystanders equals the undisturbed one: whole, same text, no stall."""
    for result in hostile_run.reference:
        assert result["problem"] is None, f"the undisturbed bystander run is not whole: {result}"
    assert hostile_run.rounds, "the bystanders never completed a round"
    reference = {r["name"]: r["text"] for r in hostile_run.reference}
    failures = []
    for results, during in hostile_run.rounds:
        for result in results:
            why = result["problem"]
            if why is None and result["text"] != reference[result["name"]]:
                why = f"text differs from the undisturbed run: {result['text']!r} != {reference[result['name']]!r}"
            if why is None and result["gap"] > STALL_S:
                low, high = result["window"]
                culprits = [name for name, o in hostile_run.outcomes.items() if o.span[0] < high and o.span[1] > low]
                why = f"stalled {result['gap']:.2f} s between two events"
                during = culprits   # the hostile requests in flight during that very gap
            if why:
                failures.append(f"{result['name']}: {why}\n    while in flight: {', '.join(during) or '(nothing)'}")
    total = len(hostile_run.rounds) * len(BYSTANDERS)
    assert not failures, f"{len(failures)} of {total} bystander streams were disturbed:\n" + "\n".join(failures[:20])

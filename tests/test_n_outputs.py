"""Several outputs per prompt: the prompt is prefilled once and its KV blocks are shared
copy-on-write by the n sequences (each computes only the last prompt token itself), each samples
independently, and greedy ones equal the single request's output."""
from __future__ import annotations

import pytest

from kvserve import LLMEngine, EngineConfig, SamplingParams

BLOCK = 16


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    return LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", num_kv_blocks=256,
                                  block_size=BLOCK, enable_prefix_caching=False))


def run_group(engine, prompt: list[int], params: list[SamplingParams], tag: str) -> tuple[dict, int, int]:
    """Outputs by index, the most blocks in use at once, and the prompt tokens computed."""
    ids = [f"{tag}-{i}" for i in range(len(params))]
    computed = engine.prompt_tokens
    for i, (rid, p) in enumerate(zip(ids, params)):
        engine.add_request(prompt, p, rid, parent_request_id=ids[0] if i else None)
    outs, peak = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(out.request_id, []).extend(out.new_tokens)
        peak = max(peak, engine.stats().blocks_used)
    return {i: [t.id for t in outs[rid]] for i, rid in enumerate(ids)}, peak, engine.prompt_tokens - computed


def test_n8_long_prompt_allocates_its_blocks_once(engine):
    prompt = [(7 * i) % 250 + 3 for i in range(200)]          # 12 full blocks and 8 tokens
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=i, ignore_eos=True) for i in range(8)]
    outs, peak, computed = run_group(engine, prompt, params, "n8")
    prompt_blocks = -(-200 // BLOCK)
    # the prompt's 13 blocks once, plus per sequence its own copy of the shared partial block (7 copies):
    # eight separate requests would hold 8 x 13 = 104 blocks for their prompts
    assert peak <= prompt_blocks + 7, peak
    assert computed == 200 + 7            # each fork computes only the last prompt token
    assert all(len(o) == 4 for o in outs.values())
    assert len({tuple(o) for o in outs.values()}) > 1      # independent draws


def test_forks_match_separate_requests(engine):
    prompt = [(5 * i) % 200 + 3 for i in range(40)]
    greedy = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)] * 4
    outs, _, _ = run_group(engine, prompt, greedy, "greedy")
    alone, _, _ = run_group(engine, prompt, greedy[:1], "alone")
    assert all(o == alone[0] for o in outs.values())
    seeded = [SamplingParams(max_tokens=12, temperature=1.0, seed=100 + i, ignore_eos=True) for i in range(4)]
    forked, _, _ = run_group(engine, prompt, seeded, "seeded")
    separate = {i: run_group(engine, prompt, [p], f"sep{i}")[0][0] for i, p in enumerate(seeded)}
    assert forked == separate                # each sequence samples as it would alone


@pytest.mark.parametrize("length", [17, 32, 33])   # the shared prefix ends inside a block, at its end, past it
def test_block_boundaries(engine, length):
    prompt = [(3 * i) % 200 + 3 for i in range(length)]
    greedy = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)] * 3
    outs, _, computed = run_group(engine, prompt, greedy, f"edge{length}")
    alone, _, _ = run_group(engine, prompt, greedy[:1], f"edge-alone{length}")
    assert all(o == alone[0] for o in outs.values()) and computed == length + 2


def test_an_aborted_parent_leaves_its_forks_to_run_alone(engine):
    prompt = [(11 * i) % 200 + 3 for i in range(64)]
    engine.add_request(prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), "p")
    engine.add_request(prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), "c",
                       parent_request_id="p")
    engine.abort("p")
    tokens = []
    while engine.has_unfinished():
        tokens += [t.id for out in engine.step() if out.request_id == "c" for t in out.new_tokens]
    alone, _, _ = run_group(engine, prompt, [SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)], "pa")
    assert tokens == alone[0]


def test_a_waiting_fork_holds_no_blocks_and_a_late_one_leaves_the_cache_intact(demo_model_dir):
    """With one sequence at a time, the fork waits while its parent runs to the end (holding no block
    meanwhile), then computes its prompt alone (prefix hits); the parent's cached blocks stay exact."""
    cached = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", num_kv_blocks=64,
                                    block_size=8, max_num_seqs=1))
    prompt = [(17 * i) % 200 + 3 for i in range(21)]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    cached.add_request(prompt, greedy, "parent")
    cached.add_request(prompt, greedy, "child", parent_request_id="parent")
    outs: dict[str, list[int]] = {}
    while cached.has_unfinished():
        for out in cached.step():
            outs.setdefault(out.request_id, []).extend(t.id for t in out.new_tokens)
        if "child" not in cached.kv.block_tables:
            assert cached.stats().blocks_used == len(cached.kv.block_tables.get("parent", []))
    assert outs["child"] == outs["parent"]
    follow = prompt + outs["parent"] + [5, 6, 7]          # a second turn over the parent's reply
    again, _, _ = run_group(cached, follow, [greedy], "follow")
    fresh = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", num_kv_blocks=64,
                                   block_size=8, enable_prefix_caching=False))
    assert again == run_group(fresh, follow, [greedy], "fresh")[0]


def test_a_fork_survives_preemption(demo_model_dir):
    small = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", num_kv_blocks=12,
                                   block_size=8, enable_prefix_caching=False, max_num_seqs=8))
    prompt = [(13 * i) % 200 + 3 for i in range(30)]
    greedy = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)] * 3
    outs, _, _ = run_group(small, prompt, greedy, "pre")
    assert small.scheduler.num_preemptions > 0
    alone, _, _ = run_group(small, prompt, greedy[:1], "pre-alone")
    assert all(o == alone[0] for o in outs.values())


# over HTTP: n, best_of, lists of prompts

@pytest.fixture(scope="module")
def server(demo_model_dir, tmp_path_factory):
    from test_server_api import running_server
    with running_server(demo_model_dir, tmp_path_factory.mktemp("n") / "server.log", "--num-kv-blocks", "256") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="none")


def streamed_texts(client, **kwargs) -> tuple[dict[int, str], dict[int, str], list]:
    """Texts and finish reasons by choice index of a streamed completion, and its chunks."""
    from test_server_api import MODEL
    chunks = list(client.completions.create(model=MODEL, stream=True, **kwargs))
    texts, finish = {}, {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                assert choice.index not in finish
                finish[choice.index] = choice.finish_reason
    return texts, finish, chunks


def test_completions_n_seeded_is_reproducible_and_streams_the_same(client):
    from test_server_api import MODEL
    kwargs = dict(prompt="Once upon a time", n=3, max_tokens=12, temperature=1.0, seed=42)
    first = client.completions.create(model=MODEL, **kwargs)
    again = client.completions.create(model=MODEL, **kwargs)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1
    single = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=1)
    assert first.usage.completion_tokens == 36 and first.usage.prompt_tokens == single.usage.prompt_tokens
    streamed, finish, chunks = streamed_texts(client, stream_options={"include_usage": True}, **kwargs)
    assert [streamed[i] for i in range(3)] == texts and set(finish) == {0, 1, 2}
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1 and usage[0].completion_tokens == 36 and not chunks[-1].choices


def test_chat_n_greedy_choices_equal_one_request(client):
    from test_server_api import MODEL
    messages = [{"role": "user", "content": "Tell me a story"}]
    one = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    many = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, n=4)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert all(c.message.content == one.choices[0].message.content for c in many.choices)
    assert many.usage.completion_tokens == 4 * one.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 n=2, stream=True))
    texts: dict[int, str] = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert texts == {0: one.choices[0].message.content, 1: one.choices[0].message.content}


def test_best_of_answers_the_likeliest(client):
    from test_server_api import MODEL
    kwargs = dict(prompt="The weather", max_tokens=8, temperature=1.0, seed=7, logprobs=0)
    all3 = client.completions.create(model=MODEL, n=3, **kwargs)
    best = max(all3.choices, key=lambda c: sum(c.logprobs.token_logprobs))
    picked = client.completions.create(model=MODEL, best_of=3, **kwargs)
    assert len(picked.choices) == 1 and picked.choices[0].text == best.text and picked.choices[0].index == 0
    assert picked.usage.completion_tokens == 24        # every generated token counts
    two = client.completions.create(model=MODEL, best_of=3, n=2, **kwargs)
    ranked = sorted(all3.choices, key=lambda c: -sum(c.logprobs.token_logprobs))[:2]
    assert [c.text for c in two.choices] == [c.text for c in ranked] and [c.index for c in two.choices] == [0, 1]


def test_streamed_echo_logprobs_of_every_choice(client):
    from test_server_api import MODEL
    kwargs = dict(prompt="Echo me", n=2, max_tokens=3, temperature=0, echo=True, logprobs=1)
    whole = client.completions.create(model=MODEL, **kwargs)
    chunks = list(client.completions.create(model=MODEL, stream=True, **kwargs))
    for index in (0, 1):
        first = next(c.choices[0] for c in chunks if c.choices and c.choices[0].index == index and c.choices[0].logprobs)
        assert first.logprobs.token_logprobs[0] is None and None not in first.logprobs.token_logprobs[1:]
        assert first.logprobs.token_logprobs[1:4] == pytest.approx(whole.choices[index].logprobs.token_logprobs[1:4])


def test_list_of_prompts(client):
    from test_server_api import MODEL
    prompts = ["alpha", "a longer second prompt", "3"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in prompts]
    many = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert [c.index for c in many.choices] == list(range(6))
    assert [c.text for c in many.choices] == [t for t in alone for _ in range(2)]
    streamed, finish, _ = streamed_texts(client, prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert [streamed[i] for i in range(6)] == [c.text for c in many.choices] and len(finish) == 6
    echoed = client.completions.create(model=MODEL, prompt=prompts[:2], max_tokens=2, temperature=0, echo=True)
    assert [c.text[:len(p)] for c, p in zip(echoed.choices, prompts[:2])] == prompts[:2]
    ids = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=3, temperature=0)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 5


@pytest.mark.parametrize("body,param,words", [
    ({"prompt": "x", "n": 2, "best_of": 1}, "best_of", "at least n"),
    ({"prompt": "x", "best_of": 2, "stream": True}, "best_of", "streaming"),
    ({"prompt": ["x"] * 65}, "prompt", "at most 64"),
    ({"prompt": ["x"] * 8, "n": 16}, "n", "at most 64"),
    ({"prompt": ["ok", ""]}, "prompt[1]", "empty"),
    ({"prompt": [[1, 2], [10**6]]}, "prompt[1]", "vocabulary"),
    ({"prompt": "x", "n": 17}, "n", ""),
])
def test_bad_n_and_prompts_are_400s(server, body, param, words):
    import httpx
    from test_server_api import MODEL
    r = httpx.post(f"{server.base}/v1/completions", json={"model": MODEL, "max_tokens": 2, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"], r.json()


def test_tgi_best_of(server, monkeypatch):
    import huggingface_hub as hub
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)   # a loopback server, not the hub
    client = hub.InferenceClient(base_url=server.base)
    out = client.text_generation("Once upon", max_new_tokens=6, best_of=3, do_sample=True, details=True,
                                 decoder_input_details=True)
    others = out.details.best_of_sequences
    assert len(others) == 2 and len({out.details.seed, *(o.seed for o in others)}) == 3
    totals = [sum(t.logprob for t in out.details.tokens)] + [sum(t.logprob for t in o.tokens) for o in others]
    assert totals == sorted(totals, reverse=True)             # the best answers, the others best first
    assert out.generated_text == "".join(t.text for t in out.details.tokens)
    assert all(o.prefill and o.prefill[0].logprob is None for o in others)
    plain = client.text_generation("Once upon", max_new_tokens=6, best_of=2, do_sample=True)
    assert isinstance(plain, str)


@pytest.mark.parametrize("parameters,path,words", [
    ({"best_of": 2}, "/generate", "needs sampling"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "/generate", "seed"),
    ({"best_of": 2, "do_sample": True}, "/generate_stream", "streaming"),
    ({"best_of": 17, "do_sample": True}, "/generate", ""),
])
def test_bad_tgi_best_of_is_a_422(server, parameters, path, words):
    import httpx
    r = httpx.post(f"{server.base}{path}", json={"inputs": "x", "parameters": {"max_new_tokens": 2, **parameters}},
                   timeout=60)
    assert r.status_code == 422 and "best_of" in r.json()["error"] and words in r.json()["error"], r.text

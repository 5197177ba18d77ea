"""No request can break the engine for others: hostile sampling values, a request that breaks the
forward or the sampler, duplicate ids, shutdown and death races (offline and async APIs)."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from kvserve import LLM, AsyncEngine, EngineConfig, EngineDeadError, InvalidRequestError, SamplingParams
from kvserve import sampler as sampler_module
from faults import poison_forward

PROMPTS = ["The quick brown fox", "Once upon a time there was", "abc", "0123456789" * 4]


@pytest.fixture(scope="module")
def llm(demo_model_dir):
    return LLM(demo_model_dir, block_size=8, num_kv_blocks=256, max_num_batched_tokens=32)


def greedy(n: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def undisturbed(llm):
    return [o.token_ids for o in llm.generate(PROMPTS, greedy())]


# Within every documented bound, yet each of these broke a step before: they must now sample.
EXTREME = [
    dict(temperature=1e-50), dict(temperature=2.0, top_p=1e-50), dict(temperature=1.0, repetition_penalty=1e-50),
    dict(temperature=1.0, repetition_penalty=1e50), dict(temperature=1.0, top_k=10**9),
    dict(temperature=1.0, seed=2**64 - 1), dict(temperature=1.0, seed=-2**63), dict(temperature=1.0, min_p=1.0),
    dict(temperature=0.7, presence_penalty=2.0, frequency_penalty=-2.0), dict(temperature=1e-4, top_k=1),
]


@pytest.mark.parametrize("extreme", EXTREME, ids=[str(e) for e in EXTREME])
def test_extreme_valid_values_sample_and_leave_others_alone(llm, undisturbed, extreme):
    hostile = SamplingParams(max_tokens=12, ignore_eos=True, **extreme)
    outs = llm.generate(PROMPTS + PROMPTS[:1], [greedy()] * len(PROMPTS) + [hostile])
    assert [o.token_ids for o in outs[:len(PROMPTS)]] == undisturbed
    assert len(outs[-1].token_ids) == 12 and outs[-1].error is None
    assert all(0 <= t < llm.engine.runner.vocab_size for t in outs[-1].token_ids)


@pytest.mark.parametrize("field,value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -1.0), ("top_p", 0.0),
    ("top_p", 1.5), ("top_p", float("nan")), ("top_k", -2), ("top_k", 1.5), ("min_p", 2.0),
    ("repetition_penalty", 0.0), ("repetition_penalty", float("inf")), ("presence_penalty", 3.0),
    ("frequency_penalty", float("-inf")), ("seed", 2**64), ("seed", -2**63 - 1), ("seed", "1"),
    ("max_tokens", 0), ("max_tokens", True), ("min_tokens", -(2**64)), ("min_tokens", 17),
    ("stop_token_ids", [-1]), ("stop_token_ids", [2**64]), ("stop_token_ids", list(range(2000))),
    ("stop_token_ids", ["1"]), ("stop", [""]), ("stop", ["x"] * 100), ("stop", ["x" * 5000]), ("stop", [1]),
])
def test_out_of_bounds_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{"max_tokens": 16, field: value})


def test_stop_token_ids_outside_the_vocabulary_are_refused(llm):
    vocab = llm.engine.runner.vocab_size
    with pytest.raises(InvalidRequestError, match="stop_token_ids: token id") as info:
        llm.engine.validate([5, 6], SamplingParams(stop_token_ids=[vocab]))
    assert info.value.param == "stop_token_ids"


def test_a_request_that_breaks_the_forward_fails_alone(llm, undisturbed, monkeypatch):
    used = {t for p in PROMPTS for t in llm.engine.encode(p)} | {t for ids in undisturbed for t in ids}
    poison = poison_forward(llm, monkeypatch, used)
    blocks_before = llm.engine.stats().blocks_used
    outs = llm.generate(PROMPTS[:2] + [[poison, 1, 2]] + PROMPTS[2:], [greedy()] * (len(PROMPTS) + 1))
    bad = outs.pop(2)
    assert bad.finished and bad.error and "cannot take this request" in bad.error and bad.finish_reason == "error"
    assert [o.token_ids for o in outs] == undisturbed
    assert llm.engine.stats().blocks_used == blocks_before
    monkeypatch.undo()
    assert [o.token_ids for o in llm.generate(PROMPTS, greedy())] == undisturbed   # and it keeps serving


def test_a_request_that_breaks_the_sampler_fails_alone_and_seeds_stay_exact(llm, monkeypatch):
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    expected = llm.generate(PROMPTS, [seeded] * len(PROMPTS))
    real = sampler_module.sample

    def fragile(logits, params, *args, **kwargs):
        if any(p.top_k == 13 for p in params):
            raise ValueError("this row cannot be sampled")
        return real(logits, params, *args, **kwargs)

    monkeypatch.setattr(sampler_module, "sample", fragile)
    bad = SamplingParams(max_tokens=10, temperature=1.0, top_k=13)
    outs = llm.generate(PROMPTS + ["x"], [seeded] * len(PROMPTS) + [bad])
    assert outs[-1].error and "cannot be sampled" in outs[-1].error
    assert [o.token_ids for o in outs[:-1]] == [o.token_ids for o in expected]


def test_a_fault_of_the_engine_is_not_blamed_on_requests(llm, monkeypatch):
    """When every row fails on its own too, the step's error is re-raised: the engine is at fault."""
    monkeypatch.setattr(llm.engine.runner, "execute", lambda step: (_ for _ in ()).throw(RuntimeError("broken")))
    for prompt in PROMPTS[:2]:
        llm.engine.add_request(prompt, greedy())
    with pytest.raises(RuntimeError, match="broken"):
        llm.engine.step()
    monkeypatch.undo()
    for request_id in list(llm.engine.requests):
        llm.engine.abort(request_id)


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def async_engine(demo_model_dir):
    engine = AsyncEngine(EngineConfig(model=demo_model_dir, num_kv_blocks=64, device="cpu"))
    engine.start()
    yield engine
    engine.shutdown()


async def collect(engine: AsyncEngine, prompt, params, request_id=None):
    return [out async for out in engine.generate(prompt, params, request_id=request_id)]


def test_a_duplicate_request_id_is_refused_and_the_first_caller_is_served(async_engine):
    async def scenario():
        stream = async_engine.generate("hello", greedy(40), request_id="same")
        outs = [await anext(stream)]       # the first request is running (no timing assumed)
        assert not outs[0].finished
        with pytest.raises(InvalidRequestError, match="already in use"):
            await collect(async_engine, "other", greedy(), request_id="same")
        outs += [out async for out in stream]
        assert outs[-1].finished and len(outs[-1].token_ids) == 40
    run(scenario())


def test_stats_never_wait_for_a_step(async_engine):
    """A scrape reads the snapshot the engine published: it answers while the engine lock is held."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with async_engine._lock:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(5)
    try:
        done = []
        reader = threading.Thread(target=lambda: done.append(async_engine.stats()))
        reader.start()
        reader.join(2)
        assert done and done[0].num_blocks == 64
    finally:
        release.set()
        thread.join()


def test_shutdown_answers_every_caller_including_those_still_in_the_pipe(demo_model_dir):
    """An engine process that no longer reads (stopped) still lets shutdown finish: it is killed
    after the timeout and every caller, whose adds never reached it, gets an error."""
    engine = AsyncEngine(EngineConfig(model=demo_model_dir, num_kv_blocks=64, device="cpu"))
    engine.start()

    async def scenario():
        os.kill(engine.pid, signal.SIGSTOP)
        callers = [asyncio.ensure_future(collect(engine, p, greedy())) for p in PROMPTS]
        await asyncio.sleep(0.1)
        began = time.monotonic()
        await asyncio.to_thread(engine.shutdown, 1.0)
        assert time.monotonic() - began < 8
        results = await asyncio.gather(*callers, return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) for r in results), results
        with pytest.raises(EngineDeadError):
            await collect(engine, "late", greedy())
    run(scenario())
    assert engine._proc.poll() is not None


def test_shutdown_aborts_what_runs(demo_model_dir):
    engine = AsyncEngine(EngineConfig(model=demo_model_dir, num_kv_blocks=64, device="cpu"))
    engine.start()

    async def scenario():
        callers = [asyncio.ensure_future(collect(engine, p, greedy(400))) for p in PROMPTS]
        await asyncio.sleep(0.5)
        await asyncio.to_thread(engine.shutdown)
        results = await asyncio.gather(*callers, return_exceptions=True)
        for result in results:   # taken in before the stop: aborted; still in the pipe: an error
            assert isinstance(result, EngineDeadError) or result[-1].finish_reason == "abort", result
    run(scenario())
    assert engine._proc.poll() == 0


def test_engine_death_fails_everyone_and_tells_its_listener(demo_model_dir):
    """The engine process killed mid-run (the OOM killer, a crash): every caller gets an error at
    once, new ones too, and the death listener runs once."""
    engine = AsyncEngine(EngineConfig(model=demo_model_dir, num_kv_blocks=64, device="cpu"))
    died = []
    engine.add_death_listener(died.append)
    engine.start()

    async def scenario():
        callers = [asyncio.ensure_future(collect(engine, p, greedy(400))) for p in PROMPTS]
        await asyncio.sleep(0.3)
        os.kill(engine.pid, signal.SIGKILL)
        results = await asyncio.gather(*callers, return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) for r in results), results
        with pytest.raises(EngineDeadError):
            await collect(engine, "late", greedy())
    run(scenario())
    deadline = time.monotonic() + 5     # the listener runs on the reader thread, after the callers were failed
    while not died and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(died) == 1 and "-9" in str(died[0]) and not engine.is_running
    engine.shutdown()


def test_logit_bias_steers_sampling_and_is_bounded(llm, undisturbed):
    target = undisturbed[0][0] + 1
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                  logit_bias={target: 100.0}))[0]
    assert out.token_ids == [target] * 4
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                  logit_bias={undisturbed[0][0]: -100.0}))[0]
    assert out.token_ids[0] != undisturbed[0][0]
    for bias in ({1: 101.0}, {1: float("nan")}, {-1: 1.0}, {"1": 1.0}, {i: 1.0 for i in range(2000)}):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bias)
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        llm.engine.validate([5], SamplingParams(logit_bias={llm.engine.runner.vocab_size: 1.0}))


def test_a_caller_whose_event_loop_closed_is_dropped_not_fatal(async_engine):
    """A caller that vanished with its event loop (closed without closing its generators) cannot
    take the engine down: its request is aborted, everyone else is served."""
    loop = asyncio.new_event_loop()
    gen = async_engine.generate(PROMPTS[0], greedy(200))
    loop.run_until_complete(gen.__anext__())
    loop.close()                          # the generator stays suspended, its stream registered
    deadline = time.monotonic() + 10
    while async_engine.num_unfinished() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert async_engine.num_unfinished() == 0 and async_engine.is_running
    outs = run(collect(async_engine, PROMPTS[1], greedy()))
    assert outs[-1].finished and outs[-1].finish_reason == "length"


def test_a_stream_ends_at_its_first_final_output():
    """An abort's final output can reach a stream before a step's older output for the same request
    (the reader thread hands a step over after releasing its lock): the stale one must not reopen it."""
    from kvserve import RequestOutput
    from kvserve.async_engine import _Stream

    async def scenario():
        stream = _Stream(asyncio.get_running_loop())
        stream.put(RequestOutput("r", [1], [], "", "", [], finished=True, finish_reason="abort"))
        stream.put(RequestOutput("r", [1], [], "x", "x", [5], finished=False))
        stream.put(EngineDeadError("late"))
        first = await stream.get()
        assert first.finished and first.finish_reason == "abort" and not stream.items
    run(scenario())


def test_a_death_listener_added_after_the_death_is_told_at_once(demo_model_dir):
    engine = AsyncEngine(EngineConfig(model=demo_model_dir, num_kv_blocks=64, device="cpu"))
    engine.start()
    os.kill(engine.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while engine.dead_error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    told = []
    engine.add_death_listener(told.append)
    assert len(told) == 1 and told[0] is engine.dead_error
    engine.shutdown()


def test_a_row_that_breaks_a_step_beside_graph_decodes_fails_alone(tiny_model_factory, monkeypatch):
    """The retry by halves of a step whose decodes replay CUDA graphs: each replay writes its logits
    into the graph's one output buffer, so the rows kept from an earlier half must be copies.
    (Graphs are not captured on CPU: run() here returns its buffer's rows, as a replay does.)"""
    pytest.importorskip("triton")
    import torch

    llm = LLM(tiny_model_factory("llama"), block_size=8, num_kv_blocks=64, attention_backend="triton",
              cuda_graphs=True, cuda_graph_max_batch=4)
    graphs = llm.engine.runner.graphs
    buffer = torch.empty(4, llm.engine.runner.vocab_size)
    run = graphs.run

    def replay_like(ids, *args):
        logits = run(ids, *args)
        buffer[:len(ids)] = logits
        return buffer[:len(ids)]

    monkeypatch.setattr(graphs, "run", replay_like)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    greedy6 = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(prompts, greedy6)]
    poison = poison_forward(llm, monkeypatch, {t for p in prompts for t in p} | {t for e in expected for t in e})
    engine = llm.engine
    got: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, greedy6, request_id=str(i))
    for _ in range(2):                      # the prefills, then decodes
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(t.id for t in out.new_tokens)
    engine.add_request([poison, 3, 4], greedy6, request_id="bad")   # a prefill beside three decodes
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(t.id for t in out.new_tokens)
            if out.request_id == "bad":
                assert out.finish_reason == "error"
    assert [got[str(i)] for i in range(3)] == expected

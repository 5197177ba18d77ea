"""Engine behaviour users rely on: seeded sampling, stops, limits, abort, the async interface."""
from __future__ import annotations

import asyncio

import pytest

from kvserve import LLM, AsyncEngine, EngineConfig, SamplingParams
from kvserve.detokenizer import IncrementalDetokenizer, StopStringMatcher
from kvserve.errors import InvalidRequestError, PromptTooLongError


@pytest.fixture(scope="module")
def llm(demo_model_dir):
    return LLM(demo_model_dir, block_size=8, num_kv_blocks=256, max_num_batched_tokens=64)


def test_seeded_sample_is_the_same_alone_and_in_a_busy_batch(llm):
    params = SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = llm.generate("Once upon a time", params)[0].token_ids
    noise = [SamplingParams(max_tokens=30 + i, temperature=0.8, ignore_eos=True) for i in range(6)]
    busy = llm.generate(["other prompt %d" % i for i in range(3)] + ["Once upon a time"]
                        + ["more traffic %d" % i for i in range(3)], noise[:3] + [params] + noise[3:])
    assert busy[3].token_ids == alone
    unseeded = [llm.generate("Once upon a time", SamplingParams(max_tokens=40, temperature=1.0,
                                                                 ignore_eos=True))[0].token_ids for _ in range(2)]
    assert unseeded[0] != unseeded[1] or unseeded[0] != alone


def test_penalties_and_min_p_change_sampling_but_stay_valid(llm):
    base = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    plain = llm.generate("abcabc", base)[0].token_ids
    penal = llm.generate("abcabc", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                   repetition_penalty=1.8, frequency_penalty=1.5))[0].token_ids
    assert plain != penal
    assert len(set(penal)) >= len(set(plain))
    # min_p = 1 and top_k = 1 keep only the most likely token: sampling becomes greedy
    for warp in (dict(min_p=1.0), dict(top_k=1), dict(top_p=1e-6)):
        out = llm.generate("abcabc", SamplingParams(max_tokens=30, temperature=1.5, ignore_eos=True, **warp))[0]
        assert out.token_ids == plain, warp


def test_logprobs_are_log_probabilities_of_chosen_tokens(llm):
    out = llm.engine
    rid = out.add_request("hello", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    tokens = []
    while out.has_unfinished():
        for o in out.step():
            tokens.extend(o.new_tokens)
    assert len(tokens) == 5 and all(t.logprob <= 0 for t in tokens)
    assert rid not in out.requests


def test_stop_string_across_token_boundaries(llm):
    free = llm.generate("The cat", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    text = free.text
    assert len(text) >= 8
    stop = text[3:6]          # the demo tokenizer is byte-level: this spans three tokens
    out = llm.generate("The cat", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)]
    kept = llm.generate("The cat", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop],
                                                  include_stop_str_in_output=True))[0]
    assert kept.text == text[:text.index(stop) + len(stop)]


def test_stop_token_ids_and_max_tokens(llm):
    free = llm.generate("xyz", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop_id = free.token_ids[4]
    out = llm.generate("xyz", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop_id]))[0]
    first = free.token_ids.index(stop_id)
    assert out.finish_reason == "stop_token" and out.token_ids == free.token_ids[:first + 1]


def test_eos_stops_unless_ignored(llm):
    eos = sorted(llm.engine.eos_token_ids)[0]
    # make EOS overwhelmingly likely by penalising nothing and forcing it through a stop id check
    out = llm.generate("hi", SamplingParams(max_tokens=64, temperature=0))[0]
    assert out.finish_reason in ("eos", "length")
    if out.finish_reason == "eos":
        assert out.token_ids[-1] in llm.engine.eos_token_ids
    ignored = llm.generate("hi", SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))[0]
    assert len(ignored.token_ids) == 64
    assert eos in llm.engine.eos_token_ids


def test_min_tokens_keeps_eos_and_stop_tokens_from_being_sampled(llm, monkeypatch):
    """Before min_tokens, EOS and stop_token_ids are masked out of the logits (as in vLLM and
    OpenAI): they are never produced, rather than produced and then ignored."""
    free = llm.generate("min tokens", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0].token_ids
    early = free[1]
    # the model "wants" to stop at its second token: make that token its EOS
    monkeypatch.setattr(llm.engine, "eos_token_ids", frozenset({early}))
    stopped = llm.generate("min tokens", SamplingParams(max_tokens=16, temperature=0))[0]
    assert stopped.finish_reason == "eos" and stopped.token_ids == free[:2]
    for params in (SamplingParams(max_tokens=16, temperature=0, min_tokens=6),
                   SamplingParams(max_tokens=16, temperature=0, min_tokens=6, ignore_eos=True, stop_token_ids=[early]),
                   SamplingParams(max_tokens=16, temperature=0.9, seed=3, min_tokens=6)):
        out = llm.generate("min tokens", params)[0]
        assert early not in out.token_ids[:6], (params, out.token_ids)
        assert len(out.token_ids) >= 6
        if out.finish_reason != "length":
            assert out.token_ids[-1] == early and early not in out.token_ids[:-1]


def test_prompt_longer_than_max_model_len_is_rejected_not_truncated(demo_model_dir):
    llm = LLM(demo_model_dir, num_kv_blocks=64, max_model_len=100)
    with pytest.raises(PromptTooLongError) as err:
        llm.generate([5] * 150, SamplingParams(max_tokens=4))
    assert "150" in str(err.value) and "100" in str(err.value)
    with pytest.raises(InvalidRequestError, match="max_model_len is 100"):
        llm.generate([5] * 90, SamplingParams(max_tokens=20))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([10**6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="larger than the model's maximum length"):
        LLM(demo_model_dir, max_model_len=10**6)


def test_abort_frees_blocks_at_once(llm):
    eng = llm.engine
    rid = eng.add_request("a long story " * 10, SamplingParams(max_tokens=200, ignore_eos=True))
    eng.step()
    assert eng.stats().blocks_used > 0
    out = eng.abort(rid)
    assert out.finished and out.finish_reason == "abort"
    assert eng.stats().blocks_used == 0 and not eng.has_unfinished()


def test_detokenizer_unknown_ids_and_multibyte(demo_model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    ids = tok.encode("héllo 你好 🙂", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, [], True)
    pieces = [det.add(i) for i in ids[:4]] + [det.add(len(tok) + 3)] + [det.add(i) for i in ids[4:]]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + det.flush() == "héllo 你好 🙂"
    m = StopStringMatcher(["END", "x"], include_in_output=False)
    assert m.check("abcEN", 1) is None and m.check("abcEND", 1) == (3, "END")
    assert m.releasable("abcEN") == 3


def test_async_engine_streams_aborts_and_reports(demo_model_dir):
    engine = AsyncEngine(EngineConfig(demo_model_dir, num_kv_blocks=128, block_size=8), max_waiting_requests=4)
    engine.start()
    steps = []
    engine.add_step_listener(steps.append)

    async def main():
        async def one(i):
            text, final = "", None
            async for out in engine.generate(f"prompt {i}", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)):
                text += out.new_text
                final = out
            return text, final

        results = await asyncio.gather(*(one(i) for i in range(4)))
        for text, final in results:
            assert final.finished and final.finish_reason == "length" and text == final.text
        gen = engine.generate("abort me", SamplingParams(max_tokens=500, ignore_eos=True))
        await gen.__anext__()
        await gen.aclose()                     # a client going away
        for _ in range(100):
            if engine.stats().blocks_used == 0 and engine.num_unfinished() == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().blocks_used == 0

    try:
        asyncio.run(main())
        assert engine.is_running and steps and steps[0].num_seqs >= 1
    finally:
        engine.shutdown()
    assert not engine.is_running


def test_async_engine_runs_the_model_in_its_own_process(demo_model_dir):
    """The engine core lives in a child process (its own GIL); this process only tokenizes,
    detokenizes and streams. Shutdown ends the child."""
    import os
    import threading

    engine = AsyncEngine(EngineConfig(model=demo_model_dir, block_size=8, num_kv_blocks=64))
    steps = []
    engine.add_step_listener(lambda stats: steps.append(threading.current_thread().name))
    engine.start()
    assert engine.pid != os.getpid() and engine._proc.poll() is None

    async def run():
        return [out async for out in engine.generate("process", SamplingParams(max_tokens=3, ignore_eos=True))]

    outs = asyncio.run(run())
    engine.shutdown()
    assert outs[-1].finished and len(outs[-1].token_ids) == 3
    assert steps and set(steps) == {"kvserve-engine-reader"}
    assert engine._proc.poll() == 0 and not engine.is_running


def test_presence_and_frequency_penalties_follow_openai():
    """logit[t] -= frequency * count(t in output) + presence * (t in output); the prompt is not counted."""
    import torch

    from kvserve.sampler import _apply_penalties
    row = torch.zeros(8)
    _apply_penalties(row, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [1, 3, 3, 3, 5, 9], 2)
    expected = torch.zeros(8)
    expected[3] -= 0.25 * 2 + 0.5
    expected[5] -= 0.25 + 0.5
    assert torch.equal(row, expected)


def test_a_kernel_compiled_while_serving_is_logged_and_counted(llm, monkeypatch, caplog):
    """Start-up compiles every kernel variant; one compiled later stalls everyone, so it is a warning
    and a counter (kvserve_kernel_late_compiles_total). Here the compile count is simulated."""
    compiles = iter(range(100, 200))
    monkeypatch.setattr(llm.engine, "_count_compiles", lambda: next(compiles))
    monkeypatch.setattr(llm.engine, "_compiles", 99)
    before = llm.engine.stats().late_compiles
    with caplog.at_level("WARNING", logger="kvserve"):
        llm.generate("late", SamplingParams(max_tokens=3, ignore_eos=True))
    assert llm.engine.stats().late_compiles == before + 3      # one per step: the prefill and two decodes
    assert "a kernel compiled while serving" in caplog.text


def test_a_slow_reader_gets_the_tokens_it_missed_merged_into_one_output(demo_model_dir):
    """Outputs the caller has not read yet merge: a reader that falls behind reads fewer outputs,
    each with several tokens, and ends with exactly the text and tokens of a prompt reader."""
    engine = AsyncEngine(EngineConfig(model=demo_model_dir, block_size=8, num_kv_blocks=128))
    engine.start()
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def read(delay: float):
        outs = []
        async for out in engine.generate("merge", params):
            outs.append(out)
            await asyncio.sleep(delay)
        return outs

    try:
        prompt_reader, slow_reader = asyncio.run(read(0)), asyncio.run(read(0.05))
    finally:
        engine.shutdown()
    for outs in (prompt_reader, slow_reader):
        assert [t.id for o in outs for t in o.new_tokens] == outs[-1].token_ids and len(outs[-1].token_ids) == 40
        assert "".join(o.new_text for o in outs) == outs[-1].text
    assert slow_reader[-1].token_ids == prompt_reader[-1].token_ids and slow_reader[-1].text == prompt_reader[-1].text
    assert len(slow_reader) < len(prompt_reader) and max(len(o.new_tokens) for o in slow_reader) > 1

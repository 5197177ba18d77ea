"""Async scheduling (`--async-scheduling`): step n+1 is scheduled while step n runs on the forward
thread, its pending tokens filled in once step n's are known. It changes when work happens, never
what comes out: every output equals the synchronous engine's, for every sampling feature, under
preemption, chunked prefill, prefix hits, aborts and a request that breaks the forward.
(Greedy equality with transformers is in test_engine_equivalence.py, test_async_scheduling.)"""
from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams, StructuredOutput
from faults import poison_forward

PROMPTS = ["The quick brown fox", "Once upon a time there was", "abc", "0123456789" * 4,
           "continuous batching interleaves prefill and decode", "a b c d e f g h i j k l m n o p"]


def _mixed_params() -> list[SamplingParams]:
    """One of each kind of request, several times over: each reads state the previous step wrote."""
    kinds = [
        dict(temperature=0, ignore_eos=True),
        dict(temperature=0.9, top_p=0.9, seed=1, top_logprobs=2),
        dict(temperature=0, repetition_penalty=1.3, min_tokens=6, stop_token_ids=[101, 105, 110, 115]),
        dict(temperature=1.0, seed=3, frequency_penalty=0.5, presence_penalty=0.3, stop=["e", "o "]),
        dict(temperature=0, prompt_logprobs=2, top_logprobs=1),
        dict(temperature=0.7, top_k=20, seed=5, logit_bias={100: 5.0, 101: -100.0}),
        dict(temperature=0, stop_token_ids=list(range(100, 140))),      # ends early, by a stop token
        dict(temperature=1.0, seed=7, structured=StructuredOutput("regex", r"[a-c]{3,6}-[0-9]{2}")),
        dict(temperature=0, ignore_eos=True, max_tokens=1),
        dict(temperature=0.8, seed=9, min_p=0.05, min_tokens=3),
    ]
    out = []
    for i in range(2 * len(kinds)):
        kind = dict(kinds[i % len(kinds)])
        kind.setdefault("max_tokens", 8 + 5 * (i % 4))
        out.append(SamplingParams(**kind))
    return out


def _summary(out) -> tuple:
    """Ids, text and endings exactly; logprobs to 1e-4 (a row's float32 sums may differ in the last
    bits between batches of different shapes, in either mode)."""
    def approx(value):
        return pytest.approx(value, abs=1e-4) if isinstance(value, float) else value

    tokens = [(t.id, t.text, approx(t.logprob), [(i, approx(v)) for i, v in t.top or ()]) for t in out.new_tokens]
    prompt = [None if p is None else (approx(p[0]), [(i, approx(v)) for i, v in p[1] or ()])
              for p in out.prompt_logprobs or ()]
    return out.token_ids, out.text, out.finish_reason, out.stop_reason, out.error, tokens, prompt


def _run(llm: LLM, prompts, params, forks: int = 0) -> dict[str, tuple]:
    """Drive the engine: every prompt, plus `forks` extra outputs of the first few (sharing their
    parent's prompt blocks, as a request's n outputs do). Returns request id -> summary."""
    engine = llm.engine
    ids = []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        ids.append(engine.add_request(prompt, p, request_id=f"r{i}"))
        if i < forks:
            ids.append(engine.add_request(prompt, p, request_id=f"r{i}-fork", parent_request_id=f"r{i}"))
    merged = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id in merged:
                merged[out.request_id].merge(out)
            else:
                merged[out.request_id] = out
    assert set(merged) == set(ids) and all(o.finished for o in merged.values())
    return {rid: _summary(o) for rid, o in merged.items()}


@pytest.mark.parametrize("num_kv_blocks", [512, 14], ids=["roomy", "preempting"])
def test_every_sampling_feature_gives_the_synchronous_outputs(demo_model_dir, num_kv_blocks):
    params = _mixed_params()
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(len(params))]
    results, stats = {}, {}
    for mode in (False, True):
        llm = LLM(demo_model_dir, block_size=8, num_kv_blocks=num_kv_blocks, max_num_batched_tokens=24,
                  async_scheduling=mode)
        results[mode] = _run(llm, prompts, params, forks=3)
        results[mode, "again"] = _run(llm, prompts[:4], params[:4])      # prefix hits on the first round
        stats[mode] = llm.engine.stats()
        llm.close()
    assert results[True] == results[False]
    assert results[True, "again"] == results[False, "again"]
    on = stats[True]
    assert on.blocks_used == 0 and on.num_running == on.num_waiting == 0
    # a request that ended by its own token is left out of the next step, not computed and discarded
    assert on.generation_tokens == stats[False].generation_tokens
    assert on.prefix_hit_tokens > 0
    if num_kv_blocks == 14:
        assert on.num_preemptions > 0


def test_an_abort_while_its_step_runs_ends_it_and_no_one_else(demo_model_dir):
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    expected = LLM(demo_model_dir, block_size=8, num_kv_blocks=64).generate(PROMPTS[:3], greedy)
    llm = LLM(demo_model_dir, block_size=8, num_kv_blocks=64, async_scheduling=True)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS[:4]):
        engine.add_request(prompt, greedy, request_id=str(i))
    got: dict[str, list[int]] = {str(i): [] for i in range(4)}
    for _ in range(3):
        for out in engine.step():
            got[out.request_id] += [t.id for t in out.new_tokens]
    assert engine._inflight is not None                # request 3's next token is being computed
    aborted = engine.abort("3")
    assert aborted.finished and aborted.finish_reason == "abort"
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id != "3", "an output after the abort"
            got[out.request_id] += [t.id for t in out.new_tokens]
    assert [got[str(i)] for i in range(3)] == [o.token_ids for o in expected]
    assert engine.stats().blocks_used == 0


def test_a_request_that_breaks_the_forward_fails_alone(demo_model_dir, monkeypatch):
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    llm = LLM(demo_model_dir, block_size=8, num_kv_blocks=256, max_num_batched_tokens=32, async_scheduling=True)
    undisturbed = [o.token_ids for o in llm.generate(PROMPTS, greedy)]
    used = {t for p in PROMPTS for t in llm.engine.encode(p)} | {t for ids in undisturbed for t in ids}
    poison = poison_forward(llm, monkeypatch, used)
    outs = llm.generate(PROMPTS[:2] + [[poison, 1, 2]] + PROMPTS[2:], [greedy] * (len(PROMPTS) + 1))
    bad = outs.pop(2)
    assert bad.finish_reason == "error" and "cannot take this request" in bad.error
    assert [o.token_ids for o in outs] == undisturbed
    assert llm.engine.stats().blocks_used == 0
    monkeypatch.undo()
    assert [o.token_ids for o in llm.generate(PROMPTS, greedy)] == undisturbed


def test_a_fault_of_the_engine_raises_from_the_step_that_waits_for_it(demo_model_dir, monkeypatch):
    llm = LLM(demo_model_dir, block_size=8, num_kv_blocks=64, async_scheduling=True)
    monkeypatch.setattr(llm.engine.runner, "execute", lambda step: (_ for _ in ()).throw(RuntimeError("broken")))
    llm.engine.add_request(PROMPTS[0], SamplingParams(max_tokens=4))
    llm.engine.add_request(PROMPTS[1], SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="broken"):
        for _ in range(2):      # the first call launches the step, the second waits for it
            llm.engine.step()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_step_broken_off_is_undone_and_the_engine_goes_on(demo_model_dir, monkeypatch, async_scheduling):
    """Ctrl-C (or a fault of the engine) inside a step: the steps scheduled and not applied are
    undone (their sequences recompute), so a caller that goes on stepping gets the same tokens."""
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    llm = LLM(demo_model_dir, block_size=8, num_kv_blocks=64, async_scheduling=async_scheduling)
    expected = [o.token_ids for o in llm.generate(PROMPTS[:3], greedy)]
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(prompt, greedy, request_id=str(i))
    got: dict[str, list[int]] = {str(i): [] for i in range(3)}
    for _ in range(4):
        for out in engine.step():
            got[out.request_id] += [t.id for t in out.new_tokens]
    execute = engine.runner.execute

    def interrupted(step):
        monkeypatch.setattr(engine.runner, "execute", execute)   # once
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.runner, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        for _ in range(2):
            for out in engine.step():
                got[out.request_id] += [t.id for t in out.new_tokens]
    assert all(seq.num_pending == 0 for seq in engine.requests.values())
    assert engine._inflight is None and not engine._unconfirmed
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += [t.id for t in out.new_tokens]
    assert [got[str(i)] for i in range(3)] == expected
    assert engine.stats().blocks_used == 0 and engine.stats().num_preemptions > 0


def test_a_fork_shares_only_blocks_a_finished_forward_wrote(demo_model_dir):
    """One of n outputs takes its parent's prompt blocks once their K/V is written, not while the
    step writing them runs (and may still fail)."""
    from kvserve.scheduler.sequence import Sequence
    llm = LLM(demo_model_dir, block_size=8, num_kv_blocks=64, async_scheduling=True)
    engine = llm.engine
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.add_request(PROMPTS[3], params, request_id="parent")
    parent = engine.requests["parent"]

    def fork_point() -> int:
        child = Sequence("probe", parent.prompt_token_ids, params)
        child.fork_parent = parent
        shared = engine.scheduler._fork_point(child)
        engine.kv.free("probe")
        return shared

    outs: dict[str, list[int]] = {}

    def step() -> None:
        for out in engine.step():
            outs.setdefault(out.request_id, []).extend(t.id for t in out.new_tokens)

    step()                  # the parent's prompt: scheduled (counted as computed) and running
    assert parent.num_computed_tokens == parent.num_prompt_tokens and engine._inflight is not None
    assert fork_point() == 0
    step()                  # that step applied (the next one runs)
    assert fork_point() == parent.num_prompt_tokens - 1
    engine.add_request(PROMPTS[3], params, request_id="child", parent_request_id="parent")
    while engine.has_unfinished():
        for out in engine.step():
            outs.setdefault(out.request_id, []).extend(t.id for t in out.new_tokens)
    assert outs["child"] == outs["parent"] and len(outs["child"]) == 8      # greedy, one prompt
    assert engine.stats().blocks_used == 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_outputs_made_before_a_step_breaks_off_come_with_the_next(demo_model_dir, async_scheduling):
    """A step listener that raises after the step's tokens are in: those tokens are not lost, the
    next step() returns them, and every request ends with the tokens it would have had."""
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    llm = LLM(demo_model_dir, block_size=8, num_kv_blocks=64, async_scheduling=async_scheduling)
    expected = [o.token_ids for o in llm.generate(PROMPTS[:3], greedy)]
    engine = llm.engine
    calls = []

    def listener(stats):
        calls.append(stats)
        if len(calls) == 3:
            raise RuntimeError("a listener broke")

    engine.add_step_listener(listener)
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(prompt, greedy, request_id=str(i))
    got: dict[str, list[int]] = {str(i): [] for i in range(3)}
    raised = 0
    while engine.has_unfinished():
        try:
            outs = engine.step()
        except RuntimeError:
            raised += 1
            continue
        for out in outs:
            got[out.request_id] += [t.id for t in out.new_tokens]
    assert raised == 1
    assert [got[str(i)] for i in range(3)] == expected
    assert engine.stats().blocks_used == 0 and not engine._outputs

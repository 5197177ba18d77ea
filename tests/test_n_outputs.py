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


def test_a_fork_survives_preemption(demo_model_dir):
    small = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", num_kv_blocks=12,
                                   block_size=8, enable_prefix_caching=False, max_num_seqs=8))
    prompt = [(13 * i) % 200 + 3 for i in range(30)]
    greedy = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)] * 3
    outs, _, _ = run_group(small, prompt, greedy, "pre")
    assert small.scheduler.num_preemptions > 0
    alone, _, _ = run_group(small, prompt, greedy[:1], "pre-alone")
    assert all(o == alone[0] for o in outs.values())

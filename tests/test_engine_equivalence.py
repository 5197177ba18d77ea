"""Greedy outputs equal transformers' generate() token for token, for every tiny architecture,
batched, with chunked prefill, with prefix-cache hits, under preemption, and with async scheduling.

Ties: at the first position where a sequence differs, the test accepts kvserve's token only if
the reference logits of the two tokens are within TIE_TOLERANCE of each other (float32 sums in a
different order can flip an exact tie); the rest of that sequence is then not compared.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from kvserve import LLM, SamplingParams
from models import ARCHITECTURES

TIE_TOLERANCE = 1e-4   # absolute, on float32 logits of order 1-10
MAX_NEW = 24
PROMPT_LENS = (3, 11, 24, 37, 50)


def _prompts(seed: int, lens=PROMPT_LENS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module")
def reference(tiny_model_factory):
    """arch -> fn(prompt) -> (tokens, per-step logits) from transformers' generate(), memoized."""
    models, memo = {}, {}

    def get(arch: str, prompt: list[int]):
        key = (arch, tuple(prompt))
        if key not in memo:
            if arch not in models:
                models[arch] = AutoModelForCausalLM.from_pretrained(
                    tiny_model_factory(arch), attn_implementation="eager", dtype=torch.float32).eval()
                # like ignore_eos: no EOS at all (min_new_tokens would mask EOS in the logits instead)
                models[arch].generation_config.eos_token_id = None
            cfg = GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0, output_logits=True,
                                   return_dict_in_generate=True)
            with torch.no_grad():
                out = models[arch].generate(torch.tensor([prompt]), generation_config=cfg)
            memo[key] = (out.sequences[0, len(prompt):].tolist(), [l[0] for l in out.logits])
        return memo[key]

    return get


def assert_matches(arch, reference, prompts, outputs):
    exact = 0
    for prompt, out in zip(prompts, outputs):
        ref_tokens, ref_logits = reference(arch, prompt)
        ours = out.token_ids
        assert len(ours) == MAX_NEW, (arch, out.finish_reason)
        diff = next((i for i, (a, b) in enumerate(zip(ours, ref_tokens)) if a != b), None)
        if diff is None:
            exact += 1
            continue
        logits = ref_logits[diff]
        gap = (logits[ref_tokens[diff]] - logits[ours[diff]]).item()
        assert gap <= TIE_TOLERANCE, (
            f"{arch}: token {diff} of a {len(prompt)}-token prompt differs: kvserve {ours[diff]}, "
            f"transformers {ref_tokens[diff]}, reference logit gap {gap:.3g} > {TIE_TOLERANCE}")
    assert exact >= len(prompts) - 1, f"{arch}: only {exact}/{len(prompts)} sequences matched exactly"


def _greedy():
    return SamplingParams(max_tokens=MAX_NEW, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("tiny_arch", sorted(ARCHITECTURES))
def test_batched(tiny_arch, tiny_model_factory, reference):
    llm = LLM(tiny_model_factory(tiny_arch), block_size=8, num_kv_blocks=128)
    prompts = _prompts(1)
    assert_matches(tiny_arch, reference, prompts, llm.generate(prompts, _greedy()))


@pytest.mark.parametrize("tiny_arch", sorted(ARCHITECTURES))
def test_chunked_prefill(tiny_arch, tiny_model_factory, reference):
    llm = LLM(tiny_model_factory(tiny_arch), block_size=8, num_kv_blocks=128, max_num_batched_tokens=13)
    prompts = _prompts(2)
    assert_matches(tiny_arch, reference, prompts, llm.generate(prompts, _greedy()))
    assert llm.engine.num_steps > MAX_NEW + sum(PROMPT_LENS) // 13 - 1


@pytest.mark.parametrize("tiny_arch", sorted(ARCHITECTURES))
def test_prefix_cache_hits(tiny_arch, tiny_model_factory, reference):
    llm = LLM(tiny_model_factory(tiny_arch), block_size=8, num_kv_blocks=128, max_num_batched_tokens=64)
    shared = _prompts(3, (35,))[0]
    tails = _prompts(4, (5, 12))
    first = llm.generate([shared], _greedy())
    prompts = [shared, shared + tails[0], shared + tails[1], list(shared)]
    outputs = llm.generate(prompts, _greedy())
    assert_matches(tiny_arch, reference, [shared] + prompts, first + outputs)
    assert all(o.num_cached_tokens >= 32 for o in outputs), [o.num_cached_tokens for o in outputs]
    # a prompt that ends its generation inside cached blocks also hits (output tokens are cached too)
    again = llm.generate([shared + first[0].token_ids[:10]], _greedy())
    assert again[0].num_cached_tokens >= 40
    stats = llm.engine.stats()
    assert stats.prefix_hit_tokens >= 4 * 32 and stats.blocks_used == 0


@pytest.mark.parametrize("tiny_arch", sorted(ARCHITECTURES))
def test_preemption_recompute(tiny_arch, tiny_model_factory, reference):
    # 12 blocks x 8 tokens: the five sequences (up to 74 tokens each) cannot all fit at once
    llm = LLM(tiny_model_factory(tiny_arch), block_size=8, num_kv_blocks=12, max_num_batched_tokens=32)
    prompts = _prompts(5)
    assert_matches(tiny_arch, reference, prompts, llm.generate(prompts, _greedy()))
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0
    assert stats.blocks_used == 0 and stats.num_running == stats.num_waiting == 0


@pytest.mark.parametrize("tiny_arch", sorted(ARCHITECTURES))
def test_async_scheduling(tiny_arch, tiny_model_factory, reference):
    """--async-scheduling (each step scheduled while the one before runs): chunked prefill, preemption,
    then prefix hits on the first round's blocks."""
    llm = LLM(tiny_model_factory(tiny_arch), block_size=8, num_kv_blocks=12, max_num_batched_tokens=13,
              async_scheduling=True)
    prompts = _prompts(5)
    outputs = llm.generate(prompts, _greedy())
    again = llm.generate(prompts[:2], _greedy())
    assert_matches(tiny_arch, reference, prompts + prompts[:2], outputs + again)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_hit_tokens > 0
    assert stats.blocks_used == 0 and not llm.engine.has_unfinished()


@pytest.mark.parametrize("tiny_arch", ["llama", "gemma2", "mistral"])
def test_triton_backend(tiny_arch, tiny_model_factory, reference):
    """The Triton kernels (through TRITON_INTERPRET=1 on CPU) in the engine: one varlen launch per
    layer over mixed prefill chunks and decodes, with prefix hits and preemption."""
    pytest.importorskip("triton")
    llm = LLM(tiny_model_factory(tiny_arch), block_size=8, num_kv_blocks=14, max_num_batched_tokens=24,
              attention_backend="triton")
    assert llm.engine.runner.backend.name == "triton"
    prompts = _prompts(6, (9, 30, 41))
    assert_matches(tiny_arch, reference, prompts + prompts[:1],
                   llm.generate(prompts, _greedy()) + llm.generate(prompts[:1], _greedy()))
    assert llm.engine.stats().num_preemptions > 0 and llm.engine.stats().prefix_hit_tokens > 0


@pytest.mark.parametrize("tiny_arch,max_batch,buckets", [("llama", 4, [1, 2, 4]), ("gemma2", 2, [1, 2])])
def test_decode_graph_path(tiny_arch, max_batch, buckets, tiny_model_factory, reference):
    """The CUDA-graph decode path: static buffers padded to bucketed batch sizes, tables padded to
    max_model_len's width, padded rows writing nothing (run eagerly here; captured on CUDA). Batches
    above the largest bucket and steps with prefill chunks fall back to the varlen path."""
    pytest.importorskip("triton")
    llm = LLM(tiny_model_factory(tiny_arch), block_size=8, num_kv_blocks=14, max_num_batched_tokens=24,
              attention_backend="triton", cuda_graphs=True, cuda_graph_max_batch=max_batch)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.buckets == buckets
    batch_sizes = []
    run = graphs.run
    graphs.run = lambda ids, *args: batch_sizes.append(len(ids)) or run(ids, *args)
    prompts = _prompts(7, (9, 30, 41))
    assert_matches(tiny_arch, reference, prompts + prompts[:1],
                   llm.generate(prompts, _greedy()) + llm.generate(prompts[:1], _greedy()))
    # llama: 3 decodes run padded to the bucket of 4; gemma2: 3 decodes exceed the largest bucket
    assert (3 in batch_sizes) == (max_batch >= 3) and {1, 2} <= set(batch_sizes), batch_sizes
    assert llm.engine.stats().num_preemptions > 0 and llm.engine.stats().prefix_hit_tokens > 0


@pytest.mark.parametrize("tiny_arch", sorted(ARCHITECTURES))
def test_host_tier_reload(tiny_arch, tiny_model_factory, reference):
    """Prefix blocks evicted from a device pool too small to keep them come back from the host tier
    (--kv-offload-memory), with outputs equal to transformers'; also under preemption."""
    # 12 blocks x 8 tokens: each 50-token conversation evicts the one before it
    llm = LLM(tiny_model_factory(tiny_arch), block_size=8, num_kv_blocks=12, max_num_batched_tokens=32,
              kv_offload_memory="4MiB")
    prompts = _prompts(8, (50, 50, 50))
    first = [llm.generate([p], _greedy())[0] for p in prompts]
    stats = llm.engine.stats()
    assert stats.offload_blocks_stored > 0 and stats.offload_blocks_loaded == 0
    again = llm.generate([prompts[0]], _greedy())     # evicted from the device pool by the other two
    stats = llm.engine.stats()
    assert again[0].num_cached_tokens == 48 and stats.prefix_hit_tokens_host >= 40, (
        again[0].num_cached_tokens, stats)
    assert stats.offload_blocks_loaded >= 5
    # preemption: five sequences that cannot all fit, their prefixes moving between the tiers
    batch = _prompts(5)
    outputs = llm.generate(batch, _greedy())
    assert_matches(tiny_arch, reference, prompts + prompts[:1] + batch, first + again + outputs)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0 and stats.blocks_used == 0

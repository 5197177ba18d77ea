"""`compile=True` (`kvserve serve --compile`): the model runs through torch.compile. Greedy outputs
still equal transformers' generate(), with batching, chunked prefill, prefix hits and preemption, and
through the decode graphs' padded path (captured on CUDA); every graph is compiled at start-up
(nothing compiles while serving); a compiled graph that fails gives way to the eager model for good."""
from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams
from kvserve.cache import attention
from test_engine_equivalence import _greedy, _prompts, assert_matches, reference  # noqa: F401


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("tiny_arch", ["llama", "gemma2", "qwen3"])
def test_compiled_model_equals_transformers(tiny_arch, tiny_model_factory, reference):  # noqa: F811
    llm = LLM(tiny_model_factory(tiny_arch), block_size=8, num_kv_blocks=14, max_num_batched_tokens=24,
              compile=True)
    runner = llm.engine.runner
    assert runner.compiled is not None
    compiled_at_start, uncompiled_at_start = _graphs_compiled(), attention.uncompiled_calls
    prompts = _prompts(6, (9, 30, 41))
    outputs = llm.generate(prompts, _greedy()) + llm.generate(prompts[:1], _greedy())
    assert_matches(tiny_arch, reference, prompts + prompts[:1], outputs)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_hit_tokens > 0
    # prompt logprobs keep every prompt token's logits: one more shape, still no new graph
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=1)
    assert llm.generate([prompts[0]], params)[0].prompt_logprobs
    assert _graphs_compiled() == compiled_at_start, "a graph compiled while serving"
    assert attention.uncompiled_calls == uncompiled_at_start, "dynamo ran part of the model eagerly"
    assert runner.compiled is not None


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_lone_prompt_chunked_without_a_sampled_row(tiny_model_factory, reference, async_scheduling):  # noqa: F811
    """A long prompt alone, in chunks that keep no logits: the compiled graph still runs (and writes
    the K/V of) the last layer. Inductor used to drop that layer from such a graph, so the answer was
    computed over a cache the last layer had never written."""
    llm = LLM(tiny_model_factory("llama"), block_size=8, num_kv_blocks=64, max_num_batched_tokens=16,
              compile=True, async_scheduling=async_scheduling)
    prompt = _prompts(9, (45,))[0]    # chunks of 16, 16 and 13 tokens: the first two sample nothing
    assert_matches("llama", reference, [prompt], llm.generate([prompt], _greedy()))
    assert llm.engine.runner.compiled is not None


def test_a_failing_compiled_graph_gives_way_to_eager(tiny_model_factory, caplog):
    llm = LLM(tiny_model_factory("llama"), block_size=8, num_kv_blocks=64, compile=True)
    prompt = _prompts(8, (12,))[0]
    expected = llm.generate([prompt], _greedy())[0].token_ids

    def broken(*args, **kwargs):
        raise RuntimeError("inductor kernel failed")

    llm.engine.runner.compiled = broken
    assert llm.generate([prompt], _greedy())[0].token_ids == expected
    assert llm.engine.runner.compiled is None
    assert "serving eagerly from now on" in caplog.text


def test_the_decode_graphs_run_the_compiled_forward(tiny_model_factory, reference):  # noqa: F811
    """compile=True beside the decode graphs: on CUDA they capture the compiled forward (inductor's fused
    kernels instead of hundreds of small ones per step); here the same padded static-buffer path runs
    uncaptured through the Triton interpreter. Decode steps go through the compiled model, the attention
    op finds each step's metadata, and greedy outputs still equal transformers'."""
    llm = LLM(tiny_model_factory("llama"), block_size=8, num_kv_blocks=32, attention_backend="triton",
              cuda_graphs=True, cuda_graph_max_batch=4, compile=True)
    runner = llm.engine.runner
    assert runner.compiled is not None and runner.graphs.compiled is runner.compiled
    captured = bool(runner.graphs.graphs)    # on CUDA: the replays call no Python, nothing to count
    compiled, batch_sizes = runner.graphs.compiled, []

    def counted(**inputs):
        batch_sizes.append(inputs["input_ids"].shape[1])
        return compiled(**inputs)

    runner.graphs.compiled = counted
    compiled_at_start, uncompiled_at_start = _graphs_compiled(), attention.uncompiled_calls
    prompts = _prompts(10, (9, 30, 17))
    assert_matches("llama", reference, prompts, llm.generate(prompts, _greedy()))
    assert 4 in (runner.graphs.graphs if captured else batch_sizes), batch_sizes   # three decodes, padded to 4
    # the static buffers are inference tensors like the eager path's inputs: no graph of their own
    assert _graphs_compiled() == compiled_at_start, "a graph compiled while serving"
    assert attention.uncompiled_calls == uncompiled_at_start, "dynamo ran part of the model eagerly"
    assert llm.engine.stats().late_compiles == 0


def test_a_graph_compiled_while_serving_counts_as_a_late_compile(tiny_model_factory, caplog):
    """With a compiled model, a new torch.compile graph after start-up stalls every request for seconds:
    the engine's late-compile count (the warning, kvserve_kernel_late_compiles_total) includes it. Here
    dynamo forgets its graphs, so the next steps compile them again."""
    import torch
    llm = LLM(tiny_model_factory("llama"), block_size=8, num_kv_blocks=64, compile=True)
    prompt = _prompts(11, (12,))[0]
    llm.generate([prompt], _greedy())
    assert llm.engine.stats().late_compiles == 0
    torch._dynamo.reset()
    llm.generate([prompt], _greedy())
    assert llm.engine.stats().late_compiles > 0
    assert "a kernel compiled while serving" in caplog.text


def test_a_compiled_forward_that_cannot_be_captured_gives_way_to_the_eager_one(tiny_model_factory, monkeypatch,
                                                                               caplog):
    """On CUDA: if capturing the compiled forward fails, the eager forward is captured instead (the compiled
    model still runs the steps no graph covers); if that fails too, decodes run without graphs."""
    from kvserve.cuda_graphs import DecodeGraphs
    llm = LLM(tiny_model_factory("llama"), block_size=8, num_kv_blocks=32, attention_backend="triton",
              cuda_graphs=True, cuda_graph_max_batch=4, compile=True)
    runner, tried = llm.engine.runner, []

    def capture_all(graphs):
        tried.append(graphs.compiled)
        if graphs.compiled is not None or fail_eager:
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeGraphs, "capture_all", capture_all)
    fail_eager = False
    runner.init_decode_graphs(64, 4, capture=True)
    assert tried == [runner.compiled, None] and runner.graphs is not None and runner.graphs.compiled is None
    assert "capture of the compiled forward failed; capturing the eager forward" in caplog.text
    tried.clear()
    fail_eager = True
    runner.init_decode_graphs(64, 4, capture=True)
    assert tried == [runner.compiled, None] and runner.graphs is None
    assert runner.compiled is not None


def test_compile_is_accepted_on_cuda():
    from kvserve.config import EngineConfig
    assert EngineConfig(model="unused", device="cuda", compile=True).compile


def test_a_device_fault_in_a_compiled_graph_keeps_it(tiny_model_factory):
    """Out of memory is the step's or the host's trouble, not the graph's: re-raised, compile kept."""
    from kvserve.runner import _compile_steps
    llm = LLM(tiny_model_factory("llama"), block_size=8, num_kv_blocks=64, compile=True)
    runner = llm.engine.runner

    def out_of_memory(*args, **kwargs):
        raise MemoryError("no memory left")

    runner.compiled = out_of_memory
    with pytest.raises(MemoryError):
        runner.execute(_compile_steps(64 * 8, 8)[0])
    assert runner.compiled is out_of_memory


def test_compile_with_tensor_parallel_is_refused():
    from kvserve.config import EngineConfig
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(model="unused", compile=True, tensor_parallel_size=2)

"""No Triton compile after start-up: the kernel variants a server launches are few, enumerable,
and all launched by ModelRunner.warmup() (issue 18). Runs on CPU through TRITON_INTERPRET=1: the
interpreter compiles nothing, but the recorder computes each launch's specialization key the way
Triton would (constexprs, and for what Triton still specializes: int ==1 / %16, pointer alignment).
"""
from __future__ import annotations

import pytest
import torch

from triton_env import DEVICE, ta, tl  # sets TRITON_INTERPRET=1 before triton loads, on CPU

from kvserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def group3_model(tmp_path_factory):
    """A one-layer Qwen2 with 6 query heads over 2 KV heads: a GQA group of 3, not a power of two."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvserve.demo import build_byte_tokenizer
    tokenizer = build_byte_tokenizer()
    config = AutoConfig.for_model("qwen2", hidden_size=96, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                                  initializer_range=0.3, tie_word_embeddings=False,
                                  vocab_size=-(-len(tokenizer) // 64) * 64, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp("qwen2-group3")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _prompts(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in lens]


def _model_variants(llm, softcap, window):
    spec, runner = llm.engine.runner.kv_pool.spec, llm.engine.runner
    heads = runner.model.config.get_text_config().num_attention_heads
    return ta.enumerate_variants(heads, spec.num_kv_heads, spec.head_dim, spec.block_size, spec.dtype,
                                 softcap=softcap, window=window)


@pytest.mark.parametrize("arch,softcap,window,graphs", [
    ("llama", False, False, True),            # decode steps through the (eager here) CUDA-graph path too
    ("gemma2", True, (False, True), False),   # soft-cap; sliding and global layers
    ("group3", False, False, False),          # GQA group 3
])
def test_served_variants_are_all_warmed_up(arch, softcap, window, graphs, tiny_model_factory, group3_model):
    """A mixed workload (chunked prefills beside decodes of both parities, prefix-cache hits, a lone
    decode) launches only variants that the warm-up launched, and those are all enumerated."""
    path = group3_model if arch == "group3" else tiny_model_factory(arch)
    llm = LLM(path, block_size=8, num_kv_blocks=24, max_num_batched_tokens=16, attention_backend="triton",
              cuda_graphs=graphs or None, cuda_graph_max_batch=2)
    runner = llm.engine.runner
    runner.warmup(interpreted=True)        # on CPU the engine skips it (the interpreter compiles nothing)
    warm = runner.warmup_variants
    assert warm, "warmup() launched nothing"
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    compiled = ta.num_compiles()
    with ta.record_variants() as served:
        llm.generate(_prompts((5, 21, 12)), params)
        llm.generate(_prompts((21,)) + _prompts((2,), seed=1), params)   # a prefix hit, short prompts
    assert ta._recorder is None
    assert served, "the workload launched nothing"
    late = served - warm
    assert not late, "variants first launched after warm-up:\n" + "\n".join(map(str, late))
    enumerated = _model_variants(llm, softcap, window)
    assert warm <= enumerated, "warm-up launched variants the enumeration misses:\n" + "\n".join(
        map(str, warm - enumerated))
    assert ta.num_compiles() == compiled, "kernels compiled after warm-up"   # on CUDA; 0 == 0 interpreted


def test_torch_backend_warmup_is_a_no_op(tiny_model_factory):
    llm = LLM(tiny_model_factory("llama"), block_size=8, num_kv_blocks=16, attention_backend="torch")
    assert llm.engine.runner.warmup() == 0 and llm.engine.runner.warmup_variants == frozenset()


def test_enumeration_is_small():
    # Qwen2.5-0.5B in bf16: decode (split or not), its reduce, and 3 prefill tile heights
    qwen = ta.enumerate_variants(14, 2, 64, 16, torch.bfloat16)
    assert len(qwen) == 6, sorted(map(str, qwen))
    assert {k.kernel for k in qwen} == {"_decode_kernel", "_decode_reduce_kernel", "_prefill_kernel"}
    assert len(ta.prefill_buckets(7, torch.bfloat16, 64)) == 3
    for heads, kv_heads, head_dim, dtype in [(32, 8, 64, torch.float16), (8, 4, 256, torch.bfloat16),
                                             (28, 4, 128, torch.bfloat16), (64, 8, 128, torch.float32),
                                             (12, 12, 80, torch.bfloat16), (96, 1, 128, torch.bfloat16)]:
        one = ta.enumerate_variants(heads, kv_heads, head_dim, 16, dtype)
        assert len(one) <= 6, (heads, kv_heads, head_dim, dtype)
        every = ta.enumerate_variants(heads, kv_heads, head_dim, 16, dtype, softcap=(False, True),
                                      window=(False, True), offset64=(False, True))
        assert len(every) <= 8 * 5 + 1


def _decode_and_prefill(num_decodes, tokens, width, gen):
    """The engine's calls for one step (attention.py's _triton_attention): q, key and value are
    views of contiguous [1, heads, tokens, head_dim] tensors, the decode rows' slices start at 0
    and the prefill rows' at num_decodes."""
    heads, kv_heads, head_dim, bs = 6, 2, 32, 8
    q = torch.randn(1, heads, tokens, head_dim, generator=gen)[0].transpose(0, 1).to(DEVICE)
    k = torch.randn(1, kv_heads, tokens, head_dim, generator=gen)[0].transpose(0, 1).to(DEVICE)
    v = torch.randn(1, kv_heads, tokens, head_dim, generator=gen)[0].transpose(0, 1).to(DEVICE)
    cache = torch.zeros(4, bs, kv_heads, head_dim, device=DEVICE)
    rows = num_decodes + 1
    tables = torch.zeros(rows, width, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([1] * num_decodes + [tokens - num_decodes], dtype=torch.int32, device=DEVICE)
    slots = torch.full((tokens,), -1, device=DEVICE)
    out = torch.empty(tokens, heads, head_dim, device=DEVICE)
    nd = num_decodes
    if nd:
        ta.paged_decode_attention(q[:nd], cache, cache, tables[:nd], lens[:nd], 0.3, key=k[:nd], value=v[:nd],
                                  slot_mapping=slots[:nd], out=out[:nd], num_splits=1)
    cu = torch.tensor([0, tokens - nd], dtype=torch.int32, device=DEVICE)
    ta.paged_prefill_attention(q[nd:], cache, cache, tables[nd:], cu, lens[nd:], 0.3, max_seqlen_q=tokens - nd,
                               key=k[nd:], value=v[nd:], slot_mapping=slots[nd:], out=out[nd:])


def test_step_shapes_do_not_change_the_key():
    """Token count (head strides T * D), table width, and the parity of num_decodes (the int64 slot
    slice's alignment) leave one variant per kernel once the prefill tile height is fixed."""
    gen = torch.Generator().manual_seed(0)
    with ta.record_variants() as keys:
        for num_decodes, tokens, width in [(1, 2, 1), (2, 3, 5), (3, 4, 16), (4, 5, 17), (0, 2, 3)]:
            _decode_and_prefill(num_decodes, tokens, width, gen)
    kernels = [k.kernel for k in keys]
    assert sorted(kernels) == ["_decode_kernel", "_prefill_kernel"], "\n".join(map(str, keys))


def test_recording_is_off_by_default_and_nests():
    assert ta._recorder is None
    gen = torch.Generator().manual_seed(1)
    with ta.record_variants() as outer:
        with ta.record_variants() as inner:
            _decode_and_prefill(1, 2, 1, gen)
        assert inner and inner <= outer
    assert ta._recorder is None
    _decode_and_prefill(1, 2, 1, gen)   # not recorded anywhere: nothing to look at, nothing raised
    assert isinstance(ta.num_compiles(), int)
    if type(tl.cdiv).__name__ == "InterpretedFunction":
        assert ta.num_compiles() == 0

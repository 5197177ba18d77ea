"""Triton paged-attention kernels against a dense PyTorch reference (the interpreter runs them on CPU).

Error bound: max |out - ref| / max |ref| <= 1e-5 in float32, 5e-3 in float16, 2e-2 in bfloat16
(the interpreter measures ~2e-7, ~1e-4 and ~4e-3).
"""
import os

import pytest
import torch

from triton_env import DEVICE, ta  # sets TRITON_INTERPRET=1 before triton loads, on CPU

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def make_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype, gen, spare_columns=1):
    """Fill a shuffled paged cache; return k/v caches, block tables and each sequence's dense K/V."""
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)  # unused slots hold garbage on purpose
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    width = max(blocks_per_seq) + spare_columns
    block_tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    dense, used = [], 0
    for i, n in enumerate(seq_lens):
        ids = perm[used:used + blocks_per_seq[i]]
        used += blocks_per_seq[i]
        block_tables[i, :len(ids)] = ids
        slots = (ids[torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size)
        flat = lambda c: c.view(-1, num_kv_heads, head_dim)  # noqa: E731
        dense.append((flat(k_cache)[slots].float(), flat(v_cache)[slots].float()))
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return to(k_cache), to(v_cache), to(block_tables), dense


def reference(q, k, v, scale, window=None, softcap=None):
    """Dense attention of q [q_len, H, D] over the last q_len of k/v [ctx, KVH, D] positions."""
    q_len, num_heads, _ = q.shape
    ctx = k.shape[0]
    group = num_heads // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    qpos = torch.arange(ctx - q_len, ctx)[:, None]
    kpos = torch.arange(ctx)[None, :]
    visible = kpos <= qpos
    if window:
        visible &= kpos > qpos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


# On a GPU every distinct (dtype, block_size, heads, group, head_dim, window on/off, softcap on/off,
# split or not, fused or not) compiles its own kernel (the window and softcap values, split counts,
# lengths and strides do not), so the cases below reuse few of them: the decode cases share theirs
# with the prefill cases (PREFILL_CASES[i] matches DECODE_CASES[SHARED[i]]), the random test draws
# from those shared ones, and the other tests reuse a case's shape.
DECODE_CASES = [
    # seed, dtype, block_size, num_kv_heads, group, head_dim, window, softcap, num_splits
    (0, torch.float32, 8, 2, 1, 32, None, None, 1),
    (1, torch.float32, 8, 2, 2, 32, None, None, None),
    (2, torch.float32, 8, 2, 2, 32, None, None, 3),
    (3, torch.float32, 8, 2, 2, 32, 7, None, 2),
    (4, torch.float32, 8, 1, 4, 64, 20, 5.0, 4),
    (5, torch.float32, 16, 1, 2, 32, None, 2.0, 2),
    (6, torch.bfloat16, 8, 2, 2, 32, None, None, 2),
    (7, torch.bfloat16, 16, 1, 4, 32, 9, 3.0, 1),
    (8, torch.float16, 8, 2, 1, 32, None, None, 3),
    (9, torch.float32, 8, 2, 3, 80, 33, None, 2),  # neither the group nor head_dim a power of two
]


@pytest.mark.parametrize("seed,dtype,block_size,num_kv_heads,group,head_dim,window,softcap,num_splits",
                         DECODE_CASES)
def test_paged_decode_attention(seed, dtype, block_size, num_kv_heads, group, head_dim, window, softcap,
                                num_splits):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [1, 2 * block_size, int(torch.randint(3, 100, (1,), generator=gen)), 37]
    k_cache, v_cache, block_tables, dense = make_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype, gen)
    num_heads = num_kv_heads * group
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim ** -0.5
    out = ta.paged_decode_attention(query.to(DEVICE), k_cache, v_cache, block_tables,
                                    torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), scale,
                                    sliding_window=window, softcap=softcap, num_splits=num_splits)
    assert out.dtype == dtype and out.shape == query.shape
    ref = torch.cat([reference(query[i:i + 1], k, v, scale, window, softcap) for i, (k, v) in enumerate(dense)])
    assert relative_error(out.cpu(), ref) <= TOLERANCE[dtype]


def test_decode_long_context_automatic_splits_and_strided_query():
    """A long sequence gets several splits by default; the query may be a strided view of a fused qkv."""
    gen = torch.Generator().manual_seed(12)
    seq_lens = [600, 5]
    k_cache, v_cache, block_tables, dense = make_cache(seq_lens, 16, 1, 32, torch.float32, gen)
    qkv = torch.randn(2, 4, 32, generator=gen).to(DEVICE)
    query = qkv[:, :2]
    assert ta._auto_num_splits(query, 1, block_tables.shape[1] * 16) > 1
    out = ta.paged_decode_attention(query, k_cache, v_cache, block_tables,
                                    torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), 0.2, softcap=4.0)
    ref = torch.cat([reference(query[i:i + 1].cpu(), k, v, 0.2, softcap=4.0) for i, (k, v) in enumerate(dense)])
    assert relative_error(out.cpu(), ref) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("seed", range(100, 106))
def test_random_configs_decode_matches_prefill_and_reference(seed):
    """Random lengths, window, softcap and split count over the shapes the decode and prefill cases
    compile (SHARED); decode and prefill kernels agree with each other and with the reference."""
    gen = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=gen))]  # noqa: E731
    case = PREFILL_CASES[pick([i for i, c in enumerate(PREFILL_CASES) if c[1] == torch.float32 and i in SHARED])]
    _, dtype, block_size, num_kv_heads, group, head_dim, has_window, has_softcap = case
    window = pick([5, 17]) if has_window else None
    softcap = pick([1.5, 30.0]) if has_softcap else None
    splits = DECODE_CASES[SHARED[PREFILL_CASES.index(case)]][-1] or 1
    num_splits = pick([2, 5]) if splits > 1 else 1
    seq_lens = torch.randint(1, 100, (3,), generator=gen).tolist()
    k_cache, v_cache, block_tables, dense = make_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype, gen)
    query = torch.randn(3, num_kv_heads * group, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    cu = torch.arange(4, dtype=torch.int32, device=DEVICE)
    decode = ta.paged_decode_attention(query.to(DEVICE), k_cache, v_cache, block_tables, lens, 0.25,
                                       window, softcap, num_splits=num_splits)
    prefill = ta.paged_prefill_attention(query.to(DEVICE), k_cache, v_cache, block_tables, cu, lens, 0.25,
                                         window, softcap)
    ref = torch.cat([reference(query[i:i + 1], k, v, 0.25, window, softcap) for i, (k, v) in enumerate(dense)])
    assert relative_error(decode.cpu(), ref) <= TOLERANCE[dtype]
    assert relative_error(prefill.cpu(), ref) <= TOLERANCE[dtype]


def test_decode_splits_beyond_context_and_empty_rows():
    """More splits than tiles leaves empty splits; seq_len 0 (a padded batch row) gives zeros, not NaN."""
    gen = torch.Generator().manual_seed(11)
    seq_lens = [3, 70, 1]
    k_cache, v_cache, block_tables, dense = make_cache(seq_lens, 8, 2, 32, torch.float32, gen)
    query = torch.randn(4, 4, 32, generator=gen)
    lens = torch.tensor(seq_lens + [0], dtype=torch.int32, device=DEVICE)
    block_tables = torch.cat([block_tables, block_tables[:1]])
    for num_splits in (1, 6):
        out = ta.paged_decode_attention(query.to(DEVICE), k_cache, v_cache, block_tables, lens, 0.2,
                                        num_splits=num_splits).cpu()
        ref = torch.cat([reference(query[i:i + 1], k, v, 0.2) for i, (k, v) in enumerate(dense)])
        assert relative_error(out[:3], ref) <= TOLERANCE[torch.float32]
        assert torch.equal(out[3], torch.zeros_like(out[3]))


PREFILL_CASES = [
    # seed, dtype, block_size, num_kv_heads, group, head_dim, window, softcap
    (0, torch.float32, 8, 2, 1, 32, None, None),
    (1, torch.float32, 8, 2, 2, 32, None, None),
    (2, torch.float32, 8, 2, 2, 32, 10, None),
    (3, torch.float32, 16, 1, 2, 32, None, 4.0),
    (4, torch.float32, 8, 1, 4, 64, 24, 3.0),
    (5, torch.bfloat16, 16, 2, 2, 32, None, None),
    (6, torch.bfloat16, 8, 1, 4, 32, 13, 2.0),
    (7, torch.float32, 16, 1, 2, 96, None, None),  # head_dim not a power of two
]
SHARED = {0: 0, 1: 2, 2: 3, 3: 5, 4: 4}   # PREFILL_CASES index -> the DECODE_CASES index of the same shape

# (context length, query length): a lone token, full prefills (block multiple and not),
# chunks after a cached prefix, and decode tokens (q_len 1) in the same batch.
PREFILL_SEQS = [(1, 1), (32, 32), (37, 37), (64, 20), (100, 1), (45, 1), (90, 3)]


@pytest.mark.parametrize("seed,dtype,block_size,num_kv_heads,group,head_dim,window,softcap", PREFILL_CASES)
def test_paged_prefill_attention_mixed_batch(seed, dtype, block_size, num_kv_heads, group, head_dim, window,
                                             softcap):
    gen = torch.Generator().manual_seed(seed)
    seqs = [PREFILL_SEQS[i] for i in torch.randperm(len(PREFILL_SEQS), generator=gen)[:5].tolist()]
    seq_lens = [n for n, _ in seqs]
    k_cache, v_cache, block_tables, dense = make_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype, gen)
    num_heads = num_kv_heads * group
    q_lens = [q for _, q in seqs]
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    scale = head_dim ** -0.5
    out = ta.paged_prefill_attention(query.to(DEVICE), k_cache, v_cache, block_tables, cu.to(DEVICE),
                                     torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), scale,
                                     sliding_window=window, softcap=softcap)
    assert out.dtype == dtype and out.shape == query.shape
    ref = torch.cat([reference(query[cu[i]:cu[i + 1]], k, v, scale, window, softcap)
                     for i, (k, v) in enumerate(dense)])
    assert relative_error(out.cpu(), ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv(dtype):
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.zeros(6, 8, 2, 32, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([5, -1, 17, 40, -1, 47, 0], device=DEVICE)
    key = torch.randn(7, 2, 32, generator=gen).to(dtype).to(DEVICE)
    value = torch.randn(7, 2, 32, generator=gen).to(dtype).to(DEVICE)
    ta.store_kv(key, value, k_cache, v_cache, slots)
    expected_k, expected_v = torch.zeros_like(k_cache).view(48, 2, 32), torch.zeros_like(v_cache).view(48, 2, 32)
    keep = slots >= 0
    expected_k[slots[keep]] = key[keep]
    expected_v[slots[keep]] = value[keep]
    assert torch.equal(k_cache.view(48, 2, 32), expected_k)
    assert torch.equal(v_cache.view(48, 2, 32), expected_v)


def _step_kv(seq_lens, q_lens, num_kv_heads, head_dim, dtype, gen):
    """The step's own K/V and their positions. As transformers hands them over, key (after rotary)
    is a head-major view and value a token-major one: their strides differ."""
    total = sum(q_lens)
    key = torch.randn(num_kv_heads, total, head_dim, generator=gen).to(dtype).transpose(0, 1)
    value = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    positions = [range(n - q, n) for n, q in zip(seq_lens, q_lens)]
    return key, value, positions


def _slots(block_tables, positions, block_size):
    return torch.tensor([int(block_tables[i, p // block_size]) * block_size + p % block_size
                         for i, ps in enumerate(positions) for p in ps])


FUSED_CASES = [
    # seed, dtype, block_size, num_kv_heads, group, window, softcap
    (0, torch.float32, 8, 2, 2, None, None),
    (1, torch.float32, 16, 1, 4, 9, None),
    (2, torch.float32, 8, 2, 1, None, 3.0),
    (3, torch.bfloat16, 16, 2, 2, 20, 2.0),
]


@pytest.mark.parametrize("seed,dtype,block_size,num_kv_heads,group,window,softcap", FUSED_CASES)
def test_fused_prefill_reads_the_chunk_from_key_value_and_writes_it(seed, dtype, block_size, num_kv_heads,
                                                                      group, window, softcap):
    """Chunks after a cached prefix, a full prefill and a decode token in one launch. The cache holds
    garbage where the step's tokens go, so reading them back from it before the write would show."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens, q_lens = [40, 19, 33, 70], [12, 1, 33, 5]
    k_cache, v_cache, block_tables, dense = make_cache(seq_lens, block_size, num_kv_heads, 32, dtype, gen)
    query = torch.randn(sum(q_lens), num_kv_heads * group, 32, generator=gen).to(dtype)
    key, value, positions = _step_kv(seq_lens, q_lens, num_kv_heads, 32, dtype, gen)
    slots = _slots(block_tables, positions, block_size)
    slots[13] = -1  # a token whose K/V must not be written (its cache slot keeps its old value)
    kept = k_cache.view(-1, num_kv_heads, 32)[_slots(block_tables, positions, block_size)[13]].clone()
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    out = ta.paged_attention_fused(query.to(DEVICE), key.to(DEVICE), value.to(DEVICE), k_cache, v_cache,
                                   slots.to(DEVICE), block_tables, cu.to(DEVICE),
                                   torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), 0.3,
                                   sliding_window=window, softcap=softcap, max_seqlen_q=max(q_lens))
    refs = []
    for i, (k, v) in enumerate(dense):
        rows = slice(cu[i], cu[i + 1])
        k[positions[i].start:], v[positions[i].start:] = key[rows].float(), value[rows].float()
        refs.append(reference(query[rows], k, v, 0.3, window, softcap))
    assert relative_error(out.cpu(), torch.cat(refs)) <= TOLERANCE[dtype]
    flat_k, flat_v = k_cache.view(-1, num_kv_heads, 32).cpu(), v_cache.view(-1, num_kv_heads, 32).cpu()
    written = slots >= 0
    assert torch.equal(flat_k[slots[written]], key[written])
    assert torch.equal(flat_v[slots[written]], value[written])
    assert torch.equal(flat_k[_slots(block_tables, positions, block_size)[13]], kept.cpu())


@pytest.mark.parametrize("case,num_splits", [(0, 1), (1, 4), (2, 1), (3, 1), (3, 4)])
def test_fused_decode_writes_the_new_token_once(case, num_splits):
    """The split holding position len - 1 takes the new token from key/value and stores it; a padded
    row (slot -1, as CUDA-graph buckets add) attends but writes nothing."""
    seed, dtype, block_size, num_kv_heads, group, window, softcap = FUSED_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [1, 2 * block_size, 75, 300]
    k_cache, v_cache, block_tables, dense = make_cache(seq_lens, block_size, num_kv_heads, 32, dtype, gen)
    before = (k_cache.clone(), v_cache.clone())
    query = torch.randn(5, num_kv_heads * group, 32, generator=gen).to(dtype)
    key, value, positions = _step_kv(seq_lens + [1], [1] * 5, num_kv_heads, 32, dtype, gen)
    slots = torch.cat([_slots(block_tables, positions[:4], block_size), torch.tensor([-1])])
    lens = torch.tensor(seq_lens + [1], dtype=torch.int32, device=DEVICE)
    tables = torch.cat([block_tables, torch.zeros_like(block_tables[:1])])
    out = ta.paged_decode_attention(query.to(DEVICE), k_cache, v_cache, tables, lens, 0.25, window, softcap,
                                    num_splits=num_splits, key=key.to(DEVICE), value=value.to(DEVICE),
                                    slot_mapping=slots.to(DEVICE)).cpu()
    refs = []
    for i, (k, v) in enumerate(dense):
        k[-1], v[-1] = key[i].float(), value[i].float()
        refs.append(reference(query[i:i + 1], k, v, 0.25, window, softcap))
    assert relative_error(out[:4], torch.cat(refs)) <= TOLERANCE[dtype]
    expect_k, expect_v = before[0].view(-1, num_kv_heads, 32).cpu(), before[1].view(-1, num_kv_heads, 32).cpu()
    expect_k[slots[:4]], expect_v[slots[:4]] = key[:4], value[:4]
    assert torch.equal(k_cache.view(-1, num_kv_heads, 32).cpu(), expect_k)
    assert torch.equal(v_cache.view(-1, num_kv_heads, 32).cpu(), expect_v)


def test_int64_cache_offsets(monkeypatch):
    """The int64 offset path taken for caches of 2**31 elements or more gives the same answers."""
    monkeypatch.setattr(ta, "_OFFSET_64_FROM", 0)
    test_paged_decode_attention(*DECODE_CASES[2])
    test_paged_prefill_attention_mixed_batch(*PREFILL_CASES[6])


def test_is_available():
    assert ta.is_available()


def test_kernels_compile_for_sm80_and_sm90_without_register_spills():
    """The interpreter runs the kernels as Python; this compiles them for real GPUs with Triton's
    own ptxas (no GPU needed): the fused decode and prefill kernels, bf16, at the tile configs the
    wrappers pick for Qwen2.5-0.5B, Llama-3.2-1B and a head_dim-128 window + soft-cap shape."""
    import json
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "triton_sass_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(cases) == 12
    spilled = [c for c in cases if c["local_bytes"] or c["stack"]]
    assert not spilled, spilled

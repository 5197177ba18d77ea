"""Triton kernels for the paged KV cache: store_kv, split-K paged decode, varlen paged prefill.

Cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim]; token p of a sequence
lives at slot block_table[p // block_size] * block_size + p % block_size.

Grid design:
- store_kv: one program per token, writing all its KV heads (slot -1 is skipped).
- decode: grid (num_seqs, num_kv_heads, num_splits). A program holds the whole query-head group
  of one KV head as the M rows of a tl.dot (padded to 16), so each K/V tile is loaded once per
  group. The visible context [max(0, len - window), len) is cut into num_splits equal,
  BLOCK_N-aligned parts (flash-decoding); each program writes an unnormalised partial output
  plus its running max and sum, and a reduce kernel with grid (num_seqs, num_heads) merges them
  by log-sum-exp. With one split the decode kernel writes the output directly.
- prefill: grid (q_tiles, num_seqs, num_kv_heads). The M rows of a tile are (token, group head)
  pairs, so GQA groups share each K/V tile and a length-1 chunk (a decode token) still fills
  GROUP rows; online softmax over BLOCK_N-token KV tiles gathered through the block table, with
  causal, sliding-window and padding masks. One launch covers a mixed prefill/decode batch.
Both attention kernels share _attend_range: full KV tiles load without masks, only the tail tile
masks; softmax runs in base 2 with float32 accumulators. Block sizes 8/16/32 and any head_dim
(padded to a power of two) work, since KV tiles gather tokens one by one through the block table.
Fused K/V write (key/value/slot_mapping given): a program reads the step's own positions from the
key/value tensors instead of the cache and stores the positions it owns (a prefill tile its
tokens, a decode split the new token if it holds it) at their slots. No program reads a position
of this step from the cache, so the write needs no ordering against the reads: one launch per layer.
num_splits=None picks splits from block_tables.shape[1] (no device sync), so a CUDA graph can
capture a decode whose tables are padded to a fixed width.
"""

import contextlib
import functools
import inspect
import math
import os
import threading
from typing import Iterable, NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # keeps the module importable; is_available() reports False
    triton = None

    class tl:  # noqa: N801 - only what the kernel signatures below touch at definition time
        constexpr = None


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # read as triton.jit reads it: at decoration time

# Launch arguments Triton must not specialize, per kernel (filled by _kernel): every integer whose value
# varies between steps of one server (strides of the step's q/k/v/out views: transformers hands q as a
# contiguous [1, H, T, D] tensor, so its head stride is T * D; the block-table width; num_splits; the
# window), and every pointer that may be a slice at a num_decodes offset (so its 16-byte alignment
# follows the parity of num_decodes). The KV-cache pointers and strides stay specialized: fixed for a
# server's life, and their divisibility lets the cache loads vectorize.
_UNSPECIALIZED: dict[str, tuple[frozenset, frozenset]] = {}
_PARAMS: dict[str, tuple[str, ...]] = {}   # kernel name -> its non-constexpr parameters, in order


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def _kernel(do_not_specialize=(), do_not_specialize_on_alignment=()):
    """triton.jit for a launched kernel, recording which arguments it leaves unspecialized."""
    def wrap(fn):
        dns, dnsoa = tuple(do_not_specialize), tuple(do_not_specialize_on_alignment)
        params = inspect.signature(fn).parameters
        _PARAMS[fn.__name__] = tuple(n for n, p in params.items() if "constexpr" not in str(p.annotation))
        assert set(dns) | set(dnsoa) <= set(_PARAMS[fn.__name__]), fn.__name__
        if triton is None:
            _UNSPECIALIZED[fn.__name__] = (frozenset(dns), frozenset(dnsoa))
            return fn
        try:
            jitted = triton.jit(fn, do_not_specialize=dns, do_not_specialize_on_alignment=dnsoa)
        except TypeError:  # a Triton without do_not_specialize_on_alignment: pointers stay aligned-specialized
            jitted, dnsoa = triton.jit(fn, do_not_specialize=dns), ()
        _UNSPECIALIZED[fn.__name__] = (frozenset(dns), frozenset(dnsoa))
        return jitted
    return wrap


_LOG2E = 1.4426950408889634
# Tiles for 16-bit caches, for head_dim <= 64 ("half") and above ("half_wide"), chosen so that the
# fused kernels compile for sm_80 and sm_90 with no register spills (tests/triton_sass_check.py
# checks it with Triton's ptxas; no GPU needed). They are not yet tuned for speed on a GPU.
# float32 (an FMA dot, a correctness path rather than a serving one) uses small tiles.
_DECODE_CONFIG = {"half": dict(BLOCK_N=64, num_warps=4, num_stages=3),
                  "half_wide": dict(BLOCK_N=32, num_warps=8, num_stages=3),
                  "float32": dict(BLOCK_N=32, num_warps=8, num_stages=2)}
_PREFILL_CONFIG = {"half": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
                   "half_wide": dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=3),
                   "float32": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)}
_OFFSET_64_FROM = 2**31  # cache elements from which offsets into it need int64


def is_available() -> bool:
    """Triton is importable and can run: on a CUDA device, or on CPU through TRITON_INTERPRET=1."""
    if triton is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@_kernel(do_not_specialize=("stride_kt", "stride_kh", "stride_vt", "stride_vh"),
         do_not_specialize_on_alignment=("key_ptr", "value_ptr", "slot_ptr"))
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    src_k = token.to(tl.int64) * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    src_v = token.to(tl.int64) * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct
    dst = dst + offs_h[:, None] * stride_ch + offs_d[None, :]
    tl.store(k_cache_ptr + dst, tl.load(key_ptr + src_k, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(value_ptr + src_v, mask=mask), mask=mask)


@_jit
def _tanh_exp(x):
    t = tl.exp(-2.0 * tl.abs(x))  # in (0, 1]: never overflows
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@_jit
def _tanh_libdevice(x):
    return libdevice.tanh(x)


# The soft-cap's tanh. Compiled: libdevice's (CUDA's tanhf, within 2 ulp; the exp form above loses
# relative accuracy to cancellation for small |x| and runs on ex2.approx and an approximate division).
# The interpreter has no libdevice, so it keeps the exp form.
_tanh = _tanh_exp
if triton is not None and not _INTERPRET:
    try:
        from triton.language.extra import libdevice
        _tanh = _tanh_libdevice
    except ImportError:
        pass


@_jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # The interpreter multiplies bfloat16 operands as raw uint16 bits, so it gets float32 copies.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@_jit
def _attend_block(
    q, qpos, row_valid, acc, m, l, n0, end, k_ptr, v_ptr, block_table_ptr, head_off, stride_kb, stride_kt,
    v_head_off, stride_vt, row_shift, score_scale, cap_scale, window,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    MASK_N: tl.constexpr, FROM_CACHE: tl.constexpr, OFFSET_64: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One online-softmax step over keys [n0, n0 + BLOCK_N); only a tail block (MASK_N) masks its loads.

    FROM_CACHE: key position p is read through the block table from the paged cache. Otherwise it is
    row p + row_shift of the step's own key/value tensors (token strides stride_kt / stride_vt, head
    offsets head_off / v_head_off).
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if MASK_N:
        n_mask = offs_n < end
    if FROM_CACHE:
        if MASK_N:
            block = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        else:
            block = tl.load(block_table_ptr + offs_n // BLOCK_SIZE)
        if OFFSET_64:
            block = block.to(tl.int64)
        k_off = block * stride_kb + (offs_n % BLOCK_SIZE) * stride_kt + head_off
        v_off = k_off
    else:
        row = (offs_n + row_shift).to(tl.int64)
        k_off = row * stride_kt + head_off
        v_off = row * stride_vt + v_head_off
    k_ptrs = k_off[:, None] + offs_d[None, :]
    v_ptrs = v_off[:, None] + offs_d[None, :]
    if MASK_N:
        kv_mask = n_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_ptr + k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + v_ptrs, mask=kv_mask, other=0.0)
    elif HEAD_DIM != BLOCK_D:
        k = tl.load(k_ptr + k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        v = tl.load(v_ptr + v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        k = tl.load(k_ptr + k_ptrs)
        v = tl.load(v_ptr + v_ptrs)
    s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST)
    if USE_SOFTCAP:
        s = _tanh(s * score_scale) * cap_scale
    else:
        s = s * score_scale
    visible = row_valid[:, None] & (offs_n[None, :] <= qpos[:, None])
    if MASK_N:
        visible = visible & n_mask[None, :]
    if USE_WINDOW:
        visible = visible & (offs_n[None, :] > qpos[:, None] - window)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
    return acc, m_new, l


@_jit
def _attend_range(
    q, qpos, row_valid, acc, m, l, start, end, k_ptr, v_ptr, block_table_ptr, head_off, stride_kb, stride_kt,
    v_head_off, stride_vt, row_shift, score_scale, cap_scale, window,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    FROM_CACHE: tl.constexpr, OFFSET_64: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Online softmax of rows q (positions qpos) over keys [start, end), continuing acc, max, sum (base 2)."""
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    for n0 in range(start, full_end, BLOCK_N):
        acc, m, l = _attend_block(
            q, qpos, row_valid, acc, m, l, n0, end, k_ptr, v_ptr, block_table_ptr, head_off, stride_kb, stride_kt,
            v_head_off, stride_vt, row_shift, score_scale, cap_scale, window, BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE,
            False, FROM_CACHE, OFFSET_64, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION, UPCAST,
        )
    if full_end < end:
        acc, m, l = _attend_block(
            q, qpos, row_valid, acc, m, l, full_end, end, k_ptr, v_ptr, block_table_ptr, head_off, stride_kb,
            stride_kt, v_head_off, stride_vt, row_shift, score_scale, cap_scale, window, BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE,
            True, FROM_CACHE, OFFSET_64, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION, UPCAST,
        )
    return acc, m, l


@_jit
def _store_step_kv(
    key_ptr, value_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, first_token, count, kv_head,
    stride_kb, stride_kt, stride_kh, stride_nt, stride_nh, stride_vt, stride_vh,
    BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """Write tokens [first_token, first_token + count) of the step's key/value, head kv_head, at
    their slots (-1 skips). Runs before the attention so nothing of it is live meanwhile."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    for i in range(0, count):
        token = (first_token + i).to(tl.int64)
        slot = tl.load(slot_ptr + token)
        if slot >= 0:
            k = tl.load(key_ptr + token * stride_nt + kv_head * stride_nh + offs_d, mask=d_mask)
            v = tl.load(value_ptr + token * stride_vt + kv_head * stride_vh + offs_d, mask=d_mask)
            dst = (slot // BLOCK_SIZE).to(tl.int64) * stride_kb + (slot % BLOCK_SIZE) * stride_kt
            dst = dst + kv_head * stride_kh + offs_d
            tl.store(k_cache_ptr + dst, k, mask=d_mask)
            tl.store(v_cache_ptr + dst, v, mask=d_mask)


@_jit
def _attend(
    q, qpos, row_valid, start, end, new_start, k_cache_ptr, v_cache_ptr, block_table_ptr,
    key_ptr, value_ptr, first_token, kv_head,
    stride_kb, stride_kt, stride_kh, stride_nt, stride_nh, stride_vt, stride_vh, score_scale, cap_scale, window,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, FUSED: tl.constexpr, OFFSET_64: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Attend keys [start, end). FUSED: positions from new_start on are this step's tokens (token
    first_token + p - new_start of key/value), read from there rather than from the cache."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    cache_end = end
    if FUSED:
        cache_end = tl.minimum(end, new_start)
    acc, m, l = _attend_range(
        q, qpos, row_valid, acc, m, l, start, cache_end, k_cache_ptr, v_cache_ptr, block_table_ptr,
        kv_head * stride_kh, stride_kb, stride_kt, kv_head * stride_kh, stride_kt, 0, score_scale, cap_scale, window,
        BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, True, OFFSET_64, USE_SOFTCAP, USE_WINDOW, DOT_PRECISION, UPCAST,
    )
    if FUSED:
        acc, m, l = _attend_range(
            q, qpos, row_valid, acc, m, l, tl.maximum(start, new_start), end, key_ptr, value_ptr,
            block_table_ptr, kv_head * stride_nh, 0, stride_nt, kv_head * stride_vh, stride_vt,
            first_token - new_start, score_scale, cap_scale, window,
            BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, False, OFFSET_64, USE_SOFTCAP, USE_WINDOW,
            DOT_PRECISION, UPCAST,
        )
    return acc, m, l


@_kernel(do_not_specialize=("stride_qs", "stride_qh", "stride_bt", "stride_nt", "stride_nh", "stride_vt",
                             "stride_vh", "stride_os", "stride_oh", "window", "num_splits"),
         do_not_specialize_on_alignment=("q_ptr", "block_tables_ptr", "seq_lens_ptr", "key_ptr", "value_ptr",
                                         "slot_ptr", "out_ptr", "part_out_ptr", "part_m_ptr", "part_l_ptr"))
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, key_ptr, value_ptr, slot_ptr,
    out_ptr, part_out_ptr, part_m_ptr, part_l_ptr,
    stride_qs, stride_qh, stride_bt, stride_kb, stride_kt, stride_kh, stride_nt, stride_nh, stride_vt, stride_vh,
    stride_os, stride_oh,
    score_scale, cap_scale, window, num_splits,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, FUSED: tl.constexpr, OFFSET_64: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_start = 0
    if USE_WINDOW:
        ctx_start = tl.maximum(seq_len - window, 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - ctx_start, num_splits), BLOCK_N) * BLOCK_N
    start = ctx_start + split * per_split
    end = tl.minimum(start + per_split, seq_len)

    if FUSED:
        # the new token (position seq_len - 1, token `seq` of the step) is stored by the split holding it
        holds_new = (start <= seq_len - 1) & (seq_len - 1 < end)
        _store_step_kv(key_ptr, value_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, seq, tl.where(holds_new, 1, 0),
                       kv_head, stride_kb, stride_kt, stride_kh, stride_nt, stride_nh, stride_vt, stride_vh,
                       BLOCK_D, HEAD_DIM, BLOCK_SIZE)

    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = rows < GROUP
    heads = kv_head * GROUP + rows
    mask = row_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_off = seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=mask, other=0.0)
    qpos = tl.zeros([BLOCK_M], tl.int32) + (seq_len - 1)
    acc, m, l = _attend(
        q, qpos, row_valid, start, end, seq_len - 1, k_cache_ptr, v_cache_ptr,
        block_tables_ptr + seq.to(tl.int64) * stride_bt, key_ptr, value_ptr, seq, kv_head,
        stride_kb, stride_kt, stride_kh, stride_nt, stride_nh, stride_vt, stride_vh, score_scale, cap_scale, window,
        BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, FUSED, OFFSET_64, USE_SOFTCAP, USE_WINDOW,
        DOT_PRECISION, UPCAST,
    )
    if SPLIT:
        part = (seq * NUM_HEADS + heads).to(tl.int64) * num_splits + split
        tl.store(part_m_ptr + part, m, mask=row_valid)
        tl.store(part_l_ptr + part, l, mask=row_valid)
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=mask)
    else:
        out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
        o_off = seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=mask)


@_kernel(do_not_specialize=("stride_os", "stride_oh", "num_splits"),
         do_not_specialize_on_alignment=("part_out_ptr", "part_m_ptr", "part_l_ptr", "out_ptr"))
def _decode_reduce_kernel(
    part_out_ptr, part_m_ptr, part_l_ptr, out_ptr, stride_os, stride_oh, num_splits,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    part = (seq * NUM_HEADS + head).to(tl.int64) * num_splits + offs_s
    m = tl.load(part_m_ptr + part, mask=s_mask, other=float("-inf"))
    l = tl.load(part_l_ptr + part, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    denom = tl.sum(weight * l, 0)
    mask = s_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    acc = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    o_off = seq.to(tl.int64) * stride_os + head * stride_oh + offs_d
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@_kernel(do_not_specialize=("stride_qt", "stride_qh", "stride_bt", "stride_nt", "stride_nh", "stride_vt",
                             "stride_vh", "stride_ot", "stride_oh", "window"),
         do_not_specialize_on_alignment=("q_ptr", "block_tables_ptr", "cu_seqlens_q_ptr", "seq_lens_ptr",
                                         "key_ptr", "value_ptr", "slot_ptr", "out_ptr"))
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_q_ptr, seq_lens_ptr, key_ptr, value_ptr,
    slot_ptr, out_ptr,
    stride_qt, stride_qh, stride_bt, stride_kb, stride_kt, stride_kh, stride_nt, stride_nh, stride_vt, stride_vh,
    stride_ot, stride_oh,
    score_scale, cap_scale, window,
    GROUP: tl.constexpr, TOKENS_PER_TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FUSED: tl.constexpr, OFFSET_64: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    tok0 = tile * TOKENS_PER_TILE
    if tok0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    chunk_start = seq_len - q_len
    first_pos = chunk_start + tok0
    end = chunk_start + tl.minimum(tok0 + TOKENS_PER_TILE, q_len)
    start = 0
    if USE_WINDOW:
        start = tl.maximum(first_pos - window + 1, 0)

    if FUSED:
        # each tile stores its own tokens; no program reads the chunk's keys from the cache
        _store_step_kv(key_ptr, value_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, q_start + tok0,
                       end - first_pos, kv_head, stride_kb, stride_kt, stride_kh, stride_nt, stride_nh,
                       stride_vt, stride_vh, BLOCK_D, HEAD_DIM, BLOCK_SIZE)

    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tok = tok0 + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_valid = (rows < TOKENS_PER_TILE * GROUP) & (tok < q_len)
    mask = row_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    token = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask, other=0.0)
    acc, m, l = _attend(
        q, first_pos + rows // GROUP, row_valid, start, end, chunk_start, k_cache_ptr, v_cache_ptr,
        block_tables_ptr + seq.to(tl.int64) * stride_bt, key_ptr, value_ptr, q_start, kv_head,
        stride_kb, stride_kt, stride_kh, stride_nt, stride_nh, stride_vt, stride_vh,
        score_scale, cap_scale, window, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, BLOCK_SIZE, FUSED, OFFSET_64,
        USE_SOFTCAP, USE_WINDOW, DOT_PRECISION, UPCAST,
    )
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    o_off = token[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=mask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.shape == v_cache.shape and k_cache.dim() == 4, "cache is [blocks, block_size, kv_heads, head_dim]"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "k/v caches must share a contiguous layout"


def _score_scales(scale: float, softcap: float | None) -> tuple[float, float]:
    """(multiplier before tanh, multiplier after it), folding in log2(e) for exp2."""
    if softcap:
        return scale / softcap, softcap * _LOG2E
    return scale * _LOG2E, 1.0


def _config(table: dict, dtype: torch.dtype, head_dim: int) -> dict:
    if dtype == torch.float32:
        return dict(table["float32"])
    return dict(table["half" if head_dim <= 64 else "half_wide"])


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and type(_decode_kernel).__name__ == "InterpretedFunction"


@functools.lru_cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _auto_num_splits(query: torch.Tensor, num_kv_heads: int, max_context: int) -> int:
    """Enough splits to give ~2 programs per SM, each over at least 256 tokens; no device sync."""
    sms = _sm_count(query.device) if query.is_cuda else 8
    programs = query.shape[0] * num_kv_heads
    wanted = math.ceil(2 * sms / max(programs, 1))
    return max(1, min(wanted, max_context // 256, MAX_SPLITS))


# ---------------------------------------------------------------------------------------------
# Variants: what makes Triton compile, bounded, enumerable and recordable.
#
# Triton compiles one kernel per specialization key: the constexpr values (and launch options), the
# type of every argument, and for arguments it specializes, an int's ==1 / %16 and a pointer's
# 16-byte alignment. The kernels above leave every step-dependent argument unspecialized (see
# _UNSPECIALIZED), so per model the constexprs alone pick the variant, and they take few values:
#   decode: SPLIT in {False, True} (the reduce kernel has one variant: BLOCK_S is MAX_SPLITS);
#   prefill: BLOCK_M in prefill_buckets() (at most 3), TOKENS_PER_TILE = BLOCK_M // GROUP;
#   both: per layer kind USE_SOFTCAP / USE_WINDOW, and OFFSET_64 (fixed by the pool's size).
# ---------------------------------------------------------------------------------------------

# a decode table this wide (in tokens) splits whenever the GPU has room: _auto_num_splits wants >= 2 x 256
WARMUP_SPLIT_CONTEXT = 1024
MAX_SPLITS = 32   # most split-K parts of a decode (_auto_num_splits caps at it); the reduce kernel's BLOCK_S

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "u1", torch.float64: "fp64"}


class VariantKey(NamedTuple):
    """One compiled kernel variant, as Triton keys it (our view: independent of the Triton version).

    constexprs: sorted (name, value) pairs, with the launch options num_warps / num_stages.
    args: (name, spec) for every non-float argument in order: a pointer "*bf16" (alignment not
    specialized) or "*bf16:D" / "*bf16:-" (16-byte aligned or not); an int "i32" (not specialized)
    or "i32:1" / "i32:D" / "i32:-" (== 1, a multiple of 16, neither)."""
    kernel: str
    constexprs: tuple
    args: tuple

    def __str__(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.kernel}[{consts}]({','.join(f'{k}:{v}' for k, v in self.args)})"


_recorder: set | None = None        # set while recording: every launch's VariantKey goes in
_dry_threads: dict[int, set] = {}   # enumerating threads: their launches are keyed, not run
_record_lock = threading.Lock()


def _kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", str(kernel))


def _arg_spec(value, specialize: bool, align: bool) -> str | None:
    if isinstance(value, torch.Tensor):
        ty = "*" + _DTYPE_NAMES.get(value.dtype, str(value.dtype))
        return ty + (":D" if value.data_ptr() % 16 == 0 else ":-") if align else ty
    if isinstance(value, bool):
        return "u1"
    if isinstance(value, int):
        ty = "i32" if -2**31 <= value < 2**31 else "i64"
        return ty + (":1" if value == 1 else ":D" if value % 16 == 0 else ":-") if specialize else ty
    return None   # floats are never specialized


def launch_key(kernel, args: tuple, constexprs: dict) -> VariantKey:
    """The specialization key of launching `kernel` with positional `args` (its non-constexpr
    parameters, in order) and keyword `constexprs` (constexprs and launch options)."""
    name = _kernel_name(kernel)
    dns, dnsoa = _UNSPECIALIZED[name]
    specs = tuple((p, spec) for p, v in zip(_PARAMS[name], args)
                  if (spec := _arg_spec(v, p not in dns, p not in dnsoa)) is not None)
    return VariantKey(name, tuple(sorted(constexprs.items())), specs)


def _launch(kernel, grid, args: tuple, constexprs: dict) -> None:
    if _recorder is not None or _dry_threads:   # off: one global check per launch
        key = launch_key(kernel, args, constexprs)
        dry = _dry_threads.get(threading.get_ident())
        if dry is not None:
            dry.add(key)
            return
        if _recorder is not None:
            with _record_lock:
                _recorder.add(key)
    kernel[grid](*args, **constexprs)


@contextlib.contextmanager
def record_variants():
    """Record the VariantKey of every kernel launch (from any thread) while the block runs:
    `with record_variants() as keys: ...` leaves the keys in the set `keys`. Off by default; when
    off a launch pays one module-level check."""
    global _recorder
    previous, keys = _recorder, set()
    _recorder = keys
    try:
        yield keys
    finally:
        if previous is not None:
            previous.update(keys)
        _recorder = previous


def _bools(flag) -> tuple[bool, ...]:
    if isinstance(flag, (str, bytes)) or not hasattr(flag, "__iter__"):
        return (bool(flag),)
    return tuple(sorted({bool(f) for f in flag}))


def enumerate_variants(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                       softcap=False, window=False, offset64=False) -> frozenset[VariantKey]:
    """Every kernel variant a server of this attention shape can launch (the engine's fused calls).

    softcap / window / offset64: a bool, or a collection of bools for all of them (e.g. Gemma-2's
    sliding and global layers: window=(False, True)). Per (softcap, window, offset64): 2 decode
    variants (split or not), 1 reduce, and one prefill per prefill_buckets() entry. The launches
    are the wrappers' own, made on tiny CPU tensors in this thread without running."""
    keys: set = set()
    me = threading.get_ident()
    _dry_threads[me] = keys
    try:
        group = num_heads // num_kv_heads
        cache = torch.zeros(1, block_size, num_kv_heads, head_dim, dtype=dtype)
        for cap in _bools(softcap):
            for win in _bools(window):
                kw = dict(sliding_window=4 if win else None, softcap=1.0 if cap else None)
                for splits in (1, 2):
                    q, k, v = _step_tensors(1, num_heads, num_kv_heads, head_dim, dtype)
                    paged_decode_attention(q, cache, cache, torch.zeros(1, 1, dtype=torch.int32),
                                           torch.ones(1, dtype=torch.int32), 1.0, num_splits=splits, key=k,
                                           value=v, slot_mapping=torch.full((1,), -1), **kw)
                for _, q_len in prefill_buckets(group, dtype, head_dim):
                    q, k, v = _step_tensors(q_len, num_heads, num_kv_heads, head_dim, dtype)
                    paged_prefill_attention(q, cache, cache, torch.zeros(1, 1, dtype=torch.int32),
                                            torch.tensor([0, q_len], dtype=torch.int32),
                                            torch.tensor([q_len], dtype=torch.int32), 1.0, max_seqlen_q=q_len,
                                            key=k, value=v, slot_mapping=torch.full((q_len,), -1), **kw)
    finally:
        del _dry_threads[me]
    flags = _bools(offset64)
    return frozenset(_with_constexpr(key, "OFFSET_64", off) if "OFFSET_64" in dict(key.constexprs) else key
                     for key in keys for off in flags)


def _with_constexpr(key: VariantKey, name: str, value) -> VariantKey:
    return key._replace(constexprs=tuple((k, value if k == name else v) for k, v in key.constexprs))


def _step_tensors(tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
    """q, key, value as the attention interface hands them on: views of [1, heads, tokens, head_dim]."""
    q = torch.zeros(1, num_heads, tokens, head_dim, dtype=dtype)[0].transpose(0, 1)
    k = torch.zeros(1, num_kv_heads, tokens, head_dim, dtype=dtype)[0].transpose(0, 1)
    return q, k, torch.zeros_like(k)


def prefill_block_m(max_seqlen_q: int, group: int, dtype: torch.dtype, head_dim: int) -> int:
    """The prefill tile height (rows = token x group head): a power of two from
    max(16, next_pow2(group)) up to the config's BLOCK_M, the smallest that holds the longest chunk."""
    block_m_max = _config(_PREFILL_CONFIG, dtype, head_dim)["BLOCK_M"]
    return max(16, min(block_m_max, _next_pow2(max_seqlen_q * group)), _next_pow2(group))


@functools.lru_cache
def prefill_buckets(group: int, dtype: torch.dtype, head_dim: int) -> tuple[tuple[int, int], ...]:
    """(BLOCK_M, the smallest max_seqlen_q that selects it) for every tile height the prefill uses."""
    out: dict[int, int] = {}
    q_len = 1
    while True:
        block_m = prefill_block_m(q_len, group, dtype, head_dim)
        out.setdefault(block_m, q_len)
        if block_m == prefill_block_m(10**6, group, dtype, head_dim):
            return tuple(sorted(out.items()))
        q_len += 1


# ---------------------------------------------------------------------------------------------
# Late-compile detection
# ---------------------------------------------------------------------------------------------

_compiles = 0
_compile_hook = None


def _install_compile_hook() -> None:
    global _compile_hook
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
        return
    previous = runtime.jit_post_compile_hook

    def hook(*args, **kwargs):
        global _compiles
        fn = kwargs.get("fn")
        if getattr(fn, "module", None) == __name__ or getattr(fn, "jit_function", None) in _LAUNCHED:
            _compiles += 1
        return previous(*args, **kwargs) if previous is not None else None

    try:
        runtime.jit_post_compile_hook = hook
        _compile_hook = hook
    except Exception:  # a knob that refuses assignment: fall back to the JIT caches
        pass


def _cached_kernels() -> int:
    """Entries in our kernels' JIT caches (Triton's per-device kernel dicts)."""
    total = 0
    for kernel in _LAUNCHED:
        caches = getattr(kernel, "device_caches", None)
        if caches is not None:   # Triton >= 3.2: device -> (kernel_cache, ...)
            for entry in list(caches.values()):
                first = entry[0] if isinstance(entry, tuple) and entry else None
                total += len(first) if isinstance(first, dict) else 0
            continue
        cache = getattr(kernel, "cache", None)   # older: device -> {key: kernel}
        if isinstance(cache, dict):
            total += sum(len(v) for v in cache.values() if isinstance(v, dict))
    return total


def interpreted() -> bool:
    """The kernels run in Triton's interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return _INTERPRET


def num_compiles() -> int:
    """Kernels of this module compiled (or loaded from Triton's disk cache, which is a new
    specialization all the same) by this process. 0 under the interpreter or without Triton. Read
    it before and after a step: any increase after warm-up is a late compile."""
    if triton is None or _INTERPRET:
        return 0
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if _compile_hook is not None and getattr(runtime, "jit_post_compile_hook", None) is _compile_hook:
        return _compiles
    return _cached_kernels()   # no hook, or someone replaced ours


# ---------------------------------------------------------------------------------------------
# The wrappers
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _decode_constexprs(num_heads, num_kv_heads, head_dim, block_size, dtype, split, fused, offset64, softcap,
                       window) -> dict:
    group = num_heads // num_kv_heads
    return dict(NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                BLOCK_M=max(16, _next_pow2(group)), BLOCK_D=max(16, _next_pow2(head_dim)), SPLIT=split, FUSED=fused,
                OFFSET_64=offset64, USE_SOFTCAP=softcap, USE_WINDOW=window, DOT_PRECISION=_dot_precision(dtype),
                UPCAST=_upcast_dot(dtype), **_config(_DECODE_CONFIG, dtype, head_dim))


@functools.lru_cache(maxsize=64)
def _reduce_constexprs(num_heads, head_dim, num_splits) -> dict:
    return dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_S=max(MAX_SPLITS, _next_pow2(num_splits)),
                BLOCK_D=max(16, _next_pow2(head_dim)), num_warps=4)


@functools.lru_cache(maxsize=256)
def _prefill_constexprs(group, head_dim, block_size, dtype, block_m, fused, offset64, softcap, window) -> dict:
    config = _config(_PREFILL_CONFIG, dtype, head_dim)
    del config["BLOCK_M"]
    return dict(GROUP=group, TOKENS_PER_TILE=block_m // group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                BLOCK_M=block_m, BLOCK_D=max(16, _next_pow2(head_dim)), FUSED=fused, OFFSET_64=offset64,
                USE_SOFTCAP=softcap, USE_WINDOW=window, DOT_PRECISION=_dot_precision(dtype),
                UPCAST=_upcast_dot(dtype), **config)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into the cache at slot_mapping (-1 skips)."""
    _check_cache(k_cache, v_cache)
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape and key.stride(-1) == 1 and value.stride(-1) == 1
    assert k_cache.shape[2:] == (num_kv_heads, head_dim) and slot_mapping.shape == (num_tokens,)
    if num_tokens == 0:
        return
    _launch(_store_kv_kernel, (num_tokens,), (
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
    ), dict(NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
            BLOCK_H=_next_pow2(num_kv_heads), BLOCK_D=_next_pow2(head_dim)))


def _new_kv(key, value, slot_mapping, num_tokens, k_cache):
    """Checks the step's own K/V for a fused call; returns kernel args (dummies when not fused)."""
    if key is None:
        assert value is None and slot_mapping is None, "key, value and slot_mapping go together"
        return False, k_cache, k_cache, k_cache.new_empty(0, dtype=torch.long), (0, 0, 0, 0)
    assert key.shape == value.shape and key.stride(-1) == 1 and value.stride(-1) == 1
    assert key.shape[0] == num_tokens and key.shape[1:] == k_cache.shape[2:] and slot_mapping.shape == (num_tokens,)
    return True, key, value, slot_mapping, (key.stride(0), key.stride(1), value.stride(0), value.stride(1))


def _output(query: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(query, memory_format=torch.contiguous_format)
    assert out.shape == query.shape and out.dtype == query.dtype and out.stride(-1) == 1
    return out


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None, softcap: float | None = None,
                           num_splits: int | None = None, key: torch.Tensor | None = None,
                           value: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence at position seq_lens[i] - 1; returns [num_seqs, num_heads, head_dim].

    With key/value [num_seqs, num_kv_heads, head_dim] and slot_mapping [num_seqs] (fused), the new
    token's K/V is taken from them and written into the cache by the same launch (slot -1 skips the
    write); the cache then only needs positions [0, seq_lens[i] - 1).
    """
    _check_cache(k_cache, v_cache)
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert query.stride(-1) == 1 and num_heads % num_kv_heads == 0 and k_cache.shape[3] == head_dim
    fused, key, value, slot_mapping, new_strides = _new_kv(key, value, slot_mapping, num_seqs, k_cache)
    out = _output(query, out)
    if num_seqs == 0:
        return out
    max_context = block_tables.shape[1] * block_size
    if sliding_window:
        max_context = min(max_context, sliding_window)
    if num_splits is None:
        num_splits = _auto_num_splits(query, num_kv_heads, max_context)
    split = num_splits > 1
    if split:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        part_m = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
    else:
        part_out = part_m = part_l = out
    score_scale, cap_scale = _score_scales(scale, softcap)
    _launch(_decode_kernel, (num_seqs, num_kv_heads, num_splits), (
        query, k_cache, v_cache, block_tables, seq_lens, key, value, slot_mapping,
        out, part_out, part_m, part_l,
        query.stride(0), query.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *new_strides, out.stride(0), out.stride(1),
        score_scale, cap_scale, sliding_window or 0, num_splits,
    ), _decode_constexprs(num_heads, num_kv_heads, head_dim, block_size, query.dtype, split, fused,
                          k_cache.numel() >= _OFFSET_64_FROM, bool(softcap), bool(sliding_window)))
    if split:
        _launch(_decode_reduce_kernel, (num_seqs, num_heads),
                (part_out, part_m, part_l, out, out.stride(0), out.stride(1), num_splits),
                _reduce_constexprs(num_heads, head_dim, num_splits))
    return out


def paged_prefill_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float, sliding_window: int | None = None, softcap: float | None = None,
                            max_seqlen_q: int | None = None, key: torch.Tensor | None = None,
                            value: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Varlen causal attention: sequence i's queries are the last q_len of its seq_lens[i] positions.

    With key/value [total_q, num_kv_heads, head_dim] and slot_mapping [total_q] (fused), the chunk's
    own K/V is read from them and written into the cache in the same launch (slot -1 skips the
    write); the cache then only needs each sequence's prefix before its chunk.
    """
    _check_cache(k_cache, v_cache)
    total_q, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert query.stride(-1) == 1 and num_heads % num_kv_heads == 0 and k_cache.shape[3] == head_dim
    fused, key, value, slot_mapping, new_strides = _new_kv(key, value, slot_mapping, total_q, k_cache)
    group = num_heads // num_kv_heads
    num_seqs = cu_seqlens_q.shape[0] - 1
    out = _output(query, out)
    if total_q == 0 or num_seqs == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    block_m = prefill_block_m(max_seqlen_q, group, query.dtype, head_dim)
    score_scale, cap_scale = _score_scales(scale, softcap)
    grid = (triton.cdiv(max_seqlen_q, block_m // group), num_seqs, num_kv_heads)
    _launch(_prefill_kernel, grid, (
        query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, key, value, slot_mapping, out,
        query.stride(0), query.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *new_strides, out.stride(0), out.stride(1),
        score_scale, cap_scale, sliding_window or 0,
    ), _prefill_constexprs(group, head_dim, block_size, query.dtype, block_m, fused,
                           k_cache.numel() >= _OFFSET_64_FROM, bool(softcap), bool(sliding_window)))
    return out


def paged_attention_fused(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                          block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                          scale: float, sliding_window: int | None = None, softcap: float | None = None,
                          max_seqlen_q: int | None = None) -> torch.Tensor:
    """A mixed prefill/decode batch in one launch: attend, and write the step's K/V at its slots."""
    return paged_prefill_attention(query, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                   sliding_window, softcap, max_seqlen_q, key=key, value=value,
                                   slot_mapping=slot_mapping)


_LAUNCHED = (_decode_kernel, _decode_reduce_kernel, _prefill_kernel, _store_kv_kernel)
if triton is not None and not _INTERPRET:
    _install_compile_hook()

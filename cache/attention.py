"""Paged attention in PyTorch (the reference path, and the CPU path).

Each layer first writes the step's new K/V at their slots, then attends over each sequence's
blocks. Work follows the tokens actually attended: prefill chunks attend per sequence with a
[q_len, keys] mask; single-token decodes are grouped by context length and batched, so padding
within a group stays small. Metadata that depends only on the batch is built once per step and
shared by every layer (per sliding-window size).
"""
from __future__ import annotations

import contextlib
import threading
from array import array
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvserve.cache.kv_pool import pack_tables

DECODE_GROUP_PADDING = 1.25  # padded work / real work allowed inside one decode group


@dataclass
class PrefillSeq:
    q_start: int
    q_len: int
    ctx_len: int          # tokens in the sequence after this chunk (cached prefix + chunk)
    slots: torch.Tensor   # slot of every position [0, ctx_len)


@dataclass
class DecodeGroup:
    rows: slice | torch.Tensor     # its B rows of the packed batch: a slice when they are consecutive
    blocks: torch.Tensor | slice   # [B * nb] block ids covering the attended keys, padded; a slice of the
                                   # pool when the group is one row whose blocks are consecutive (no gather)
    mask: torch.Tensor | None      # [B, 1, nb * block_size] True where not attended; None if all are
    keys: slice | None = None      # when every row attends the same span of its gathered blocks: that
                                   # span (no mask needed; mask is then None)


@dataclass
class TritonBatch:
    """What the Triton kernels take. The first num_decodes rows are single-token decodes (the
    scheduler puts decodes first): one split-K decode launch. The rest are prefill chunks: one
    varlen launch. Both write the step's K/V into the cache themselves (fused)."""
    block_tables: torch.Tensor    # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor        # int32 [num_seqs]
    num_decodes: int
    cu_seqlens_q: torch.Tensor    # int32 [num_prefills + 1], token offsets from row num_decodes
    max_seqlen_q: int             # longest prefill chunk (0 when there is none)


@dataclass
class AttentionMetadata:
    """What every layer needs to find its K/V for this step."""
    slot_mapping: torch.Tensor                 # [num_tokens] where each new token's K/V goes
    prefills: list[PrefillSeq]
    decode_index: torch.Tensor | None           # rows of single-token decodes
    decode_ctx_lens: list[int]
    decode_tables: list                         # per decode seq: its block table (array("i") or list)
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    triton: "TritonBatch | None" = None        # set when the Triton kernels run this step
    _groups: dict = field(default_factory=dict)
    _masks: dict = field(default_factory=dict)

    def decode_groups(self, window: int | None) -> list[DecodeGroup]:
        if window not in self._groups:
            self._groups[window] = _group_decodes(self, window)
        return self._groups[window]

    def prefill_mask(self, i: int, window: int | None) -> tuple[int, torch.Tensor | None]:
        """First key position attended by prefill i, and its [q_len, keys] mask (None: plain causal)."""
        key = (i, window)
        if key not in self._masks:
            self._masks[key] = _prefill_mask(self.prefills[i], window)
        return self._masks[key]


def _group_decodes(meta: AttentionMetadata, window: int | None) -> list[DecodeGroup]:
    """Group decodes by the number of blocks they attend, bounding padding per group."""
    if meta.decode_index is None:
        return []
    bs = meta.kv_caches[0][0].shape[1]
    ctx = meta.decode_ctx_lens
    starts = [max(0, c - window) if window else 0 for c in ctx]
    first = [s // bs for s in starts]
    nblocks = [-(-c // bs) - f for c, f in zip(ctx, first)]
    order = sorted(range(len(ctx)), key=lambda i: -nblocks[i])
    groups, current, real = [], [], 0
    for i in order:
        if current and nblocks[current[0]] * (len(current) + 1) > DECODE_GROUP_PADDING * (real + nblocks[i]):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += nblocks[i]
    groups.append(current)
    device = meta.slot_mapping.device
    out = []
    for g in groups:
        nb = nblocks[g[0]]
        if len(g) == 1:      # one row (batch-1 decode): its blocks, when they are a run of ids, are a view
            i = g[0]
            table = meta.decode_tables[i][first[i]:first[i] + nb]
            if _is_run(table):
                rows = slice(i, i + 1)      # decode i is row i of the packed batch (decodes come first)
                lo = starts[i] - first[i] * bs
                out.append(DecodeGroup(rows, slice(table[0], table[0] + nb), None, slice(lo, ctx[i] - first[i] * bs)))
                continue
        # each row's attended blocks, zero-padded to the group's width: one memcpy per row
        blocks = pack_tables([meta.decode_tables[i][first[i]:first[i] + nblocks[i]] for i in g],
                             torch.empty(len(g), nb, dtype=torch.int32)).view(-1).to(device=device, dtype=torch.long)
        # decode i is row i of the packed batch (decodes come first), so consecutive decodes are a slice
        rows = slice(g[0], g[0] + len(g)) if g == list(range(g[0], g[0] + len(g))) else meta.decode_index[g]
        spans = {(starts[i] - first[i] * bs, ctx[i] - first[i] * bs) for i in g}
        if len(spans) == 1:     # e.g. one row: slice the gathered keys instead of building a mask (no padding)
            (lo, hi), = spans
            out.append(DecodeGroup(rows, blocks, None, slice(lo, hi)))
            continue
        # positions relative to each row's first gathered block: a key is masked past the row's context
        # or (with a window) before its start
        offsets = torch.arange(nb * bs)[None, :]
        mask = offsets >= torch.tensor([ctx[i] - first[i] * bs for i in g])[:, None]
        if window:
            mask |= offsets < torch.tensor([starts[i] - first[i] * bs for i in g])[:, None]
        out.append(DecodeGroup(rows, blocks, mask[:, None, :].to(device)))
    return out


def _is_run(table) -> bool:
    """Block ids b, b+1, ..., b+n-1: a freshly allocated sequence's often are (the pool hands out blocks
    in order), and then its keys are a view of the pool instead of a gathered copy."""
    if not table:
        return False
    run = range(table[0], table[0] + len(table))
    return table == (array("i", run) if isinstance(table, array) else list(run))


def _prefill_mask(p: PrefillSeq, window: int | None) -> tuple[int, torch.Tensor | None]:
    first_q = p.ctx_len - p.q_len
    k_start = max(0, first_q - window + 1) if window else 0
    if k_start == 0 and first_q == 0 and (not window or window >= p.ctx_len):
        return 0, None
    device = p.slots.device
    q_pos = torch.arange(first_q, p.ctx_len, device=device)[:, None]
    k_pos = torch.arange(k_start, p.ctx_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window:
        allowed &= k_pos > q_pos - window
    return k_start, allowed


_STEP = threading.local()      # .meta: the step a compiled forward runs, in this thread (see forward_context)
uncompiled_calls = 0           # paged_attention calls without kv_meta that dynamo did not trace


@contextlib.contextmanager
def forward_context(meta: AttentionMetadata):
    """The metadata of the step a torch.compile'd forward runs. A compiled graph cannot take a Python
    object as an input, so its attention layers call the opaque op kvserve::paged_attention, which
    finds the step's block tables here (per thread: two offline engines may step in two threads)."""
    previous = getattr(_STEP, "meta", None)
    _STEP.meta = meta
    try:
        yield
    finally:
        _STEP.meta = previous


@torch.library.custom_op("kvserve::paged_attention", mutates_args=())
def _paged_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
                        scale: float, window: int, softcap: float) -> torch.Tensor:
    """paged_attention as one operator for torch.compile: it writes the step's K/V into the cache (not
    an argument: the compiler sees no mutation) and returns a new [1, T, H, D] tensor."""
    meta = getattr(_STEP, "meta", None)
    assert meta is not None, "a compiled forward runs inside attention.forward_context(meta)"
    return _paged(query, key, value, layer_idx, meta, scale, window or None, softcap or None)


@_paged_attention_op.register_fake
def _(query, key, value, layer_idx, scale, window, softcap):
    return query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])


def paged_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                    kv_meta: AttentionMetadata | None = None, sliding_window=None, softcap=None, **kwargs):
    """transformers attention interface: query [1, H, T, D], key/value [1, KVH, T, D] -> [1, T, H, D].
    kv_meta comes with the forward's arguments (eager), or from forward_context (a compiled forward)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    window = sliding_window if sliding_window and sliding_window > 0 else None
    if kv_meta is None:
        if not torch.compiler.is_compiling():      # a compiled model's frame that dynamo left eager
            if getattr(_STEP, "meta", None) is None:
                raise RuntimeError("paged attention needs kv_meta (run the model through kvserve's runner)")
            global uncompiled_calls
            uncompiled_calls += 1
        return _paged_attention_op(query, key, value, module.layer_idx, float(scale), window or 0,
                                   float(softcap or 0.0)), None
    return _paged(query, key, value, module.layer_idx, kv_meta, scale, window, softcap), None


def _paged(query, key, value, layer_idx: int, kv_meta: AttentionMetadata, scale: float, window: int | None,
           softcap: float | None) -> torch.Tensor:
    """Write the step's K/V at their slots, attend: [1, T, H, D]."""
    k_cache, v_cache = kv_meta.kv_caches[layer_idx]
    num_blocks, block_size, kvh, d = k_cache.shape
    q = query[0].transpose(0, 1)                       # [T, H, D]
    if kv_meta.triton is not None:
        return _triton_attention(q, key, value, k_cache, v_cache, kv_meta, scale, window, softcap)
    k_flat = k_cache.view(-1, kvh, d)
    v_flat = v_cache.view(-1, kvh, d)
    k_flat.index_copy_(0, kv_meta.slot_mapping, key[0].transpose(0, 1).to(k_flat.dtype))
    v_flat.index_copy_(0, kv_meta.slot_mapping, value[0].transpose(0, 1).to(v_flat.dtype))
    groups = kv_meta.decode_groups(window)
    if not kv_meta.prefills and len(groups) == 1 and groups[0].rows == slice(0, q.shape[0]):
        # decodes only, one group in batch order (batch-1 decode): no scatter into an output buffer
        return _attend_decode(q, k_cache, v_cache, groups[0], scale, softcap).unsqueeze(0)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)    # contiguous (q is a transposed view)
    for i, p in enumerate(kv_meta.prefills):
        k_start, mask = kv_meta.prefill_mask(i, window)
        slots = p.slots[k_start:]
        out[p.q_start:p.q_start + p.q_len] = _attend_prefill(
            q[p.q_start:p.q_start + p.q_len], k_flat.index_select(0, slots), v_flat.index_select(0, slots),
            mask, scale, softcap)
    for g in groups:
        out[g.rows] = _attend_decode(q[g.rows], k_cache, v_cache, g, scale, softcap)
    return out.unsqueeze(0)


def _attend_prefill(q, k, v, mask, scale, softcap):
    """q [Q, H, D], k/v [K, KVH, D], mask [Q, K] bool or None (plain causal, Q == K) -> [Q, H, D]."""
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if softcap is None:
        o = F.scaled_dot_product_attention(qh.unsqueeze(0), kh.unsqueeze(0), vh.unsqueeze(0),
                                           attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=qh.shape[0] != kh.shape[0])
        return o[0].transpose(0, 1)
    h, kvh = qh.shape[0], kh.shape[0]
    g = h // kvh
    scores = torch.matmul(qh.reshape(kvh, g * q.shape[0], -1), kh.transpose(1, 2)).float() * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(kvh, g, q.shape[0], -1)
    if mask is None:
        mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(kvh, g * q.shape[0], -1)
    o = torch.matmul(probs, vh).view(h, q.shape[0], -1)
    return o.transpose(0, 1)


def _attend_decode(q, k_cache, v_cache, g: DecodeGroup, scale, softcap):
    """q [B, H, D]; whole blocks are gathered (contiguous copies), then one fused SDPA call (without a
    softcap), or per KV head one bmm over strided views (Gemma-2's softcap) -> [B, H, D]."""
    b, h, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    if isinstance(g.blocks, slice):                                  # one row's run of blocks: a view
        k, v = k_cache[g.blocks].view(1, -1, kvh, d), v_cache[g.blocks].view(1, -1, kvh, d)
    else:
        k = k_cache.index_select(0, g.blocks).view(b, -1, kvh, d)      # [B, L, KVH, D]
        v = v_cache.index_select(0, g.blocks).view(b, -1, kvh, d)
    if g.keys is not None:
        k, v = k[:, g.keys], v[:, g.keys]
    if softcap is None:
        # a few operators per layer instead of a dozen: at batch 1 on CPU the per-operator cost dominates
        mask = None if g.mask is None else ~g.mask[:, :, None, :]                # [B, 1, 1, L], True: attend
        o = F.scaled_dot_product_attention(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, scale=scale, enable_gqa=h != kvh)
        return o.view(b, h, d)
    qg = (q * scale).view(b, kvh, h // kvh, d)
    out = torch.empty(b, kvh, h // kvh, d, dtype=q.dtype, device=q.device)
    for head in range(kvh):
        scores = torch.bmm(qg[:, head], k[:, :, head].transpose(1, 2)).float()   # [B, G, L]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if g.mask is not None:
            scores.masked_fill_(g.mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out[:, head] = torch.bmm(probs, v[:, :, head])
    return out.view(b, h, d)


def _triton_attention(q, key, value, k_cache, v_cache, meta, scale, window, softcap):
    from kvserve.cache import triton_attention as ta
    t = meta.triton
    key, value = key[0].transpose(0, 1), value[0].transpose(0, 1)      # [T, KVH, D] views
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    nd, slots = t.num_decodes, meta.slot_mapping
    if nd:
        ta.paged_decode_attention(q[:nd], k_cache, v_cache, t.block_tables[:nd], t.seq_lens[:nd], scale,
                                  window, softcap, key=key[:nd], value=value[:nd], slot_mapping=slots[:nd],
                                  out=out[:nd])
    if nd < q.shape[0]:
        ta.paged_prefill_attention(q[nd:], k_cache, v_cache, t.block_tables[nd:], t.cu_seqlens_q,
                                   t.seq_lens[nd:], scale, window, softcap, t.max_seqlen_q, key=key[nd:],
                                   value=value[nd:], slot_mapping=slots[nd:], out=out[nd:])
    return out.unsqueeze(0)

"""Attention backends: which paged attention runs, and the metadata it reads for one step.

A step is described by plain lists (the scheduler's output carries them): per row its query length
(tokens computed this step), context length (tokens with K/V after the step) and block table; per
token its slot. The first `num_decodes` rows are decodes, one token each.
"""
from __future__ import annotations

import logging

import torch

from kvserve.cache.attention import AttentionMetadata, PrefillSeq, TritonBatch
from kvserve.cache.kv_pool import KVPool, pack_tables, upload

log = logging.getLogger("kvserve")


class TorchBackend:
    """Paged attention in PyTorch (CPU, and the reference path): prefill chunks attend per row,
    decodes in groups of similar context length."""
    name = "torch"

    def build_metadata(self, pool: KVPool, query_lens: list[int], context_lens: list[int], num_decodes: int,
                       block_tables: list[list[int]], slot_mapping: list[int]) -> AttentionMetadata:
        device, block_size = pool.spec.device, pool.block_size
        prefills = []
        query_start = num_decodes
        for query_len, context_len, table in zip(query_lens[num_decodes:], context_lens[num_decodes:],
                                                 block_tables[num_decodes:]):
            positions = torch.arange(context_len)
            blocks = torch.tensor(list(table), dtype=torch.long)[positions // block_size]
            prefills.append(PrefillSeq(query_start, query_len, context_len,
                                       (blocks * block_size + positions % block_size).to(device)))
            query_start += query_len
        return AttentionMetadata(
            slot_mapping=upload(slot_mapping, device),
            prefills=prefills,
            decode_index=upload(list(range(num_decodes)), device) if num_decodes else None,
            decode_ctx_lens=context_lens[:num_decodes],
            decode_tables=block_tables[:num_decodes],
            kv_caches=pool.caches)


class TritonBackend:
    """The Triton kernels: one split-K decode launch for the decode rows, one varlen prefill launch
    for the chunks; both write the step's K/V themselves."""
    name = "triton"

    def build_metadata(self, pool: KVPool, query_lens: list[int], context_lens: list[int], num_decodes: int,
                       block_tables: list[list[int]], slot_mapping: list[int]) -> AttentionMetadata:
        device = pool.spec.device
        width = max(len(table) for table in block_tables)
        cu_seqlens_q = [0]
        for query_len in query_lens[num_decodes:]:
            cu_seqlens_q.append(cu_seqlens_q[-1] + query_len)
        tables = pack_tables(block_tables, torch.empty(len(block_tables), width, dtype=torch.int32))
        batch = TritonBatch(
            block_tables=tables.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tables,
            seq_lens=upload(context_lens, device, torch.int32),
            num_decodes=num_decodes,
            cu_seqlens_q=upload(cu_seqlens_q, device, torch.int32),
            max_seqlen_q=max(query_lens[num_decodes:], default=0))
        return AttentionMetadata(upload(slot_mapping, device), [], None, [], [], pool.caches, triton=batch)


AttentionBackend = TorchBackend | TritonBackend


def select_backend(wanted: str, device: torch.device) -> AttentionBackend:
    """auto: the Triton kernels on CUDA when triton is installed, else the PyTorch path."""
    if wanted == "torch" or (wanted == "auto" and device.type != "cuda"):
        return TorchBackend()
    from kvserve.cache import triton_attention
    if triton_attention.is_available():
        return TritonBackend()
    if wanted == "triton":
        raise ValueError("attention_backend triton needs triton and a CUDA device (or TRITON_INTERPRET=1)")
    log.warning("triton is not installed: using the PyTorch paged attention on %s", device)
    return TorchBackend()

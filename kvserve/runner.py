"""Runs the model: owns the KV pool, packs a scheduled batch into one forward, samples."""
from __future__ import annotations

import logging
import time

import torch

from cache.attention import AttentionMetadata, PrefillSeq
from kvserve import loader
from kvserve.config import EngineConfig
from kvserve.sampler import sample
from scheduler.scheduler import SchedulerOutput

log = logging.getLogger("kvserve")


class ModelRunner:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.model, self.tokenizer, self.hf_config, self.device, self.dtype = loader.load(cfg)
        text_cfg = self.hf_config.get_text_config()
        self.num_layers = text_cfg.num_hidden_layers
        self.num_heads = text_cfg.num_attention_heads
        self.num_kv_heads = getattr(text_cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // self.num_heads
        self.block_size = cfg.block_size
        self.vocab_size = text_cfg.vocab_size
        self.num_blocks = self._num_kv_blocks()
        shape = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(self.num_layers)]
        log.info("KV pool: %d blocks x %d tokens = %d tokens, %.1f MiB (%s, %s)", self.num_blocks,
                 self.block_size, self.num_blocks * self.block_size,
                 self.num_blocks * self.bytes_per_block / 2**20, str(self.dtype).removeprefix("torch."),
                 self.device)

    @property
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def _num_kv_blocks(self) -> int:
        """num_kv_blocks, else kv_cache_memory, else gpu_memory_utilization (CUDA), else a CPU budget."""
        cfg = self.cfg
        if cfg.num_kv_blocks:
            return cfg.num_kv_blocks
        if cfg.kv_cache_memory:
            return max(1, cfg.kv_cache_memory // self.bytes_per_block)
        if self.device.type == "cuda":
            return self._profile_gpu_blocks(cfg.gpu_memory_utilization or 0.9)
        if cfg.gpu_memory_utilization is not None:
            log.warning("gpu_memory_utilization applies to CUDA only; using the CPU budget")
        budget = cfg.cpu_kv_cache_memory
        max_len = cfg.max_model_len or loader.model_max_length(self.hf_config) or 4096
        useful = cfg.max_num_seqs * max_len * self.bytes_per_block // self.block_size
        return max(1, min(budget, useful) // self.bytes_per_block)

    def _profile_gpu_blocks(self, utilization: float) -> int:
        """Blocks that fit in the device memory left after the weights and the largest forward."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = self.cfg.max_num_batched_tokens
        ids = torch.zeros(1, n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device)[None]
        with torch.inference_mode():
            self.model(input_ids=ids, position_ids=pos, use_cache=False,
                       logits_to_keep=torch.tensor([n - 1], device=self.device),
                       kv_meta=self._profile_meta(n))
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        in_use = total - free
        available = total * utilization - max(in_use, peak)
        num = int(available // self.bytes_per_block)
        log.info("GPU memory: %.1f GiB total, %.1f GiB in use after profiling (peak %.1f GiB); "
                 "KV budget %.1f GiB at utilization %.2f", total / 2**30, in_use / 2**30,
                 peak / 2**30, available / 2**30, utilization)
        if num < 1:
            raise RuntimeError("no GPU memory is left for the KV cache; lower max_num_batched_tokens "
                               "or raise gpu_memory_utilization")
        return num

    def _profile_meta(self, n: int) -> AttentionMetadata:
        """A throwaway pool and metadata for one n-token prefill (memory profiling only)."""
        blocks = -(-n // self.block_size)
        shape = (blocks, self.block_size, self.num_kv_heads, self.head_dim)
        caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),) * 2
                  for _ in range(self.num_layers)]
        slots = torch.arange(n, device=self.device)
        return AttentionMetadata(slots, [PrefillSeq(0, n, n, slots)], None, [], [], caches)

    # one step
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, block_tables: list[list[int]]) -> tuple[list[int], list[float], list[int]]:
        """Run one packed forward. Returns sampled ids and logprobs, and which scheduled rows sampled."""
        for src, dst in sched.block_copies:
            for k, v in self.kv_caches:
                k[dst].copy_(k[src])
                v[dst].copy_(v[src])
        ids, meta, sample_rows, sample_idx = self._prepare(sched, block_tables)
        n = len(ids)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)[None]
        positions = self._positions(sched)[None]
        logits_index = torch.tensor(sample_idx, dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, position_ids=positions, use_cache=False,
                         logits_to_keep=logits_index, kv_meta=meta)
        assert input_ids.shape[1] == n
        if not sample_rows:
            return [], [], []
        seqs = [sched.seqs[r] for r in sample_rows]
        tokens, logprobs = sample(out.logits[0], [s.params for s in seqs], [s.token_ids for s in seqs],
                                  [s.num_prompt_tokens for s in seqs], [self._generator(s) for s in seqs])
        return tokens, logprobs, sample_rows

    def _generator(self, seq) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.greedy:
            return None
        if seq.generator is None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        return seq.generator

    def _positions(self, sched: SchedulerOutput) -> torch.Tensor:
        return torch.cat([torch.arange(s.num_computed_tokens, s.num_computed_tokens + n)
                          for s, n in zip(sched.seqs, sched.num_tokens)]).to(self.device)

    def _prepare(self, sched: SchedulerOutput, block_tables: list[list[int]]):
        bs = self.block_size
        ids, prefills, slot_chunks = [], [], []
        decode_rows, decode_ctx, decode_slots = [], [], []
        sample_rows, sample_idx = [], []
        q_start = 0
        for row, (seq, n, table) in enumerate(zip(sched.seqs, sched.num_tokens, block_tables)):
            start, ctx = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids.extend(seq.token_ids[start:ctx])
            pos = torch.arange(ctx)
            slots = (torch.tensor(table, dtype=torch.long)[pos // bs] * bs + pos % bs).to(self.device)
            slot_chunks.append(slots[start:])
            if n == 1 and start > 0:
                decode_rows.append(q_start)
                decode_ctx.append(ctx)
                decode_slots.append(slots)
            else:
                prefills.append(PrefillSeq(q_start, n, ctx, slots))
            if ctx == len(seq):
                sample_rows.append(row)
                sample_idx.append(q_start + n - 1)
            q_start += n
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slot_chunks),
            prefills=prefills,
            decode_index=torch.tensor(decode_rows, dtype=torch.long, device=self.device) if decode_rows else None,
            decode_ctx_lens=decode_ctx,
            decode_slots=decode_slots,
            kv_caches=self.kv_caches,
        )
        return ids, meta, sample_rows, sample_idx

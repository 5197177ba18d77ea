"""Runs the model: owns the KV pool, packs a scheduled batch into one forward, samples."""
from __future__ import annotations

import logging
import time

import torch

from kvserve.cache.attention import AttentionMetadata, PrefillSeq, TritonBatch
from kvserve import loader
from kvserve.config import EngineConfig
from kvserve.cuda_graphs import DecodeGraphs
from kvserve.sampler import sample, upload
from kvserve.scheduler.scheduler import SchedulerOutput

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
        self.attention_backend = self._attention_backend()
        self.num_blocks = self._num_kv_blocks()
        self.graphs: DecodeGraphs | None = None   # set by init_decode_graphs once max_model_len is known
        shape = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(self.num_layers)]
        log.info("KV pool: %d blocks x %d tokens = %d tokens, %.1f MiB (%s, %s)", self.num_blocks,
                 self.block_size, self.num_blocks * self.block_size,
                 self.num_blocks * self.bytes_per_block / 2**20, str(self.dtype).removeprefix("torch."),
                 self.device)

    def _attention_backend(self) -> str:
        """auto: the Triton kernels on CUDA when triton is installed, else the PyTorch path."""
        wanted = self.cfg.attention_backend
        if wanted == "torch" or (wanted == "auto" and self.device.type != "cuda"):
            return "torch"
        from kvserve.cache import triton_attention
        if triton_attention.is_available():
            return "triton"
        if wanted == "triton":
            raise ValueError("attention_backend triton needs triton and a CUDA device (or TRITON_INTERPRET=1)")
        log.warning("triton is not installed: using the PyTorch paged attention on %s", self.device)
        return "torch"

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return upload(values, self.device, dtype)

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
        """Blocks that fit in the device memory left after the weights, the largest forward with its
        sampling, and (with CUDA graphs) the graphs' pool and static logits."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = self.cfg.max_num_batched_tokens
        rows = min(n, self.cfg.max_num_seqs)
        weights = torch.cuda.memory_allocated(self.device)
        ids = torch.zeros(1, n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device)[None]
        with torch.inference_mode():
            logits = self.model(input_ids=ids, position_ids=pos, use_cache=False,
                                logits_to_keep=torch.arange(n - rows, n, device=self.device),
                                kv_meta=self._profile_meta(n)).logits[0]
            torch.log_softmax(logits.float(), dim=-1).sort(dim=-1)   # the sampler's largest scratch
            del logits
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        in_use = total - free
        graphs = 0
        if self._graphs_wanted():
            # their own pool: about one decode forward at the largest bucket, plus [batch, V] logits
            batch = min(self.cfg.max_num_seqs, self.cfg.cuda_graph_max_batch)
            elem = torch.tensor([], dtype=self.dtype).element_size()
            graphs = batch * self.vocab_size * max(elem, 4) + (peak - weights) * batch // n
        available = total * utilization - max(in_use, peak) - graphs
        num = int(available // self.bytes_per_block)
        log.info("GPU memory: %.1f GiB total, %.1f GiB in use after profiling (peak %.1f GiB), %.2f GiB kept for "
                 "CUDA graphs; KV budget %.1f GiB at utilization %.2f", total / 2**30, in_use / 2**30,
                 peak / 2**30, graphs / 2**30, available / 2**30, utilization)
        if num < 1:
            raise RuntimeError("no GPU memory is left for the KV cache; lower max_num_batched_tokens "
                               "or raise gpu_memory_utilization")
        return num

    def _graphs_wanted(self) -> bool:
        return (self.cfg.cuda_graphs is not False and self.attention_backend == "triton"
                and self.device.type == "cuda")

    def _profile_meta(self, n: int) -> AttentionMetadata:
        """A throwaway pool and metadata for one n-token prefill (memory profiling only)."""
        blocks = -(-n // self.block_size)
        shape = (blocks, self.block_size, self.num_kv_heads, self.head_dim)
        caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),) * 2
                  for _ in range(self.num_layers)]
        slots = torch.arange(n, device=self.device)
        return AttentionMetadata(slots, [PrefillSeq(0, n, n, slots)], None, [], [], caches)

    # CUDA graphs
    def init_decode_graphs(self, max_model_len: int) -> None:
        """Capture decode graphs (CUDA + Triton backend unless cuda_graphs is False). With
        cuda_graphs=True off CUDA, the padded static-buffer decode path runs eagerly (for tests)."""
        self.graphs = None
        if self.cfg.cuda_graphs and self.attention_backend != "triton":
            raise ValueError("cuda_graphs needs the Triton attention backend")
        if not (self.cfg.cuda_graphs or self._graphs_wanted()):
            return
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, max_model_len,
                                   min(self.cfg.max_num_seqs, self.cfg.cuda_graph_max_batch), self.device)
        if self.device.type != "cuda":
            log.warning("cuda_graphs on %s: the padded decode path runs without capture", self.device)
            return
        try:
            self.graphs.capture_all()
        except Exception:  # a model whose forward cannot be captured still serves, eagerly
            log.exception("CUDA graph capture failed; decoding eagerly")
            self.graphs = None

    # one step
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, block_tables: list[list[int]]) -> tuple[list[int], list[float], list[int]]:
        """Run one packed forward. Returns sampled ids and logprobs, and which scheduled rows sampled."""
        for src, dst in sched.block_copies:
            for k, v in self.kv_caches:
                k[dst].copy_(k[src])
                v[dst].copy_(v[src])
        ids, positions, slots, sample_rows, sample_idx = self._prepare(sched, block_tables)
        seq_lens = [s.num_computed_tokens + n for s, n in zip(sched.seqs, sched.num_tokens)]
        if self.graphs is not None and len(ids) == len(sched.seqs) and self.graphs.fits(len(ids), max(seq_lens)):
            # one token per row: a graph replay (a 1-token prefill chunk that does not sample is dropped)
            logits = self.graphs.run(ids, positions, slots, block_tables, seq_lens)
            if len(sample_rows) != len(ids):
                logits = logits[self._tensor(sample_rows)]
        else:
            meta = (self._triton_meta(sched, block_tables, slots, seq_lens) if self.attention_backend == "triton"
                    else self._torch_meta(sched, block_tables, slots))
            out = self.model(input_ids=self._tensor(ids)[None], position_ids=self._tensor(positions)[None],
                             use_cache=False, logits_to_keep=self._tensor(sample_idx), kv_meta=meta)
            logits = out.logits[0]
        if not sample_rows:
            return [], [], []
        seqs = [sched.seqs[r] for r in sample_rows]
        tokens, logprobs = sample(logits, [s.params for s in seqs], [s.token_ids for s in seqs],
                                  [s.num_prompt_tokens for s in seqs], [self._generator(s) for s in seqs],
                                  [self._banned(s) for s in seqs])
        return tokens, logprobs, sample_rows

    @staticmethod
    def _banned(seq) -> list[int]:
        """Before min_tokens, EOS (unless ignored) and the stop token ids cannot be sampled."""
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            return []
        return list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(seq.eos_token_ids))

    def _generator(self, seq) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.greedy:
            return None
        if seq.generator is None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        return seq.generator

    def _prepare(self, sched: SchedulerOutput, block_tables: list[list[int]]):
        """Host lists for the packed batch: token ids, positions, slots, and the rows that sample."""
        ids, positions, slots, sample_rows, sample_idx = [], [], [], [], []
        bs = self.block_size
        q_start = 0
        for row, (seq, n, table) in enumerate(zip(sched.seqs, sched.num_tokens, block_tables)):
            start, ctx = seq.num_computed_tokens, seq.num_computed_tokens + n
            ids.extend(seq.token_ids[start:ctx])
            positions.extend(range(start, ctx))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, ctx))
            if ctx == len(seq):
                sample_rows.append(row)
                sample_idx.append(q_start + n - 1)
            q_start += n
        return ids, positions, slots, sample_rows, sample_idx

    def _triton_meta(self, sched, block_tables, slot_mapping, seq_lens) -> AttentionMetadata:
        nd = next((i for i, n in enumerate(sched.num_tokens) if n != 1), len(sched.num_tokens))
        width = max(len(t) for t in block_tables)
        cu = [0]
        for n in sched.num_tokens[nd:]:
            cu.append(cu[-1] + n)
        batch = TritonBatch(
            block_tables=self._tensor([t + [0] * (width - len(t)) for t in block_tables], torch.int32),
            seq_lens=self._tensor(seq_lens, torch.int32),
            num_decodes=nd,
            cu_seqlens_q=self._tensor(cu, torch.int32),
            max_seqlen_q=max(sched.num_tokens[nd:], default=0))
        return AttentionMetadata(self._tensor(slot_mapping), [], None, [], [], self.kv_caches, triton=batch)

    def _torch_meta(self, sched, block_tables, slot_mapping) -> AttentionMetadata:
        bs = self.block_size
        prefills, decode_rows, decode_ctx, decode_tables = [], [], [], []
        q_start = 0
        for seq, n, table in zip(sched.seqs, sched.num_tokens, block_tables):
            start, ctx = seq.num_computed_tokens, seq.num_computed_tokens + n
            if n == 1 and start > 0:
                decode_rows.append(q_start)
                decode_ctx.append(ctx)
                decode_tables.append(table)
            else:
                pos = torch.arange(ctx)
                slots = (torch.tensor(table, dtype=torch.long)[pos // bs] * bs + pos % bs).to(self.device)
                prefills.append(PrefillSeq(q_start, n, ctx, slots))
            q_start += n
        return AttentionMetadata(
            slot_mapping=self._tensor(slot_mapping),
            prefills=prefills,
            decode_index=self._tensor(decode_rows) if decode_rows else None,
            decode_ctx_lens=decode_ctx,
            decode_tables=decode_tables,
            kv_caches=self.kv_caches,
        )

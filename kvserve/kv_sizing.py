"""How many KV blocks the pool gets: from the configuration, or from a memory profile on CUDA."""
from __future__ import annotations

import logging

import torch

from kvserve import loader
from kvserve.cache.backends import TorchBackend
from kvserve.cache.kv_pool import KVPool, KVSpec
from kvserve.config import EngineConfig

log = logging.getLogger("kvserve")


def num_kv_blocks(cfg: EngineConfig, spec: KVSpec, model, graphs_wanted: bool) -> int:
    """num_kv_blocks, else kv_cache_memory, else gpu_memory_utilization (CUDA), else a CPU budget."""
    if cfg.num_kv_blocks:
        return cfg.num_kv_blocks
    if cfg.kv_cache_memory:
        return max(1, cfg.kv_cache_memory // spec.bytes_per_block)
    if spec.device.type == "cuda":
        return _profile_gpu_blocks(cfg, spec, model, graphs_wanted)
    if cfg.gpu_memory_utilization is not None:
        log.warning("gpu_memory_utilization applies to CUDA only; using the CPU budget")
    max_len = cfg.max_model_len or loader.model_max_length(model.config) or 4096
    useful = cfg.max_num_seqs * max_len * spec.bytes_per_block // spec.block_size
    return max(1, min(cfg.cpu_kv_cache_memory, useful) // spec.bytes_per_block)


def num_host_blocks(cfg: EngineConfig, spec: KVSpec) -> int:
    """Blocks of the host-memory tier: kv_offload_memory over the size of one block (0: no tier)."""
    if not cfg.kv_offload_memory:
        return 0
    if not cfg.enable_prefix_caching:
        raise ValueError("kv_offload_memory keeps evicted prefix-cache blocks: it needs prefix caching, "
                         "which is disabled")
    blocks = cfg.kv_offload_memory // spec.bytes_per_block
    if blocks < 1:
        raise ValueError(f"kv_offload_memory {cfg.kv_offload_memory} bytes holds no KV block "
                         f"({spec.bytes_per_block} bytes each for this model)")
    return blocks


def _profile_gpu_blocks(cfg: EngineConfig, spec: KVSpec, model, graphs_wanted: bool) -> int:
    """Blocks that fit in the device memory left after the weights, the largest forward with its
    sampling, and (with CUDA graphs) the graphs' pool and static logits."""
    utilization = cfg.gpu_memory_utilization or 0.9
    device = spec.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    num_tokens = cfg.max_num_batched_tokens
    rows = min(num_tokens, cfg.max_num_seqs)
    weights = torch.cuda.memory_allocated(device)
    _profile_forward(model, spec, num_tokens, rows)
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    in_use = total - free
    graphs = 0
    if graphs_wanted:
        # their own pool: about one decode forward at the largest bucket, plus [batch, V] logits
        batch = min(cfg.max_num_seqs, cfg.cuda_graph_max_batch)
        elem = torch.tensor([], dtype=spec.dtype).element_size()
        vocab_size = model.config.get_text_config().vocab_size
        graphs = batch * vocab_size * max(elem, 4) + (peak - weights) * batch // num_tokens
    available = total * utilization - max(in_use, peak) - graphs
    num = int(available // spec.bytes_per_block)
    log.info("GPU memory: %.1f GiB total, %.1f GiB in use after profiling (peak %.1f GiB), %.2f GiB kept for "
             "CUDA graphs; KV budget %.1f GiB at utilization %.2f", total / 2**30, in_use / 2**30,
             peak / 2**30, graphs / 2**30, available / 2**30, utilization)
    if num < 1:
        raise RuntimeError("no GPU memory is left for the KV cache; lower max_num_batched_tokens "
                           "or raise gpu_memory_utilization")
    return num


@torch.inference_mode()
def _profile_forward(model, spec: KVSpec, num_tokens: int, rows: int) -> None:
    """One num_tokens prefill through a throwaway pool, keeping `rows` logits, then the sampler's
    largest scratch (a sort over float32 log-probabilities)."""
    scratch = KVPool(spec, spec.blocks_for(num_tokens))
    slots = list(range(num_tokens))
    meta = TorchBackend().build_metadata(scratch, [num_tokens], [num_tokens], 0, [list(range(scratch.num_blocks))],
                                         slots)
    device = spec.device
    logits = model(input_ids=torch.zeros(1, num_tokens, dtype=torch.long, device=device),
                   position_ids=torch.arange(num_tokens, device=device)[None], use_cache=False,
                   logits_to_keep=torch.arange(num_tokens - rows, num_tokens, device=device), kv_meta=meta).logits[0]
    torch.log_softmax(logits.float(), dim=-1).sort(dim=-1)

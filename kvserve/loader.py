"""Load a causal LM and its tokenizer with transformers, with kvserve's paged attention plugged in."""
from __future__ import annotations

import logging
import time

import torch
import transformers
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kvserve.cache.attention import paged_attention
from kvserve.config import EngineConfig
from kvserve.cpu_weights import fuse_sibling_projections, tune_linear_layouts

log = logging.getLogger("kvserve")
ATTN_NAME = "kvserve_paged"
AttentionInterface.register(ATTN_NAME, paged_attention)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but torch sees no CUDA device")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on a GPU that supports it, else float16 on GPU; float32 on CPU."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load(cfg: EngineConfig):
    """Returns (model, tokenizer, hf_config, device, dtype)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    t0 = time.perf_counter()
    log.info("loading %s (dtype %s, device %s)", cfg.model, str(dtype).removeprefix("torch."), device)
    hf_config = AutoConfig.from_pretrained(cfg.model, revision=cfg.revision,
                                           trust_remote_code=cfg.trust_remote_code)
    tokenizer = load_tokenizer(cfg)
    tensor_parallel = cfg.tensor_parallel_size > 1
    if tensor_parallel:     # each rank loads its shard, as the model's tensor-parallel plan says (kvserve.distributed)
        from transformers.distributed import DistributedConfig
        placement = {"distributed_config": DistributedConfig(tp_size=cfg.tensor_parallel_size)}
    else:
        placement = {"device_map": str(device) if device.type == "cuda" else None}
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model, revision=cfg.revision, dtype=dtype, attn_implementation=ATTN_NAME,
        trust_remote_code=cfg.trust_remote_code, **placement)
    (model if tensor_parallel else model.to(device)).eval()
    _skip_padding_check(model)
    if device.type == "cpu" and cfg.cpu_weight_layout == "auto" and not tensor_parallel:   # not on sharded weights
        fused = fuse_sibling_projections(model)
        if fused:
            log.info("fused %d sets of sibling projections (q/k/v, gate/up) into one matmul each", fused)
        tune_linear_layouts(model, decode_batch=min(cfg.max_num_seqs, 64))
    log.info("loaded %s in %.1fs: %s, %.1fM parameters (transformers %s)", cfg.model,
             time.perf_counter() - t0, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, transformers.__version__)
    return model, tokenizer, hf_config, device, dtype


def load_tokenizer(cfg: EngineConfig):
    return AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model, revision=cfg.revision,
                                         trust_remote_code=cfg.trust_remote_code)


def _skip_padding_check(model) -> None:
    """Some models (GPT-2) look for pad tokens in input_ids on every forward to warn about a missing
    attention mask: a device -> host read per step. kvserve packs sequences without padding, so the
    check can only misfire; it is switched off on this model instance."""
    for module in model.modules():
        if hasattr(module, "warn_if_padding_and_no_attention_mask"):
            module.warn_if_padding_and_no_attention_mask = lambda *args, **kwargs: None


def model_max_length(hf_config) -> int | None:
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    ids = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)

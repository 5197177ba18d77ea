"""Load a causal LM and its tokenizer with transformers, with kvserve's paged attention plugged in."""
from __future__ import annotations

import logging
import time

import torch
import transformers
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kvserve.cache.attention import paged_attention
from kvserve.config import EngineConfig

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
        tune_linear_layouts(model, decode_batch=min(cfg.max_num_seqs, 64))
    log.info("loaded %s in %.1fs: %s, %.1fM parameters (transformers %s)", cfg.model,
             time.perf_counter() - t0, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, transformers.__version__)
    return model, tokenizer, hf_config, device, dtype


@torch.inference_mode()
def tune_linear_layouts(model, decode_batch: int, margin: float = 0.9) -> list[tuple[int, int]]:
    """Store a linear layer's weight column-major ((in, out) contiguous, seen through a transposed view)
    where this CPU's BLAS runs it faster. F.linear then multiplies by a contiguous (in, out) matrix:
    on some CPUs the transposed GEMV of a large row-major weight is several times slower (a 32000 x 256
    lm_head: 3.9 ms vs 1.1 ms per token on a 2-core AMD EPYC). Measured per weight shape at load, at
    batch 1 and at decode_batch rows; kept only when at least 1/margin faster. The values, and so the
    outputs, are unchanged. Returns the (out, in) shapes switched."""
    layers: dict[tuple, list[torch.nn.Linear]] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype.is_floating_point \
                and module.weight.is_contiguous():
            layers.setdefault((*module.weight.shape, module.weight.dtype), []).append(module)
    switched = []
    for (out_features, in_features, dtype), modules in layers.items():
        # timed over up to 4 layers' own weights in turn, as a forward meets them (not one weight kept hot)
        sample = list({id(m.weight): m.weight for m in modules}.values())[:4]
        copies = [weight.t().contiguous().t() for weight in sample]
        inputs = [torch.randn(rows, in_features, dtype=dtype) for rows in sorted({1, max(1, decode_batch)})]
        row_time = sum(_time_linears(x, sample) for x in inputs)
        column_time = sum(_time_linears(x, copies) for x in inputs)
        if column_time >= margin * row_time:
            continue
        switched.append((out_features, in_features))
        for module in modules:
            if module.weight.is_contiguous():      # a weight tied to one switched already is not again
                module.weight.data = module.weight.t().contiguous().t()
        log.info("linear %d x %d (%d layers): column-major weights, %.3f ms vs %.3f ms at batch 1 and %d",
                 out_features, in_features, len(modules), column_time * 1e3, row_time * 1e3, decode_batch)
    return switched


def _time_linears(x: torch.Tensor, weights: list[torch.Tensor], reps: int = 5) -> float:
    """The fastest of reps passes over the weights (after one warm-up): the least disturbed by other work."""
    best = float("inf")
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        for weight in weights:
            torch.nn.functional.linear(x, weight)
        if rep:
            best = min(best, time.perf_counter() - t0)
    return best


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

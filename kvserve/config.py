"""Engine configuration: model, device, KV pool sizing and scheduler limits."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: int | float | str | None) -> int | None:
    """Parse a byte size such as 4GiB, 512MB, 1.5gb or 1000000 into bytes; None or an empty
    string (an environment variable set to nothing) is None: unset."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    if not value.strip():
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse size {value!r}: expected a number with an optional unit like 4GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class EngineConfig:
    model: str
    tokenizer: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = "auto"                 # auto | float32 | bfloat16 | float16
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    block_size: int = 16
    num_kv_blocks: int | None = None    # absolute pool size (first match wins)
    kv_cache_memory: int | str | None = None  # bytes, or "4GiB"
    gpu_memory_utilization: float | None = None  # CUDA only; default 0.9 there
    cpu_kv_cache_memory: int = 2 * 2**30  # default budget on CPU when nothing is given
    kv_offload_memory: int | str | None = None  # host-memory tier for evicted prefix blocks, e.g. "16GiB"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"     # auto | torch | triton
    cuda_graphs: bool | None = None     # decode via CUDA graphs; None: on with CUDA + triton
    cuda_graph_max_batch: int = 256     # largest captured decode batch (bigger ones run eagerly)
    seed: int = 0
    logprobs_mode: str = "raw"          # raw: log-softmax of the model's logits; processed: of what was sampled from
    cpu_weight_layout: str = "auto"     # CPU: auto fuses sibling projections (q/k/v, gate/up) into one matmul and
                                        # lays each linear weight out as its BLAS runs fastest (measured at load);
                                        # "row": every weight as stored (kvserve.cpu_weights)
    compile: bool = False               # torch.compile the model at start-up (inductor; on CPU it needs a C++
                                        # compiler; on CUDA the decode graphs capture the compiled forward)
    tensor_parallel_size: int = 1       # ranks the model is sharded over (kvserve.distributed); 1: one process
    async_scheduling: bool = False      # schedule step n+1 while step n runs (on a forward thread)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kv_cache_memory = parse_size(self.kv_cache_memory)
        self.kv_offload_memory = parse_size(self.kv_offload_memory)
        if self.kv_offload_memory is not None and self.kv_offload_memory < 0:
            raise ValueError(f"kv_offload_memory must be >= 0, got {self.kv_offload_memory}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if self.cuda_graph_max_batch < 1:
            raise ValueError("cuda_graph_max_batch must be >= 1")
        if self.cpu_weight_layout not in ("auto", "row"):
            raise ValueError(f"cpu_weight_layout must be auto or row, got {self.cpu_weight_layout!r}")
        if self.logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode must be raw or processed, got {self.logprobs_mode!r}")
        if self.compile and self.tensor_parallel_size > 1:
            raise ValueError("compile is not supported with tensor_parallel_size > 1 (the shards run eagerly)")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")

"""The KV tensor pool: every layer's K and V blocks, and the host-to-device copies that feed it."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class KVSpec:
    """The shape of one KV block in every layer; a block holds block_size tokens."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def for_model(cls, model_config, block_size: int, dtype: torch.dtype, device: torch.device) -> KVSpec:
        """From a transformers config (its text part, for multimodal configs)."""
        text = model_config.get_text_config()
        num_heads = text.num_attention_heads
        return cls(num_layers=text.num_hidden_layers,
                   num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
                   head_dim=getattr(text, "head_dim", None) or text.hidden_size // num_heads,
                   block_size=block_size, dtype=dtype, device=device)

    @property
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


class KVPool:
    """Per layer a (K, V) pair of [num_blocks, block_size, num_kv_heads, head_dim] tensors.

    Token p of a sequence lives at slot block_table[p // block_size] * block_size + p % block_size.
    """

    def __init__(self, spec: KVSpec, num_blocks: int):
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.caches = [(torch.zeros(shape, dtype=spec.dtype, device=spec.device),
                        torch.zeros(shape, dtype=spec.dtype, device=spec.device))
                       for _ in range(spec.num_layers)]

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.spec.bytes_per_block

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Apply copy-on-write copies (source block, destination block) in every layer."""
        for src, dst in copies:
            for k_cache, v_cache in self.caches:
                k_cache[dst].copy_(k_cache[src])
                v_cache[dst].copy_(v_cache[src])

    def describe(self) -> dict:
        return {"num_blocks": self.num_blocks, "block_size": self.block_size,
                "num_tokens": self.num_blocks * self.block_size, "bytes": self.num_bytes,
                "dtype": str(self.spec.dtype).removeprefix("torch."), "device": str(self.spec.device)}


def upload(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list on the device; through pinned memory on CUDA so the host does not wait (the
    step's inputs, its attention metadata and the sampler's small index lists all come up this way)."""
    tensor = torch.tensor(values, dtype=dtype)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor

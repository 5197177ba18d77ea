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

    With num_host_blocks > 0 it also holds the host-memory tier: one [num_host_blocks, num_layers, 2,
    block_size, num_kv_heads, head_dim] tensor in host memory (pinned on CUDA), a host block being
    one device block of every layer, K then V, contiguous (one copy moves it).
    """

    COPY_CHUNK = 64   # blocks gathered per copy between the tiers (bounds the device staging buffer)

    def __init__(self, spec: KVSpec, num_blocks: int, num_host_blocks: int = 0):
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.caches = [(torch.zeros(shape, dtype=spec.dtype, device=spec.device),
                        torch.zeros(shape, dtype=spec.dtype, device=spec.device))
                       for _ in range(spec.num_layers)]
        self.num_host_blocks = num_host_blocks
        self.host: torch.Tensor | None = None
        self.copy_stream = None
        if num_host_blocks:
            on_cuda = spec.device.type == "cuda"
            # empty, not zeros: a host block is only ever read after it was written
            self.host = torch.empty((num_host_blocks, spec.num_layers, 2) + shape[1:], dtype=spec.dtype,
                                    pin_memory=on_cuda)
            if on_cuda:
                self.copy_stream = torch.cuda.Stream(spec.device)

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.spec.bytes_per_block

    @property
    def num_host_bytes(self) -> int:
        return self.num_host_blocks * self.spec.bytes_per_block

    def move_blocks(self, offloads: list[tuple[int, int]], reloads: list[tuple[int, int]],
                    copies: list[tuple[int, int]]) -> None:
        """A step's block copies, in this order: evicted device blocks out to the host tier (device,
        host), host-tier hits back into the device pool (host, device), then copy-on-write copies
        (source, destination). Each later kind may write a block an earlier one reads.

        On CUDA the tier copies run on their own stream, batched (a gather per layer, one DMA per
        block); the compute stream waits for them before the step's forward, which writes the
        evicted blocks and reads the reloaded ones."""
        if offloads or reloads:
            if self.copy_stream is None:
                self._move_tiers(offloads, reloads)
            else:
                self.copy_stream.wait_stream(torch.cuda.current_stream(self.spec.device))
                with torch.cuda.stream(self.copy_stream):
                    self._move_tiers(offloads, reloads)
                torch.cuda.current_stream(self.spec.device).wait_stream(self.copy_stream)
        for src, dst in copies:
            for k_cache, v_cache in self.caches:
                k_cache[dst].copy_(k_cache[src])
                v_cache[dst].copy_(v_cache[src])

    def _move_tiers(self, offloads: list[tuple[int, int]], reloads: list[tuple[int, int]]) -> None:
        device, chunk = self.spec.device, self.COPY_CHUNK
        for i in range(0, len(offloads), chunk):
            part = offloads[i:i + chunk]
            src = torch.tensor([d for d, _ in part], device=device)
            # [n, num_layers, 2, block_size, heads, dim]: each block of every layer, contiguous
            staged = torch.stack([torch.stack((k.index_select(0, src), v.index_select(0, src)), 1)
                                  for k, v in self.caches], 1)
            if device.type == "cuda":
                for j, (_, host_block) in enumerate(part):
                    self.host[host_block].copy_(staged[j], non_blocking=True)
            else:
                self.host.index_copy_(0, torch.tensor([h for _, h in part]), staged)
        for i in range(0, len(reloads), chunk):
            part = reloads[i:i + chunk]
            if device.type == "cuda":
                staged = torch.empty((len(part),) + self.host.shape[1:], dtype=self.host.dtype, device=device)
                for j, (host_block, _) in enumerate(part):
                    staged[j].copy_(self.host[host_block], non_blocking=True)
            else:
                staged = self.host.index_select(0, torch.tensor([h for h, _ in part]))
            dst = torch.tensor([d for _, d in part], device=device)
            for layer, (k, v) in enumerate(self.caches):
                k.index_copy_(0, dst, staged[:, layer, 0])
                v.index_copy_(0, dst, staged[:, layer, 1])

    def describe(self) -> dict:
        return {"num_blocks": self.num_blocks, "block_size": self.block_size,
                "num_tokens": self.num_blocks * self.block_size, "bytes": self.num_bytes,
                "dtype": str(self.spec.dtype).removeprefix("torch."), "device": str(self.spec.device),
                "host_blocks": self.num_host_blocks, "host_bytes": self.num_host_bytes}


def upload(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list on the device; through pinned memory on CUDA so the host does not wait (the
    step's inputs, its attention metadata and the sampler's small index lists all come up this way)."""
    tensor = torch.tensor(values, dtype=dtype)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor

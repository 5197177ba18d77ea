"""The KV tensor pool: every layer's K and V blocks, and the host-to-device copies that feed it."""
from __future__ import annotations

import logging
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("kvserve")


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

    COPY_CHUNK_BYTES = 64 * 2**20   # blocks staged on the device per copy between the tiers, at most
    COPY_CHUNK_BLOCKS = 64

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
        self.copy_chunk = max(1, min(self.COPY_CHUNK_BLOCKS, self.COPY_CHUNK_BYTES // spec.bytes_per_block))
        if num_host_blocks:
            # empty, not zeros: a host block is only ever read after it was written
            self.host = torch.empty((num_host_blocks, spec.num_layers, 2) + shape[1:], dtype=spec.dtype)
            if spec.device.type == "cuda":
                _pin(self.host)
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
        """Off the CPU, one gather per layer into a staging buffer and one copy per block (the host
        tier's blocks are contiguous); on the CPU, index copies straight between the two pools."""
        device, chunk = self.spec.device, self.copy_chunk
        on_cpu = device.type == "cpu"
        block_shape = self.host.shape[1:]
        for i in range(0, len(offloads), chunk):
            part = offloads[i:i + chunk]
            src = torch.tensor([d for d, _ in part], device=device)
            staged = torch.empty((len(part),) + block_shape, dtype=self.host.dtype, device=device)
            for layer, (k, v) in enumerate(self.caches):
                staged[:, layer, 0] = k.index_select(0, src)
                staged[:, layer, 1] = v.index_select(0, src)
            if on_cpu:
                self.host.index_copy_(0, torch.tensor([h for _, h in part]), staged)
            else:
                for j, (_, host_block) in enumerate(part):
                    self.host[host_block].copy_(staged[j], non_blocking=True)
        for i in range(0, len(reloads), chunk):
            part = reloads[i:i + chunk]
            if on_cpu:
                staged = self.host.index_select(0, torch.tensor([h for h, _ in part]))
            else:
                staged = torch.empty((len(part),) + block_shape, dtype=self.host.dtype, device=device)
                for j, (host_block, _) in enumerate(part):
                    staged[j].copy_(self.host[host_block], non_blocking=True)
            dst = torch.tensor([d for _, d in part], device=device)
            for layer, (k, v) in enumerate(self.caches):
                k.index_copy_(0, dst, staged[:, layer, 0])
                v.index_copy_(0, dst, staged[:, layer, 1])

    def describe(self) -> dict:
        return {"num_blocks": self.num_blocks, "block_size": self.block_size,
                "num_tokens": self.num_blocks * self.block_size, "bytes": self.num_bytes,
                "dtype": str(self.spec.dtype).removeprefix("torch."), "device": str(self.spec.device),
                "host_blocks": self.num_host_blocks, "host_bytes": self.num_host_bytes}


def _pin(tensor: torch.Tensor) -> None:
    """Page-lock a host tensor in place for asynchronous copies. cudaHostRegister pins exactly its
    bytes (pin_memory=True goes through torch's caching host allocator, which rounds a request up to
    the next power of two: 40 GiB would lock 64). Without it the copies still run, synchronously."""
    size = tensor.numel() * tensor.element_size()
    err = int(torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), size, 0))
    if err != 0:
        log.warning("could not pin the %.1f GiB host KV tier (cudaError %d): its copies will be synchronous",
                    size / 2**30, err)


def upload(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list on the device; through pinned memory on CUDA so the host does not wait (the
    step's inputs, its attention metadata and the sampler's small index lists all come up this way)."""
    tensor = torch.tensor(values, dtype=dtype)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def pack_tables(tables: Sequence[Sequence[int]], out: torch.Tensor) -> torch.Tensor:
    """Block tables into the rows of `out` (a host int32 tensor [>= len(tables), >= their longest]),
    each zero-padded; rows past len(tables) are left as they are. The scheduler's tables are
    array("i"): one memcpy per row (256 tables of 1,024 blocks: torch.tensor on padded nested
    lists took ~15 ms, numpy from lists ~4.5)."""
    rows = out.numpy()
    rows[:len(tables)] = 0
    for i, table in enumerate(tables):
        fast = isinstance(table, array) and table.typecode == "i"   # C int, 4 bytes: a plain memcpy
        rows[i, :len(table)] = np.frombuffer(table, np.int32) if fast else table
    return out

"""Decode steps replayed from CUDA graphs captured at bucketed batch sizes.

A decode-only step (every row one token, the common steady state) has a fixed shape once the
batch is padded up to a bucket: its inputs live in static device buffers, the block tables are
padded to the width max_model_len needs, and the Triton decode kernel takes its split count from
that width, so nothing in the forward depends on a host-side value. Each bucket's forward is
captured once at start-up (all buckets share one memory pool) and a step is then: copy the inputs
into the static buffers from pinned host memory (non-blocking), replay, sample from the static
logits. Padded rows decode position 0 with slot -1: the fused kernels write nothing for them.

With compile=True the graphs capture the torch.compile'd forward (see ModelRunner.compile): at batch 1
an eager forward of a 24-layer model is some 940 small kernels (each norm, rotary half, activation and
residual add is its own), and a graph replays them back to back at a few microseconds each, far longer
than the step's bytes take to read; inductor fuses them into about a third as many (`kvserve bench
kernels` counts them). A capture of the compiled forward that fails falls back to capturing the eager one.

Without CUDA (tests on CPU through TRITON_INTERPRET=1) the same padded static-buffer forward runs
uncaptured, so everything but the capture itself is exercised.
"""
from __future__ import annotations

import logging
import time

import torch

from kvserve.cache.attention import AttentionMetadata, TritonBatch, forward_context
from kvserve.cache.kv_pool import pack_tables

log = logging.getLogger("kvserve")


def graphs_wanted(cuda_graphs: bool | None, backend_name: str, device: torch.device) -> bool:
    """Capture decode graphs: on CUDA with the Triton backend, unless switched off (cuda_graphs=False)."""
    return cuda_graphs is not False and backend_name == "triton" and device.type == "cuda"


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 to 128 and of 16 beyond; always max_batch itself."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += list(range(8, min(max_batch, 128) + 1, 8)) + list(range(144, max_batch + 1, 16))
    return sorted(set(sizes) | {max_batch})


class DecodeGraphs:
    def __init__(self, model, kv_caches, block_size: int, max_model_len: int, max_batch: int,
                 device: torch.device, compiled=None):
        self.model = model
        self.compiled = compiled    # the torch.compile'd model: what the graphs run and capture, when given
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.buckets = buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.width = -(-max_model_len // block_size)
        rows, width = self.max_batch, self.width
        # one host staging row per buffer, pinned on CUDA so the uploads do not block the host; made as
        # inference tensors, like the eager path's inputs, so that a compiled model takes both alike
        # (dynamo guards on the kind: a different one would compile the model again)
        with torch.inference_mode():
            pin = device.type == "cuda"
            self.host_ids = torch.zeros(rows, dtype=torch.long, pin_memory=pin)
            self.host_pos = torch.zeros(rows, dtype=torch.long, pin_memory=pin)
            self.host_slots = torch.full((rows,), -1, dtype=torch.long, pin_memory=pin)
            self.host_lens = torch.ones(rows, dtype=torch.int32, pin_memory=pin)
            self.host_tables = torch.zeros(rows * width, dtype=torch.int32, pin_memory=pin)   # [batch, width] packed
            self.ids = torch.zeros(rows, dtype=torch.long, device=device)
            self.pos = torch.zeros(rows, dtype=torch.long, device=device)
            self.slots = torch.full((rows,), -1, dtype=torch.long, device=device)
            self.seq_lens = torch.ones(rows, dtype=torch.int32, device=device)
            self.tables = torch.zeros(rows, width, dtype=torch.int32, device=device)
            self.tables_upload = torch.zeros(rows * width, dtype=torch.int32, device=device)
            self.rows = torch.arange(rows, device=device)
        self.uploaded = torch.cuda.Event() if device.type == "cuda" else None  # staging may be rewritten
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: torch.Tensor | None = None   # [max_batch, V]: every graph writes its logits here

    def fits(self, num_seqs: int, max_len: int) -> bool:
        return num_seqs <= self.max_batch and max_len <= self.width * self.block_size

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _forward(self, batch_size: int) -> torch.Tensor:
        """The padded decode forward of the static buffers' first batch_size rows -> logits [batch_size, V]."""
        triton_batch = TritonBatch(block_tables=self.tables[:batch_size], seq_lens=self.seq_lens[:batch_size],
                                   num_decodes=batch_size, cu_seqlens_q=self.seq_lens[:1], max_seqlen_q=0)
        meta = AttentionMetadata(self.slots[:batch_size], [], None, [], [], self.kv_caches, triton=triton_batch)
        inputs = dict(input_ids=self.ids[None, :batch_size], position_ids=self.pos[None, :batch_size],
                      use_cache=False, logits_to_keep=self.rows[:batch_size])
        if self.compiled is not None:      # a compiled graph takes no Python object: the step's metadata
            with forward_context(meta):    # reaches its attention op through the forward context
                return self.compiled(**inputs).logits[0]
        return self.model(**inputs, kv_meta=meta).logits[0]

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every bucket, largest first, into one shared memory pool."""
        t0 = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for batch_size in reversed(self.buckets):
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                warm = self._forward(batch_size)   # warm-up: Triton compiles, the allocator settles
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self.logits is None:
                self.logits = torch.empty(self.max_batch, warm.shape[-1], dtype=warm.dtype, device=self.device)
            del warm
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    # the forward's own tensors are freed back to the shared pool after capture;
                    # only the copy into the one static logits buffer survives
                    self.logits[:batch_size].copy_(self._forward(batch_size))
            except BaseException:
                # an invalidated capture raises from capture_end() before the stream context
                # is left: put the default stream back and keep no half-captured graphs
                torch.cuda.set_stream(torch.cuda.default_stream(self.device))
                self.graphs.clear()
                raise
            self.graphs[batch_size] = graph
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        log.info("CUDA graphs: captured %d decode batch sizes (1..%d) in %.1fs, %.0f MiB",
                 len(self.buckets), self.max_batch, time.perf_counter() - t0, used / 2**20)

    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
            seq_lens: list[int]) -> torch.Tensor:
        """One decode step of len(ids) sequences -> logits [len(ids), V] (a view of static memory)."""
        n = len(ids)
        batch_size = self.bucket(n)
        if self.uploaded is not None:
            self.uploaded.synchronize()   # the previous step's uploads have left the staging buffers
        self.host_ids[:n] = torch.tensor(ids)
        self.host_pos[:n] = torch.tensor(positions)
        self.host_slots[:n] = torch.tensor(slots)
        self.host_lens[:n] = torch.tensor(seq_lens, dtype=torch.int32)
        # rows n..batch_size are padding: position 0, slot -1 (no write), length 1
        self.host_ids[n:batch_size] = 0
        self.host_pos[n:batch_size] = 0
        self.host_slots[n:batch_size] = -1
        self.host_lens[n:batch_size] = 1
        # The tables travel packed as [batch_size, width] (one contiguous pinned upload), then spread on the
        # device. Columns past a row's table are never read (the kernels stop at seq_len), so stale
        # entries there, and in padding rows, are harmless.
        width = max(len(t) for t in tables)
        packed = self.host_tables[:batch_size * width].view(batch_size, width)
        pack_tables(tables, packed)
        packed[n:] = 0
        for host, dev in ((self.host_ids, self.ids), (self.host_pos, self.pos), (self.host_slots, self.slots),
                          (self.host_lens, self.seq_lens)):
            dev[:batch_size].copy_(host[:batch_size], non_blocking=True)
        upload = self.tables_upload[:batch_size * width]
        upload.copy_(self.host_tables[:batch_size * width], non_blocking=True)
        self.tables[:batch_size, :width].copy_(upload.view(batch_size, width))
        if self.uploaded is not None:
            self.uploaded.record()
        if batch_size in self.graphs:
            self.graphs[batch_size].replay()
            return self.logits[:n]
        return self._forward(batch_size)[:n]

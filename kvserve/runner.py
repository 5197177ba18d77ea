"""Runs the model: one packed forward per scheduled step, replayed from a CUDA graph when it can be."""
from __future__ import annotations

import logging

import torch

from kvserve.cache.backends import AttentionBackend
from kvserve.cache.kv_pool import KVPool, upload
from kvserve.cuda_graphs import DecodeGraphs
from kvserve.scheduler.scheduler import SchedulerOutput

log = logging.getLogger("kvserve")


class ModelRunner:
    """Turns a SchedulerOutput into the logits of its sampling rows. It reads nothing but the
    scheduler's output: token ids, positions, slots, block tables, and which rows decode."""

    def __init__(self, model, kv_pool: KVPool, backend: AttentionBackend):
        self.model = model
        self.kv_pool = kv_pool
        self.backend = backend
        self.device = kv_pool.spec.device
        self.vocab_size = model.config.get_text_config().vocab_size
        self.graphs: DecodeGraphs | None = None

    def init_decode_graphs(self, max_model_len: int, max_batch: int, capture: bool) -> None:
        """Decode through the padded static-buffer path; captured as CUDA graphs when `capture`
        (off CUDA the same path runs eagerly, for tests)."""
        self.graphs = DecodeGraphs(self.model, self.kv_pool.caches, self.kv_pool.block_size, max_model_len,
                                   max_batch, self.device)
        if not capture:
            log.warning("cuda_graphs on %s: the padded decode path runs without capture", self.device)
            return
        try:
            self.graphs.capture_all()
        except Exception:  # a model whose forward cannot be captured still serves, eagerly
            log.exception("CUDA graph capture failed; decoding eagerly")
            self.graphs = None

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> torch.Tensor:
        """Run one packed forward. Returns the logits of step.sample_rows, [len(sample_rows), V]."""
        self.kv_pool.copy_blocks(step.block_copies)
        num_rows = len(step.num_tokens)
        if (self.graphs is not None and step.num_decodes == num_rows
                and self.graphs.fits(num_rows, max(step.context_lens))):
            # a decode-only step: every row feeds one token and samples
            return self.graphs.run(step.input_ids, step.positions, step.slot_mapping, step.block_tables,
                                   step.context_lens)
        meta = self.backend.build_metadata(self.kv_pool, step.num_tokens, step.context_lens, step.num_decodes,
                                           step.block_tables, step.slot_mapping)
        last_token_of_row = _last_token_indices(step.num_tokens)
        out = self.model(input_ids=upload(step.input_ids, self.device)[None],
                         position_ids=upload(step.positions, self.device)[None], use_cache=False,
                         logits_to_keep=upload([last_token_of_row[r] for r in step.sample_rows], self.device),
                         kv_meta=meta)
        return out.logits[0]


def _last_token_indices(num_tokens: list[int]) -> list[int]:
    """Index in the packed batch of each row's last token."""
    indices, end = [], 0
    for n in num_tokens:
        end += n
        indices.append(end - 1)
    return indices

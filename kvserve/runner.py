"""Runs the model: one packed forward per scheduled step, replayed from a CUDA graph when it can be."""
from __future__ import annotations

import logging
import time

import torch

from kvserve.cache import attention
from kvserve.cache.attention import forward_context
from kvserve.cache.backends import AttentionBackend
from kvserve.cache.kv_pool import KVPool, upload
from kvserve.cuda_graphs import DecodeGraphs
from kvserve.scheduler.scheduler import SchedulerOutput

log = logging.getLogger("kvserve")

_FATAL_MESSAGES = ("CUDA error", "device-side assert", "CUBLAS_STATUS", "cuDNN error", "out of memory")


def is_fatal(exc: BaseException) -> bool:
    """Faults of the engine or the device, not of one request (kvserve.isolation retries none of them)."""
    if not isinstance(exc, Exception) or isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return any(text in str(exc) for text in _FATAL_MESSAGES)


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
        self.warmup_variants: frozenset = frozenset()   # kernel variants launched by warmup()
        self.compiled = None                            # the torch.compile'd model, see compile()
        self.warned_uncompiled = False

    def compile(self) -> bool:
        """torch.compile the model (inductor, dynamic shapes) and compile its graphs now, on synthetic
        steps shaped like serving's (one decode, several decodes, a prefill chunk, and a prefill beside a
        decode), so none compiles while serving. The paged attention stays one opaque op per layer
        (kvserve::paged_attention); the rest of each layer (norms, rotary, MLP, residuals) becomes
        fused kernels and the per-module Python goes. On CUDA the decode graphs then capture the
        compiled forward (init_decode_graphs), and the steps no graph runs (prefills, mixed steps) run
        it without a capture. Returns False, and leaves the model eager, when compiling fails (e.g. no
        C++ compiler on a CPU host)."""
        t0 = time.perf_counter()
        # dynamo keeps its graphs per code object, shared by every model in the process (the offline LLM,
        # tests, benchmarks build several): past the limit it would run frames eagerly without a word
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.compiled = torch.compile(self.model, dynamic=True)
        try:
            with torch.inference_mode():
                for step in _compile_steps(self.kv_pool.num_blocks * self.kv_pool.block_size, self.kv_pool.block_size):
                    self._forward(step)     # drops self.compiled if a compiled graph fails
        except Exception:
            log.exception("the compile warm-up failed")
            self.compiled = None
        if self.compiled is None:
            log.warning("torch.compile failed: the model runs eagerly")
            return False
        log.info("torch.compile: model compiled in %.1fs", time.perf_counter() - t0)
        return True

    def init_decode_graphs(self, max_model_len: int, max_batch: int, capture: bool) -> None:
        """Decode through the padded static-buffer path, running the compiled model if there is one;
        captured as CUDA graphs when `capture` (off CUDA the same path runs uncaptured, for tests). If
        the compiled forward cannot be captured, the eager one is; if neither can, decode steps run the
        packed path like any other step."""
        for compiled in ([self.compiled, None] if self.compiled is not None else [None]):
            self.graphs = DecodeGraphs(self.model, self.kv_pool.caches, self.kv_pool.block_size, max_model_len,
                                       max_batch, self.device, compiled)
            if not capture:
                log.warning("cuda_graphs on %s: the padded decode path runs without capture", self.device)
                return
            try:
                self.graphs.capture_all()
                return
            except Exception:  # a model whose forward cannot be captured still serves, without graphs
                kind = "compiled" if compiled is not None else "eager"
                log.exception("CUDA graph capture of the %s forward failed%s", kind,
                              "; capturing the eager forward" if compiled is not None else "; decoding without graphs")
        self.graphs = None

    @torch.inference_mode()
    def move_blocks(self, step: SchedulerOutput) -> None:
        """The step's block copies (to and from the host tier, copy-on-write): once, before its forward
        (a step retried in parts by kvserve.isolation must not repeat them)."""
        if step.kv_moves:
            self.kv_pool.move_blocks(*step.kv_moves)

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> torch.Tensor:
        """Run one packed forward. Returns the logits of step.sample_rows' last tokens, then of every
        token of step.prompt_logprob_rows, row by row: [len(sample_rows) + their tokens, V]."""
        num_rows = len(step.num_tokens)
        if (self.graphs is not None and step.num_decodes == num_rows
                and self.graphs.fits(num_rows, max(step.context_lens))):
            # a decode-only step: every row feeds one token and samples
            return self.graphs.run(step.input_ids, step.positions, step.slot_mapping, step.block_tables,
                                   step.context_lens)
        return self._forward(step)

    def _forward(self, step: SchedulerOutput) -> torch.Tensor:
        """The eager packed forward of one step (no CUDA graph)."""
        meta = self.backend.build_metadata(self.kv_pool, step.num_tokens, step.context_lens, step.num_decodes,
                                           step.block_tables, step.slot_mapping)
        last_token_of_row = _last_token_indices(step.num_tokens)
        keep = [last_token_of_row[r] for r in step.sample_rows]
        for r in step.prompt_logprob_rows:
            keep.extend(range(last_token_of_row[r] - step.num_tokens[r] + 1, last_token_of_row[r] + 1))
        # a compiled graph that keeps no logits (a lone chunk mid-prompt) would depend on none of the
        # last layer's work: inductor drops it, and with it that layer's K/V writes (the attention op
        # writes the cache unseen). Such a step keeps its last token's row, and drops it here.
        keeps_none = not keep and self.compiled is not None
        if keeps_none:
            keep = [last_token_of_row[-1]]
        input_ids = upload(step.input_ids, self.device)[None]
        position_ids = upload(step.positions, self.device)[None]
        logits_to_keep = upload(keep, self.device)
        if self.compiled is not None:
            uncompiled = attention.uncompiled_calls
            try:
                with forward_context(meta):
                    logits = self.compiled(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                           logits_to_keep=logits_to_keep).logits[0]
                if attention.uncompiled_calls != uncompiled and not self.warned_uncompiled:
                    self.warned_uncompiled = True
                    log.warning("torch.compile ran part of the model eagerly (dynamo's recompile limit?): "
                                "correct, but without the compiled speed")
                return logits[:0] if keeps_none else logits
            except Exception as exc:
                if is_fatal(exc):        # out of memory, a device fault: not the compiled graph's doing
                    raise
                # the eager forward decides: if it fails too, the step is at fault (kvserve.isolation
                # finds its rows); if not, the compiled graph is, and it is dropped for good
                out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                 logits_to_keep=logits_to_keep, kv_meta=meta)
                captured = self.graphs is not None and bool(self.graphs.graphs) and self.graphs.compiled is not None
                log.exception("a compiled forward failed where the eager one runs: serving eagerly from now on%s",
                              " (decode steps still replay the CUDA graphs captured from it)" if captured else "")
                self.compiled = None
                if self.graphs is not None and not captured:   # (a captured graph was checked when it was made)
                    self.graphs.compiled = None
                return out.logits[0][:0] if keeps_none else out.logits[0]
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                         logits_to_keep=logits_to_keep, kv_meta=meta)
        return out.logits[0]

    @torch.inference_mode()
    def warmup(self, interpreted: bool = False) -> int:
        """Compile every Triton kernel variant the eager path can meet, before serving: returns the
        number of kernels compiled (0 under the interpreter), and leaves the variants the warm-up
        launched in self.warmup_variants. A no-op for the torch backend.

        Real forwards of synthetic steps through the eager path (so each layer kind, e.g. Gemma-2's
        sliding and global layers, launches its own variants): every prefill tile height
        (triton_attention.prefill_buckets) with 0, 1 and 2 decodes beside it (both parities of
        num_decodes), a decode-only step, and a decode whose block table is wide enough to split.
        Every token has slot -1 (nothing is written to the cache), every table points at block 0 and
        every row's context is its own tokens, so nothing is read from the cache either. Decode-only
        steps on CUDA graphs were compiled when the graphs were captured (same kernels). Under
        Triton's interpreter (CPU tests) it runs only when `interpreted` asks for it."""
        from kvserve.cache import triton_attention as ta
        if self.backend.name != "triton" or (ta.interpreted() and not interpreted):
            return 0     # the interpreter compiles nothing: warming it up only costs start-up time
        t0 = time.perf_counter()
        compiled = ta.num_compiles()
        spec = self.kv_pool.spec
        cfg = self.model.config.get_text_config()
        num_heads = cfg.num_attention_heads
        group = max(1, num_heads // (getattr(cfg, "num_key_value_heads", None) or num_heads))   # per rank too
        prefill_lens = [q for _, q in ta.prefill_buckets(group, spec.dtype, spec.head_dim)]
        block_size = self.kv_pool.block_size
        split_width = -(-ta.WARMUP_SPLIT_CONTEXT // block_size)
        steps = []
        for i in range(max(3, len(prefill_lens))):
            steps.append(_synthetic_step([1] * (i % 3) + [prefill_lens[min(i, len(prefill_lens) - 1)]],
                                         num_decodes=i % 3, width=1))
        steps.append(_synthetic_step([1, 1], num_decodes=2, width=1))
        steps.append(_synthetic_step([1], num_decodes=1, width=split_width))
        with ta.record_variants() as keys:
            for step in steps:
                self._forward(step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmup_variants = frozenset(keys)
        compiled = ta.num_compiles() - compiled
        log.info("Triton warm-up: %d steps, %d kernel variants, %d compiled, %.1fs", len(steps), len(keys),
                 compiled, time.perf_counter() - t0)
        return compiled


def _synthetic_step(num_tokens: list[int], num_decodes: int, width: int) -> SchedulerOutput:
    """A warm-up step: rows of num_tokens tokens at positions 0.., token id 0, slot -1, every row's
    table `width` entries of block 0, every row sampling."""
    total = sum(num_tokens)
    return SchedulerOutput(num_tokens=list(num_tokens), context_lens=list(num_tokens),
                           block_tables=[[0] * width for _ in num_tokens], num_decodes=num_decodes,
                           sample_rows=list(range(len(num_tokens))), input_ids=[0] * total,
                           positions=[p for n in num_tokens for p in range(n)], slot_mapping=[-1] * total)


def _compile_steps(num_slots: int, block_size: int) -> list[SchedulerOutput]:
    """torch.compile's warm-up: a step of each shape its dynamic graphs specialise on (one token or
    many; one kept row or several; a chunk mid-prompt keeps its last row, see _forward). Every row's
    K/V go to the pool's first blocks, free at start-up."""
    chunk = max(2, min(8, num_slots))
    steps = []
    shapes = (([1], 1, [0]), ([1, 1], 2, [0, 1]), ([chunk], 0, [0]), ([1, chunk - 1], 1, [0, 1]))
    # (tokens per row, decodes, sampled rows)
    for num_tokens, num_decodes, sample_rows in shapes:
        tables = [list(range(-(-n // block_size))) for n in num_tokens]
        steps.append(SchedulerOutput(
            num_tokens=list(num_tokens), context_lens=list(num_tokens), block_tables=tables, num_decodes=num_decodes,
            sample_rows=sample_rows, input_ids=[0] * sum(num_tokens),
            positions=[p for n in num_tokens for p in range(n)],
            slot_mapping=[p for n in num_tokens for p in range(n)]))   # block b holds slots b*bs..: p's slot is p
    return steps


def _last_token_indices(num_tokens: list[int]) -> list[int]:
    """Index in the packed batch of each row's last token."""
    indices, end = [], 0
    for n in num_tokens:
        end += n
        indices.append(end - 1)
    return indices

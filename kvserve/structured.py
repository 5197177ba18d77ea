"""Structured outputs: a request's grammar (a JSON schema or a regex) constrains every token it samples.

llguidance does the grammar work (why it and not xgrammar: see the README's API section). Three
stages, each cached:

- `grammar_text(spec)`: the request's schema or regex as llguidance grammar text, then checked
  (`check`): what the HTTP edge runs, in a worker thread, so a schema the engine cannot compile is
  a 400 before the request is admitted.
- `GrammarCompiler.matcher(spec)`: in the engine, a matcher for the grammar. The first request of a
  schema builds it on a worker thread (llguidance releases the GIL while it compiles, so the steps
  of other requests go on); later requests of the same schema take a copy of the cached one.
- `fill_bitmask` each step: one bit per vocabulary entry, for every constrained row of the batch at
  once; the sampler applies it to the logits, and the engine advances each request's matcher with
  the token it accepted. The matcher belongs to its request: free rows are never masked.

Preemption needs no rollback: a preempted request keeps its generated tokens (only their KV is
recomputed), so its matcher is still where its tokens left it.
"""
from __future__ import annotations

import functools
import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from typing import TYPE_CHECKING

from kvserve.scheduler.sampling_params import StructuredOutput

if TYPE_CHECKING:     # the HTTP edge checks grammars with this module: it must not load torch
    import torch

log = logging.getLogger("kvserve")

# compact, fixed JSON layout: no run of whitespace for a sampling model to wander into; the options
# override the schema's own "x-guidance" settings
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}
MAX_CACHED_GRAMMARS = 256


class GrammarError(ValueError):
    """The grammar cannot be compiled: the message says why (a client error)."""


@functools.lru_cache(maxsize=MAX_CACHED_GRAMMARS)
def grammar_text(spec: StructuredOutput) -> str:
    """llguidance grammar text for the spec; GrammarError when it is not even well-formed."""
    from llguidance import LLMatcher
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.value)
    try:
        schema = json.loads(spec.value)
    except json.JSONDecodeError as exc:
        raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be a JSON object")
    try:
        return LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except ValueError as exc:
        raise GrammarError(str(exc)) from None


@functools.lru_cache(maxsize=MAX_CACHED_GRAMMARS)
def check(spec: StructuredOutput) -> str | None:
    """Why the spec's grammar cannot be compiled, or None. Can take a while for a large schema (run it
    off the event loop); cached by spec."""
    from llguidance import LLMatcher
    try:
        text = grammar_text(spec)
    except GrammarError as exc:
        return str(exc)
    error = LLMatcher.validate_grammar(text, None)
    return _short(error) if error else None


def _short(message: str, limit: int = 500) -> str:
    message = message.strip()
    return message if len(message) <= limit else message[:limit] + "..."


class GrammarCompiler:
    """The engine's side: llguidance's view of the tokenizer, compiled matchers cached by spec, and
    the thread that compiles new ones."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]):
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._lock = threading.Lock()
        # the template cache and its copies, shared with the compile thread (a matcher used by two threads
        # at once raises "Already borrowed")
        self._copy_lock = threading.Lock()
        self._ll_tokenizer = None
        self._templates: OrderedDict[StructuredOutput, object] = OrderedDict()
        self._compiling: dict[StructuredOutput, Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    def _tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf
                self._ll_tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                                  eos_token=self._eos or None)
            return self._ll_tokenizer

    def matcher(self, spec: StructuredOutput) -> Future:
        """A future of a fresh matcher for the spec (already done when the spec is cached). It raises
        GrammarError when the grammar does not compile."""
        with self._copy_lock:
            template = self._templates.get(spec)
            if template is not None:
                self._templates.move_to_end(spec)
                done: Future = Future()
                done.set_result(template.deep_copy())
                return done
        pending = self._compiling.get(spec)
        if pending is None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvserve-grammar")
            pending = self._compiling[spec] = self._pool.submit(self._compile, spec)
        fresh: Future = Future()
        pending.add_done_callback(lambda f: self._copy_to(f, fresh))
        return fresh

    def _copy_to(self, compiled: Future, fresh: Future) -> None:
        exc = compiled.exception()
        if exc is not None:
            fresh.set_exception(exc)
            return
        with self._copy_lock:
            fresh.set_result(compiled.result().deep_copy())

    def _compile(self, spec: StructuredOutput):
        from llguidance import LLMatcher
        try:
            matcher = LLMatcher(self._tokenizer(), grammar_text(spec), log_level=0)
            if matcher.is_error():
                raise GrammarError(_short(matcher.get_error()))
            with self._copy_lock:    # published before the pending entry goes: no second compile
                self._templates[spec] = matcher
                while len(self._templates) > MAX_CACHED_GRAMMARS:
                    self._templates.popitem(last=False)
        finally:
            self._compiling.pop(spec, None)
        return matcher

    def fill_bitmask(self, matchers: list, banned: list[list[int]]) -> torch.Tensor | None:
        """[rows, ceil(V / 32)] int32 on the host, bit t of a row set when token t is allowed, or None
        when no row has a matcher (rows without one allow everything). A row's banned tokens (EOS
        before min_tokens) are cleared from its mask unless that would leave it nothing: the grammar
        decides when it must end."""
        rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        import numpy as np
        import torch
        from llguidance.torch import fill_next_token_bitmask
        # one row after another on this thread: llguidance's parallel executor (a rayon pool) fought torch's
        # threads for the cores; on 2 cores it made constrained steps 5.8x slower (bench structured)
        mask = torch.full((len(matchers), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        for matcher, i in rows:
            fill_next_token_bitmask(matcher, mask, i)
        words = mask.numpy().view(np.uint32)
        for _, i in rows:
            ids = [t for t in banned[i] if 0 <= t < self.vocab_size]
            if ids:
                row = words[i].copy()
                np.bitwise_and.at(row, np.array(ids) // 32, ~(np.uint32(1) << (np.array(ids) % 32).astype(np.uint32)))
                if row.any():
                    words[i] = row
        return mask


def unpack_bitmask(mask: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """The host bitmask as a [rows, V] bool tensor on the device (True: allowed)."""
    import torch
    bits = torch.arange(32, dtype=torch.int32, device=device)
    words = mask.to(device, non_blocking=True)
    return ((words[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab_size]

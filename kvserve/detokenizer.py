"""Incremental detokenization: exact text deltas, never a split multi-byte character, stop strings."""
from __future__ import annotations

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens decoded with the first output tokens so spacing comes out right


class IncrementalDetokenizer:
    """Emits each token's text once it is complete; ids with no vocabulary entry decode to ""."""

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.vocab_limit = len(tokenizer)
        self.ids = [t for t in prompt_ids if self._known(t)][-PROMPT_CONTEXT:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _known(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_limit

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        if not self._known(token_id):
            return ""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """At the end: whatever is still held back (an incomplete character becomes U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if full.startswith(prefix) else ""


class StopStringMatcher:
    """Finds stop strings in the growing text, also across token boundaries, and says how much
    text is safe to release (text that could still start a stop string is held back)."""

    def __init__(self, stops: list[str], include_in_output: bool):
        self.stops = stops
        self.include = include_in_output
        self.hold = max((len(s) for s in stops), default=1) - 1

    def check(self, text: str, new_len: int) -> tuple[int, str] | None:
        """Search the tail of text affected by the last new_len characters. Returns (cut, stop)."""
        if not self.stops:
            return None
        start = max(0, len(text) - new_len - self.hold)
        best = None
        for stop in self.stops:
            idx = text.find(stop, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        return (idx + len(stop) if self.include else idx), stop

    def releasable(self, text: str) -> int:
        return len(text) - self.hold if self.stops else len(text)

"""Incremental detokenization: exact text deltas, never a split multi-byte character, stop strings."""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5  # prompt tokens decoded with the first output tokens so spacing comes out right


class IncrementalDetokenizer:
    """Emits each token's text once it is complete; ids with no vocabulary entry decode to ""."""

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.vocab_limit = len(tokenizer)
        self.backend_decode = _backend_decode(tokenizer)
        context: list[int] = []     # the last PROMPT_CONTEXT known ids (a prompt can be 100k ids long)
        for t in reversed(prompt_ids):
            if len(context) == PROMPT_CONTEXT:
                break
            if self._known(t):
                context.append(t)
        self.ids = context[::-1]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _known(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_limit

    def _decode(self, ids: list[int]) -> str:
        if self.backend_decode is not None:
            return self.backend_decode(ids, skip_special_tokens=self.skip_special_tokens)
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


def _backend_decode(tokenizer) -> Callable[..., str] | None:
    """The Rust tokenizer's decode where it returns exactly what
    tokenizer.decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False) does, else None.

    transformers 5's TokenizersBackend.decode only converts ids to a Python list (to_py_obj) and calls
    _decode, which calls self._tokenizer.decode(ids, skip_special_tokens=...) and, with cleanup off,
    returns that text as is. That wrapper costs ~15x the Rust call, twice per generated token. A class
    (or instance) overriding decode or _decode (whisper, marian, mistral_common, ...) keeps the wrapper."""
    if not _keeps_base_decode(type(tokenizer)):
        return None
    own = getattr(tokenizer, "__dict__", {})
    if "decode" in own or "_decode" in own:
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    return backend.decode if isinstance(backend, Tokenizer) else None


@lru_cache(maxsize=None)
def _keeps_base_decode(cls: type) -> bool:
    """Whether cls is a transformers TokenizersBackend with the base class's decode and _decode."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers version: its wrapper may do more, keep calling it
        return False
    base_decode = getattr(TokenizersBackend, "decode", None)
    base_inner = TokenizersBackend.__dict__.get("_decode")  # the one that calls self._tokenizer.decode
    return (issubclass(cls, TokenizersBackend) and base_decode is not None and base_inner is not None
            and getattr(cls, "decode", None) is base_decode and getattr(cls, "_decode", None) is base_inner)


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


class TokenBytes:
    """A token id's exact bytes (what OpenAI's logprobs report as `bytes`), memoized.

    Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen) spell tokens in an alphabet of 256 printable
    characters, one per byte; SentencePiece ones use "▁" for a space and <0xNN> for a lone byte.
    Decoding a single token instead would turn a piece of a multi-byte character into U+FFFD."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_limit = len(tokenizer)
        self.byte_of = _byte_level_alphabet() if _is_byte_level(tokenizer) else None
        self.cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        if token_id not in self.cache:
            self.cache[token_id] = self._bytes(token_id)
        return self.cache[token_id]

    def _bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_limit:
            return b""
        token = self.tokenizer.convert_ids_to_tokens(token_id)
        if token is None:
            return b""
        if self.byte_of is not None and all(c in self.byte_of for c in token):
            return bytes(self.byte_of[c] for c in token)
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                pass
        return token.replace("\u2581", " ").encode("utf-8")


def _is_byte_level(tokenizer) -> bool:
    """Whether the tokenizer's decoder is byte-level (fast tokenizers; False when it cannot tell)."""
    import json
    try:
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    except Exception:  # noqa: BLE001 - a slow tokenizer, or one without a serialized decoder
        return False
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
    return "ByteLevel" in kinds


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's character for each byte, inverted: printable Latin-1 bytes stand for
    themselves, the other 68 bytes for the characters from U+0100 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars

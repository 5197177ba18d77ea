"""Per-request sampling and stopping parameters, checked so that no value can break a step."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import ClassVar

GREEDY_BELOW = 1e-5          # a temperature below this samples greedily (dividing by it overflows)
MAX_STOP_TOKEN_IDS = 1024
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_TOKEN_ID = 2**31 - 1
MAX_TOP_LOGPROBS = 20                    # most likely tokens reported per position (OpenAI's bound)
MAX_LOGIT_BIAS = 1024                    # entries; each bias is in [-100, 100] as OpenAI documents
MAX_GRAMMAR_CHARS = 65536                # a structured output's schema or regex, as text
STRUCTURED_KINDS = ("json", "regex")     # a JSON schema, a regular expression
SEED_MIN, SEED_MAX = -2**63, 2**64 - 1   # OpenAI's signed 64-bit seeds and TGI's unsigned ones


@dataclass(frozen=True)
class StructuredOutput:
    """A grammar every generated token must keep to: kind "json" (value: a JSON schema, as JSON text)
    or "regex" (value: the pattern). Compiled and enforced by kvserve.structured."""
    kind: str
    value: str
    MAX_CHARS: ClassVar[int] = MAX_GRAMMAR_CHARS

    @classmethod
    def json_schema(cls, schema: dict | str) -> StructuredOutput:
        return cls("json", schema if isinstance(schema, str) else json.dumps(schema, ensure_ascii=False))

    def error(self) -> str | None:
        if self.kind not in STRUCTURED_KINDS:
            return f"structured.kind must be one of {', '.join(STRUCTURED_KINDS)}, got {self.kind!r}"
        if not isinstance(self.value, str):
            return "structured.value must be a string"
        if len(self.value) > MAX_GRAMMAR_CHARS:
            return f"structured.value has {len(self.value)} characters; at most {MAX_GRAMMAR_CHARS} are allowed"
        return None


@dataclass
class SamplingParams:
    """Every field is checked here, whoever builds the params (the HTTP edge or the offline API):
    a bad value raises ValueError naming the field, before the request reaches the engine."""
    max_tokens: int = 16
    temperature: float = 1.0          # 0 (or below 1e-5) means greedy
    top_k: int = 0                    # 0 or -1: off; larger than the vocabulary: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0   # HF-style, over prompt and output tokens
    presence_penalty: float = 0.0     # OpenAI-style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: bool = True             # log-probability of each chosen token
    top_logprobs: int = 0             # also this many of the most likely tokens at each position (0-20)
    prompt_logprobs: int | None = None  # the prompt tokens' logprobs, and this many most likely (0-20); None: off
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    structured: StructuredOutput | None = None   # a grammar every generated token keeps to

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        errors = [e for e in self._errors() if e]
        if errors:
            raise ValueError("; ".join(errors))

    def _errors(self):
        yield _integer("max_tokens", self.max_tokens, 1, None)
        yield _number("temperature", self.temperature, 0, None)
        yield _integer("top_k", self.top_k, -1, None)
        yield _number("top_p", self.top_p, 0, 1, low_open=True)
        yield _number("min_p", self.min_p, 0, 1)
        yield _number("repetition_penalty", self.repetition_penalty, 0, None, low_open=True)
        yield _number("presence_penalty", self.presence_penalty, -2, 2)
        yield _number("frequency_penalty", self.frequency_penalty, -2, 2)
        if self.seed is not None:
            yield _integer("seed", self.seed, SEED_MIN, SEED_MAX)
        yield _integer("min_tokens", self.min_tokens, 0, None)
        yield _integer("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        if self.prompt_logprobs is not None:
            yield _integer("prompt_logprobs", self.prompt_logprobs, 0, MAX_TOP_LOGPROBS)
        if _is_int(self.min_tokens) and _is_int(self.max_tokens) and self.min_tokens > self.max_tokens:
            yield f"min_tokens must be at most max_tokens ({self.max_tokens}), got {self.min_tokens}"
        yield from self._stop_errors()
        yield _logit_bias_error(self.logit_bias)
        if self.structured is not None:
            yield (self.structured.error() if isinstance(self.structured, StructuredOutput)
                   else "structured must be a StructuredOutput")

    def _stop_errors(self):
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            yield "stop must be a string or a list of strings"
        elif len(self.stop) > MAX_STOP_STRINGS:
            yield f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed"
        elif any(not s for s in self.stop):
            yield "stop strings must not be empty"
        elif any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            yield f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters"
        if not isinstance(self.stop_token_ids, list):
            yield "stop_token_ids must be a list of token ids"
        elif len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            yield f"stop_token_ids has {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed"
        else:
            bad = next((t for t in self.stop_token_ids if not _is_int(t) or not 0 <= t <= MAX_TOKEN_ID), None)
            if bad is not None:
                yield f"stop_token_ids must hold token ids (integers >= 0), got {bad!r}"

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _logit_bias_error(bias) -> str | None:
    if not isinstance(bias, dict):
        return "logit_bias must map token ids to numbers"
    if len(bias) > MAX_LOGIT_BIAS:
        return f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS} are allowed"
    for token, value in bias.items():
        if not _is_int(token) or not 0 <= token <= MAX_TOKEN_ID:
            return f"logit_bias keys must be token ids (integers >= 0), got {token!r}"
        error = _number(f"logit_bias[{token}]", value, -100, 100)
        if error:
            return error
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(name: str, value, low: int | None, high: int | None) -> str | None:
    if not _is_int(value):
        return f"{name} must be an integer, got {value!r}"
    if (low is not None and value < low) or (high is not None and value > high):
        return f"{name} must be {_range(low, high, False)}, got {value}"
    return None


def _number(name: str, value, low: float | None, high: float | None, low_open: bool = False) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{name} must be a finite number, got {value!r}"
    if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
        return f"{name} must be {_range(low, high, low_open)}, got {value}"
    return None


def _range(low, high, low_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}]"

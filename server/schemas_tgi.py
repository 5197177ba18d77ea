"""Request and response bodies of text-generation-inference's API (/generate, /generate_stream, /)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvserve.server.validation import ClientBody, NullAsDefault

MAX_STOP_SEQUENCES = 4
DEFAULT_MAX_NEW_TOKENS = 100


class GenerateParameters(NullAsDefault):
    """TGI's `parameters`, in TGI's documented ranges; typical_p, watermark and adapter_id only at their
    defaults."""
    model_config = ConfigDict(extra="allow")

    max_new_tokens: int | None = Field(None, ge=1, description=f"default {DEFAULT_MAX_NEW_TOKENS}, "
                                       "capped by what is left of max_model_len")
    do_sample: bool = Field(False, description="sample instead of greedy; implied by temperature, "
                            "top_k or top_p")
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, lt=1)
    typical_p: float | None = Field(None, gt=0, lt=1, description="not supported: only null")
    repetition_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=0, le=2**64 - 1, description="an unsigned 64-bit integer")
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    details: bool = False
    decoder_input_details: bool = Field(False, description="prefill tokens: ids, texts and logprobs (null for "
                                        "the first); not when streaming")
    return_full_text: bool | None = False
    truncate: int | None = Field(None, ge=1, description="keep only the last `truncate` prompt tokens")
    top_n_tokens: int | None = Field(None, ge=0, le=20, description="this many of the most likely tokens at each "
                                     "generated position, in details.top_tokens (0-20)")
    best_of: int | None = Field(None, ge=1, le=16, description="sample this many sequences (1-16; needs sampling, "
                                "no seed, no streaming) and answer the one with the highest total logprob, the "
                                "others in details.best_of_sequences")
    watermark: bool = Field(False, description="not supported: only false")
    grammar: Any = Field(None, description="{\"type\": \"json\", \"value\": schema}, {\"type\": \"json_schema\", "
                         "\"value\": {\"name\", \"schema\"}} or {\"type\": \"regex\", \"value\": pattern}: the output "
                         "is constrained to it")
    adapter_id: str | None = Field(None, description="not supported: only null")
    ignore_eos: bool = Field(False, description="kvserve extension: keep generating after EOS")
    logit_bias: dict[str, float] | None = Field(None, description="kvserve extension, as OpenAI's: token id (as a "
                                                "string) -> bias in [-100, 100] added to its logit; at most 1024")


class GenerateRequest(ClientBody):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class BestOfSequence(BaseModel):
    """One of best_of's other sequences."""
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] = Field(default_factory=list)


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] = Field(default_factory=list)   # per generated token, with top_n_tokens
    best_of_sequences: list[BestOfSequence] | None = None        # with best_of > 1: the others, best first


class GenerateResponse(BaseModel):
    """`details` is present only when parameters.details is true."""
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(BaseModel):
    """One SSE `data:` event per token; the last one carries generated_text and details."""
    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class TGIErrorResponse(BaseModel):
    error: str
    error_type: str


class SimpleToken(BaseModel):
    """One token of POST /tokenize: `text` is inputs[start:stop] (character offsets); a token the
    tokenizer added (BOS) has "" and 0, 0, as has every token of a tokenizer without offsets."""
    id: int
    text: str
    start: int
    stop: int

"""Request and response bodies of the OpenAI-compatible API (/v1/completions, /v1/chat/completions)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvserve.server.validation import ClientBody, NullAsDefault

OpenAIFinishReason = Literal["stop", "length", "tool_calls"]
MAX_STOP_SEQUENCES = 64       # OpenAI documents 4; vLLM has no cap; SamplingParams' own bound
MAX_LOGIT_BIAS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_N = 16                    # outputs per prompt (n, best_of)
MAX_PROMPTS = 64              # prompts in one completions request
MAX_SEQUENCES = 64            # prompts x best_of in one request


class StreamOptions(NullAsDefault):
    """Only with `stream: true`."""
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False
    include_obfuscation: bool | None = Field(None, description="accepted and ignored (no obfuscation field)")


class SamplingFields(ClientBody):
    """Fields shared by completions and chat, including vLLM's extensions (ignore_eos, top_k, ...).
    Fields that change nothing here (store, metadata, user, ...) are accepted and ignored."""
    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="a served model name (GET /v1/models); optional")
    temperature: float | None = Field(None, ge=0, le=2, description="default 1.0; 0 is greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(1, ge=1, le=MAX_N, description=f"outputs per prompt (1-{MAX_N}); the prompt is prefilled once")
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    stop: str | list[str] | None = Field(None, description=(
        f"up to {MAX_STOP_SEQUENCES} strings (OpenAI documents 4; kvserve accepts more, as vLLM does)"))
    seed: int | None = Field(None, ge=-2**63, le=2**63 - 1, description="a 64-bit signed integer")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description=(
        f"token id (as a string) -> bias in [-100, 100] added to its logit; at most {MAX_LOGIT_BIAS} entries"))
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating after EOS")
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    response_format: dict[str, Any] | None = Field(None, description=(
        "{\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": "
        "{\"name\", \"schema\", \"strict\"}}: the output is constrained to the schema"))
    # accepted and ignored: they change nothing in what this server generates
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description=f"a string, a token id list, or a list of up to {MAX_PROMPTS} of either (choice i*n+j is prompt "
                    "i's output j)")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="each chosen token's logprob, and this many of "
                                 "the most likely tokens at each position (0-20)")
    suffix: str | None = Field(None, description="not supported: only null")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description=f"generate this many (n-{MAX_N}), answer the n "
                                "with the highest total logprob; not when streaming unless equal to n")


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, description="an assistant's calls: {id, type, function: "
                                                    "{name, arguments}}")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="default: what is left of "
                                              "max_model_len")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: this many of the most likely "
                                     "tokens at each position (0-20)")
    tools: list[Any] | None = Field(None, description="function tools, rendered through the chat template")
    tool_choice: Any = Field(None, description="\"none\", \"auto\" (the default with tools), \"required\" or "
                             "{\"type\": \"function\", \"function\": {\"name\"}}")
    functions: list[Any] | None = Field(None, description="deprecated by OpenAI, not supported: use tools")
    function_call: Any = Field(None, description="deprecated by OpenAI, only null or \"none\": use tool_choice")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call (tool_choice required)")
    modalities: list[str] | None = Field(None, description="only [\"text\"]")
    audio: Any = Field(None, description="not supported: only null")
    prediction: Any = Field(None, description="not supported: only null")
    reasoning_effort: str | None = Field(None, description="not supported: only null")
    verbosity: str | None = Field(None, description="not supported: only null")
    web_search_options: Any = Field(None, description="not supported: only null")
    add_generation_prompt: bool = True
    chat_template: str | None = Field(None, description="only when the server runs with "
                                      "--trust-request-chat-template")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description=(
        "extra variables for the chat template: plain JSON values, bounded in size"))


class TokenizeCompletionRequest(ClientBody):
    """vLLM's POST /tokenize of a text."""
    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="a served model name (GET /v1/models); optional")
    prompt: str
    add_special_tokens: bool = Field(True, description="add the tokenizer's special tokens (BOS), as "
                                     "/v1/completions does")
    return_token_strs: bool = Field(False, description="also answer each token's vocabulary string")


class TokenizeChatRequest(ClientBody):
    """vLLM's POST /tokenize of a conversation, rendered by the chat template as /v1/chat/completions
    renders it."""
    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="a served model name (GET /v1/models); optional")
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = Field(False, description="leave the last message open (only with "
                                         "add_generation_prompt false)")
    add_special_tokens: bool = Field(False, description="add the tokenizer's special tokens on top of "
                                     "what the template writes")
    return_token_strs: bool = Field(False, description="also answer each token's vocabulary string")
    chat_template: str | None = Field(None, description="only when the server runs with "
                                      "--trust-request-chat-template")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description=(
        "extra variables for the chat template: plain JSON values, bounded in size"))
    tools: list[Any] | None = Field(None, description="function tools, rendered through the chat template")
    mm_processor_kwargs: dict[str, Any] | None = Field(None, description="not supported: only null")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None = Field(None, description="with return_token_strs")


class DetokenizeRequest(ClientBody):
    """vLLM's POST /detokenize."""
    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="a served model name (GET /v1/models); optional")
    tokens: list[int] = Field(description="token ids in the vocabulary, at most max_model_len of them")


class DetokenizeResponse(BaseModel):
    prompt: str


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float | None] | None] | None = None   # null for an echoed prompt's first token
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: OpenAIFinishReason | None = None


class CompletionBase(BaseModel):
    """How every completion body and streamed chunk starts; subclasses fix `object` and the choices."""
    id: str
    object: str
    created: int
    model: str


class CompletionResponse(CompletionBase):
    """Also the shape of each streamed chunk (then `usage` is null until the usage chunk)."""
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int]


class ChatLogprob(BaseModel):
    """One generated token: its text (U+FFFD where it holds part of a character), log-probability
    and exact bytes, with the most likely tokens at its position when top_logprobs asks for them."""
    token: str
    logprob: float | None
    bytes: list[int]
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str          # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str = ""


class ToolCallDelta(BaseModel):
    """A fragment of a streamed call: its first has id, type and the function's name."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: OpenAIFinishReason


class ChatCompletionResponse(CompletionBase):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: OpenAIFinishReason | None = None


class ChatCompletionChunk(CompletionBase):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvserve"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: ErrorDetail

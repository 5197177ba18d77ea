"""The tokenizer's routes: POST /tokenize in TGI's shape (a body with `inputs`) or vLLM's (`prompt` or
`messages`), told apart by the body, and vLLM's POST /detokenize.

Tokenization runs as for generation (server/inputs.py): on the worker pool, bounded in time, with the
same ids, texts too long for the model refused before they are tokenized, chat templates rendered as
/v1/chat/completions renders them.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Discriminator, Tag

from kvserve.server.errors import APIError, Family, set_family
from kvserve.server.inputs import chat_prompt, check_model, encode_spans, off_loop, tokenize
from kvserve.server.schemas_openai import (DetokenizeRequest, DetokenizeResponse, OpenAIErrorResponse,
                                           TokenizeChatRequest, TokenizeCompletionRequest, TokenizeResponse)
from kvserve.server.schemas_tgi import GenerateRequest, SimpleToken, TGIErrorResponse
from kvserve.server.serving import ServerState, get_state
from kvserve.server.tools import check_tools
from kvserve.server.validation import reject_unknown, reject_unsupported


def body_model(body: Any) -> str:
    """Which body this is, by its fields: vLLM's has `prompt` or `messages`; anything else is TGI's,
    whose refusal then names `inputs`. (The names tag the union: pydantic's error locations carry them.)"""
    if isinstance(body, BaseModel):
        return type(body).__name__
    if isinstance(body, dict) and "inputs" not in body:
        if "messages" in body:
            return "TokenizeChatRequest"
        if "prompt" in body:
            return "TokenizeCompletionRequest"
    return "GenerateRequest"


def family_of_body(body: Any) -> Family:
    return "tgi" if body_model(body) == "GenerateRequest" else "openai"


TokenizeBody = Annotated[Annotated[GenerateRequest, Tag("GenerateRequest")]
                         | Annotated[TokenizeCompletionRequest, Tag("TokenizeCompletionRequest")]
                         | Annotated[TokenizeChatRequest, Tag("TokenizeChatRequest")], Discriminator(body_model)]


class TokenizeRoute(APIRoute):
    """A route that answers, refusals of its body included, in the shape of the API its body belongs to.
    The body is parsed here, before FastAPI validates it (FastAPI then reuses the parsed body)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            with contextlib.suppress(ValueError, RecursionError):   # not JSON: FastAPI refuses it (TGI's shape)
                set_family(request, family_of_body(await request.json()))
            return await handler(request)

        return route_handler


router = APIRouter(tags=["tokenizer"])
tokenize_router = APIRouter(tags=["tokenizer"], route_class=TokenizeRoute)

OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIErrorResponse, "description": "invalid request"},
    404: {"model": OpenAIErrorResponse, "description": "unknown model"},
    503: {"model": OpenAIErrorResponse, "description": "loading, shutting down or engine dead"},
}
TOKENIZE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIErrorResponse, "description": "invalid vLLM-style body"},
    404: {"model": OpenAIErrorResponse, "description": "unknown model (vLLM-style body)"},
    422: {"model": TGIErrorResponse, "description": "invalid TGI-style body"},
    503: {"description": "loading, shutting down or engine dead (in the shape of the body's API)"},
}


def check_count(count: int, max_model_len: int, param: str) -> None:
    """More tokens than the model holds: refused (the answer stays bounded), both lengths named."""
    if count > max_model_len:
        raise APIError("validation", f"{param} has {count} tokens, more than this model's max_model_len "
                       f"({max_model_len})", param=param, code="context_length_exceeded")


def check_token_ids(ids: list[int], max_model_len: int, vocab_size: int) -> None:
    if len(ids) > max_model_len:
        raise APIError("validation", f"tokens has {len(ids)} token ids, more than this model's max_model_len "
                       f"({max_model_len})", param="tokens", code="context_length_exceeded")
    bad = next((index for index, token_id in enumerate(ids) if not 0 <= token_id < vocab_size), None)
    if bad is not None:
        shown = str(ids[bad]) if abs(ids[bad]) < 10**20 else f"{str(ids[bad])[:20]}..."
        raise APIError("validation", f"tokens[{bad}]: token id {shown} is outside the vocabulary [0, {vocab_size})",
                       param="tokens")


def simple_tokens(tokenizer: Any, inputs: str, max_model_len: int, truncate: int | None) -> list[dict]:
    """Runs on a worker thread: each token's id and its characters in `inputs`, the last `truncate` tokens
    if set (the text is then not bounded before tokenizing, as on /generate)."""
    ids, spans = encode_spans(tokenizer, inputs, max_model_len if truncate is None else None, "inputs")
    if truncate is not None:
        ids, spans = ids[-truncate:], None if spans is None else spans[-truncate:]
    check_count(len(ids), max_model_len, "inputs")
    if spans is None:   # TGI's answer for a tokenizer without offsets
        return [{"id": token_id, "text": "", "start": 0, "stop": 0} for token_id in ids]
    return [{"id": token_id, "text": inputs[start:stop], "start": start, "stop": stop}
            for token_id, (start, stop) in zip(ids, spans)]


async def tgi_tokens(state: ServerState, body: GenerateRequest) -> list[dict]:
    """TGI's answer. Of the parameters only `truncate` counts; the rest are typed as on /generate (unknown
    ones refused) and ignored, as TGI ignores them."""
    reject_unknown(body.parameters, prefix="parameters.")
    reject_unsupported([("stream", body.stream, body.stream)])
    engine = state.require_engine()
    return await off_loop("tokenizing inputs", "inputs", simple_tokens, engine.tokenizer, body.inputs,
                          engine.max_model_len, body.parameters.truncate)


def check_tokenize_chat(body: TokenizeChatRequest) -> None:
    reject_unsupported([("mm_processor_kwargs", body.mm_processor_kwargs, bool(body.mm_processor_kwargs))])
    if body.continue_final_message and body.add_generation_prompt:
        raise APIError("validation", "continue_final_message and add_generation_prompt cannot both be true; set "
                       "add_generation_prompt to false to continue the last message",
                       param="continue_final_message")


async def vllm_tokens(state: ServerState, body: TokenizeCompletionRequest | TokenizeChatRequest) -> dict:
    """vLLM's answer: the ids generation would take, their count and max_model_len."""
    reject_unknown(body)
    check_model(state, body.model)
    engine = state.require_engine()
    if isinstance(body, TokenizeChatRequest):
        check_tokenize_chat(body)
        ids = await chat_prompt(state, body, body.continue_final_message, body.add_special_tokens,
                                tools=check_tools(body.tools))   # rendered as chat completions renders them
        check_count(len(ids), engine.max_model_len, "messages")
    else:
        ids = await tokenize(state, body.prompt, "prompt", add_special_tokens=body.add_special_tokens)
        check_count(len(ids), engine.max_model_len, "prompt")
    token_strs = None
    if body.return_token_strs:
        token_strs = await off_loop("naming the tokens", "return_token_strs", engine.tokenizer.convert_ids_to_tokens,
                                    ids)
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids,
                            token_strs=token_strs).model_dump()


@tokenize_router.post("/tokenize", response_model=list[SimpleToken] | TokenizeResponse, responses=TOKENIZE_ERRORS)
async def tokenize_body(body: TokenizeBody, request: Request) -> Response:
    """TGI: `{"inputs"}` → `[{id, text, start, stop}]`. vLLM: `{"prompt"}` or `{"messages"}` (through the
    chat template) → `{count, max_model_len, tokens}`. Errors take the shape of the body's API."""
    state = get_state(request)
    if isinstance(body, GenerateRequest):
        return JSONResponse(await tgi_tokens(state, body))
    return JSONResponse(await vllm_tokens(state, body))


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=OPENAI_ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
    """vLLM's detokenization: `{"tokens": [ids]}` → `{"prompt": text}`, special tokens written out."""
    state = get_state(request)
    reject_unknown(body)
    check_model(state, body.model)
    engine = state.require_engine()
    check_token_ids(body.tokens, engine.max_model_len, engine.vocab_size)
    text = await off_loop("detokenizing tokens", "tokens", decode, engine.tokenizer, body.tokens)
    return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

"""TGI's routes: POST /generate, /generate_stream and the compatibility route POST /.

generated_text is always the exact concatenation of the token texts. A stop sequence ends
generation after the token that completes it; that token (and so the stop sequence) is included.
"""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kvserve.outputs import RequestOutput, TokenInfo
from kvserve.scheduler.sampling_params import SamplingParams
from kvserve.server.errors import APIError, from_engine_error
from kvserve.server.schemas_tgi import (DEFAULT_MAX_NEW_TOKENS, Details, TGIErrorResponse, GenerateParameters,
                                GenerateRequest, GenerateResponse, PrefillToken, StreamDetails, StreamResponse,
                                Token)
from kvserve.server.serving import EngineRequest, ServerState, StateDep, output_error
from kvserve.server.sse import KEEPALIVE, sse_event, sse_response
from kvserve.server.validation import finite, random_seed, reject_unknown, reject_unsupported, resolve_max_tokens

router = APIRouter(tags=["TGI"])

TGI_FINISH = {"eos": "eos_token", "stop_token": "eos_token", "stop": "stop_sequence", "length": "length"}
ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": TGIErrorResponse, "description": "validation error"},
    429: {"model": TGIErrorResponse, "description": "too many requests waiting"},
    503: {"model": TGIErrorResponse, "description": "loading, shutting down or engine dead"},
}
SSE_DOC: dict[str, Any] = {"content": {"text/event-stream": {"schema": StreamResponse.model_json_schema()}}}


class Submission:
    """A validated TGI request bound to an engine request."""

    def __init__(self, body: GenerateRequest, prompt_ids: list[int], params: SamplingParams, seed: int | None,
                 engine_request: EngineRequest):
        self.body = body
        self.prompt_ids = prompt_ids
        self.params = params
        self.seed = seed
        self.engine_request = engine_request


def check_parameters(p: GenerateParameters, stream: bool) -> None:
    reject_unknown(p, prefix="parameters.")
    reject_unsupported([
        ("parameters.typical_p", p.typical_p, p.typical_p not in (None, 1.0)),
        ("parameters.top_n_tokens", p.top_n_tokens, p.top_n_tokens not in (None, 0)),
        ("parameters.best_of", p.best_of, p.best_of not in (None, 1)),
        ("parameters.watermark", p.watermark, p.watermark),
        ("parameters.grammar", p.grammar, p.grammar is not None),
        ("parameters.adapter_id", p.adapter_id, p.adapter_id is not None),
    ])
    if stream and p.decoder_input_details:
        raise APIError("validation", "parameters.decoder_input_details is not supported when streaming",
                       param="parameters.decoder_input_details")


def sampling_params(p: GenerateParameters, max_tokens: int) -> tuple[SamplingParams, int | None]:
    """TGI semantics: greedy unless do_sample or a sampling knob is set; a seed is drawn if missing."""
    sample = p.do_sample or p.temperature not in (None, 1.0) or p.top_k is not None or p.top_p not in (None, 1.0)
    seed = (p.seed if p.seed is not None else random_seed()) if sample else None
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=(p.temperature or 1.0) if sample else 0.0, top_k=p.top_k or 0,
            top_p=p.top_p or 1.0, repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty or 0.0, seed=seed, stop=list(p.stop),
            include_stop_str_in_output=True, ignore_eos=p.ignore_eos)
    except ValueError as exc:
        raise APIError("validation", str(exc), param="parameters") from exc
    return params, seed


async def submit(state: ServerState, body: GenerateRequest, stream: bool) -> Submission:
    """Validate the body, tokenize, admit into the engine (raising APIError before any response)."""
    p = body.parameters
    check_parameters(p, stream)
    engine = state.require_engine()
    prompt_ids = engine.encode(body.inputs)
    if p.truncate is not None:
        prompt_ids = prompt_ids[-p.truncate:]
    if not prompt_ids:
        raise APIError("validation", "inputs must not be empty", param="inputs")
    max_tokens = resolve_max_tokens(len(prompt_ids), engine.max_model_len, p.max_new_tokens,
                                    DEFAULT_MAX_NEW_TOKENS, "parameters.max_new_tokens", "inputs")
    params, seed = sampling_params(p, max_tokens)
    engine_request = EngineRequest(state, prompt_ids, params, uuid.uuid4().hex)
    await engine_request.start()
    return Submission(body, prompt_ids, params, seed, engine_request)


def token(t: TokenInfo) -> Token:
    return Token(id=t.id, text=t.text, logprob=finite(t.logprob), special=t.special)


def prefill(state: ServerState, prompt_ids: list[int]) -> list[PrefillToken]:
    """Prompt tokens with their texts; logprobs are null (prompt log-probabilities are not computed)."""
    texts = state.engine.tokenizer.batch_decode([[i] for i in prompt_ids])
    return [PrefillToken(id=i, text=s, logprob=None) for i, s in zip(prompt_ids, texts)]


def finish_reason(out: RequestOutput) -> str:
    return TGI_FINISH.get(out.finish_reason or "length", "length")


def full_text(sub: Submission, generated: str) -> str:
    return sub.body.inputs + generated if sub.body.parameters.return_full_text else generated


async def generate_once(state: ServerState, sub: Submission, request: Request) -> GenerateResponse | None:
    """Run to completion; None when the client went away (the request was aborted)."""
    result = await sub.engine_request.collect(request)
    if result is None:
        return None
    out, tokens = result
    error = output_error(out, state.draining)
    if error is not None:
        raise error
    text = full_text(sub, "".join(t.text for t in tokens))
    if not sub.body.parameters.details:
        return GenerateResponse(generated_text=text)
    details = Details(finish_reason=finish_reason(out), generated_tokens=len(tokens), seed=sub.seed,
                      tokens=[token(t) for t in tokens],
                      prefill=prefill(state, sub.prompt_ids) if sub.body.parameters.decoder_input_details else [])
    return GenerateResponse(generated_text=text, details=details)


def stream_event(sub: Submission, index: int, t: TokenInfo, out: RequestOutput | None, texts: list[str]) -> bytes:
    """One token event; `out` is the finished output when this is the last token."""
    event = StreamResponse(index=index, token=token(t))
    if out is not None:
        event.generated_text = full_text(sub, "".join(texts))
        event.details = StreamDetails(finish_reason=finish_reason(out), generated_tokens=len(texts),
                                      seed=sub.seed, input_length=len(sub.prompt_ids))
    return sse_event(event.model_dump())


async def stream_events(state: ServerState, sub: Submission) -> AsyncIterator[bytes]:
    """TGI's SSE: one event per token, the last one with generated_text and details; errors last."""
    texts: list[str] = []
    try:
        async for out in sub.engine_request.outputs():
            if out is None:
                yield KEEPALIVE
                continue
            error = output_error(out, state.draining) if out.finished else None
            if error is not None:
                yield sse_event(error.body("tgi"))
                return
            for i, t in enumerate(out.new_tokens):
                texts.append(t.text)
                last = out.finished and i == len(out.new_tokens) - 1
                yield stream_event(sub, len(texts), t, out if last else None, texts)
            if out.finished and not out.new_tokens:
                yield sse_event(APIError("generation", "the engine finished without a final token").body("tgi"))
    except APIError as error:
        yield sse_event(error.body("tgi"))
    except Exception as exc:  # an error after the headers went out: report it as the last event
        yield sse_event(from_engine_error(exc).body("tgi"))
    finally:
        sub.engine_request.close()


def streaming_response(state: ServerState, sub: Submission) -> Response:
    return sse_response(stream_events(state, sub), on_close=sub.engine_request.close)


async def respond(state: ServerState, body: GenerateRequest, request: Request, stream: bool,
                  as_list: bool = False) -> Response:
    sub = await submit(state, body, stream)
    if stream:
        return streaming_response(state, sub)
    response = await generate_once(state, sub, request)
    if response is None:
        return Response(status_code=499)
    payload = response.model_dump(exclude_none=response.details is None)
    return JSONResponse([payload] if as_list else payload)


@router.post("/generate", response_model=GenerateResponse, responses={**ERRORS, 200: SSE_DOC})
async def generate(body: GenerateRequest, request: Request, state: StateDep) -> Response:
    """Generate text; with "stream": true the answer is the SSE stream of /generate_stream."""
    return await respond(state, body, request, stream=body.stream)


@router.post("/generate_stream", response_model=StreamResponse, responses={**ERRORS, 200: SSE_DOC})
async def generate_stream(body: GenerateRequest, request: Request, state: StateDep) -> Response:
    """Stream tokens as server-sent events; the last event carries generated_text and details."""
    return await respond(state, body, request, stream=True)


@router.post("/", response_model=list[GenerateResponse], responses={**ERRORS, 200: SSE_DOC})
async def compat_generate(body: GenerateRequest, request: Request, state: StateDep) -> Response:
    """TGI's compatibility route: a one-element JSON array, or the SSE stream with "stream": true."""
    return await respond(state, body, request, stream=body.stream, as_list=True)

"""TGI's routes: POST /generate, /generate_stream and the compatibility route POST /.

generated_text is always the exact concatenation of the token texts. A stop sequence ends
generation after the token that completes it; that token (and so the stop sequence) is included.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kvserve import RequestOutput, SamplingParams, TokenInfo
from kvserve.server.errors import APIError
from kvserve.server.schemas_tgi import (DEFAULT_MAX_NEW_TOKENS, Details, TGIErrorResponse, GenerateParameters,
                                        GenerateRequest, GenerateResponse, PrefillToken, StreamDetails,
                                        StreamResponse, Token)
from kvserve.server.serving import EngineRequest, EventBuilder, ServerState, StateDep, admit, stream_response
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


def check_parameters(parameters: GenerateParameters, stream: bool) -> None:
    reject_unknown(parameters, prefix="parameters.")
    reject_unsupported([
        ("parameters.typical_p", parameters.typical_p, parameters.typical_p not in (None, 1.0)),
        ("parameters.top_n_tokens", parameters.top_n_tokens, parameters.top_n_tokens not in (None, 0)),
        ("parameters.best_of", parameters.best_of, parameters.best_of not in (None, 1)),
        ("parameters.watermark", parameters.watermark, parameters.watermark),
        ("parameters.grammar", parameters.grammar, parameters.grammar is not None),
        ("parameters.adapter_id", parameters.adapter_id, parameters.adapter_id is not None),
    ])
    if stream and parameters.decoder_input_details:
        raise APIError("validation", "parameters.decoder_input_details is not supported when streaming",
                       param="parameters.decoder_input_details")


def sampling_params(parameters: GenerateParameters, max_tokens: int) -> tuple[SamplingParams, int | None]:
    """TGI semantics: greedy unless do_sample or a sampling knob is set; a seed is drawn if missing."""
    sample = (parameters.do_sample or parameters.temperature not in (None, 1.0) or parameters.top_k is not None
              or parameters.top_p not in (None, 1.0))
    seed = (parameters.seed if parameters.seed is not None else random_seed()) if sample else None
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=(parameters.temperature or 1.0) if sample else 0.0,
            top_k=parameters.top_k or 0, top_p=parameters.top_p or 1.0,
            repetition_penalty=parameters.repetition_penalty or 1.0,
            frequency_penalty=parameters.frequency_penalty or 0.0, seed=seed, stop=list(parameters.stop),
            include_stop_str_in_output=True, ignore_eos=parameters.ignore_eos)
    except ValueError as exc:
        raise APIError("validation", str(exc), param="parameters") from exc
    return params, seed


async def submit(state: ServerState, body: GenerateRequest, stream: bool) -> Submission:
    """Validate the body, tokenize, admit into the engine (raising APIError before any response)."""
    parameters = body.parameters
    check_parameters(parameters, stream)
    engine = state.require_engine()
    prompt_ids = engine.encode(body.inputs)
    if parameters.truncate is not None:
        prompt_ids = prompt_ids[-parameters.truncate:]
    if not prompt_ids:
        raise APIError("validation", "inputs must not be empty", param="inputs")
    max_tokens = resolve_max_tokens(len(prompt_ids), engine.max_model_len, parameters.max_new_tokens,
                                    DEFAULT_MAX_NEW_TOKENS, "parameters.max_new_tokens", "inputs")
    params, seed = sampling_params(parameters, max_tokens)
    engine_request = await admit(state, prompt_ids, params, uuid.uuid4().hex)
    return Submission(body, prompt_ids, params, seed, engine_request)


def token(token_info: TokenInfo) -> Token:
    return Token(id=token_info.id, text=token_info.text, logprob=finite(token_info.logprob),
                 special=token_info.special)


def prefill(state: ServerState, prompt_ids: list[int]) -> list[PrefillToken]:
    """Prompt tokens with their texts; logprobs are null (prompt log-probabilities are not computed)."""
    texts = state.engine.tokenizer.batch_decode([[token_id] for token_id in prompt_ids])
    return [PrefillToken(id=token_id, text=text, logprob=None) for token_id, text in zip(prompt_ids, texts)]


def finish_reason(out: RequestOutput) -> str:
    return TGI_FINISH.get(out.finish_reason or "length", "length")


def full_text(submission: Submission, generated: str) -> str:
    return submission.body.inputs + generated if submission.body.parameters.return_full_text else generated


async def generate_once(state: ServerState, submission: Submission, request: Request) -> GenerateResponse | None:
    """Run to completion; None when the client went away (the request was aborted)."""
    result = await submission.engine_request.collect(request)
    if result is None:
        return None
    out, tokens = result
    text = full_text(submission, "".join(token_info.text for token_info in tokens))
    parameters = submission.body.parameters
    if not parameters.details:
        return GenerateResponse(generated_text=text)
    prefill_tokens = prefill(state, submission.prompt_ids) if parameters.decoder_input_details else []
    details = Details(finish_reason=finish_reason(out), generated_tokens=len(tokens), seed=submission.seed,
                      tokens=[token(token_info) for token_info in tokens], prefill=prefill_tokens)
    return GenerateResponse(generated_text=text, details=details)


def token_events(submission: Submission) -> EventBuilder:
    """TGI's stream: one event per token; the last one carries generated_text and details."""
    texts: list[str] = []

    def events(out: RequestOutput) -> Iterator[dict]:
        if out.finished and not out.new_tokens:
            raise APIError("generation", "the engine finished without a final token")
        for position, token_info in enumerate(out.new_tokens, start=1):
            texts.append(token_info.text)
            event = StreamResponse(index=len(texts), token=token(token_info))
            if out.finished and position == len(out.new_tokens):
                event.generated_text = full_text(submission, "".join(texts))
                event.details = StreamDetails(finish_reason=finish_reason(out), generated_tokens=len(texts),
                                              seed=submission.seed, input_length=len(submission.prompt_ids))
            yield event.model_dump()

    return events


async def respond(state: ServerState, body: GenerateRequest, request: Request, stream: bool,
                  as_list: bool = False) -> Response:
    submission = await submit(state, body, stream)
    if stream:
        return stream_response(state, submission.engine_request, "tgi", token_events(submission))
    response = await generate_once(state, submission, request)
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

"""TGI's routes: POST /generate, /generate_stream and the compatibility route POST /.

generated_text is always the exact concatenation of the token texts. A stop sequence ends
generation after the token that completes it; that token (and so the stop sequence) is included.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kvserve import RequestOutput, SamplingParams, TokenInfo
from kvserve.server.errors import APIError
from kvserve.server.inputs import prepare_tgi
from kvserve.server.schemas_tgi import (BestOfSequence, Details, TGIErrorResponse, GenerateRequest, GenerateResponse,
                                        PrefillToken, StreamDetails, StreamResponse, Token)
from kvserve.server.serving import EventBuilder, RequestGroup, ServerState, admit_group, get_state, stream_response
from kvserve.server.validation import finite, random_seed

router = APIRouter(tags=["TGI"])

TGI_FINISH = {"eos": "eos_token", "stop_token": "eos_token", "stop": "stop_sequence", "length": "length",
              "grammar": "eos_token"}
ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": TGIErrorResponse, "description": "validation error"},
    429: {"model": TGIErrorResponse, "description": "too many requests waiting"},
    503: {"model": TGIErrorResponse, "description": "loading, shutting down or engine dead"},
}
SSE_DOC: dict[str, Any] = {"content": {"text/event-stream": {"schema": StreamResponse.model_json_schema()}}}


class Submission:
    """A validated TGI request bound to its engine requests (best_of of them, the first's prompt
    blocks shared by the others)."""

    def __init__(self, body: GenerateRequest, prompt_ids: list[int], params: SamplingParams, seeds: list[int | None],
                 engine_request: RequestGroup):
        self.body = body
        self.prompt_ids = prompt_ids
        self.params = params
        self.seeds = seeds              # per sequence: what details.seed reports
        self.seed = seeds[0]
        self.engine_request = engine_request


async def submit(state: ServerState, body: GenerateRequest, stream: bool) -> Submission:
    """Validate the body, tokenize, admit into the engine (raising APIError before any response)."""
    prepared = await prepare_tgi(state, body, stream)
    seeds = [prepared.seed] + [random_seed() for _ in range((body.parameters.best_of or 1) - 1)]
    members = [(prepared.prompt_ids, replace(prepared.params, seed=seed) if i else prepared.params,
                None if i == 0 else 0) for i, seed in enumerate(seeds)]
    group = await admit_group(state, uuid.uuid4().hex, members)
    return Submission(body, prepared.prompt_ids, prepared.params, seeds, group)


def token(token_info: TokenInfo) -> Token:
    return Token(id=token_info.id, text=token_info.text, logprob=finite(token_info.logprob),
                 special=token_info.special)


def top_tokens(state: ServerState, token_info: TokenInfo, special: frozenset[int]) -> list[Token]:
    """The most likely tokens at this token's position (parameters.top_n_tokens), most likely first;
    each token's text is its own (U+FFFD where it holds part of a character)."""
    token_bytes = state.require_engine().token_bytes
    return [Token(id=t, text=token_bytes(t).decode("utf-8", errors="replace"), logprob=finite(lp),
                  special=t in special) for t, lp in token_info.top or ()]


def top_tokens_of(state: ServerState, tokens: list[TokenInfo]) -> list[list[Token]]:
    special = special_ids(state)
    return [top_tokens(state, token_info, special) for token_info in tokens]


def special_ids(state: ServerState) -> frozenset[int]:
    return frozenset(state.require_engine().tokenizer.all_special_ids)


def prefill(state: ServerState, prompt_ids: list[int], logprobs: list | None) -> list[PrefillToken]:
    """Prompt tokens with their texts and logprobs (null for the first: nothing precedes it)."""
    texts = state.engine.tokenizer.batch_decode([[token_id] for token_id in prompt_ids])
    logprobs = logprobs or [None] * len(prompt_ids)
    return [PrefillToken(id=token_id, text=text, logprob=None if value is None else finite(value[0]))
            for token_id, text, value in zip(prompt_ids, texts, logprobs)]


def finish_reason(out: RequestOutput) -> str:
    return TGI_FINISH.get(out.finish_reason or "length", "length")


def full_text(submission: Submission, generated: str) -> str:
    return submission.body.inputs + generated if submission.body.parameters.return_full_text else generated


async def generate_once(state: ServerState, submission: Submission, request: Request) -> GenerateResponse | None:
    """Run to completion; None when the client went away (the request was aborted). With best_of, the
    sequence with the highest total logprob answers; the others go to details.best_of_sequences."""
    results = await submission.engine_request.collect(request)
    if results is None:
        return None
    ranked = sorted(zip(results, submission.seeds), key=lambda r: -sum(t.logprob for t in r[0][1]))
    parameters = submission.body.parameters

    def sequence(out: RequestOutput, tokens: list[TokenInfo], seed: int | None) -> dict:
        prompt_logprobs = out.prompt_logprobs or results[0][0].prompt_logprobs
        return dict(generated_text=full_text(submission, "".join(token_info.text for token_info in tokens)),
                    finish_reason=finish_reason(out), generated_tokens=len(tokens), seed=seed,
                    tokens=[token(token_info) for token_info in tokens],
                    prefill=prefill(state, submission.prompt_ids, prompt_logprobs)
                    if parameters.decoder_input_details else [],
                    top_tokens=top_tokens_of(state, tokens) if parameters.top_n_tokens else [])

    (out, tokens), seed = ranked[0]
    best = sequence(out, tokens, seed)
    if not parameters.details:
        return GenerateResponse(generated_text=best["generated_text"])
    others = [BestOfSequence(**sequence(o, t, s)) for (o, t), s in ranked[1:]] if len(ranked) > 1 else None
    text = best.pop("generated_text")
    return GenerateResponse(generated_text=text, details=Details(**best, best_of_sequences=others))


def token_events(state: ServerState, submission: Submission) -> EventBuilder:
    """TGI's stream: one event per token; the last one carries generated_text and details."""
    texts: list[str] = []
    special = special_ids(state) if submission.body.parameters.top_n_tokens else None

    def events(out: RequestOutput) -> Iterator[dict]:
        if out.finished and not out.new_tokens:
            raise APIError("generation", "the engine finished without a final token")
        for position, token_info in enumerate(out.new_tokens, start=1):
            texts.append(token_info.text)
            event = StreamResponse(index=len(texts), token=token(token_info),
                                   top_tokens=top_tokens(state, token_info, special) if special is not None else None)
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
        return stream_response(state, submission.engine_request, "tgi", token_events(state, submission))
    response = await generate_once(state, submission, request)
    if response is None:
        return Response(status_code=499)
    payload = response.model_dump(exclude_none=response.details is None)
    return JSONResponse([payload] if as_list else payload)


@router.post("/generate", response_model=GenerateResponse, responses={**ERRORS, 200: SSE_DOC})
async def generate(body: GenerateRequest, request: Request) -> Response:
    """Generate text; with "stream": true the answer is the SSE stream of /generate_stream."""
    state = get_state(request)
    return await respond(state, body, request, stream=body.stream)


@router.post("/generate_stream", response_model=StreamResponse, responses={**ERRORS, 200: SSE_DOC})
async def generate_stream(body: GenerateRequest, request: Request) -> Response:
    """Stream tokens as server-sent events; the last event carries generated_text and details."""
    state = get_state(request)
    return await respond(state, body, request, stream=True)


@router.post("/", response_model=list[GenerateResponse], responses={**ERRORS, 200: SSE_DOC})
async def compat_generate(body: GenerateRequest, request: Request) -> Response:
    """TGI's compatibility route: a one-element JSON array, or the SSE stream with "stream": true."""
    state = get_state(request)
    return await respond(state, body, request, stream=body.stream, as_list=True)

"""OpenAI-compatible routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models."""
from __future__ import annotations

import codecs
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from kvserve import RequestOutput, TokenInfo
from kvserve.server.inputs import check_model, choices_per_prompt, member_params, prepare_chat, prepare_completion
from kvserve.server.schemas_openai import (ChatChoice, ChatChoiceLogprobs, ChatChunkChoice, ChatCompletionChunk,
                                           ChatCompletionRequest, ChatCompletionResponse, ChatDelta, ChatLogprob,
                                           ChatResponseMessage, CompletionChoice, CompletionLogprobs,
                                           CompletionRequest, CompletionResponse, FunctionCall, FunctionCallDelta,
                                           OpenAIErrorResponse, ModelCard, ModelList, PromptTokensDetails,
                                           SamplingFields, ToolCallDelta, ToolCallOut, TopLogprob, Usage)
from kvserve.server.tool_parsers import ContentDelta
from kvserve.server.tools import ToolPlan, call_id
from kvserve.server.sse import SSETemplate
from kvserve.server.serving import (EventBuilder, RequestGroup, ServerState, admit_group, get_state,
                                    stream_response)
from kvserve.server.validation import finite

router = APIRouter(prefix="/v1", tags=["OpenAI"])

OPENAI_FINISH = {"eos": "stop", "stop_token": "stop", "stop": "stop", "length": "length", "grammar": "stop"}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIErrorResponse, "description": "invalid request"},
    404: {"model": OpenAIErrorResponse, "description": "unknown model"},
    429: {"model": OpenAIErrorResponse, "description": "too many requests waiting"},
    503: {"model": OpenAIErrorResponse, "description": "loading, shutting down or engine dead"},
    "4XX": {"model": OpenAIErrorResponse, "description": "every client error has this shape"},
}


def finish_reason(out: RequestOutput) -> str | None:
    return OPENAI_FINISH.get(out.finish_reason or "length", "length") if out.finished else None


def token_text(token_bytes: Callable[[int], bytes], token_id: int) -> tuple[str, bytes]:
    """A token's own text and exact bytes (its text has U+FFFD where it holds part of a character)."""
    raw = token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), raw


def completion_logprobs(tokens: list[TokenInfo], offset: int, token_bytes: Callable[[int], bytes],
                        top: int) -> CompletionLogprobs:
    """One entry per token: its text, logprob and offset in the output text; with logprobs=N > 0 the
    N most likely tokens at its position (top_dict)."""
    result = CompletionLogprobs(top_logprobs=[] if top else None)
    for token_info in tokens:
        result.tokens.append(token_text(token_bytes, token_info.id)[0])
        result.token_logprobs.append(finite(token_info.logprob))
        result.text_offset.append(offset)
        offset += len(token_info.text)
        if top:
            result.top_logprobs.append(top_dict(token_info.top, token_bytes))
    return result


def top_dict(pairs: list[tuple[int, float]] | None, token_bytes: Callable[[int], bytes]) -> dict[str, float | None]:
    """Completions' {token text: logprob} of the most likely tokens, most likely first; two tokens
    with the same text share one key, which keeps the likelier one's logprob."""
    entries: dict[str, float | None] = {}
    for token_id, logprob in pairs or ():
        entries.setdefault(token_text(token_bytes, token_id)[0], finite(logprob))
    return entries


def prompt_logprobs(prompt_ids: list[int], values: list | None, token_bytes: Callable[[int], bytes],
                    top: int) -> CompletionLogprobs:
    """The echoed prompt's part of a completion's logprobs: each prompt token's text, logprob (null for
    the first), offset in the echoed text and, with logprobs=N > 0, its N most likely tokens."""
    result = CompletionLogprobs(top_logprobs=[] if top else None)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offset = 0
    for token_id, value in zip(prompt_ids, values or [None] * len(prompt_ids)):
        text, raw = token_text(token_bytes, token_id)
        result.tokens.append(text)
        result.text_offset.append(offset)
        offset += len(decoder.decode(raw))
        result.token_logprobs.append(None if value is None else finite(value[0]))
        if top:
            result.top_logprobs.append(top_dict(value[1], token_bytes) if value else None)
    return result


def join_logprobs(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=first.tokens + second.tokens,
                              token_logprobs=first.token_logprobs + second.token_logprobs,
                              top_logprobs=None if first.top_logprobs is None else
                              first.top_logprobs + (second.top_logprobs or []),
                              text_offset=first.text_offset + second.text_offset)


def chat_logprobs(tokens: list[TokenInfo], token_bytes: Callable[[int], bytes]) -> ChatChoiceLogprobs:
    """One entry per generated token, with its top_logprobs when asked for."""
    def entry(token_id: int, logprob: float) -> dict:
        text, raw = token_text(token_bytes, token_id)
        return {"token": text, "logprob": finite(logprob), "bytes": list(raw)}

    return ChatChoiceLogprobs(content=[
        ChatLogprob(**entry(t.id, t.logprob), top_logprobs=[TopLogprob(**entry(i, lp)) for i, lp in t.top or ()])
        for t in tokens])


def stream(state: ServerState, group: RequestGroup, header: dict,
           chunk_type: type[CompletionResponse | ChatCompletionChunk], chunkers: list[EventBuilder],
           with_usage: bool, opening: list[dict], prompt_tokens: int, per_prompt: int) -> Response:
    """OpenAI's stream: `opening`, each output's chunks (chunkers[i] builds choice i's, and the choice
    index is set here), a usage chunk once every choice has finished if asked for (group_usage's
    counts), then [DONE]."""
    completion_tokens: dict[int, int] = {}
    cached: dict[int, int] = {}

    def events(out: RequestOutput) -> list[dict | bytes]:
        index = group.index_of[out.request_id]
        result = chunkers[index](out)
        for data in result:
            if not isinstance(data, bytes):   # (a templated chunk carries its index already)
                for choice in data["choices"]:
                    choice["index"] = index
        if out.finished:
            completion_tokens[index], cached[index] = out.num_output_tokens, out.num_cached_tokens
            if with_usage and len(completion_tokens) == len(chunkers):
                done = sum(completion_tokens.values())
                result.append(chunk_type(**header, choices=[], usage=Usage(
                    prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done,
                    prompt_tokens_details=PromptTokensDetails(
                        cached_tokens=sum(cached[i] for i in range(0, len(chunkers), per_prompt))))).model_dump())
        return result

    return stream_response(state, group, "openai", events, opening)


def include_usage(body: SamplingFields) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def dump_chunk(chunk: CompletionResponse | ChatCompletionChunk, with_usage: bool) -> dict:
    """A chunk dict: `usage` only when include_usage, chat deltas without null fields."""
    data = chunk.model_dump(exclude={"usage"} if not with_usage else None)
    for choice, model in zip(data["choices"], chunk.choices):
        if isinstance(model, ChatChunkChoice):
            choice["delta"] = model.delta.model_dump(exclude_none=True)
    return data


def text_template(chunk: dict, index: int, *path: str) -> SSETemplate:
    """The SSE event of `chunk` as choice `index`, its text (at `path` in the choice) left open."""
    def put_hole(data: dict, hole: str) -> None:
        choice = data["choices"][0]
        choice["index"] = index
        for key in path[:-1]:
            choice = choice[key]
        choice[path[-1]] = hole
    return SSETemplate(chunk, put_hole)


def model_card(state: ServerState) -> ModelCard:
    engine = state.require_engine()
    return ModelCard(id=state.served_model_name, created=int(state.info.get("started", time.time())),
                     root=str(engine.model_id), max_model_len=engine.max_model_len)


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """The one served model."""
    return ModelList(data=[model_card(get_state(request))])


@router.get("/models/{model:path}", response_model=ModelCard, responses=ERRORS)
async def retrieve_model(model: str, request: Request) -> ModelCard:
    """The served model's entry of GET /v1/models, by any name the `model` field accepts; else 404."""
    state = get_state(request)
    card = model_card(state)
    check_model(state, model)
    return card


@router.post("/completions", response_model=CompletionResponse, responses=ERRORS)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    """OpenAI text completion; `stream: true` answers `data:` chunks ending in `data: [DONE]`. Choice
    i * n + j is prompt i's output j."""
    state = get_state(request)
    prepared = await prepare_completion(state, body)
    engine = state.require_engine()
    n, per_prompt = choices_per_prompt(body)
    members = [(p.prompt_ids, member_params(p.params, j), None if j == 0 else i * per_prompt)
               for i, p in enumerate(prepared) for j in range(per_prompt)]
    group = await admit_group(state, f"cmpl-{uuid.uuid4().hex}", members)
    echoes = [engine.tokenizer.decode(p.prompt_ids) if body.echo else "" for p in prepared]
    header = {"id": group.request_id, "created": int(time.time()), "model": state.served_model_name}
    with_logprobs = body.logprobs is not None
    prompt_tokens = sum(len(p.prompt_ids) for p in prepared)
    if body.stream:    # best_of == n here
        chunkers, opening = [], []
        for i, p in enumerate(prepared):
            for j in range(n):
                chunker, first = completion_chunker(engine.token_bytes, header, echoes[i], with_logprobs,
                                                    include_usage(body), body.logprobs or 0,
                                                    p.prompt_ids if body.echo else None, i * n + j)
                chunkers.append(chunker)
                for data in first:
                    data["choices"][0]["index"] = i * n + j
                    opening.append(data)
        return stream(state, group, header, CompletionResponse, chunkers, include_usage(body), opening,
                      prompt_tokens, per_prompt)
    results = await group.collect(request)
    if results is None:
        return Response(status_code=499)
    choices = []
    for i, p in enumerate(prepared):
        mine = results[i * per_prompt:(i + 1) * per_prompt]
        first = mine[0][0]
        if per_prompt > n:     # best_of: the n with the highest total logprob
            mine = sorted(mine, key=lambda r: -sum(t.logprob for t in r[1]))[:n]
        for j, (out, tokens) in enumerate(mine):
            logprobs = None
            if with_logprobs:
                logprobs = completion_logprobs(tokens, len(echoes[i]), engine.token_bytes, body.logprobs or 0)
                if body.echo:
                    logprobs = join_logprobs(prompt_logprobs(p.prompt_ids, first.prompt_logprobs, engine.token_bytes,
                                                             body.logprobs or 0), logprobs)
            choices.append(CompletionChoice(index=i * n + j, text=echoes[i] + out.text,
                                            finish_reason=finish_reason(out), logprobs=logprobs))
    response = CompletionResponse(**header, choices=choices, usage=group_usage(prompt_tokens, results, per_prompt))
    return JSONResponse(response.model_dump())


def group_usage(prompt_tokens: int, results: list[tuple[RequestOutput, list[TokenInfo]]], per_prompt: int) -> Usage:
    """Every generated token counts (best_of's dropped outputs too); each prompt once."""
    done = sum(out.num_output_tokens for out, _ in results)
    cached = sum(results[i][0].num_cached_tokens for i in range(0, len(results), per_prompt))
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=done, total_tokens=prompt_tokens + done,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def completion_chunker(token_bytes: Callable[[int], bytes], header: dict, echo: str, with_logprobs: bool,
                       with_usage: bool, top: int = 0, prompt_ids: list[int] | None = None,
                       index: int = 0) -> tuple[EventBuilder, list[dict]]:
    """Choice `index`'s chunk builder, and the chunks that open its stream. With echo, the prompt's text
    opens it; with echo and logprobs it comes with the first token's chunk instead, which carries the
    prompt's logprobs (they are known once it is prefilled)."""
    text_offset = len(echo)
    echo_pending = prompt_ids is not None and with_logprobs

    # the common chunk (text only) is the pydantic model's own dump, encoded once with its text left
    # open (this runs once per token per stream)
    plain = text_template(dump_chunk(CompletionResponse(**header, choices=[CompletionChoice(text="")]), with_usage),
                          index, "text")

    def chunks(out: RequestOutput) -> list[dict | bytes]:
        nonlocal text_offset, echo_pending
        if echo_pending:
            echo_pending = False
            logprobs = join_logprobs(prompt_logprobs(prompt_ids, out.prompt_logprobs, token_bytes, top),
                                     completion_logprobs(out.new_tokens, text_offset, token_bytes, top))
            text_offset += sum(len(token_info.text) for token_info in out.new_tokens)
            choice = CompletionChoice(text=echo + out.new_text, logprobs=logprobs, finish_reason=finish_reason(out))
            return [dump_chunk(CompletionResponse(**header, choices=[choice]), with_usage)]
        if not (out.new_text or out.finished or (with_logprobs and out.new_tokens)):
            return []
        if not out.finished and not with_logprobs:
            text_offset += sum(len(token_info.text) for token_info in out.new_tokens)
            return [plain.fill(out.new_text)]
        logprobs = completion_logprobs(out.new_tokens, text_offset, token_bytes, top) if with_logprobs else None
        text_offset += sum(len(token_info.text) for token_info in out.new_tokens)
        choice = CompletionChoice(text=out.new_text, logprobs=logprobs, finish_reason=finish_reason(out))
        return [dump_chunk(CompletionResponse(**header, choices=[choice]), with_usage)]

    echo_chunk = CompletionResponse(**header, choices=[CompletionChoice(text=echo)])
    return chunks, ([dump_chunk(echo_chunk, with_usage)] if echo and not echo_pending else [])


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    """OpenAI chat completion via the model's chat template; 400 if the model has none."""
    state = get_state(request)
    prepared = await prepare_chat(state, body)
    prompt_ids = prepared.prompt_ids
    n = body.n or 1
    group = await admit_group(state, f"chatcmpl-{uuid.uuid4().hex}",
                              [(prompt_ids, member_params(prepared.params, j), None if j == 0 else 0)
                               for j in range(n)])
    header = {"id": group.request_id, "created": int(time.time()), "model": state.served_model_name}
    tools = prepared.tools
    if body.stream:
        return stream_chat(state, group, header, body.logprobs, include_usage(body), tools, len(prompt_ids))
    results = await group.collect(request)
    if results is None:
        return Response(status_code=499)
    choices = []
    for index, (out, tokens) in enumerate(results):
        content, calls = tools.parse(out.text)
        message = ChatResponseMessage(content=content, tool_calls=[
            ToolCallOut(id=call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls])
        logprobs = chat_logprobs(tokens, state.require_engine().token_bytes) if body.logprobs else None
        choices.append(ChatChoice(index=index, message=message, finish_reason=chat_finish_reason(out, bool(calls)),
                                  logprobs=logprobs))
    response = ChatCompletionResponse(**header, choices=choices, usage=group_usage(len(prompt_ids), results, n))
    return JSONResponse(response.model_dump())


def chat_finish_reason(out: RequestOutput, has_calls: bool) -> str | None:
    """tool_calls when the reply holds calls (unless max_tokens cut it), else the usual reason."""
    reason = finish_reason(out)
    return "tool_calls" if has_calls and reason == "stop" else reason


def stream_chat(state: ServerState, group: RequestGroup, header: dict, with_logprobs: bool, with_usage: bool,
                tools: ToolPlan, prompt_tokens: int) -> Response:
    def chunk(choice: ChatChunkChoice) -> dict:
        return dump_chunk(ChatCompletionChunk(**header, choices=[choice]), with_usage)

    opening = [chunk(ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")))
               for i in range(len(group.members))]
    chunkers = [chat_chunker(state, header, with_logprobs, with_usage, tools, i) for i in range(len(group.members))]
    return stream(state, group, header, ChatCompletionChunk, chunkers, with_usage, opening, prompt_tokens,
                  len(chunkers))


def chat_chunker(state: ServerState, header: dict, with_logprobs: bool, with_usage: bool,
                 tools: ToolPlan, index: int = 0) -> EventBuilder:
    """Choice `index`'s chunk builder: content deltas and tool-call deltas (its own reply parser)."""
    token_bytes = state.require_engine().token_bytes
    reply = tools.stream()

    def chunk(choice: ChatChunkChoice) -> dict:
        return dump_chunk(ChatCompletionChunk(**header, choices=[choice]), with_usage)

    # the common chunk (a content delta alone) encoded once with its text left open
    content = text_template(chunk(ChatChunkChoice(delta=ChatDelta(content=""))), index, "delta", "content")

    def deltas(events: list) -> list[ChatDelta]:
        """Reply events as deltas: content runs, and each call fragment (id, type and name on its first)."""
        result = []
        for event in events:
            if isinstance(event, ContentDelta):
                result.append(ChatDelta(content=event.text))
                continue
            first = event.name is not None
            result.append(ChatDelta(tool_calls=[ToolCallDelta(
                index=event.index, id=reply.ids[event.index] if first else None, type="function" if first else None,
                function=FunctionCallDelta(name=event.name, arguments=event.arguments))]))
        return result

    def chunks(out: RequestOutput) -> list[dict | bytes]:
        result = []
        events = reply.feed(out.new_text) + (reply.finish() if out.finished else [])
        if (not out.finished and not with_logprobs and len(events) == 1 and isinstance(events[0], ContentDelta)
                and events[0].text):
            return [content.fill(events[0].text)]
        logprobs = chat_logprobs(out.new_tokens, token_bytes) if with_logprobs and out.new_tokens else None
        parts = deltas(events) or ([ChatDelta(content="")] if logprobs else [])
        for i, delta in enumerate(parts):   # this update's logprobs ride on its first chunk
            result.append(chunk(ChatChunkChoice(delta=delta, logprobs=logprobs if i == 0 else None)))
        if out.finished:
            result.append(chunk(ChatChunkChoice(delta=ChatDelta(),
                                                finish_reason=chat_finish_reason(out, reply.has_calls))))
        return result

    return chunks

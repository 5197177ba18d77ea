"""Server state and one request's life: admission, outputs with keep-alive, the SSE stream of either
API family, disconnects, draining."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request

from kvserve import RequestOutput, SamplingParams, TokenInfo
from kvserve.server.errors import APIError, Family, from_engine_error
from kvserve.server.sse import DONE, KEEPALIVE, SSEResponse, sse_event

if TYPE_CHECKING:  # importing the server loads neither torch (with the engine) nor prometheus_client
    from kvserve import AsyncEngine, RequestStream
    from kvserve.server.metrics import EngineMetrics

logger = logging.getLogger("kvserve.server")

EventBuilder = Callable[[RequestOutput], Iterable[dict | bytes]]   # bytes: an event encoded already


DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20


@dataclass(frozen=True)
class ServerSettings:
    """The operator's choices for the HTTP edge (flags of `kvserve serve`)."""
    served_model_names: tuple[str, ...] = ("kvserve",)  # the first is reported; every one is accepted
    api_key: str | None = None                           # Bearer token the API routes require
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES   # larger bodies get 413
    trust_request_chat_template: bool = False            # allow a client's own chat_template
    tool_call_parser: str | None = None                  # the model's tool-call format (None: from its template)


@dataclass
class ServerState:
    """Everything the routes share: the engine (None while loading), metrics, drain flag, requests."""
    served_model_name: str
    settings: ServerSettings = field(default_factory=ServerSettings)
    engine: AsyncEngine | None = None
    metrics: EngineMetrics | None = None
    keepalive_interval: float = 5.0
    stream_interval: int = 1              # tokens a stream gathers before a write (the first goes at once)
    draining: bool = False
    load_error: str | None = None
    info: dict = field(default_factory=dict)
    inflight: dict[str, EngineRequest] = field(default_factory=dict)

    def set_engine(self, engine: AsyncEngine) -> None:
        from kvserve.server.metrics import EngineMetrics  # prometheus_client loads with the engine

        self.engine = engine
        self.metrics = EngineMetrics(engine, self.served_model_name)

    def health(self) -> tuple[bool, str]:
        if self.load_error:
            return False, f"model failed to load: {self.load_error}"
        if self.engine is None:
            return False, "loading"
        if self.draining:
            return False, "shutting down"
        if not self.engine.is_running:
            return False, f"engine died: {self.engine.dead_error!r}"
        return True, "ok"

    def require_engine(self) -> AsyncEngine:
        """The engine, or a 503 APIError while loading, draining or dead."""
        ok, why = self.health()
        if not ok:
            raise APIError("unavailable", f"the server cannot take requests: {why}", code="unavailable")
        assert self.engine is not None
        return self.engine

    def record_failure(self, reason: str, request_id: str | None = None) -> None:
        """Count a failure once per request id (the engine reports its aborts too)."""
        if self.metrics is not None:
            self.metrics.record_failure(reason, request_id)


def output_error(out: RequestOutput, draining: bool) -> APIError | None:
    """The error a finished output carries: an engine failure or an abort."""
    error = None
    if out.error:
        error = APIError("generation", f"generation failed: {out.error}", code="engine_error")
    elif out.finish_reason == "abort":
        why = "the server is shutting down" if draining else "the request was aborted"
        error = APIError("unavailable", f"generation did not complete: {why}", code="aborted")
    if error is not None:
        error.recorded = True
    return error


class EngineRequest:
    """One request submitted to the engine; read it with `next()` (or `outputs()`), `close()` always.
    Routes use it as a member of a RequestGroup."""

    def __init__(self, state: ServerState, prompt_ids: list[int], params: SamplingParams, request_id: str,
                 parent_request_id: str | None = None):
        self.state = state
        self.prompt_ids = prompt_ids
        self.params = params
        self.request_id = request_id
        self.parent_request_id = parent_request_id   # shares this earlier request's prompt blocks (n > 1)
        self.finished = False
        self.closed = False
        self._stream: RequestStream | None = None

    async def start(self) -> None:
        """Validate and admit the request; raises APIError before any response byte is sent."""
        engine = self.state.require_engine()
        try:
            self._stream = engine.add_request(self.prompt_ids, self.params, request_id=self.request_id,
                                              quiet_after=self.state.keepalive_interval,
                                              parent_request_id=self.parent_request_id,
                                              stream_interval=self.state.stream_interval)
        except Exception as exc:
            self.close(record=False)
            raise from_engine_error(exc) from exc
        self.state.inflight[self.request_id] = self

    @property
    def stream(self) -> RequestStream:
        """The engine's stream of this request's outputs (once started)."""
        assert self._stream is not None
        return self._stream

    async def next(self) -> RequestOutput | None:
        """The next incremental output (every token since the previous one), or None for a keep-alive
        tick. Raises APIError on failure; after the final output the request is closed."""
        assert self._stream is not None
        try:
            out = await self._stream.next()
        except (APIError, asyncio.CancelledError):
            self.close()
            raise
        except Exception as exc:
            self.finished = True
            self.close()
            error = from_engine_error(exc)
            self.state.record_failure(error.failure_reason or "engine_error", self.request_id)
            error.recorded = True
            raise error from exc
        if out is not None and out.finished:
            self.finished = True
            self._record_finish(out)
            self.close()
        return out

    async def outputs(self) -> AsyncIterator[RequestOutput | None]:
        """next() until the final output; leaving early closes (aborts) the request."""
        try:
            while not self.finished:
                yield await self.next()
        finally:
            self.close()

    def _record_finish(self, out: RequestOutput) -> None:
        if out.error:
            self.state.record_failure("engine_error", self.request_id)
        elif out.finish_reason == "abort":
            self.state.record_failure("timeout" if self.state.draining else "aborted", self.request_id)

    def close(self, record: bool = True) -> None:
        """Abort the request unless it finished; safe to call many times, from any cleanup path."""
        if self.closed:
            return
        self.closed = True
        self.state.inflight.pop(self.request_id, None)
        if self._stream is None:
            return
        if record and not self.finished:
            self.state.record_failure("aborted", self.request_id)
        with contextlib.suppress(Exception):
            self._stream.close()


async def collect_outputs(state: ServerState, outputs: AsyncIterator[RequestOutput | None],
                          http_request: Request, abort: Callable[[], None]
                          ) -> dict[str, tuple[RequestOutput, list[TokenInfo]]] | None:
    """Run outputs to their end: per request id its final output and every token; None if the client
    disconnected first: `abort()` then ends the requests. Raises the APIError of a failed or aborted one.

    The abort does not rest on cancelling the reader: Python 3.11's asyncio.wait_for (in
    RequestGroup.outputs) can swallow a cancel that lands as an output arrives, and the requests then
    ran to their end for a client long gone."""
    results: dict[str, tuple[RequestOutput, list[TokenInfo]]] = {}

    async def consume() -> None:
        async for out in outputs:
            if out is not None:
                tokens = results[out.request_id][1] if out.request_id in results else []
                tokens.extend(out.new_tokens)
                results[out.request_id] = (out, tokens)

    task = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(wait_disconnected(http_request))
    gone = False
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone = watcher.done() and not watcher.cancelled() and watcher.exception() is None
        watcher.cancel()
        if gone or not task.done():
            abort()       # before waiting for the reader: its outputs end with the abort
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if gone or task.cancelled():
        return None
    task.result()
    for final, _ in results.values():
        error = output_error(final, state.draining)
        if error is not None:
            raise error
    return results


class RequestGroup:
    """Several engine requests answered as one response: a request's n outputs (each one after the
    first shares the first's prompt blocks), for each of completions' prompts. The interface of
    EngineRequest: outputs() interleaves the members' outputs (tell them apart by request_id)."""

    def __init__(self, state: ServerState, request_id: str, members: list[EngineRequest]):
        self.state = state
        self.request_id = request_id
        self.members = members
        self.index_of = {m.request_id: i for i, m in enumerate(members)}
        self.done = False             # every member's final output has been read
        self._merged: AsyncIterator[RequestOutput | None] | None = None

    async def next(self) -> RequestOutput | None:
        """The next output of any member (tell them apart by request_id), or None for a keep-alive
        tick; `done` once the last member's final output is read."""
        if len(self.members) == 1:
            out = await self.members[0].next()
            self.done = self.members[0].finished
            return out
        if self._merged is None:
            self._merged = self.outputs()
        try:
            return await anext(self._merged)
        except StopAsyncIteration:
            self.done = True
            return None

    async def start(self) -> None:
        """Admit every member, or none: a refusal closes those already admitted."""
        try:
            for member in self.members:
                await member.start()
        except BaseException:
            self.close(record=False)
            raise

    async def outputs(self) -> AsyncIterator[RequestOutput | None]:
        """Every member's outputs, interleaved, and None for keep-alive ticks."""
        if len(self.members) == 1:
            async for out in self.members[0].outputs():
                yield out
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(member: EngineRequest) -> None:
            try:
                async for out in member.outputs():
                    if out is not None:
                        queue.put_nowait(out)
            except Exception as exc:  # noqa: BLE001 - handed to the reader, who raises it
                queue.put_nowait(exc)
            finally:
                queue.put_nowait(done)

        pumps = [asyncio.ensure_future(pump(member)) for member in self.members]
        remaining = len(pumps)
        try:
            while remaining:
                try:
                    item = await asyncio.wait_for(queue.get(), self.state.keepalive_interval)
                except asyncio.TimeoutError:
                    yield None
                    continue
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in pumps:
                task.cancel()
            self.close()

    async def collect(self, http_request: Request) -> list[tuple[RequestOutput, list[TokenInfo]]] | None:
        """Each member's final output and tokens, in member order (see collect_outputs)."""
        results = await collect_outputs(self.state, self.outputs(), http_request, self.close)
        return None if results is None else [results[m.request_id] for m in self.members]

    def close(self, record: bool = True) -> None:
        """Abort the members that have not finished (a reader still waiting gets their final outputs)."""
        for member in self.members:
            member.close(record)

    async def aclose(self) -> None:
        """close(), and end the merging of n > 1 members' outputs (its pump tasks)."""
        self.close()
        if self._merged is not None:
            await self._merged.aclose()


async def admit_group(state: ServerState, request_id: str,
                      members: list[tuple[list[int], SamplingParams, int | None]]) -> RequestGroup:
    """Submit (prompt ids, params, index of the member whose prompt blocks it shares) members as one
    response; the member ids are request_id itself for one member, else request_id-<index>."""
    ids = [request_id] if len(members) == 1 else [f"{request_id}-{i}" for i in range(len(members))]
    group = RequestGroup(state, request_id, [
        EngineRequest(state, prompt_ids, params, ids[i], None if parent is None else ids[parent])
        for i, (prompt_ids, params, parent) in enumerate(members)])
    await group.start()
    return group


def stream_response(state: ServerState, group: RequestGroup, family: Family, events: EventBuilder,
                    opening: Iterable[dict] = ()) -> SSEResponse:
    """The SSE stream of an admitted request in one API family's shape; `events` turns each output into
    that family's events. The request is closed (aborted if unfinished) however the stream ends, and
    as soon as the client leaves."""
    encode = chunk_encoder(events)
    # one member: its outputs before the final one are written as the engine hands them out (see SSEResponse)
    direct = (group.members[0].stream, encode) if len(group.members) == 1 else None
    return SSEResponse(stream_body(state, group, family, encode, opening), on_close=group.close, direct=direct)


def chunk_encoder(events: EventBuilder) -> Callable[[RequestOutput], bytes]:
    """An output's events as one chunk of SSE bytes (one write per output). An output whose events failed
    raises the same error if encoded again (the body retries what a direct delivery could not encode),
    without running `events` twice: builders keep state (text so far, a tool-call parser)."""
    failed: list = [None, None]     # the output whose encoding failed, and its error

    def encode(out: RequestOutput) -> bytes:
        if failed[0] is out:
            raise failed[1]
        try:
            return b"".join(map(sse_event, events(out)))
        except Exception as exc:
            failed[0], failed[1] = out, exc
            raise
    return encode


async def stream_body(state: ServerState, group: RequestGroup, family: Family,
                      encode: Callable[[RequestOutput], bytes], opening: Iterable[dict]) -> AsyncIterator[bytes]:
    """`opening`, then each output's events with keep-alive comments while the engine is quiet, then
    `data: [DONE]` for OpenAI (TGI's stream just ends). An error is the last event, in the family's shape.
    One chunk per output read: a reader that fell behind gets one output carrying several tokens."""
    try:
        for event in opening:
            yield sse_event(event)
        while not group.done:
            out = await group.next()
            if out is None:
                if not group.done:
                    yield KEEPALIVE
                continue
            error = output_error(out, state.draining) if out.finished else None
            if error is not None:
                raise error
            chunk = encode(out)
            if chunk:
                yield chunk
        if family == "openai":
            yield DONE
    except Exception as exc:  # the headers went out already: the error can only be the last event
        yield sse_event(from_engine_error(exc).body(family))
    finally:
        await group.aclose()


def get_state(request: Request) -> ServerState:
    """The routes call this themselves: a FastAPI dependency costs a resolution on every request."""
    return request.app.state.kvserve


async def wait_disconnected(request: Request) -> None:
    """Return once the client has gone away. The body is read by now, so the server's next message
    for this request is http.disconnect: waited for at no cost, not polled."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def drain(state: ServerState, timeout: float) -> None:
    """Stop admitting, give in-flight requests `timeout` seconds, then abort what is left."""
    state.draining = True
    deadline = time.monotonic() + timeout
    logger.info("draining: %d request(s) in flight, waiting up to %.1f s", len(state.inflight), timeout)
    while state.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if not state.inflight:
        logger.info("drained: no request in flight")
        return
    logger.warning("shutdown timeout: aborting %d request(s)", len(state.inflight))
    for request_id in list(state.inflight):
        state.record_failure("timeout", request_id)
        state.engine.abort(request_id)
    deadline = time.monotonic() + 2.0
    while state.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)

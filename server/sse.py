"""Server-sent events: event encoding, the keep-alive comment, the response (keep-alive ticks come
from the engine stream itself: AsyncEngine.add_request(quiet_after=...))."""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from pydantic_core import to_json
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from kvserve import RequestOutput, RequestStream

logger = logging.getLogger("kvserve.server")

# the scope key under which AppSendMiddleware keeps the `send` it is called with
APP_SEND = "kvserve.app_send"
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: Any) -> bytes:
    """Encode one `data:` event; dicts and lists become compact JSON in UTF-8 (non-ASCII text is not
    escaped). pydantic_core's encoder: a fifth of json.dumps's time, and this runs once per token per
    stream. Bytes are an event encoded already (an SSETemplate's) and pass as they are."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return f"data: {data}\n\n".encode()
    return b"data: " + to_json(data) + b"\n\n"


class SSETemplate:
    """One event encoded once with a string field left open: a stream's per-token chunk, whose only
    change from token to token is its text. fill(text) gives the bytes sse_event would give for the
    whole event with that text in place, for the cost of encoding the text alone."""
    HOLE = "\x00kvserve-text\x00"

    def __init__(self, data: dict, put_hole: Callable[[dict, str], None]):
        """put_hole(data, HOLE) puts the placeholder where the text goes: in `data` itself, which the
        caller gives up (a fresh dump; a copy of it cost more than the rest of a request's set-up)."""
        put_hole(data, self.HOLE)
        encoded = sse_event(data)
        hole = to_json(self.HOLE)
        if encoded.count(hole) != 1:
            raise ValueError("an SSETemplate needs exactly one place for its text")
        self.head, self.tail = encoded.split(hole)

    def fill(self, text: str) -> bytes:
        return self.head + to_json(text) + self.tail


class AppSendMiddleware:
    """Keeps the `send` it is called with in the scope (APP_SEND): an SSEResponse writes its body chunks
    there once its headers are out, past what lies between (Starlette's exception middleware and the
    route's wrapper, whose send wrappers only note that a response has started). Added as the app's
    innermost middleware, so that what lies outside (FastAPI's telemetry, the server-error middleware)
    still sees every message."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[APP_SEND] = send
        await self.app(scope, receive, send)


class SSEResponse(Response):
    """A text/event-stream response that proxies neither cache nor buffer. It writes each chunk of
    `body` as it comes, and calls `on_close` however it ends (even if `body` never yields) and as
    soon as the client leaves: `on_close` ends the request, so that `body` comes to its end.

    Starlette's StreamingResponse cancels the body through an anyio task group instead; this costs
    one watcher task per response and no cancel scopes (the body runs once per token per stream).

    `direct` = (the request's stream, encode): while `body` waits for that stream's next output, the
    outputs before the final one are encoded and written as the engine hands them out
    (RequestStream.deliver_to), without waking `body`: with many streams, a step's chunks cost one
    wake-up of the event loop, not one task switch through `body`'s frames per stream. `body` reads
    the stream too and handles everything else (the opening events, the final output, errors,
    keep-alives); the chunks go out in the order of the outputs either way.

    Once the headers are out, the body goes to the send AppSendMiddleware kept (scope[APP_SEND]), past
    the send wrappers that only note that a response has started. Direct chunks are sent in the
    request's own context (contextvars), as the body's would be."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], None] | None = None,
                 direct: tuple[RequestStream, Callable[[RequestOutput], bytes]] | None = None):
        self.body_iterator = body
        self.on_close = on_close
        self.direct = direct
        self.status_code = 200
        self.background = None
        self.init_headers(SSE_HEADERS)
        self._ended = False      # the last chunk is written (or the client left): a disconnect is no news
        self._send: Send | None = None
        self._context: contextvars.Context | None = None   # the request's, for the direct chunks' sends
        self._pending: asyncio.Task | None = None   # a direct chunk's send, waiting for the socket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            self._send = send = scope.get(APP_SEND, send)
            if self.direct is not None:
                self._context = contextvars.copy_context()
                self.direct[0].deliver_to(self._deliver)
            async for chunk in self.body_iterator:
                await self._after_pending()
                if self._ended:       # the client left (or a direct chunk's send failed): nobody reads the rest
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await self._after_pending()
            if not self._ended:
                self._ended = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:              # how an ASGI 2.4 server tells that the client left
            self._departed()
        finally:
            if self.direct is not None:
                self.direct[0].deliver_to(None)
            if self._pending is not None:
                self._pending.cancel()
            watcher.cancel()
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()
            self._close()

    def _deliver(self, out: RequestOutput) -> bool:
        """The stream's sink (on the event loop, in the engine's per-step hand-out): write `out`'s chunk
        now. False (the body's reader takes the output instead) while an earlier chunk waits for the
        socket, so that order holds, or when encoding it fails: the reader then meets the error itself
        and ends the stream with it."""
        if self._ended:
            return True               # the client left: the abort's final output ends the body
        if self._pending is not None:
            return False
        try:
            chunk = self.direct[1](out)
        except Exception:  # noqa: BLE001 - handed to the reader (see above)
            return False
        if chunk:
            self._send_now(self._send({"type": "http.response.body", "body": chunk, "more_body": True}))
        return True

    def _send_now(self, send: Coroutine) -> None:
        """Run a send to its end now, without a task: it ends at once unless the socket's buffer is
        full (the server's flow control), and then a task finishes it, which the body's next send
        waits for."""
        try:
            waiting_on = self._context.run(send.send, None)
        except StopIteration:
            return
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - nowhere to raise it: end the response
            self._send_failed(exc)
            return
        self._pending = asyncio.ensure_future(self._finish_send(send, waiting_on))

    async def _finish_send(self, send: Coroutine, waiting_on: Any) -> None:
        """Drive a send that suspended in _send_now, as a task would: wait for what it waits on, resume it."""
        try:
            while True:
                if isinstance(waiting_on, asyncio.Future):
                    waiting_on._asyncio_future_blocking = False
                    await asyncio.wait((waiting_on,))     # done however it ended: the send reads the outcome
                else:                                     # a bare yield: one turn of the loop
                    await asyncio.sleep(0)
                try:
                    waiting_on = self._context.run(send.send, None)
                except StopIteration:
                    return
        except asyncio.CancelledError:
            send.close()
            raise
        except Exception as exc:  # noqa: BLE001
            self._send_failed(exc)
        finally:
            if self._pending is asyncio.current_task():
                self._pending = None

    def _send_failed(self, exc: BaseException) -> None:
        if not isinstance(exc, OSError):
            logger.error("writing a stream's chunk failed; ending the response", exc_info=exc)
        self._departed()

    async def _after_pending(self) -> None:
        """Wait for a direct chunk's send still under way (however it ends: it handles its own failure)."""
        if self._pending is not None:
            await asyncio.wait((self._pending,))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._departed()

    def _departed(self) -> None:
        if not self._ended:
            self._ended = True
            pending = self._pending       # a send waiting for a socket nobody reads any more
            if pending is not None and pending is not asyncio.current_task():
                pending.cancel()
            self._close()

    def _close(self) -> None:
        if self.on_close is not None:
            self.on_close()

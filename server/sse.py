"""Server-sent events: event encoding, keep-alive comments while a source is quiet, the response."""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: Any) -> bytes:
    """Encode one `data:` event; dicts and lists become compact JSON."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def with_keepalive(source: AsyncIterator[T], interval: float) -> AsyncIterator[T | None]:
    """Yield the source's items, and None each time `interval` seconds pass without one.

    The pending read is never cancelled by a timeout, only when the consumer goes away, in which
    case the source is closed (for an engine stream, that aborts the request).
    """
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            task, pending = pending, None
            try:
                item = task.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        await _close(source, pending)


async def _close(source: AsyncIterator, pending: asyncio.Future | None) -> None:
    """Cancel an in-flight read, wait for it to unwind, then close the source."""
    if pending is not None and not pending.done():
        pending.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.shield(asyncio.wait({pending}))
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


class SSEResponse(StreamingResponse):
    """A text/event-stream response that proxies neither cache nor buffer, and that runs `on_close`
    however it ends, even if never iterated."""

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], None] | None = None):
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()


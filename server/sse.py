"""Server-sent events: event encoding, the keep-alive comment, the response (keep-alive ticks come
from the engine stream itself: AsyncEngine.generate(quiet_after=...))."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: Any) -> bytes:
    """Encode one `data:` event; dicts and lists become compact JSON."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


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


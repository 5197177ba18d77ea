"""The HTTP edge, before any route runs: the API key and the request-size limit.

Both are ASGI middleware, so every route (today's and future ones) passes through them. Probes and
scrapes stay open: /health, /metrics and /version need no key, and neither do the API documentation
pages nor the KV map's page (/kv/view holds no data; the /kv it polls needs the key).
"""
from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvserve.server.errors import APIError, family_of_path

# /version too, as vLLM leaves it open: it tells no more than /openapi.json, which is open
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/kv/view", "/docs", "/docs/oauth2-redirect", "/redoc",
                        "/openapi.json"})


async def _answer(error: APIError, scope: Scope, send: Send, headers: dict[str, str] | None = None) -> None:
    response = error.response(family_of_path(scope["path"]))
    for name, value in (headers or {}).items():
        response.headers[name] = value
    await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


class APIKeyMiddleware:
    """Every route but the open ones needs `Authorization: Bearer <key>`; compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            why = "a missing" if not given else "an invalid"
            error = APIError("unauthorized", f"this server needs an API key: {why} Authorization header; send "
                             "`Authorization: Bearer <key>`", code="invalid_api_key")
            return await _answer(error, scope, send, {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    """Raised from the body stream once it passes the limit (FastAPI passes HTTPExceptions through)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes, this server's limit "
                              "(--max-request-bytes)")


class BodySizeMiddleware:
    """Bodies over `limit` bytes get 413 before the rest is read: at once from Content-Length, or as
    soon as a streamed (chunked) body passes the limit."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _answer(APIError("too_large", BodyTooLarge(self.limit).detail, code="body_too_large"),
                                 scope, send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)

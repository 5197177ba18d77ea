"""The HTTP edge: API keys and the request-size limit apply to every route before it runs."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from kvserve.server.app import create_app
from kvserve.server.serving import ServerSettings

KEY = "s3cret-key"
ROUTES = [("POST", "/generate"), ("POST", "/generate_stream"), ("POST", "/"), ("GET", "/info"),
          ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
          ("GET", "/some/future/route")]


def call(settings: ServerSettings, method: str, path: str, **kwargs) -> httpx.Response:
    app = create_app(settings=settings)   # no engine: a request that passes the edge gets 503 or 404

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kvserve") as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(go())


@pytest.mark.parametrize("method,path", ROUTES)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"bearer {KEY}", KEY, f"Bearer {KEY}x"])
def test_api_routes_need_the_key(method, path, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    r = call(ServerSettings(api_key=KEY), method, path, headers=headers, json={})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    body = r.json()
    if path.startswith("/v1/"):
        assert body["error"]["code"] == "invalid_api_key" and "Authorization" in body["error"]["message"]
    else:
        assert body["error_type"] == "unauthorized" and "Authorization" in body["error"]


@pytest.mark.parametrize("method,path", ROUTES)
def test_the_right_key_passes(method, path):
    r = call(ServerSettings(api_key=KEY), method, path, headers={"Authorization": f"Bearer {KEY}"}, json={})
    assert r.status_code in (200, 400, 404, 405, 422, 503), r.text   # past the edge: the route itself answered


@pytest.mark.parametrize("path", ["/health", "/metrics", "/docs", "/openapi.json"])
def test_probes_scrapes_and_docs_stay_open(path):
    r = call(ServerSettings(api_key=KEY), "GET", path)
    assert r.status_code != 401


def test_without_a_key_configured_nothing_is_asked():
    assert call(ServerSettings(), "GET", "/v1/models").status_code == 503   # loading, not 401


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_a_body_over_the_limit_is_413_in_the_api_shape(path):
    limit = 1000
    body = b'{"inputs": "' + b"a" * 2000 + b'"}'
    r = call(ServerSettings(max_request_bytes=limit), "POST", path, content=body,
             headers={"content-type": "application/json"})
    assert r.status_code == 413
    message = r.json()["error"]["message"] if path.startswith("/v1/") else r.json()["error"]
    assert "1000 bytes" in message and "--max-request-bytes" in message


def test_a_streamed_body_without_length_is_cut_at_the_limit():
    async def chunks():
        for _ in range(50):
            yield b"a" * 100

    r = call(ServerSettings(max_request_bytes=1000), "POST", "/generate", content=chunks(),
             headers={"content-type": "application/json"})
    assert r.status_code == 413 and "1000 bytes" in r.json()["error"]
    assert r.json()["error_type"] == "payload_too_large"   # the same shape as the Content-Length refusal


def test_a_body_at_the_limit_passes():
    body = b'{"inputs": "' + b"a" * 100 + b'"}'
    r = call(ServerSettings(max_request_bytes=len(body)), "POST", "/generate", content=body,
             headers={"content-type": "application/json"})
    assert r.status_code == 503   # past the edge: no engine yet


def test_the_key_is_checked_before_the_body_size():
    r = call(ServerSettings(api_key=KEY, max_request_bytes=10), "POST", "/generate", content=b"x" * 100)
    assert r.status_code == 401

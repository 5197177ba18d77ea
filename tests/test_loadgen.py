"""The benchmarks' load client (kvserve.bench.loadgen.Client) against a scripted HTTP server: what it
counts as tokens, and how each way a request can go wrong becomes that request's error, not the run's."""
from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("aiohttp")

from kvserve.bench.loadgen import Client, TextRequest, run_concurrency, run_poisson  # noqa: E402


def sse(*events: dict | str) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, str) else json.dumps(e)).encode() + b"\n\n" for e in events)


def chunked(*pieces: bytes, end: bool = True) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return body + (b"0\r\n\r\n" if end else b"")


def completion(text: str) -> dict:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": None}]}


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}


class Scripted:
    """A keep-alive HTTP/1.1 server answering each request with the reply its prompt names."""

    def __init__(self, replies: dict[str, bytes | None]):
        self.replies = replies            # prompt -> raw response bytes (None: close without answering)
        self.bodies: list[dict] = []
        self.connections = 0

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                body = json.loads(await reader.readexactly(length))
                self.bodies.append(body)
                reply = self.replies[body.get("prompt") or body.get("inputs")]
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def run(replies: dict, prompts: list[str], api: str = "openai") -> list:
    """All prompts at once through one Client; their outcomes in order."""
    async def go():
        async with Scripted(replies) as url:
            client = Client(url, api, "m", True, timeout=10)
            try:
                outcomes, _ = await run_poisson(client, [TextRequest(p, 3) for p in prompts], float("inf"), 0)
            finally:
                await client.close()
            return outcomes
    return asyncio.run(go())


def test_a_stream_counts_each_chunk_with_text_and_takes_the_usage_block():
    ok = STREAM_HEAD + chunked(sse(completion("a"), completion("")), sse(completion("b")),
                               sse(completion("c"), USAGE, "[DONE]"))
    (out,) = run({"p": ok}, ["p"])
    assert out.ok and out.error is None
    assert len(out.token_times) == 3            # the empty-text chunk is not a token
    assert out.output_tokens == 3 and out.prompt_tokens == 7
    assert 0 < out.ttft <= out.e2e and len(out.itls) == 2


def test_requests_say_what_was_asked_and_reuse_connections():
    ok = STREAM_HEAD + chunked(sse(completion("a"), USAGE, "[DONE]"))

    async def go():
        server = Scripted({"p": ok})
        async with server as url:
            client = Client(url, "openai", "m", True, timeout=10)
            try:
                outcomes, _ = await run_concurrency(client, [TextRequest("p", 3)] * 6, 1)
            finally:
                await client.close()
        return outcomes, server
    outcomes, server = asyncio.run(go())
    assert all(o.ok for o in outcomes)
    assert server.connections == 1                # one keep-alive connection for six requests in turn
    assert server.bodies[0] == {"model": "m", "prompt": "p", "max_tokens": 3, "temperature": 0, "stream": True,
                                "stream_options": {"include_usage": True}, "ignore_eos": True}


def test_an_event_line_of_megabytes_is_read_whole():
    """A TGI stream's last event carries the whole generated text: a long one is one long line."""
    text = "x" * (3 * 2**20)
    events = [{"token": {"id": 1, "text": "a"}},
              {"token": {"id": 2, "text": "b"}, "generated_text": text, "details": {"generated_tokens": 2}}]
    (out,) = run({"p": STREAM_HEAD + chunked(sse(*events))}, ["p"], api="tgi")
    assert out.ok and out.output_tokens == 2, out.error


def test_tgi_streams_count_tokens_and_read_generated_tokens_from_the_details():
    events = [{"token": {"id": 1, "text": "a"}}, {"token": {"id": 2, "text": "b"},
                                                   "details": {"generated_tokens": 2}}]
    reply = STREAM_HEAD + chunked(sse(*events))
    (out,) = run({"p": reply}, ["p"], api="tgi")
    assert out.ok and out.output_tokens == 2


def test_each_failure_is_its_own_requests_error_and_the_rest_complete():
    ok = STREAM_HEAD + chunked(sse(completion("a"), USAGE, "[DONE]"))
    problem = b'{"error": "max_tokens too big"}'
    refused = (b"HTTP/1.1 422 Unprocessable Entity\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n%s" % (len(problem), problem))
    in_stream = STREAM_HEAD + chunked(sse(completion("a"), {"error": {"message": "engine failed"}}, "[DONE]"))
    empty = STREAM_HEAD + chunked(sse(USAGE, "[DONE]"))
    replies = {"ok": ok, "refused": refused, "in_stream": in_stream, "empty": empty}
    first, refused_out, in_stream_out, empty_out, last = run(replies, ["ok", "refused", "in_stream", "empty", "ok"])
    assert first.ok and last.ok
    assert not refused_out.ok and refused_out.error == 'HTTP 422: {"error": "max_tokens too big"}'
    assert not in_stream_out.ok and "engine failed" in in_stream_out.error
    assert not empty_out.ok and empty_out.error == "no tokens received"


def test_a_connection_closed_mid_stream_or_unanswered_is_an_error():
    cut = STREAM_HEAD + chunked(sse(completion("a")), end=False)

    async def go():
        server = Scripted({"gone": None})

        async def serve_and_close(reader, writer):   # answer part of the stream, then hang up
            await reader.readuntil(b"\r\n\r\n")
            writer.write(cut)
            await writer.drain()
            writer.close()
        async with server as url:
            client = Client(url, "openai", "m", True, timeout=10)
            try:
                gone = await client.send(TextRequest("gone", 3))
            finally:
                await client.close()
        half = await asyncio.start_server(serve_and_close, "127.0.0.1", 0)
        port = half.sockets[0].getsockname()[1]
        client = Client(f"http://127.0.0.1:{port}", "openai", "m", True, timeout=10)
        try:
            cut_out = await client.send(TextRequest("cut", 3))
        finally:
            await client.close()
            half.close()
        return gone, cut_out
    gone, cut_out = asyncio.run(go())
    assert not gone.ok and gone.error
    assert not cut_out.ok and cut_out.error


def test_a_server_that_never_answers_times_out_as_an_error():
    async def go():
        async def silent(reader, writer):
            await asyncio.sleep(5)
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = Client(f"http://127.0.0.1:{port}", "openai", "m", True, timeout=0.3)
        try:
            return await client.send(TextRequest("p", 3))
        finally:
            await client.close()
            server.close()
    out = asyncio.run(go())
    assert not out.ok and out.error.startswith("TimeoutError")


def test_only_loopback_servers_are_driven():
    with pytest.raises(SystemExit, match="loopback"):
        Client("http://example.com:8000", "openai", "m", True, timeout=1)

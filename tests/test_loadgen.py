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
USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}}   # (not the chunks' count)


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
                end = b"0\r\n\r\n" if reply.endswith(b"\r\n0\r\n\r\n") else b""
                writer.write(reply[:len(reply) - len(end)])     # the body's end marker on its own, later,
                await writer.drain()                            # as kvserve's SSE response sends it
                if end:
                    await asyncio.sleep(0.01)
                    writer.write(end)
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
    assert out.output_tokens == 5 and out.prompt_tokens == 7    # the usage block's counts
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
    assert out.ok and out.output_tokens == 2 and len(out.token_times) == 2, out.error


def test_tgi_streams_count_tokens_and_read_generated_tokens_from_the_details():
    events = [{"token": {"id": 1, "text": "a"}}, {"token": {"id": 2, "text": "b"},
                                                   "details": {"generated_tokens": 4}}]
    reply = STREAM_HEAD + chunked(sse(*events))
    (out,) = run({"p": reply}, ["p"], api="tgi")
    assert out.ok and len(out.token_times) == 2 and out.output_tokens == 4   # the details' count


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

    async def serve_and_close(reader, writer):   # answer part of the stream, then hang up
        await reader.readuntil(b"\r\n\r\n")
        writer.write(cut)
        await writer.drain()
        writer.close()

    async def go():
        async with Scripted({"gone": None}) as url:
            client = Client(url, "openai", "m", True, timeout=10)
            try:
                gone = await client.send(TextRequest("gone", 3))
            finally:
                await client.close()
        half = await asyncio.start_server(serve_and_close, "127.0.0.1", 0)
        client = Client(f"http://127.0.0.1:{half.sockets[0].getsockname()[1]}", "openai", "m", True, timeout=10)
        try:
            cut_out = await client.send(TextRequest("cut", 3))
        finally:
            await client.close()
            half.close()
            await half.wait_closed()
        return gone, cut_out
    gone, cut_out = asyncio.run(go())
    assert not gone.ok and gone.error.startswith("ServerDisconnectedError"), gone.error
    assert not cut_out.ok and cut_out.error.startswith("ClientPayloadError"), cut_out.error


def silent_server(delays: list[float], then: bytes = b""):
    """A server that waits `delays` seconds, one after the other, writing one event of `then` after each."""
    async def handler(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            if then:
                writer.write(STREAM_HEAD)
            for delay in delays:
                await asyncio.sleep(delay)
                if then:
                    writer.write(chunked(then, end=False))
            if then:
                writer.write(chunked(sse(USAGE, "[DONE]")))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
    return asyncio.start_server(handler, "127.0.0.1", 0)


def drive(server_factory, timeout: float):
    async def go():
        server = await server_factory
        client = Client(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", "openai", "m", True, timeout)
        try:
            return await client.send(TextRequest("p", 3))
        finally:
            await client.close()
            server.close()
            await server.wait_closed()
    return asyncio.run(go())


def test_a_server_that_never_answers_times_out_as_an_error():
    out = drive(silent_server([1.0]), timeout=0.3)
    assert not out.ok and out.error == "TimeoutError: no answer or data for 0.3 s"


def test_the_timeout_bounds_each_wait_not_the_whole_stream():
    """As the httpx client's did: a stream longer than the timeout, with shorter gaps, completes."""
    out = drive(silent_server([0.15] * 6, then=sse(completion("a"))), timeout=0.5)
    assert out.ok and len(out.token_times) == 6 and out.e2e > 0.5, out.error


def test_a_client_serves_one_event_loop_after_another():
    """A session belongs to the loop it was made in: a client used again under a new asyncio.run
    makes a new one instead of failing every request."""
    ok = STREAM_HEAD + chunked(sse(completion("a"), USAGE, "[DONE]"))
    client = Client("http://127.0.0.1:9", "openai", "m", True, timeout=10)

    async def go(close: bool):
        async with Scripted({"p": ok}) as url:
            client.url = url
            out = await client.send(TextRequest("p", 3))
            if close:
                await client.close()
            return out
    first = asyncio.run(go(close=False))     # its session is left open with its loop
    second = asyncio.run(go(close=True))
    assert first.ok and second.ok, (first.error, second.error)


def test_only_loopback_servers_are_driven():
    with pytest.raises(SystemExit, match="loopback"):
        Client("http://example.com:8000", "openai", "m", True, timeout=1)

"""The streaming plumbing without a model: a request's output stream (merging, keep-alive ticks without
a timer per output) and the SSE response (departures end the request, every path closes it)."""
import asyncio
import contextvars

from kvserve import RequestOutput
import pytest

from kvserve.async_engine import _QUIET, RequestStream, _Stream
from kvserve.server.sse import APP_SEND, AppSendMiddleware, SSEResponse, SSETemplate, sse_event


def output(text: str, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", [1], [], text, text, [5], finished=finished)


def test_a_quiet_stream_ticks_and_a_busy_one_does_not():
    async def scenario():
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, quiet_after=0.1)
        t0 = loop.time()
        assert await stream.get() is _QUIET                 # nothing for quiet_after: a tick
        assert 0.09 <= loop.time() - t0 < 0.5
        timer = stream.timer

        async def producer():
            for i in range(10):                             # an output every 0.03 s, for 0.3 s
                await asyncio.sleep(0.03)
                stream.put(output(str(i)))
        task = asyncio.ensure_future(producer())
        got = []
        while len(got) < 10:
            item = await stream.get()
            assert item is not _QUIET                       # never quiet for 0.1 s while outputs flow
            got.append(item.new_text)
        await task
        assert "".join(got) == "0123456789"
        assert stream.timer is None or stream.timer is not timer   # re-armed when it fired, not per output
        t1 = loop.time()
        assert await stream.get() is _QUIET                 # quiet again: ticks resume
        assert 0.05 <= loop.time() - t1 < 0.5
        stream.close()
        assert stream.timer is None
    asyncio.run(scenario())


def test_unread_outputs_merge_and_nothing_follows_the_final_one():
    async def scenario():
        stream = _Stream(asyncio.get_running_loop(), quiet_after=5.0)
        stream.put(output("a"))
        stream.put(output("b"))
        stream.put(output("c", finished=True))
        stream.put(output("late"))
        merged = await stream.get()
        assert merged.new_text == "abc" and merged.finished and not stream.items
        stream.close()
    asyncio.run(scenario())


class Client:
    """An ASGI server's side of one streaming response: what was sent, and a departure on demand."""

    def __init__(self):
        self.sent: list[dict] = []
        self.gone = asyncio.Event()

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


def test_an_sse_response_writes_each_chunk_and_closes_the_request_once_done():
    closed = []

    async def body():
        for i in range(3):
            yield sse_event({"i": i})

    async def scenario():
        client = Client()
        await SSEResponse(body(), on_close=lambda: closed.append(True))({"type": "http"}, client.receive, client.send)
        assert client.sent[0]["type"] == "http.response.start" and client.sent[0]["status"] == 200
        assert (b"content-type", b"text/event-stream; charset=utf-8") in client.sent[0]["headers"]
        assert client.body() == b'data: {"i":0}\n\ndata: {"i":1}\n\ndata: {"i":2}\n\n'
        assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
        assert closed
    asyncio.run(scenario())


def test_a_departed_client_ends_the_request_at_once_and_the_body_runs_its_cleanup():
    """The departure calls on_close (which aborts the request) while the body still waits for its next
    output; the aborted request's final output ends the body, whose cleanup then runs."""
    events = []

    async def scenario():
        client = Client()
        request_ended = asyncio.Event()

        async def body():
            try:
                yield b"data: first\n\n"
                await request_ended.wait()       # an engine request, waiting for its next output
                yield b"data: aborted\n\n"       # the abort's final output
                events.append("read past the end")
            finally:
                events.append("body cleanup")

        def on_close():
            events.append("on_close")
            request_ended.set()

        response = asyncio.ensure_future(SSEResponse(body(), on_close=on_close)({"type": "http"}, client.receive,
                                                                                client.send))
        await asyncio.sleep(0.05)
        assert client.body() == b"data: first\n\n" and not events
        client.gone.set()
        await asyncio.wait_for(response, 5)
        assert events[0] == "on_close" and "body cleanup" in events and "read past the end" not in events
        assert b"aborted" not in client.body()   # nothing more is written for a client that left
    asyncio.run(scenario())


def test_an_sse_response_closes_the_request_even_if_its_body_never_yields():
    closed = []

    async def body():
        raise RuntimeError("broken before the first chunk")
        yield b""   # pragma: no cover - makes this an async generator

    async def scenario():
        client = Client()
        try:
            await SSEResponse(body(), on_close=lambda: closed.append(True))({"type": "http"}, client.receive,
                                                                            client.send)
        except RuntimeError:
            pass
        assert closed
    asyncio.run(scenario())


class StandIn:
    """The two engine calls a RequestStream makes; `abort` puts the final output, as AsyncEngine's does."""

    def __init__(self, stream: _Stream, abort_raises: bool = False):
        self.stream, self.abort_raises, self.aborted, self.forgotten = stream, abort_raises, [], []

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        if self.abort_raises:
            raise ValueError("a finish listener broke")
        self.stream.loop.call_soon(self.stream.put, RequestOutput(request_id, [1], [], "", "", [], finished=True,
                                                                 finish_reason="abort"))

    def _forget(self, request_id: str) -> None:
        self.forgotten.append(request_id)


@pytest.mark.parametrize("abort_raises", [False, True])
def test_closing_a_request_wakes_its_waiting_reader_even_if_the_abort_fails(abort_raises):
    async def scenario():
        stream = _Stream(asyncio.get_running_loop(), quiet_after=60.0)
        engine = StandIn(stream, abort_raises)
        request = RequestStream(engine, "r", stream)
        reader = asyncio.ensure_future(request.next())
        await asyncio.sleep(0.01)
        request.close()                                   # a client left while its reader waits
        if abort_raises:
            with pytest.raises(RuntimeError, match="could not be aborted"):
                await asyncio.wait_for(reader, 5)
        else:
            final = await asyncio.wait_for(reader, 5)
            assert final.finished and final.finish_reason == "abort"
        assert engine.aborted == ["r"] and engine.forgotten == ["r"] and stream.timer is None
        with pytest.raises(RuntimeError, match="has ended"):
            await asyncio.wait_for(request.next(), 5)     # past the end: an error, not a wait forever
    asyncio.run(scenario())


def test_a_stream_interval_hands_over_the_first_output_then_k_tokens_at_a_time():
    from kvserve import TokenInfo

    def tokens(n: int, finished: bool = False) -> RequestOutput:
        return RequestOutput("r", [1], [TokenInfo(5, "x", 0.0, False)] * n, "x" * n, "", [], finished=finished)

    async def scenario():
        stream = _Stream(asyncio.get_running_loop(), quiet_after=0.2, interval=3)
        stream.put(tokens(1))
        assert len((await stream.get()).new_tokens) == 1          # the first token goes at once
        stream.put(tokens(1))
        stream.put(tokens(1))
        reader = asyncio.ensure_future(stream.get())
        await asyncio.sleep(0.05)
        assert not reader.done()                                  # 2 of 3 gathered: still waiting
        stream.put(tokens(1))
        assert len((await asyncio.wait_for(reader, 1)).new_tokens) == 3
        stream.put(tokens(1))
        assert len((await asyncio.wait_for(stream.get(), 1)).new_tokens) == 1   # a quiet spell hands it over
        stream.put(tokens(1))
        stream.put(tokens(1, finished=True))
        final = await asyncio.wait_for(stream.get(), 1)           # the end goes at once
        assert final.finished and len(final.new_tokens) == 2
        stream.close()
    asyncio.run(scenario())


HOSTILE_TEXTS = ["ab", "", " ", 'quote " and \\ backslash', "\x00\x01\x1f\x7f", "line\nbreak\r\t", "\u2028\u2029",
                 "é 你好 🙂", "</script>", "\\u0000", "\x00kvserve-text\x00", '{"choices":[]}']


@pytest.mark.parametrize("text", HOSTILE_TEXTS)
def test_a_templated_chunk_is_the_chunk_encoded_whole(text):
    chunk = {"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m é",
             "choices": [{"index": 3, "delta": {"content": "x"}, "logprobs": None, "finish_reason": None}]}

    def put(data, value):
        data["choices"][0]["delta"]["content"] = value
    whole = {**chunk, "choices": [{**chunk["choices"][0], "delta": {"content": text}}]}
    template = SSETemplate(chunk, put)                          # (chunk is given up to it)
    assert template.fill(text) == sse_event(whole)
    assert sse_event(template.fill(text)) == template.fill(text)  # encoded events pass through


def test_a_template_needs_exactly_one_hole():
    with pytest.raises(ValueError):
        SSETemplate({"a": 1}, lambda data, hole: None)
    with pytest.raises(ValueError):
        SSETemplate({"a": 1}, lambda data, hole: data.update(a=hole, b=hole))


# direct delivery: a waiting reader's outputs written from the engine's per-step hand-out

def test_outputs_go_to_the_sink_while_the_reader_waits_and_the_final_one_to_the_reader(caplog):
    async def scenario():
        stream = _Stream(asyncio.get_running_loop(), quiet_after=0.1)
        request = RequestStream(StandIn(stream), "r", stream)
        taken, answer = [], {"take": True, "raise": False}

        def sink(out):
            if answer["raise"]:
                raise ValueError("a broken sink")
            if answer["take"]:
                taken.append(out.new_text)
            return answer["take"]
        request.deliver_to(sink)
        stream.put(output("early"))                   # nobody waits yet: queued for the reader
        assert (await request.next()).new_text == "early" and not taken
        reader = asyncio.ensure_future(request.next())
        for i in range(8):                            # an output every 0.03 s for 0.24 s: past quiet_after
            await asyncio.sleep(0.03)
            stream.put(output(str(i)))
        assert taken == [str(i) for i in range(8)]
        assert not reader.done()                      # not woken, not even for a keep-alive tick
        answer["take"] = False                        # refused: the reader gets it
        stream.put(output("refused"))
        assert (await asyncio.wait_for(reader, 1)).new_text == "refused"
        answer["take"], answer["raise"] = True, True  # a sink that raises is dropped, the reader takes over
        reader = asyncio.ensure_future(request.next())
        await asyncio.sleep(0)
        stream.put(output("x"))
        assert (await asyncio.wait_for(reader, 1)).new_text == "x" and stream.sink is None
        assert "an output sink failed" in caplog.text
        answer["raise"] = False
        request.deliver_to(sink)
        reader = asyncio.ensure_future(request.next())
        await asyncio.sleep(0)
        stream.put(output("end", finished=True))      # the final output always goes to the reader
        final = await asyncio.wait_for(reader, 1)
        assert final.finished and final.new_text == "end" and taken[-1] == "7"
        assert request.finished and stream.sink is None   # closed: no sink left behind
    asyncio.run(scenario())


def test_a_stream_interval_keeps_outputs_from_the_sink():
    async def scenario():
        stream = _Stream(asyncio.get_running_loop(), interval=2)
        stream.sink = lambda out: pytest.fail("an interval gathers tokens: no direct delivery")
        reader = asyncio.ensure_future(stream.get())
        await asyncio.sleep(0)
        stream.put(output("a"))
        assert (await asyncio.wait_for(reader, 1)).new_text == "a"
        stream.close()
    asyncio.run(scenario())


class SlowClient(Client):
    """A client whose socket fills up on demand: a send then waits, as an ASGI server's flow control does."""

    def __init__(self):
        super().__init__()
        self.writable = asyncio.Event()
        self.writable.set()

    async def send(self, message: dict) -> None:
        if not self.writable.is_set():
            await self.writable.wait()
        self.sent.append(message)


def test_direct_chunks_and_the_reader_s_chunks_go_out_in_order_when_the_socket_fills():
    """Outputs while the body waits are written from the hand-out; one whose send has to wait holds the
    next ones back (they go through the body), and every chunk still goes out once, in order."""
    async def scenario():
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, quiet_after=60.0)
        request = RequestStream(StandIn(stream), "r", stream)
        woken, closed = [], []

        async def body():
            yield b"open;"
            while not request.finished:
                out = await request.next()
                woken.append(out.new_text)
                yield f"{out.new_text};".encode()

        client = SlowClient()
        response = asyncio.ensure_future(SSEResponse(
            body(), on_close=lambda: closed.append(True),
            direct=(request, lambda out: f"{out.new_text};".encode()))({"type": "http"}, client.receive, client.send))
        await asyncio.sleep(0.01)
        for text in ("a", "b"):
            stream.put(output(text))
        assert client.body() == b"open;a;b;" and woken == []     # written at once, the body not woken
        client.writable.clear()                                  # the socket is full
        stream.put(output("c"))                                  # its send waits
        stream.put(output("d"))                                  # held back: the body takes it
        stream.put(output("e"))
        await asyncio.sleep(0.01)
        assert client.body() == b"open;a;b;"
        client.writable.set()
        await asyncio.sleep(0.01)
        assert client.body() == b"open;a;b;c;de;"                # (d and e merged while the body waited)
        stream.put(output("f"))                                  # the body waits again: direct again
        assert client.body().endswith(b"f;") and woken == ["de"]
        stream.put(output("end", finished=True))
        await asyncio.wait_for(response, 5)
        assert client.body() == b"open;a;b;c;de;f;end;" and woken == ["de", "end"] and closed
        assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    asyncio.run(scenario())


def direct_request() -> tuple[_Stream, StandIn, RequestStream, object]:
    """On the running loop: a request's stream (its engine a StandIn) and a body writing each output's text."""
    stream = _Stream(asyncio.get_running_loop(), quiet_after=60.0)
    engine = StandIn(stream)
    request = RequestStream(engine, "r", stream)

    async def body():
        while not request.finished:
            yield (await request.next()).new_text.encode()
    return stream, engine, request, body


def test_a_client_leaving_while_a_direct_chunk_waits_ends_the_request():
    async def scenario():
        stream, engine, request, body = direct_request()

        client = SlowClient()
        response = asyncio.ensure_future(SSEResponse(
            body(), on_close=request.close, direct=(request, lambda out: out.new_text.encode()))(
                {"type": "http"}, client.receive, client.send))
        await asyncio.sleep(0.01)
        client.writable.clear()
        stream.put(output("stuck"))                  # its send waits for a socket that never drains
        await asyncio.sleep(0.01)
        client.gone.set()                            # the client leaves
        await asyncio.wait_for(response, 5)          # the request is aborted, the response ends
        assert engine.aborted == ["r"] and request.closed and b"stuck" not in client.body()
    asyncio.run(scenario())


def test_a_chunk_that_fails_to_encode_is_left_to_the_body():
    """The body meets the same error itself and ends the stream with it (the last event)."""
    async def scenario():
        stream = _Stream(asyncio.get_running_loop(), quiet_after=60.0)
        request = RequestStream(StandIn(stream), "r", stream)

        def encode(out):
            if out.new_text == "bad":
                raise ValueError("cannot encode")
            return f"{out.new_text};".encode()

        async def body():
            try:
                while not request.finished:
                    yield encode(await request.next())
            except ValueError:
                yield b"error;"
            finally:
                request.close()

        client = Client()
        response = asyncio.ensure_future(SSEResponse(body(), on_close=request.close, direct=(request, encode))(
            {"type": "http"}, client.receive, client.send))
        await asyncio.sleep(0.01)
        stream.put(output("ok"))
        stream.put(output("bad"))
        await asyncio.wait_for(response, 5)
        assert client.body() == b"ok;error;" and request.closed
    asyncio.run(scenario())


def test_the_body_goes_to_the_send_the_app_was_called_with_once_the_headers_are_out():
    """Past the middleware's send wrappers, which only note that a response has started."""
    async def body():
        yield b"a"
        yield b"b"

    async def scenario():
        client, wrapped = Client(), []

        async def wrapper(message):
            wrapped.append(message["type"])
            await client.send(message)
        await SSEResponse(body())({"type": "http", APP_SEND: client.send}, client.receive, wrapper)
        assert wrapped == ["http.response.start"]
        assert client.body() == b"ab" and client.sent[-1]["more_body"] is False
    asyncio.run(scenario())


def test_middleware_outside_the_app_send_middleware_sees_every_message():
    """FastAPI's telemetry and the server-error middleware wrap the send outside it: they must see the
    last body message (telemetry closes the request's span there); the wrappers inside see the start."""
    outer, inner = [], []

    async def body():
        yield b"a"

    async def scenario():
        client = Client()

        async def endpoint(scope, receive, send):
            async def inner_send(message):
                inner.append(message.get("more_body", message["type"]))
                await send(message)
            await SSEResponse(body())(scope, receive, inner_send)

        async def outer_send(message):
            outer.append(message.get("more_body", message["type"]))
            await client.send(message)
        await AppSendMiddleware(endpoint)({"type": "http"}, client.receive, outer_send)
        assert outer == ["http.response.start", True, False] and inner == ["http.response.start"]
    asyncio.run(scenario())


def test_direct_chunks_are_sent_in_the_request_s_context():
    """The engine's hand-out runs in no request's context; a send wrapper that reads (or sets and resets) a
    context variable must see the request's, whether its send ends at once or has to wait."""
    var = contextvars.ContextVar("var", default="elsewhere")
    seen = []

    async def scenario():
        stream, _, request, body = direct_request()
        client = SlowClient()

        async def send(message):
            token = var.set(var.get() + "+")
            try:
                await client.send(message)          # may wait (the socket is full)
            finally:
                var.reset(token)                    # in another context: ValueError
            seen.append(var.get())

        async def serve():
            var.set("request")
            await SSEResponse(body(), direct=(request, lambda out: out.new_text.encode()))(
                {"type": "http"}, client.receive, send)

        response = asyncio.ensure_future(serve())
        await asyncio.sleep(0.01)
        stream.put(output("a"))                     # direct, at once
        client.writable.clear()
        stream.put(output("b"))                     # direct, waits
        await asyncio.sleep(0.01)
        client.writable.set()
        await asyncio.sleep(0.01)
        stream.put(output("end", finished=True))
        await asyncio.wait_for(response, 5)
        assert client.body() == b"abend" and seen == ["request"] * 5   # start, a, b, end, the last message
    asyncio.run(scenario())


def test_nothing_is_written_after_a_direct_chunk_s_send_failed():
    async def scenario():
        stream, engine, request, body = direct_request()

        client = SlowClient()
        sent = client.send

        async def failing(message):
            await sent(message)
            if message.get("body") == b"stuck":
                raise RuntimeError("the server broke")  # not a departure: logged, the response ends

        response = asyncio.ensure_future(SSEResponse(
            body(), on_close=request.close, direct=(request, lambda out: out.new_text.encode()))(
                {"type": "http"}, client.receive, failing))
        await asyncio.sleep(0.01)
        client.writable.clear()
        stream.put(output("stuck"))                 # its send waits, then fails
        stream.put(output("next"))                  # the body takes it, after the failed one
        await asyncio.sleep(0.01)
        client.writable.set()
        await asyncio.wait_for(response, 5)
        assert client.body() == b"stuck" and engine.aborted == ["r"] and request.closed
    asyncio.run(scenario())


def test_an_output_whose_encoding_failed_fails_again_without_running_its_builder_twice():
    from kvserve.server.serving import chunk_encoder
    calls = []

    def events(out):
        calls.append(out.new_text)
        if out.new_text == "bad":
            raise ValueError("cannot build")
        return [{"text": out.new_text}]

    encode = chunk_encoder(events)
    bad = output("bad")
    for _ in range(2):
        with pytest.raises(ValueError, match="cannot build"):
            encode(bad)
    assert calls == ["bad"]                         # (builders keep state: text so far, a tool parser)
    assert encode(output("ok")) == b'data: {"text":"ok"}\n\n' and calls == ["bad", "ok"]

"""Nothing a client sends stalls the others: a 20 MiB body is refused at once while streams keep
their pace, scrapes never wait for a step, and a dead engine takes the process down non-zero."""
from __future__ import annotations

import asyncio
import gc
import os
import signal
import time

import httpx
import pytest

from kvserve import AsyncEngine, EngineConfig
from kvserve.server.app import GC_YOUNG_THRESHOLD, create_app
from test_server_api import running_server

STREAM = {"inputs": "steady", "parameters": {"max_new_tokens": 160, "ignore_eos": True}}


@pytest.fixture(scope="module")
def server(demo_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server-pressure") / "kvserve.log"
    with running_server(demo_model_dir, log, "--num-kv-blocks", "128", "--max-num-seqs", "8",
                        "--log-level", "warning") as s:
        yield s


async def timed_stream(client: httpx.AsyncClient, started: asyncio.Event) -> tuple[str, float]:
    """The streamed text and the longest gap between two of its events."""
    text, gaps, last = [], [], None
    async with client.stream("POST", "/generate_stream", json=STREAM) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            now = time.monotonic()
            if last is not None:
                gaps.append(now - last)
            last = now
            started.set()
            text.append(line)
    return "\n".join(text), max(gaps)


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions"])
def test_a_20_mib_body_is_refused_at_once_while_streams_keep_their_pace(server, path):
    body = b'{"inputs": "' + b"x" * (20 * 2**20) + b'"}'

    async def main():
        async with httpx.AsyncClient(base_url=server.base, timeout=60) as client:
            undisturbed, _ = await timed_stream(client, asyncio.Event())
            started = [asyncio.Event() for _ in range(3)]
            streams = [asyncio.create_task(timed_stream(client, e)) for e in started]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
            began = time.monotonic()
            try:
                refused = await client.post(path, content=body, headers={"content-type": "application/json"})
                status = refused.status_code
            except httpx.TransportError:   # the server may close before the client finished sending
                status = None
            elapsed = time.monotonic() - began
            results = await asyncio.gather(*streams)
            return undisturbed, status, elapsed, results

    undisturbed, status, elapsed, results = asyncio.run(main())
    assert status in (413, None) and elapsed < 3, (status, elapsed)
    for text, longest_gap in results:
        assert text.count("data:") == 160 and longest_gap < 2, longest_gap
    # greedy streams are the same text whatever else happened (events differ only in nothing)
    assert all(text.split("\n")[-1].split('"generated_text":')[1] == undisturbed.split("\n")[-1].split(
        '"generated_text":')[1] for text, _ in results)
    assert httpx.get(f"{server.base}/health", timeout=5).status_code == 200


def test_scrapes_never_wait_for_a_step(demo_model_dir):
    """/metrics, /info and /health answer at once while the engine is stuck in a step (here its
    process is stopped: it reads nothing and sends nothing). While serving, the heap loaded at start is
    frozen and young collections are rarer; both are undone at shutdown."""
    engine = AsyncEngine(EngineConfig(model=demo_model_dir, num_kv_blocks=64, device="cpu"))
    app = create_app(engine, "demo")
    thresholds = gc.get_threshold()

    async def main():
        async with app.router.lifespan_context(app):
            assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *thresholds[1:]) and gc.get_freeze_count() > 0
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://kvserve", timeout=30) as client:
                os.kill(engine.pid, signal.SIGSTOP)
                try:
                    busy = asyncio.create_task(client.post("/generate", json={"inputs": "hi",
                                                                              "parameters": {"max_new_tokens": 2}}))
                    await asyncio.sleep(0.2)
                    times = []
                    for path in ["/metrics"] * 20 + ["/info", "/health"]:
                        began = time.monotonic()
                        r = await client.get(path)
                        times.append(time.monotonic() - began)
                        assert r.status_code == 200, (path, r.text)
                    assert not busy.done()
                finally:
                    os.kill(engine.pid, signal.SIGCONT)
                assert (await busy).status_code == 200
                return times

    times = asyncio.run(main())
    assert max(times) < 0.5, times
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0

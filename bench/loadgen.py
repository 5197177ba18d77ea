"""An online load generator for OpenAI (/v1/completions) and TGI (/generate_stream) streaming servers."""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

from kvserve.bench.common import summarize

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
PRINTABLE = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,"


@dataclass(slots=True)
class TextRequest:
    prompt: str
    max_tokens: int


@dataclass(slots=True)
class Outcome:
    ok: bool
    sent: float
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    token_times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def check_loopback(url: str) -> str:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK and not host.startswith("127."):
        raise SystemExit(f"refusing {url}: this benchmark only talks to loopback addresses (127.0.0.1, ::1)")
    return url.rstrip("/")


def text_workload(num: int, prompt_len: tuple[int, int], output_len: tuple[int, int], seed: int) -> list[TextRequest]:
    """Random printable prompts: one token per character with a byte-level tokenizer."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        plen, olen = rng.randint(*prompt_len), rng.randint(*output_len)
        out.append(TextRequest("".join(rng.choice(PRINTABLE) for _ in range(plen)), olen))
    return out


class Client:
    """Streams one request and times every token. api: "openai" or "tgi".

    aiohttp, one session with unbounded keep-alive connections: a request's bytes go out in the first
    run of its task. httpx (this client before) spent ~0.3 ms of Python per request before its first
    write, so a burst of 256 reached the server over ~80 ms while the server sat idle (on a 2-core AMD
    EPYC the served burst took 2.5-8% longer with it, two alternated pairs). `timeout` bounds the
    connect and each wait for data, not the whole stream (as httpx's did)."""

    LINE_LIMIT = 8 * 2**20   # the longest event line read (a TGI stream's last event holds the whole text)

    def __init__(self, url: str, api: str, model: str, ignore_eos: bool, timeout: float):
        self.url, self.api, self.model, self.ignore_eos = check_loopback(url), api, model, ignore_eos
        self.timeout = timeout
        self.session = None   # made on first use, inside the running loop (aiohttp binds it there)
        self.loop = None

    @property
    def http(self):
        import aiohttp
        loop = asyncio.get_running_loop()
        if self.session is None or self.loop is not loop:   # (a session cannot outlive its loop)
            self.session, self.loop = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),   # as many connections as requests in flight
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(30.0, self.timeout),
                                              sock_read=self.timeout),
                read_bufsize=self.LINE_LIMIT // 2), loop   # aiohttp refuses a line over twice this
        return self.session

    async def close(self) -> None:
        if self.session is not None and self.loop is asyncio.get_running_loop():
            await self.session.close()
        self.session = self.loop = None

    def _body(self, req: TextRequest) -> tuple[str, dict]:
        if self.api == "openai":
            body = {"model": self.model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            if self.ignore_eos:
                body["ignore_eos"] = True
            return f"{self.url}/v1/completions", body
        params = {"max_new_tokens": req.max_tokens, "do_sample": False, "details": True}
        return f"{self.url}/generate_stream", {"inputs": req.prompt, "parameters": params, "stream": True}

    async def send(self, req: TextRequest) -> Outcome:
        url, body = self._body(req)
        out = Outcome(ok=False, sent=time.perf_counter())
        usage = None
        try:
            async with self.http.post(url, json=body) as resp:
                if resp.status != 200:
                    text = (await resp.read()).decode(errors="replace")[:200]
                    out.error = f"HTTP {resp.status}: {text}"
                    return out
                async for raw in resp.content:     # one line at a time
                    if not raw.startswith(b"data:"):
                        continue
                    data = raw[5:].strip()
                    if data == b"[DONE]":
                        await resp.content.read()   # the body's end, so the connection is kept for reuse
                        break
                    now = time.perf_counter()
                    msg = json.loads(data.decode(errors="replace"))
                    if "error" in msg and msg["error"]:
                        out.error = str(msg["error"])[:200]
                        return out
                    n, usage = self._tokens_in(msg, usage)
                    for _ in range(n):
                        out.token_times.append(now)
        except asyncio.TimeoutError:
            out.error = f"TimeoutError: no answer or data for {self.timeout:g} s"
            return out
        except Exception as exc:  # any transport failure counts as an error for this request
            out.error = f"{type(exc).__name__}: {exc}"[:200]
            return out
        end = time.perf_counter()
        if not out.token_times:
            out.error = "no tokens received"
            return out
        out.ok = True
        out.ttft = out.token_times[0] - out.sent
        out.e2e = end - out.sent
        out.output_tokens = usage.get("completion_tokens", len(out.token_times)) if usage else len(out.token_times)
        out.prompt_tokens = usage.get("prompt_tokens") if usage else None
        return out

    def _tokens_in(self, msg: dict, usage: dict | None) -> tuple[int, dict | None]:
        """Tokens this event carries (a chunk with text counts as one) and the usage block when present."""
        if self.api == "openai":
            usage = msg.get("usage") or usage
            choices = msg.get("choices") or []
            return (1 if choices and choices[0].get("text") else 0), usage
        details = msg.get("details")
        if details:
            usage = {"completion_tokens": details.get("generated_tokens")}
        return (1 if msg.get("token") is not None else 0), usage


async def run_poisson(client: Client, reqs: list[TextRequest], rate: float, seed: int, bar=None) -> tuple[list, float]:
    """Send `reqs` with exponential gaps at `rate` requests/s (inf: all at once); return outcomes and duration."""
    rng = random.Random(seed)
    start = time.perf_counter()
    tasks, t = [], 0.0
    for req in reqs:
        delay = start + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_tracked(client, req, bar)))
        t += rng.expovariate(rate) if math.isfinite(rate) else 0.0
    outcomes = await asyncio.gather(*tasks)
    return outcomes, time.perf_counter() - start


async def run_concurrency(client: Client, reqs: list[TextRequest], concurrency: int, bar=None) -> tuple[list, float]:
    """Keep `concurrency` requests in flight until all are done."""
    queue = list(enumerate(reqs))[::-1]
    outcomes: list = [None] * len(reqs)

    async def worker():
        while queue:
            i, req = queue.pop()
            outcomes[i] = await _tracked(client, req, bar)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes, time.perf_counter() - start


async def _tracked(client: Client, req: TextRequest, bar) -> Outcome:
    out = await client.send(req)
    if bar is not None:
        bar.update(1)
    return out


def summarize_point(outcomes: list[Outcome], duration: float) -> dict:
    ok = [o for o in outcomes if o.ok]
    errors = [o.error for o in outcomes if not o.ok]
    out_tokens = sum(o.output_tokens for o in ok)
    chunks = sum(len(o.token_times) for o in ok)
    return {
        "requests": len(outcomes), "completed": len(ok), "errors": len(errors),
        "error_samples": sorted(set(errors))[:3], "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else math.nan,
        "output_tokens": out_tokens, "tokens_per_chunk": out_tokens / chunks if chunks else math.nan,
        "output_tokens_per_s": out_tokens / duration if duration else math.nan,
        "ttft_s": summarize([o.ttft for o in ok]),
        "tpot_s": summarize([o.tpot for o in ok if o.tpot is not None]),
        "itl_s": summarize([x for o in ok for x in o.itls]),
        "e2e_s": summarize([o.e2e for o in ok]),
    }

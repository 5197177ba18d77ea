"""EngineMetrics against a real AsyncEngine on the demo model: values, not just names."""
from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvserve import AsyncEngine, EngineConfig, EngineStats, SamplingParams
from kvserve.server.metrics import FAILURE_REASONS, SUCCESS_REASONS, EngineMetrics, format_log_line

MODEL = "demo"


def make_engine(path: str, num_kv_blocks: int, **kw) -> AsyncEngine:
    cfg = EngineConfig(model=path, device="cpu", dtype="float32", num_kv_blocks=num_kv_blocks, block_size=16,
                       max_num_batched_tokens=kw.pop("max_num_batched_tokens", 256), **kw)
    engine = AsyncEngine(cfg)
    engine.start()
    return engine


@pytest.fixture
def engine_factory(demo_model_dir):
    engines = []

    def factory(num_kv_blocks: int, **kw):
        engine = make_engine(demo_model_dir, num_kv_blocks, **kw)
        engines.append(engine)
        return engine, EngineMetrics(engine, MODEL)

    yield factory
    for engine in engines:
        engine.shutdown()


def scrape(metrics: EngineMetrics) -> dict[tuple[str, frozenset], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            assert s.labels.get("model_name") == MODEL, s
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples[(name, frozenset({"model_name": MODEL, **labels}.items()))]


def prompt_ids(n: int, seed: int) -> list[int]:
    return [(seed * 31 + i * 7) % 250 + 1 for i in range(n)]


async def run_one(engine: AsyncEngine, ids: list[int], max_tokens: int):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    last = None
    async for out in engine.generate(ids, params):
        last = out
    return last


async def run_many(engine: AsyncEngine, prompts: list[list[int]], max_tokens: int):
    return await asyncio.gather(*(run_one(engine, p, max_tokens) for p in prompts))


def test_series_exist_at_zero_and_capacity_matches_config(engine_factory):
    engine, metrics = engine_factory(40)
    s = scrape(metrics)
    assert value(s, "kvserve_kv_cache_capacity_blocks") == 40
    assert value(s, "kvserve_kv_cache_block_size_tokens") == 16
    assert value(s, "kvserve_kv_cache_usage_ratio") == 0
    assert value(s, "kvserve_kv_cache_blocks", state="free") + value(s, "kvserve_kv_cache_blocks", state="cached") == 40
    assert value(s, "kvserve_engine_up") == 1
    for reason in SUCCESS_REASONS:
        assert value(s, "kvserve_request_success_total", finish_reason=reason) == 0
    for reason in FAILURE_REASONS:
        assert value(s, "kvserve_request_failure_total", reason=reason) == 0
    for name in ("kvserve_prefix_cache_query_tokens_total", "kvserve_prefix_cache_hit_tokens_total",
                 "kvserve_preemptions_total", "kvserve_prompt_tokens_total", "kvserve_generation_tokens_total",
                 "kvserve_requests_running", "kvserve_requests_waiting", "kvserve_time_to_first_token_seconds_count",
                 "kvserve_inter_token_latency_seconds_count", "kvserve_e2e_request_latency_seconds_count",
                 "kvserve_request_queue_time_seconds_count", "kvserve_step_tokens_count",
                 "kvserve_kernel_late_compiles_total"):
        assert value(s, name) == 0, name


def test_usage_rises_under_load_and_returns_to_idle(engine_factory):
    engine, metrics = engine_factory(64)
    peak = {"usage": 0.0, "running": 0.0}

    async def main():
        task = asyncio.ensure_future(run_many(engine, [prompt_ids(100, k) for k in range(6)], 40))
        while not task.done():
            s = scrape(metrics)
            peak["usage"] = max(peak["usage"], value(s, "kvserve_kv_cache_usage_ratio"))
            peak["running"] = max(peak["running"], value(s, "kvserve_requests_running"))
            await asyncio.sleep(0.005)
        return await task

    outs = asyncio.run(main())
    assert all(o.finish_reason == "length" for o in outs)
    assert peak["usage"] >= 0.5, peak
    assert peak["running"] >= 2, peak
    s = scrape(metrics)
    assert value(s, "kvserve_kv_cache_usage_ratio") == 0
    assert value(s, "kvserve_kv_cache_blocks", state="used") == 0
    assert value(s, "kvserve_kv_cache_blocks", state="cached") > 0   # prefixes stay reusable
    assert value(s, "kvserve_requests_running") == value(s, "kvserve_requests_waiting") == 0
    assert value(s, "kvserve_generation_tokens_total") == 6 * 40
    assert value(s, "kvserve_prompt_tokens_total") >= 6 * 100
    assert value(s, "kvserve_step_tokens_sum") == value(s, "kvserve_prompt_tokens_total") + value(
        s, "kvserve_generation_tokens_total") - 6   # the last sampled token of each request is never fed back


def test_hit_tokens_grow_when_a_prompt_repeats(engine_factory):
    engine, metrics = engine_factory(64)
    ids = prompt_ids(90, 3)
    asyncio.run(run_one(engine, ids, 4))
    first = scrape(metrics)
    assert value(first, "kvserve_prefix_cache_hit_tokens_total") == 0
    assert value(first, "kvserve_prefix_cache_query_tokens_total") > 0
    out = asyncio.run(run_one(engine, ids, 4))
    second = scrape(metrics)
    hit = value(second, "kvserve_prefix_cache_hit_tokens_total")
    assert hit >= 16 * ((90 - 1) // 16) - 16 and hit == out.num_cached_tokens
    assert value(second, "kvserve_prefix_cache_query_tokens_total") > value(
        first, "kvserve_prefix_cache_query_tokens_total")
    assert hit == engine.stats().prefix_hit_tokens


def test_latency_histograms_count_each_request_once(engine_factory):
    engine, metrics = engine_factory(64)
    n, max_tokens = 5, 12
    asyncio.run(run_many(engine, [prompt_ids(30, k) for k in range(n)], max_tokens))
    s = scrape(metrics)
    assert value(s, "kvserve_time_to_first_token_seconds_count") == n
    assert value(s, "kvserve_e2e_request_latency_seconds_count") == n
    assert value(s, "kvserve_request_queue_time_seconds_count") == n
    assert value(s, "kvserve_inter_token_latency_seconds_count") == n * (max_tokens - 1)
    assert value(s, "kvserve_request_success_total", finish_reason="length") == n
    assert value(s, "kvserve_time_to_first_token_seconds_sum") > 0
    inf = value(s, "kvserve_time_to_first_token_seconds_bucket", le="+Inf")
    assert inf == n and value(s, "kvserve_e2e_request_latency_seconds_bucket", le="3600.0") == n


def test_preemptions_counted_when_the_pool_is_small(engine_factory):
    # 10 blocks of 16 tokens; each request grows to 20 + 60 tokens = 5 blocks, four of them at once.
    engine, metrics = engine_factory(10)
    outs = asyncio.run(run_many(engine, [prompt_ids(20, k) for k in range(4)], 60))
    assert all(len(o.token_ids) == 60 for o in outs)
    s = scrape(metrics)
    assert value(s, "kvserve_preemptions_total") >= 1
    assert value(s, "kvserve_preemptions_total") == engine.stats().num_preemptions
    assert value(s, "kvserve_time_to_first_token_seconds_count") == 4     # preemption does not count twice
    assert value(s, "kvserve_kv_cache_usage_ratio") == 0


def test_abort_counts_as_failure_once(engine_factory):
    engine, metrics = engine_factory(32)

    async def main():
        agen = engine.generate(prompt_ids(20, 1), SamplingParams(max_tokens=200, temperature=0, ignore_eos=True),
                               request_id="gone")
        await agen.__anext__()
        await agen.aclose()          # what a client disconnect does
        for _ in range(200):
            if engine.num_unfinished() == 0 and engine.stats().num_running == 0:
                return
            await asyncio.sleep(0.01)

    asyncio.run(main())
    metrics.record_failure("aborted", request_id="gone")   # the server saw the disconnect too
    metrics.record_failure("validation")
    s = scrape(metrics)
    assert value(s, "kvserve_request_failure_total", reason="aborted") == 1
    assert value(s, "kvserve_request_failure_total", reason="validation") == 1
    assert sum(value(s, "kvserve_request_success_total", finish_reason=r) for r in SUCCESS_REASONS) == 0
    assert value(s, "kvserve_e2e_request_latency_seconds_count") == 0
    assert value(s, "kvserve_kv_cache_usage_ratio") == 0


def test_log_line_and_loop(engine_factory, caplog):
    prev = EngineStats(64, 16, 0, 0, 64, 0, 0, 0, 0, 0, 0, 0, 0)
    cur = EngineStats(64, 16, 16, 8, 40, 200, 50, 3, 2, 1, 1000, 500, 90)
    line = format_log_line(prev, cur, 5.0)
    for part in ("prompt 200.0 tok/s", "generation 100.0 tok/s", "running 3", "waiting 2", "KV usage 25.0%",
                 "prefix hit rate 25.0%", "preemptions 1"):
        assert part in line, line
    engine, metrics = engine_factory(64)
    with caplog.at_level(logging.INFO, logger="kvserve.server.metrics"):
        metrics.start_log_loop(interval=0.05)
        # 200 tokens each: the load spans many 0.05 s intervals (30 could end inside the first one, and
        # the loop stops before logging the interval it ended in)
        asyncio.run(run_many(engine, [prompt_ids(60, k) for k in range(3)], 200))
        metrics.stop_log_loop()
    assert any("tok/s" in r.getMessage() and "KV usage" in r.getMessage() for r in caplog.records)


def test_scrape_survives_a_broken_engine():
    class Broken:
        is_running = False

        def add_step_listener(self, fn):
            pass

        def add_finish_listener(self, fn):
            pass

        def stats(self):
            raise RuntimeError("engine gone")

    s = scrape(EngineMetrics(Broken(), MODEL))
    assert value(s, "kvserve_engine_up") == 0
    assert value(s, "kvserve_request_failure_total", reason="engine_error") == 0

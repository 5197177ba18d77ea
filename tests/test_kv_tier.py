"""The host-memory KV tier (--kv-offload-memory) and the live cache map (GET /kv) through a real
server and a real engine process: prefix blocks evicted from a small device pool come back from the
host tier with unchanged outputs, the metrics and usage count both tiers, and /kv describes every
block and request consistently while other clients stream."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvserve import AsyncEngine, EngineConfig, EngineDeadError, SamplingParams
from faults import poison_forward
from test_server_api import MODEL, running_server

KEY = "kv-map-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NUM_BLOCKS = 24     # 16-token blocks: one 200-token conversation takes 13 of them
TOP_KEYS = {"time", "step", "block_size", "device", "host", "requests", "prefix_cache", "offload"}


@pytest.fixture(scope="module")
def server(demo_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("kv-tier") / "server.log"
    with running_server(demo_model_dir, log, "--num-kv-blocks", str(NUM_BLOCKS), "--block-size", "16",
                        "--kv-offload-memory", "8MiB", "--api-key", KEY) as s:
        yield s


def metrics(base: str) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {(s.name, frozenset((k, v) for k, v in s.labels.items() if k != "model_name")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def kv_map(base: str) -> dict:
    r = httpx.get(f"{base}/kv", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    return r.json()


def completion(base: str, prompt: str, max_tokens: int = 8) -> dict:
    r = httpx.post(f"{base}/v1/completions", headers=AUTH, timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def conversation(i: int) -> str:
    return f"conversation {i}: " + " ".join(f"w{(i * 37 + k) % 97}" for k in range(60))


def test_kv_needs_the_key_and_its_page_does_not(server):
    assert httpx.get(f"{server.base}/kv", timeout=10).status_code == 401
    assert httpx.get(f"{server.base}/kv", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    page = httpx.get(f"{server.base}/kv/view", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text, "the page must load nothing from outside"
    assert httpx.post(f"{server.base}/kv", headers=AUTH, timeout=10).status_code == 405


def test_a_conversation_evicted_from_the_device_pool_comes_back_from_the_host_tier(server):
    first = [completion(server.base, conversation(i)) for i in range(3)]
    before = metrics(server.base)
    assert before[("kvserve_kv_offload_stored_blocks_total", frozenset())] > 0
    capacity = before[("kvserve_kv_offload_capacity_blocks", frozenset())]
    assert capacity > 3 * 13
    again = completion(server.base, conversation(0))
    after = metrics(server.base)
    # greedy: the same answer, from K/V copied back instead of recomputed
    assert again["choices"][0]["text"] == first[0]["choices"][0]["text"]
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 12 * 16, again["usage"]
    host_hits = (after[("kvserve_prefix_cache_hit_tokens_by_tier_total", frozenset({("tier", "host")}))]
                 - before[("kvserve_prefix_cache_hit_tokens_by_tier_total", frozenset({("tier", "host")}))])
    assert host_hits == cached
    assert (after[("kvserve_kv_offload_loaded_blocks_total", frozenset())]
            - before[("kvserve_kv_offload_loaded_blocks_total", frozenset())]) == cached // 16
    assert (after[("kvserve_prefix_cache_hit_tokens_total", frozenset())]
            == after[("kvserve_prefix_cache_hit_tokens_by_tier_total", frozenset({("tier", "host")}))]
            + after[("kvserve_prefix_cache_hit_tokens_by_tier_total", frozenset({("tier", "device")}))])
    # the map agrees with the metrics once the server is idle
    snap = kv_map(server.base)
    m = metrics(server.base)
    assert set(snap) == TOP_KEYS and snap["requests"] == []
    dev, host = snap["device"], snap["host"]
    for state in ("used", "cached", "free"):
        assert dev[f"blocks_{state}"] == m[("kvserve_kv_cache_blocks", frozenset({("state", state)}))]
        assert dev["blocks"]["state"].count(state) == dev[f"blocks_{state}"]
    assert host["num_blocks"] == capacity and host["blocks"]["state"].count("cached") == host["blocks_cached"]
    assert host["blocks_cached"] == m[("kvserve_kv_offload_blocks", frozenset({("state", "cached")}))]
    assert snap["offload"]["blocks_reloaded"] == m[("kvserve_kv_offload_loaded_blocks_total", frozenset())]
    assert snap["prefix_cache"]["hit_tokens_host"] == host_hits + before[
        ("kvserve_prefix_cache_hit_tokens_by_tier_total", frozenset({("tier", "host")}))]
    assert snap["step"] == m[("kvserve_engine_steps_total", frozenset())]
    cached_order = sorted(o for o, s in zip(dev["blocks"]["evict_order"], dev["blocks"]["state"]) if s != "used")
    assert cached_order == list(range(NUM_BLOCKS - dev["blocks_used"]))


def test_the_map_while_other_clients_stream(server):
    """Blocks of running requests are used, owned by them, counted once per holder; hammering /kv
    changes nobody's output."""
    # two requests of 30 + 150 tokens: both fit the 384-token pool, and each runs for many map refreshes
    prompts = [conversation(10 + i)[:30] for i in range(2)]
    alone = [completion(server.base, p, max_tokens=150)["choices"][0]["text"] for p in prompts]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = completion(server.base, prompts[i], max_tokens=150)["choices"][0]["text"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    seen_running = []

    async def hammer() -> None:
        async with httpx.AsyncClient(base_url=server.base, headers=AUTH, timeout=30) as client:
            while any(t.is_alive() for t in threads):
                replies = await asyncio.gather(*(client.get("/kv") for _ in range(16)))
                assert all(r.status_code == 200 for r in replies)
                snap = replies[-1].json()
                running = [r for r in snap["requests"] if r["status"] == "running"]
                seen_running.append(len(running))
                dev = snap["device"]
                holders: dict[int, list[str]] = {}
                for req in running:
                    assert len(req["block_table"]) * 16 >= req["num_computed_tokens"]
                    assert req["num_computed_tokens"] <= req["num_tokens"]
                    for block in req["block_table"]:
                        holders.setdefault(block, []).append(req["id"])
                for block, ids in holders.items():
                    assert dev["blocks"]["state"][block] == "used"
                    assert dev["blocks"]["ref_cnt"][block] == len(ids)
                    assert sorted(dev["owners"][str(block)]) == sorted(ids)
                assert sum(dev["blocks"]["ref_cnt"]) == sum(len(ids) for ids in holders.values())
                text = replies[-1].text
                assert not any(p[:25] in text for p in prompts), "the map must not carry prompt text"

    asyncio.run(hammer())
    for t in threads:
        t.join()
    assert max(seen_running, default=0) >= 1, seen_running
    assert [results[i] for i in range(2)] == alone


def test_a_snapshot_waiter_is_failed_not_left_waiting_when_the_engine_dies(demo_model_dir):
    engine = AsyncEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", num_kv_blocks=16))
    engine.start()
    try:
        snap = json.loads(asyncio.run(engine.kv_snapshot_json()))
        assert snap["host"] is None and snap["device"]["num_blocks"] == 16

        async def main():
            os.kill(engine.pid, signal.SIGSTOP)      # the engine cannot answer...
            waiter = asyncio.ensure_future(engine.kv_snapshot_json(max_age=0))
            await asyncio.sleep(0.3)
            assert not waiter.done()
            os.kill(engine.pid, signal.SIGKILL)      # ...and then dies
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(waiter, 20)
        asyncio.run(main())
        with pytest.raises(EngineDeadError):
            asyncio.run(engine.kv_snapshot_json())
    finally:
        engine.shutdown()


def test_offline_engine_snapshot_and_config_errors(demo_model_dir):
    from kvserve import LLM
    llm = LLM(demo_model_dir, device="cpu", num_kv_blocks=8, block_size=16, kv_offload_memory="1MiB")
    llm.generate(["a prompt long enough to fill two blocks of sixteen tokens each, at least"],
                 SamplingParams(max_tokens=2, temperature=0))
    snap = llm.engine.kv_snapshot()
    assert snap["host"]["num_blocks"] == llm.engine.kv_pool.num_host_blocks > 0
    assert snap["device"]["blocks_cached"] >= 2
    with pytest.raises(ValueError, match="prefix caching"):
        EngineConfig(model=demo_model_dir, kv_offload_memory="1MiB", enable_prefix_caching=False) and LLM(
            demo_model_dir, device="cpu", kv_offload_memory="1MiB", enable_prefix_caching=False)
    with pytest.raises(ValueError, match="holds no KV block"):
        LLM(demo_model_dir, device="cpu", kv_offload_memory="1KB")
    with pytest.raises(ValueError, match="cannot parse size"):
        EngineConfig(model=demo_model_dir, kv_offload_memory="lots")


def test_a_step_that_fails_in_part_moves_its_blocks_once(demo_model_dir, monkeypatch):
    """A request that breaks the forward of a step full of host-tier reloads fails alone: the step's
    block copies ran once, before the retries, and every other request gets its undisturbed tokens."""
    from kvserve import LLM
    llm = LLM(demo_model_dir, device="cpu", block_size=8, num_kv_blocks=20, max_num_batched_tokens=64,
              kv_offload_memory="4MiB")
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [conversation(20 + i)[:70] for i in range(4)]
    undisturbed = [llm.generate([p], greedy)[0].token_ids for p in prompts]   # each evicts the one before
    assert llm.engine.stats().offload_blocks_stored > 0
    used = {t for p in prompts for t in llm.engine.encode(p)} | {t for ids in undisturbed for t in ids}
    poison = poison_forward(llm, monkeypatch, used)
    loaded = llm.engine.stats().offload_blocks_loaded
    outs = llm.generate(prompts + [[poison, 1, 2]], [greedy] * 5)
    assert outs[-1].finish_reason == "error" and "cannot take this request" in outs[-1].error
    assert [o.token_ids for o in outs[:-1]] == undisturbed
    assert llm.engine.stats().offload_blocks_loaded > loaded
    monkeypatch.undo()
    assert [o.token_ids for o in llm.generate(prompts, greedy)] == undisturbed
    assert llm.engine.stats().blocks_used == 0


# Loaded by the engine process (PYTHONPATH): its first KV map raises.
FIRST_MAP_FAILS = """
import kvserve.engine
_build = kvserve.engine.EngineCore.kv_snapshot
_calls = []
def kv_snapshot(self):
    _calls.append(1)
    if len(_calls) == 1:
        raise ValueError("the map broke")
    return _build(self)
kvserve.engine.EngineCore.kv_snapshot = kv_snapshot
"""


def test_a_map_that_cannot_be_built_fails_its_callers_not_the_engine(demo_model_dir, tmp_path, monkeypatch):
    (tmp_path / "sitecustomize.py").write_text(FIRST_MAP_FAILS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    engine = AsyncEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", num_kv_blocks=16))
    engine.start()
    try:
        async def main():
            with pytest.raises(RuntimeError, match="the map broke"):
                await engine.kv_snapshot_json()
            last = None
            async for out in engine.generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0)):
                last = out
            assert last.finished and len(last.token_ids) == 3
            return json.loads(await engine.kv_snapshot_json())
        snap = asyncio.run(main())
        assert snap["device"]["num_blocks"] == 16 and engine.is_running
    finally:
        engine.shutdown()

"""GET /kv/view, the live KV cache map, in a real headless browser: Debian's `chromium` and `chromium-driver`
(.ci/prometheus.sh installs them) driven by selenium, against a real `kvserve serve` on the demo model.

The page loads with no console errors, draws, updates while requests run, highlights a request's blocks on
hover, and once the load ends its figures equal /metrics. With --api-key it works after the key is given in
`#key=` or typed into its form; with --kv-offload-memory it draws the host tier. A stand-in server checks the
reverse-proxy prefix, the "disconnected" state and the aggregated grid of a 100,000-block pool.

KVSERVE_KV_VIEW_SCREENSHOT=<path> saves a screenshot of the page mid-load (docs/img/kv-view.png is one)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_server_api import start_server, stop_server

API_KEY = "kv-view-test-key"
NUM_BLOCKS = 1000               # the picture's pool: 16,000 tokens of 16-token blocks
HOST_MEMORY = "4MiB"            # 512 host blocks of the demo model's 8 KiB
VIEWPORT = (1400, 900)
USED, CACHED, FREE = (0x25, 0x63, 0xEB), (0xF5, 0x9E, 0x0B), (0xE2, 0xE8, 0xF0)   # the page's --used/--cached/--free
SYSTEM = "You are a careful assistant. Read the document, then answer in full sentences. " * 5


# ---- the browser ----

def browser_paths() -> tuple[str, str]:
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = ("chromium and chromedriver are not installed (Debian packages chromium and chromium-driver; "
              "see .ci/prometheus.sh)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " and CI=true")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def driver():
    chromium, chromedriver = browser_paths()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager (which may download) is never run.
    d = webdriver.Chrome(service=webdriver.ChromeService(executable_path=chromedriver), options=options)
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False})
    try:
        yield d
    finally:
        d.quit()


def console_errors(driver) -> list[str]:
    """The browser's SEVERE log entries since the last call (reading them empties the log)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def wait(what: str, check: Callable[[], Any], timeout: float = 30, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def updates(driver) -> int:
    return int(js(driver, "return +document.body.dataset.updates"))


def open_page(driver, url: str, min_updates: int = 1) -> None:
    driver.get("about:blank")      # a fresh document even where only the #fragment differs
    driver.get(url)
    wait(f"{min_updates} draws of {url}", lambda: updates(driver) >= min_updates)


def figures(driver) -> dict[str, str]:
    """id -> data-value (the raw JSON value as text) of every `fig-*` element."""
    return js(driver, "return Object.fromEntries([...document.querySelectorAll('[id^=fig-]')]"
                      ".map(e => [e.id.slice(4), e.dataset.value]))")


def colour_counts(driver, canvas_id: str) -> dict[str, int]:
    """Pixels of the canvas in the used, cached and free colours (and `painted`: any opaque pixel)."""
    return js(driver, """
        const c = document.getElementById(arguments[0]);
        if (!c.width || !c.height) return {painted: 0};
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, out = {painted: 0};
        const named = Object.entries(arguments[1]);
        for (let i = 0; i < d.length; i += 4) {
          if (d[i + 3] === 255) out.painted++;
          for (const [name, [r, g, b]] of named)
            if (d[i] === r && d[i + 1] === g && d[i + 2] === b && d[i + 3] === 255) out[name] = (out[name] || 0) + 1;
        }
        return out;""", canvas_id, {"used": USED, "cached": CACHED, "free": FREE})


def block_pixel(driver, block: int) -> tuple[int, int, int]:
    """The device canvas's colour at the centre of `block`'s cell."""
    return tuple(js(driver, """
        const c = document.getElementById('device-canvas'), r = c.getBoundingClientRect();
        const p = kvview.cellCenter(arguments[0]);
        return [...c.getContext('2d').getImageData(Math.floor(p.x - r.left), Math.floor(p.y - r.top), 1, 1).data]
          .slice(0, 3);""", block))


def hover_block(driver, block: int) -> None:
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    x, y = (lambda p: (int(p["x"]), int(p["y"])))(js(driver, "return kvview.cellCenter(arguments[0])", block))
    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(x, y)
    actions.perform()


# ---- the servers ----

def offload_flag_exists() -> bool:
    from kvserve.server import cli
    parser = argparse.ArgumentParser()
    cli.add_serve_flags(parser)
    return any("--kv-offload-memory" in a.option_strings for a in parser._actions)


@pytest.fixture(scope="module")
def servers(demo_model_dir, tmp_path_factory):
    """(the main server: 1,000 blocks, host tier on where kvserve has it; a keyed one: --api-key, no host tier),
    started side by side."""
    logs = tmp_path_factory.mktemp("kv-view")
    host_flags = ("--kv-offload-memory", HOST_MEMORY) if offload_flag_exists() else ()
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(start_server, demo_model_dir, logs / "main.log", "--num-kv-blocks", str(NUM_BLOCKS),
                               "--max-num-seqs", "16", *host_flags),
                   pool.submit(start_server, demo_model_dir, logs / "keyed.log", "--num-kv-blocks", "64",
                               "--api-key", API_KEY)]
    started = [f.result() for f in futures if f.exception() is None]
    try:
        for f in futures:
            f.result()              # re-raises a failed start (the other server is stopped below)
        yield started[0], started[1], bool(host_flags)
    finally:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(stop_server, started))


def metrics(base: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels without model_name) -> value."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {(s.name, frozenset((k, v) for k, v in s.labels.items() if k != "model_name")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels or ''} is not in /metrics"
    return samples[key]


def complete(base: str, prompt: str, max_tokens: int) -> None:
    r = httpx.post(f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                   "ignore_eos": True}, timeout=120)
    assert r.status_code == 200, r.text


def document(i: int, n: int) -> str:
    words = ("cache", "block", "prefix", "token", "tier", "page", "host", "evict", "reuse", "pool")
    return f"Document {i}: " + " ".join(words[(i * 7 + k * 3) % 10] for k in range(n // 6))


class Load:
    """Streams that run until stop(): closing a stream aborts its request."""

    def __init__(self, base: str, requests: list[tuple[str, int]]):
        self.base, self.stopping, self.errors = base, threading.Event(), []
        self.threads = [threading.Thread(target=self._stream, args=r, daemon=True) for r in requests]
        for t in self.threads:
            t.start()

    def _stream(self, prompt: str, max_tokens: int) -> None:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{self.base}/v1/completions", json=body, timeout=120) as r:
                if r.status_code != 200:
                    self.errors.append(f"{r.status_code}: {r.read()!r}")
                    return
                for _ in r.iter_lines():
                    if self.stopping.is_set():
                        return
        except httpx.HTTPError as exc:
            self.errors.append(repr(exc))

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=60)


@pytest.fixture(scope="module")
def loaded(servers, driver):
    """Cached prefixes first, then 12 streams; meanwhile the page is sampled, a block of a running request is
    hovered, and the screenshot taken. Ends once the engine is idle and the page has drawn an idle snapshot."""
    server, _, host_tier = servers
    base = server.base
    console_errors(driver)
    open_page(driver, f"{base}/kv/view")
    initial = {"figures": figures(driver), "colours": colour_counts(driver, "device-canvas")}
    # Eight documents computed and finished: their blocks stay in the pool as cached prefixes (~480 blocks).
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: complete(base, SYSTEM + document(i, 900), 4), range(8)))
    # Four long answers after the shared instructions, two re-reads of cached documents and six new documents
    # (~580 blocks): more than the pool holds, so the oldest cached blocks are evicted (to the host tier when it
    # is on). Every prompt + output fits the demo model's 2,048 tokens.
    load = Load(base, [(SYSTEM + f"Question {i}: why are blocks {i} pages?", 1550) for i in range(4)]
                + [(SYSTEM + document(i, 900) + " Summarise it.", 500) for i in range(2)]
                + [(SYSTEM + document(10 + i, 1550), 80) for i in range(6)])
    samples: list[dict] = []
    hover: dict = {}
    try:
        def sample() -> dict:
            f = figures(driver)
            samples.append({"updates": updates(driver), "step": int(f["step"] or -1), "used": int(f["used"] or 0),
                            "running": int(f["running"] or 0)})
            return samples[-1]

        wait("the page to show the load running", lambda: sample()["running"] >= 4, timeout=60, interval=0.2)
        first = samples[-1]["updates"]
        wait("3 more draws while they run", lambda: sample()["updates"] >= first + 3, timeout=30, interval=0.2)
        if os.environ.get("KVSERVE_KV_VIEW_SCREENSHOT"):
            if host_tier:     # a picture with both tiers in use
                wait("evicted blocks in the host tier", lambda: int(figures(driver)["host-cached"] or 0) > 0)
            driver.save_screenshot(os.environ["KVSERVE_KV_VIEW_SCREENSHOT"])
        hover = hover_running_request(driver)
    finally:
        load.stop()
    # Idle: nothing running or waiting in /metrics, then a snapshot the engine built after that.
    wait("the engine to go idle", lambda: all(metric(metrics(base), f"kvserve_requests_{s}") == 0
                                              for s in ("running", "waiting")), timeout=60, interval=0.2)
    idle_since = time.time()
    wait("an idle snapshot on the page", lambda: js(driver, "return kvview.snapshot().time") > idle_since + 0.01)
    return {"server": server, "host_tier": host_tier, "initial": initial, "samples": samples, "hover": hover,
            "load_errors": load.errors, "console": console_errors(driver), "figures": figures(driver),
            "metrics": metrics(base), "host_colours": colour_counts(driver, "host-canvas"),
            "host_off_shown": js(driver, "return !document.getElementById('host-off').hidden")}


def hover_running_request(driver) -> dict:
    """Hover a block only one running request holds, and record what the page shows then."""
    snap = js(driver, "return kvview.snapshot()")
    owners = snap["device"]["owners"]
    req = next(r for r in snap["requests"] if r["status"] == "running" and len(r["block_table"]) > 4)
    block = next(b for b in reversed(req["block_table"]) if owners.get(str(b)) == [req["id"]])
    other_used = next(int(b) for b, ids in owners.items() if req["id"] not in ids)
    hover_block(driver, block)
    wait("the hovered request's highlight", lambda: req["id"] in js(driver, "return document.body.dataset.highlight"))
    return {
        "id": req["id"], "block": block, "other_block": req["block_table"][1], "other_used": other_used,
        "highlight": js(driver, "return document.body.dataset.highlight").split(","),
        "tooltip": js(driver, "const t = document.getElementById('tooltip'); return t.hidden ? '' : t.textContent"),
        "row_highlighted": js(driver, "return document.querySelector(`#requests tr[data-id='${arguments[0]}']`)"
                                      "?.classList.contains('hl')", req["id"]),
        "pixel_own": block_pixel(driver, req["block_table"][1]), "pixel_other": block_pixel(driver, other_used),
    }


# ---- the main server ----

def test_page_loads_and_draws_without_console_errors(loaded):
    initial = loaded["initial"]
    assert initial["figures"]["num-blocks"] == str(NUM_BLOCKS)
    assert initial["colours"]["painted"] > 0 and initial["colours"].get("free", 0) > 0, initial["colours"]
    assert not loaded["console"], loaded["console"]


def test_figures_update_while_requests_run(loaded):
    assert not loaded["load_errors"], loaded["load_errors"]
    running = [s for s in loaded["samples"] if s["running"] >= 1]
    draws = {s["updates"]: s for s in running}
    assert len(draws) >= 3 and max(draws) - min(draws) >= 3, loaded["samples"]
    steps = [draws[u]["step"] for u in sorted(draws)]
    assert steps == sorted(steps) and steps[-1] > steps[0], steps          # the engine moved on between draws
    assert all(s["used"] > 0 for s in draws.values()), running


def test_hovering_a_block_highlights_its_request(loaded):
    h = loaded["hover"]
    assert h["highlight"] == [h["id"]], h
    assert f"block {h['block']} · used" in h["tooltip"] and h["id"] in h["tooltip"], h["tooltip"]
    assert h["row_highlighted"], "the request's row is not highlighted"
    assert h["pixel_own"] == USED, h                     # the request's other blocks at full strength
    assert h["pixel_other"] != USED, h                   # another request's used block washed out


def test_numbers_equal_metrics_once_idle(loaded):
    fig, m = loaded["figures"], loaded["metrics"]
    for state in ("used", "cached", "free"):
        assert int(fig[state]) == metric(m, "kvserve_kv_cache_blocks", state=state), state
    assert int(fig["num-blocks"]) == metric(m, "kvserve_kv_cache_capacity_blocks")
    assert float(fig["usage"]) == pytest.approx(metric(m, "kvserve_kv_cache_usage_ratio"), abs=1e-12)
    hit = metric(m, "kvserve_prefix_cache_hit_tokens_total")
    query = metric(m, "kvserve_prefix_cache_query_tokens_total")
    assert int(fig["query-tokens"]) == query and hit > 0
    assert float(fig["hit-rate"]) == pytest.approx(hit / query, rel=1e-12)
    assert int(fig["step"]) == metric(m, "kvserve_engine_steps_total")
    assert int(fig["running"]) == metric(m, "kvserve_requests_running") == 0
    assert int(fig["waiting"]) == metric(m, "kvserve_requests_waiting") == 0
    assert int(fig["cached"]) > 0
    if not loaded["host_tier"]:
        return
    for tier in ("device", "host"):
        assert int(fig[f"hits-{tier}"]) == metric(m, "kvserve_prefix_cache_hit_tokens_by_tier_total", tier=tier)
    for state in ("cached", "free"):
        assert int(fig[f"host-{state}"]) == metric(m, "kvserve_kv_offload_blocks", state=state), state
    assert float(fig["host-usage"]) == pytest.approx(metric(m, "kvserve_kv_offload_usage_ratio"), abs=1e-12)
    assert int(fig["offloaded"]) == metric(m, "kvserve_kv_offload_stored_blocks_total")
    assert int(fig["reloaded"]) == metric(m, "kvserve_kv_offload_loaded_blocks_total")


def test_host_tier_is_drawn_beside_the_pool(loaded):
    if not loaded["host_tier"]:
        pytest.skip("this kvserve has no --kv-offload-memory")
    fig, colours = loaded["figures"], loaded["host_colours"]
    assert not loaded["host_off_shown"]
    assert int(fig["offloaded"]) > 0 and int(fig["host-cached"]) > 0, fig   # the load evicted cached blocks
    assert colours.get("cached", 0) > 0 and colours.get("free", 0) > 0, colours


# ---- --api-key ----

def test_kv_needs_the_key_and_the_page_does_not(servers):
    keyed = servers[1]
    assert httpx.get(f"{keyed.base}/kv", timeout=10).status_code == 401
    assert httpx.get(f"{keyed.base}/kv", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).status_code == 200
    page = httpx.get(f"{keyed.base}/kv/view", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_page_takes_the_key_from_its_fragment(servers, driver):
    keyed = servers[1]
    driver.get(f"{keyed.base}/health")
    js(driver, "localStorage.clear()")
    console_errors(driver)
    open_page(driver, f"{keyed.base}/kv/view#key={API_KEY}", min_updates=2)
    assert "key=" not in driver.current_url                 # taken out of the address bar
    assert js(driver, "return document.getElementById('key-form').hidden")
    assert js(driver, "return document.getElementById('host-off').textContent") == "host tier off (--kv-offload-memory)"
    assert figures(driver)["host-cached"] == "" and figures(driver)["num-blocks"] == "64"
    assert not console_errors(driver)


def test_page_asks_for_the_key_and_keeps_it(servers, driver):
    keyed = servers[1]
    driver.get(f"{keyed.base}/health")
    js(driver, "localStorage.clear()")
    console_errors(driver)
    driver.get(f"{keyed.base}/kv/view")
    wait("the key form", lambda: not js(driver, "return document.getElementById('key-form').hidden"))
    assert js(driver, "return document.getElementById('status').textContent") == "API key needed"
    assert updates(driver) == 0
    driver.find_element("id", "key-input").send_keys(API_KEY)
    driver.find_element("css selector", "#key-form button").click()
    wait("a draw with the typed key", lambda: updates(driver) >= 1)
    assert js(driver, "return localStorage.getItem('kvserve-api-key')") == API_KEY
    open_page(driver, f"{keyed.base}/kv/view")            # a reload uses the stored key
    errors = console_errors(driver)
    assert errors and all("401" in e for e in errors), errors   # only the first, keyless poll


# ---- a stand-in server: a reverse-proxy prefix, a dead upstream, a 100,000-block pool ----

def synthetic_snapshot(num_blocks: int, step: int) -> dict:
    """A /kv answer: the first 40% used by 100 requests, the next 30% cached, the rest free."""
    used, cached = int(num_blocks * 0.4), int(num_blocks * 0.3)
    state = ["used"] * used + ["cached"] * cached + ["free"] * (num_blocks - used - cached)
    per = used // 100
    requests = [{"id": f"req-{i}", "status": "running", "num_tokens": 16 * per, "num_prompt_tokens": 16 * per,
                 "num_computed_tokens": 16 * per, "num_cached_tokens": 0,
                 "block_table": list(range(i * per, (i + 1) * per))} for i in range(100)]
    return {"time": time.time(), "step": step, "block_size": 16,
            "device": {"num_blocks": num_blocks, "blocks_used": used, "blocks_cached": cached,
                       "blocks_free": num_blocks - used - cached, "usage": used / num_blocks,
                       "blocks": {"state": state, "ref_cnt": [int(s == "used") for s in state],
                                  "age_s": [1.0 if s == "cached" else None for s in state],
                                  "evict_order": [None] * num_blocks},
                       "owners": {str(b): [r["id"]] for r in requests for b in r["block_table"]}},
            "host": None, "requests": requests,
            "prefix_cache": {"query_tokens": 0, "hit_tokens": 0, "hit_tokens_device": 0, "hit_tokens_host": 0,
                             "hit_rate": 0.0},
            "offload": {"blocks_offloaded": 0, "blocks_reloaded": 0}}


@pytest.fixture(scope="module")
def stand_in():
    """Serves the page at /proxy/kv/view and synthetic snapshots at /proxy/kv (503 while `down` is set)."""
    page = resources.files("kvserve.server").joinpath("kv_view.html").read_bytes()
    state = {"down": False, "num_blocks": 100_000, "paths": [], "step": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            state["paths"].append(self.path)
            if self.path == "/proxy/kv/view":
                self.reply(200, "text/html; charset=utf-8", page)
            elif self.path == "/proxy/kv" and not state["down"]:
                state["step"] += 1
                self.reply(200, "application/json",
                           json.dumps(synthetic_snapshot(state["num_blocks"], state["step"])).encode())
            else:
                self.reply(503 if state["down"] else 404, "text/plain", b"no")

        def reply(self, status: int, ctype: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", state
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_100k_block_pool_is_aggregated(driver, stand_in):
    base, state = stand_in
    open_page(driver, f"{base}/proxy/kv/view")
    assert "/proxy/kv" in state["paths"] and "/kv" not in state["paths"]    # the prefix is kept
    k = js(driver, "return kvview.blocksPerCell()")
    assert k > 1 and f"1 cell = {k} blocks" in driver.find_element("id", "device-scale").text
    canvas = driver.find_element("id", "device-canvas").size
    assert canvas["width"] <= VIEWPORT[0] and 0 < canvas["height"] <= VIEWPORT[1] * 0.6, canvas
    colours = colour_counts(driver, "device-canvas")
    assert colours.get("used", 0) > 0 and colours.get("cached", 0) > 0 and colours.get("free", 0) > 0, colours
    hover_block(driver, 12_345)                          # req-30's blocks: 12,000-12,399
    wait("req-30 highlighted", lambda: js(driver, "return document.body.dataset.highlight") == "req-30")
    first, last = 12_345 // k * k, 12_345 // k * k + k - 1
    assert f"blocks {first}–{last}" in js(driver, "return document.getElementById('tooltip').textContent")
    assert not console_errors(driver)


def test_a_dead_server_shows_disconnected_then_recovers(driver, stand_in):
    base, state = stand_in
    state["num_blocks"] = 1000
    open_page(driver, f"{base}/proxy/kv/view")
    state["down"] = True
    status = lambda: js(driver, "return document.getElementById('status').textContent")   # noqa: E731
    wait("the disconnected state", lambda: status().startswith("disconnected, retrying"), timeout=10)
    state["down"] = False
    seen = updates(driver)
    wait("a draw after the server is back", lambda: updates(driver) > seen, timeout=10)
    assert status() == "live"
    console_errors(driver)

"""End to end: `kvserve serve` (demo model, small KV pool) scraped by a real Prometheus on loopback; every
PromQL expression of the Grafana dashboard must evaluate without error and return data."""
from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "kvserve.json"
MODEL_NAME = "kvserve-demo"
NUM_KV_BLOCKS = 24          # 384 tokens: a few concurrent requests fill it and preempt
RATE_INTERVAL = "4s"        # what Grafana's $__rate_interval is for a 1 s scrape and a 1 s step


def prometheus_binary() -> str:
    exe = shutil.which("prometheus")
    if exe:
        return exe
    reason = "the prometheus binary is not installed (Debian package prometheus; see .ci/prometheus.sh)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " and CI=true")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}\n{log.read_text()[-4000:] if log else ''}")
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{log.read_text()[-4000:] if log else ''}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="kvserve-prom-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def kvserve(workdir, demo_model_dir):
    port = free_port()
    log = workdir / "kvserve.log"
    argv = [sys.executable, "-m", "kvserve", "serve", "--model", demo_model_dir, "--served-model-name", MODEL_NAME,
            "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--num-kv-blocks", str(NUM_KV_BLOCKS),
            "--kv-offload-memory", "8MiB"]   # the host tier's panels then show real values
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("kvserve /health", lambda: httpx.get(f"{base}/health", timeout=2).status_code == 200, 180, proc, log)
        yield base
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def prometheus_exe() -> str:
    return prometheus_binary()


@pytest.fixture(scope="module")
def prometheus(workdir, prometheus_exe, kvserve):
    exe = prometheus_exe
    port = free_port()
    target = kvserve.removeprefix("http://")
    cfg = workdir / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: kvserve\n    static_configs:\n      - targets: ['{target}']\n")
    log = workdir / "prometheus.log"
    argv = [exe, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}"
    try:
        wait_for("prometheus ready", lambda: httpx.get(f"{api}/-/ready", timeout=2).status_code == 200, 60, proc, log)
        wait_for("the kvserve scrape", lambda: instant(api, 'up{job="kvserve"} == 1'), 30, proc, log)
        yield api
    finally:
        stop(proc)


def instant(api: str, query: str, at: float | None = None) -> list:
    """Evaluate query now, or at time `at` (so a range window stays anchored to the load)."""
    params = {"query": query} if at is None else {"query": query, "time": at}
    r = httpx.get(f"{api}/api/v1/query", params=params, timeout=10).json()
    assert r["status"] == "success", (query, r)
    return r["data"]["result"]


def instant_value(api: str, query: str, at: float | None = None) -> float:
    result = instant(api, query, at)
    assert len(result) == 1, (query, result)
    return float(result[0]["value"][1])


async def complete(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> None:
    r = await client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
                                                   "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text


async def abandon_stream(client: httpx.AsyncClient, prompt: str) -> None:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 200, "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                return                    # disconnect after the first token


async def send_load(base: str, scraped_full) -> int:
    """Waves that fill the pool (preempting), with idle gaps in which it drains; prompts repeat across waves.

    A wave can finish between two 1 s scrapes, so the first wave repeats (at most 10 times) until
    Prometheus has recorded the pool at least half full (`scraped_full()`). Returns how many
    requests completed."""
    shared = "You are a helpful assistant. Answer briefly and precisely. " * 2
    completed = 0
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        for wave in range(3):
            prompts = [shared + f"Question {k}: what is {k} + {wave}?" for k in range(6)]
            for _ in range(10 if wave == 0 else 1):
                await asyncio.gather(*(complete(client, p, 200) for p in prompts))
                completed += len(prompts)
                if wave > 0 or await asyncio.to_thread(scraped_full):
                    break
            await asyncio.sleep(2.5)
        await abandon_stream(client, shared + "A story, please.")
        r = await client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 100000})
        assert 400 <= r.status_code < 500, r.text
        await asyncio.sleep(2.5)
    return completed


def promql_regex_literal(value: str) -> str:
    """`value` as an exact RE2 match, escaped for a double-quoted PromQL string."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\\\1", value).replace('"', '\\"')


def dashboard_queries(range_seconds: int) -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            expr = (t["expr"].replace("$model_name", promql_regex_literal(MODEL_NAME))
                    .replace("$__rate_interval", RATE_INTERVAL).replace("$__interval", "1s")
                    .replace("$__range", f"{range_seconds}s"))
            assert "$" not in expr, f"unsubstituted variable in {expr}"
            out.append((f"{panel['title']} / {t.get('legendFormat', t['refId'])}", expr))
    return out


@pytest.fixture(scope="module")
def loaded(kvserve, prometheus):
    start = time.time()
    sel = f'model_name="{MODEL_NAME}"'

    def scraped_full() -> bool:
        deadline = time.monotonic() + 2.5   # one scrape interval plus slack for the last one to land
        while time.monotonic() < deadline:
            if instant_value(prometheus, f"max_over_time(kvserve_kv_cache_usage_ratio{{{sel}}}[30s])") >= 0.5:
                return True
            time.sleep(0.2)
        return False

    completed = asyncio.run(send_load(kvserve, scraped_full))
    done = time.time()

    def drained() -> bool:  # Prometheus has scraped the idle cache and the abandoned stream's abort
        return (instant_value(prometheus, 'timestamp(up{job="kvserve"})') > done + 1.0
                and instant_value(prometheus, f'kvserve_kv_cache_blocks{{{sel},state="used"}}') == 0
                and instant_value(prometheus, f'kvserve_request_failure_total{{{sel},reason="aborted"}}') >= 1)

    wait_for("Prometheus to see the load drained", drained, 30)
    return start, time.time(), completed


def test_every_dashboard_query_returns_data(prometheus, loaded):
    start, end, completed = loaded
    problems = []
    for title, expr in dashboard_queries(int(end - start) + 1):
        r = httpx.get(f"{prometheus}/api/v1/query_range",
                      params={"query": expr, "start": start, "end": end, "step": "1s"}, timeout=30).json()
        if r.get("status") != "success":
            problems.append(f"{title}: {expr}: error {r.get('errorType')}: {r.get('error')}")
            continue
        series = r["data"]["result"]
        finite = [v for s in series for _, v in s["values"] if math.isfinite(float(v))]
        if not finite:
            problems.append(f"{title}: {expr}: no data ({len(series)} series, no finite point)")
    assert not problems, "\n".join(problems)


def test_model_variable_query_finds_the_served_model(prometheus, loaded):
    dash = json.loads(DASHBOARD.read_text())
    var = next(v for v in dash["templating"]["list"] if v["name"] == "model_name")
    metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"]).groups()
    r = httpx.get(f"{prometheus}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10).json()
    assert r["status"] == "success" and MODEL_NAME in r["data"], r


def test_load_filled_and_freed_the_cache(prometheus, loaded):
    start, end, completed = loaded
    window = f"{int(end - start) + 1}s"
    sel = f'{{model_name="{MODEL_NAME}"}}'
    assert instant_value(prometheus, f"kvserve_kv_cache_capacity_blocks{sel}") == NUM_KV_BLOCKS
    assert instant_value(prometheus, f"max_over_time(kvserve_kv_cache_usage_ratio{sel}[{window}])", end) >= 0.5
    assert instant_value(prometheus, f"kvserve_kv_cache_usage_ratio{sel}") == 0
    assert instant_value(prometheus, f'kvserve_kv_cache_blocks{{model_name="{MODEL_NAME}",state="used"}}') == 0
    assert instant_value(prometheus, f"increase(kvserve_prefix_cache_hit_tokens_total{sel}[{window}])", end) > 0
    assert instant_value(prometheus, f"kvserve_preemptions_total{sel}") > 0
    # the load evicted cached prefix blocks: the host tier kept them
    assert instant_value(prometheus, f"kvserve_kv_offload_capacity_blocks{sel}") > 0
    assert instant_value(prometheus, f"increase(kvserve_kv_offload_stored_blocks_total{sel}[{window}])", end) > 0
    assert instant_value(prometheus, f'kvserve_kv_offload_blocks{{model_name="{MODEL_NAME}",state="cached"}}') > 0
    assert instant_value(prometheus, f"kvserve_time_to_first_token_seconds_count{sel}") >= completed >= 18
    assert instant_value(prometheus, f"sum(kvserve_request_success_total{sel})") == completed
    assert instant_value(
        prometheus, f'kvserve_request_failure_total{{model_name="{MODEL_NAME}",reason="validation"}}') == 1
    assert instant_value(
        prometheus, f'kvserve_request_failure_total{{model_name="{MODEL_NAME}",reason="aborted"}}') == 1


def test_docker_healthcheck_against_kvserve(kvserve):
    """The image's HEALTHCHECK command, port from KVSERVE_PORT only, passes against the real server."""
    from test_docker import healthcheck_argv

    argv = json.loads(healthcheck_argv((ROOT / "docker" / "Dockerfile").read_text()))
    argv[0] = sys.executable
    env = dict(os.environ, KVSERVE_PORT=kvserve.rsplit(":", 1)[1])
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr

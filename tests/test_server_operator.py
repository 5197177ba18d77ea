"""What an operator relies on when starting `kvserve serve`: a busy port fails before the model loads,
a dead engine ends the process non-zero, the API key and model aliases work end to end."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

from test_server_api import free_port, start_server, stop_server, wait_until

KEY = "operator-key"


def test_a_busy_port_fails_at_once_before_loading(demo_model_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        began = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "kvserve", "serve", "--model", demo_model_dir, "--device", "cpu",
                              "--port", str(port)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - began
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "--port" in out.stderr
    assert "loading" not in out.stderr.lower() and elapsed < 30   # the model was never loaded


def test_a_stream_interval_below_one_is_refused_before_loading(demo_model_dir, tmp_path):
    for bad in ("0", "-3", "two"):
        out = subprocess.run([sys.executable, "-m", "kvserve", "serve", "--model", demo_model_dir, "--device", "cpu",
                              "--stream-interval", bad], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "--stream-interval" in out.stderr, out.stderr[-2000:]
        assert "loading" not in out.stderr.lower()


# Loaded by every interpreter started with this folder on PYTHONPATH, the engine process included:
# its first step raises, as a lost device would.
DIES_ON_FIRST_STEP = """
import kvserve.engine
def step(self):
    raise MemoryError("the device is gone")
kvserve.engine.EngineCore.step = step
"""


def test_a_dead_engine_fails_its_requests_and_exits_non_zero(demo_model_dir, tmp_path):
    port = free_port()
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(DIES_ON_FIRST_STEP)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "inject"),
                                                                       os.environ.get("PYTHONPATH")])))
    argv = [sys.executable, "-m", "kvserve", "serve", "--model", demo_model_dir, "--device", "cpu",
            "--port", str(port), "--num-kv-blocks", "64"]
    log = tmp_path / "kvserve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(healthy, 120, interval=0.2), log.read_text()[-3000:]
        r = httpx.post(f"{base}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 4}}, timeout=30)
        assert r.status_code == 503 and "engine" in r.json()["error"], r.text
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "exiting with status 1" in log.read_text()


def test_api_key_and_model_aliases_end_to_end(demo_model_dir, tmp_path):
    """(With --disable-access-log: no line per request in the log.)"""
    server = start_server(demo_model_dir, tmp_path / "kvserve.log", "--served-model-name", "main-name", "alias",
                          "--api-key", KEY, "--num-kv-blocks", "64", "--disable-access-log")
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{server.base}/health").status_code == 200
        assert httpx.get(f"{server.base}/metrics").status_code == 200
        assert httpx.get(f"{server.base}/v1/models").status_code == 401
        assert httpx.post(f"{server.base}/generate", json={"inputs": "hi"}).status_code == 401
        models = httpx.get(f"{server.base}/v1/models", headers=auth).json()
        assert models["data"][0]["id"] == "main-name"
        for name in ("main-name", "alias"):
            r = httpx.post(f"{server.base}/v1/completions", headers=auth, timeout=30,
                           json={"model": name, "prompt": "hi", "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200 and r.json()["model"] == "main-name", r.text
        r = httpx.post(f"{server.base}/v1/completions", headers=auth,
                       json={"model": "other", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = httpx.post(f"{server.base}/generate", headers=auth, timeout=30,
                       json={"inputs": "hi", "parameters": {"max_new_tokens": 3}})
        assert r.status_code == 200
        stop_server(server)
        log = server.log.read_text()
        assert "kvserve stopped" in log and "HTTP/1.1" not in log, log[-3000:]
    finally:
        stop_server(server)

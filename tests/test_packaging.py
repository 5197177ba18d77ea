"""Packaging: the sdist and the wheel build offline without deprecation warnings and hold the one package
`kvserve`; the wheel, installed alone into a bare folder, serves a request; importing kvserve imports nothing
but the standard library and never creates the bare top-level names server, cache, scheduler or bench."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest

import kvserve
from test_server_api import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("server", "cache", "scheduler", "bench")
IN_CI = os.environ.get("CI", "").lower() == "true"
# What a checkout holds besides its sources: never copied into the build folder.
NOT_SOURCES = (".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
               ".mypy_cache", ".ruff_cache", ".whl", "bench-results", "bench/results", "shared")
WARNING = re.compile(r"deprecat|BuildBackendWarning|SetuptoolsWarning", re.I)


def run(argv: list, cwd: Path | None = None, env: dict | None = None, timeout: float = 120) -> str:
    r = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{argv} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH (the checkout must not leak in), offline, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PIP_NO_INDEX": "1", **extra}


def wheel_files(wheel: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as z:
        return {name: z.read(name) for name in z.namelist()}


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """{"sdist", "wheel" (built from the checkout), "sdist_wheel" (built from the sdist), "log"}."""
    if importlib.util.find_spec("build") is None:
        msg = "the `build` package is missing (it comes with kvserve[test])"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"   # a copy, so that building leaves no build/ or egg-info in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    env = clean_env()
    # Without --sdist/--wheel, build makes the sdist and then the wheel from the unpacked sdist.
    log = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp / "from-sdist", src], env=env)
    log += run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", tmp / "from-tree", src],
               env=env)
    [sdist] = (tmp / "from-sdist").glob("*.tar.gz")
    [sdist_wheel] = (tmp / "from-sdist").glob("*.whl")
    [wheel] = (tmp / "from-tree").glob("*.whl")
    return {"sdist": sdist, "wheel": wheel, "sdist_wheel": sdist_wheel, "log": log}


def test_builds_without_deprecation_warnings(dists):
    warnings = [line for line in dists["log"].splitlines() if WARNING.search(line)]
    assert not warnings, "\n".join(warnings)
    v = kvserve.__version__
    assert dists["wheel"].name == f"kvserve-{v}-py3-none-any.whl"
    assert dists["sdist"].name == f"kvserve-{v}.tar.gz"


def test_wheel_holds_the_one_package_kvserve(dists):
    v = kvserve.__version__
    names = set(wheel_files(dists["wheel"]))
    assert {n.split("/")[0] for n in names} == {"kvserve", f"kvserve-{v}.dist-info"}, sorted(names)
    for sub in SUBPACKAGES:
        assert f"kvserve/{sub}/__init__.py" in names, sub
    assert {"kvserve/__init__.py", "kvserve/__main__.py", "kvserve/py.typed", "kvserve/server/cli.py",
            "kvserve/bench/cli.py", "kvserve/server/kv_view.html"} <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    info = wheel_files(dists["wheel"])
    entry_points = info[f"kvserve-{v}.dist-info/entry_points.txt"].decode()
    assert re.search(r"^kvserve = kvserve\.server\.cli:main$", entry_points, re.M), entry_points
    metadata = info[f"kvserve-{v}.dist-info/METADATA"].decode()
    assert "License-Expression: Apache-2.0" in metadata
    serving = [r for r in re.findall(r"^Requires-Dist: (.+)$", metadata, re.M) if "extra ==" not in r]
    for name in ("pytest", "hypothesis", "matplotlib", "triton", "hadolint", "build", "httpx", "aiohttp"):
        assert not [r for r in serving if r.lower().startswith(name)], f"serving requires {name}: {serving}"


def test_wheel_built_from_the_sdist_is_the_same(dists):
    """The sdist is complete: the wheel built from it has the same files, with the same contents."""
    from_tree, from_sdist = wheel_files(dists["wheel"]), wheel_files(dists["sdist_wheel"])
    assert sorted(from_sdist) == sorted(from_tree)
    changed = [n for n in from_tree if not n.endswith("/RECORD") and from_tree[n] != from_sdist[n]]
    assert not changed, changed
    with tarfile.open(dists["sdist"]) as tar:
        top = {m.name.split("/")[0] for m in tar.getmembers()}
    assert top == {f"kvserve-{kvserve.__version__}"}


@pytest.fixture(scope="module")
def installed(dists, tmp_path_factory) -> dict[str, str]:
    """The wheel alone in a bare folder (`pip install --no-deps --target`): the environment that imports it."""
    target = tmp_path_factory.mktemp("target")
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", target,
         dists["wheel"]], env=clean_env())
    return clean_env(PYTHONPATH=str(target))


def test_installed_wheel_serves_a_request(installed, demo_model_dir, tmp_path):
    target = Path(installed["PYTHONPATH"])
    where = run([sys.executable, "-c", "import kvserve, kvserve.server.cli; print(kvserve.__file__)"],
                cwd=tmp_path, env=installed).strip()
    assert Path(where).parent == target / "kvserve", where
    port = free_port()
    log = tmp_path / "kvserve.log"
    argv = [sys.executable, "-m", "kvserve", "serve", "--model", demo_model_dir, "--device", "cpu",
            "--host", "127.0.0.1", "--port", str(port), "--num-kv-blocks", "64", "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=installed, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        assert wait_until(healthy, 120, interval=0.2), log.read_text(errors="replace")[-4000:]
        r = httpx.post(f"{base}/generate", timeout=60,
                       json={"inputs": "Hello", "parameters": {"max_new_tokens": 3, "ignore_eos": True,
                                                               "details": True}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert isinstance(body["generated_text"], str) and body["details"]["generated_tokens"] == 3, body
        assert httpx.get(f"{base}/info", timeout=5).json()["version"] == kvserve.__version__
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text(errors="replace")[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_installed_wheel_runs_bench_and_version(installed, tmp_path):
    out = run([sys.executable, "-m", "kvserve", "--version"], cwd=tmp_path, env=installed)
    assert out.strip() == f"kvserve {kvserve.__version__}"
    out = run([sys.executable, "-m", "kvserve", "bench", "--help"], cwd=tmp_path, env=installed)
    assert "throughput" in out and "decode-floor" in out and "needs bench/cli.py" not in out


def test_version_flag(tmp_path):
    script = Path(sys.executable).parent / "kvserve"   # the console script of the environment under test
    assert script.exists(), script
    for argv in ([script, "--version"], [sys.executable, "-m", "kvserve", "--version"]):
        assert run(argv, cwd=tmp_path, env=clean_env()).strip() == f"kvserve {kvserve.__version__}", argv


IMPORT_KVSERVE = """
import json, sys
before = set(sys.modules)
import kvserve
added = {name.split(".")[0] for name in set(sys.modules) - before}
print(json.dumps(sorted(added - set(sys.stdlib_module_names) - {"kvserve"})))
"""


def test_importing_kvserve_imports_only_the_standard_library(tmp_path):
    out = run([sys.executable, "-c", IMPORT_KVSERVE], cwd=tmp_path, env=clean_env())
    assert json.loads(out.splitlines()[-1]) == []


IMPORT_SERVER = """
import json, sys
import kvserve.server.cli, kvserve.server.app
print(json.dumps(sorted(name for name in ("torch", "transformers", "prometheus_client") if name in sys.modules)))
"""


def test_importing_the_server_loads_neither_torch_nor_transformers(tmp_path):
    """`kvserve serve` answers /health ("loading") at once: torch and transformers load with the engine,
    in the loader thread, not when the server's modules are imported (3.5 s here)."""
    out = run([sys.executable, "-c", IMPORT_SERVER], cwd=tmp_path, env=clean_env())
    assert json.loads(out.splitlines()[-1]) == []


IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil, sys
optional = {"triton"} if importlib.util.find_spec("triton") is None else set()
seen, skipped = set(), []
for package in ["kvserve"] + ["kvserve." + sub for sub in %r]:   # an editable install's path holds only kvserve/
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        if info.name in seen or info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        seen.add(info.name)
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in optional:
                raise
            skipped.append(info.name)
print(json.dumps({"imported": sorted(seen), "skipped": skipped,
                  "bare": sorted(name for name in %r if name in sys.modules)}))
""" % (SUBPACKAGES, SUBPACKAGES)


def test_importing_every_module_creates_no_bare_top_level_names(tmp_path):
    out = run([sys.executable, "-c", IMPORT_EVERY_MODULE], cwd=tmp_path, env=clean_env(), timeout=240)
    result = json.loads(out.splitlines()[-1])
    assert result["bare"] == []
    imported = set(result["imported"])
    assert {"kvserve.server.cli", "kvserve.cache.block_pool", "kvserve.scheduler.scheduler", "kvserve.bench.cli",
            "kvserve.engine"} <= imported, sorted(imported)
    assert set(result["skipped"]) <= {"kvserve.cache.triton_attention"}, result["skipped"]

"""`kvserve serve` under Kubernetes' service links.

For every Service in a namespace Kubernetes gives each pod `<NAME>_PORT=tcp://<cluster ip>:<port>`
(and `<NAME>_SERVICE_HOST`, `<NAME>_PORT_<N>_TCP...`), unless the pod sets `enableServiceLinks: false`.
A Service named `kvserve` therefore sets KVSERVE_PORT, the variable behind `--port`. The server
must not die of it; a KVSERVE_PORT that is simply wrong must still stop it with a clear message.
"""
from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from test_server_api import free_port, wait_until

# What the kubelet injects for a Service `kvserve` with ClusterIP 10.96.14.7 and port 8000.
SERVICE_LINK_ENV = {
    "KVSERVE_PORT": "tcp://10.96.14.7:8000",
    "KVSERVE_SERVICE_HOST": "10.96.14.7",
    "KVSERVE_SERVICE_PORT": "8000",
    "KVSERVE_SERVICE_PORT_HTTP": "8000",
    "KVSERVE_PORT_8000_TCP": "tcp://10.96.14.7:8000",
    "KVSERVE_PORT_8000_TCP_PROTO": "tcp",
    "KVSERVE_PORT_8000_TCP_PORT": "8000",
    "KVSERVE_PORT_8000_TCP_ADDR": "10.96.14.7",
}


def parse_serve(monkeypatch, env: dict[str, str], *argv: str):
    from kvserve.server import cli
    for name in [n for n in os.environ if n.startswith("KVSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return cli.build_parser().parse_args(["serve", *argv])


@pytest.mark.parametrize("value", ["tcp://10.96.14.7:8000", "tcp://10.96.14.7:9000", "udp://10.0.0.1:53",
                                   "tcp://[fd00:10:96::e]:8000", " tcp://10.96.14.7:8000\n"])
def test_a_service_link_in_kvserve_port_is_ignored(monkeypatch, value):
    args = parse_serve(monkeypatch, {**SERVICE_LINK_ENV, "KVSERVE_PORT": value})
    assert args.port == 8000                      # the default: the link names the Service's port, not ours
    assert parse_serve(monkeypatch, {**SERVICE_LINK_ENV, "KVSERVE_PORT": value}, "--port", "9123").port == 9123


@pytest.mark.parametrize("value, port", [("9000", 9000), (" 8080 ", 8080), ("0", 0), ("65535", 65535)])
def test_a_port_number_in_kvserve_port_still_counts(monkeypatch, value, port):
    assert parse_serve(monkeypatch, {"KVSERVE_PORT": value}).port == port
    assert parse_serve(monkeypatch, {"KVSERVE_PORT": value}, "--port", "9123").port == 9123


@pytest.mark.parametrize("value", ["eighty", "80.5", "-1", "65536", "http://10.96.14.7:8000", "tcp://10.96.14.7",
                                   "tcp://10.96.14.7:http", ""])
def test_a_bad_kvserve_port_is_a_clear_error(monkeypatch, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        parse_serve(monkeypatch, {"KVSERVE_PORT": value})
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"KVSERVE_PORT={value!r} is not a port number" in err and "Traceback" not in err, err
    # a port given on the command line wins over a bad variable, as over any other
    assert parse_serve(monkeypatch, {"KVSERVE_PORT": value}, "--port", "9123").port == 9123


@pytest.mark.parametrize("value", ["tcp://10.96.14.7:8000", "eighty", "70000"])
def test_a_bad_port_flag_is_a_clear_error(monkeypatch, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        parse_serve(monkeypatch, {}, "--port", value)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--port" in err and repr(value) in err, err


def test_the_server_starts_beside_a_service_named_kvserve(demo_model_dir, tmp_path):
    """The reproduction: before the fix, this environment ended `kvserve serve` with a traceback
    (`int('tcp://10.96.14.7:8000')`) before it even bound its port."""
    port = free_port()
    env = {**os.environ, **SERVICE_LINK_ENV, "KVSERVE_HOST": "127.0.0.1", "KVSERVE_MODEL": demo_model_dir,
           "KVSERVE_DEVICE": "cpu", "KVSERVE_NUM_KV_BLOCKS": "64"}
    log = tmp_path / "kvserve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kvserve", "serve", "--port", str(port)], cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(healthy, 120, interval=0.2), log.read_text()[-3000:]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert "ignoring KVSERVE_PORT='tcp://10.96.14.7:8000'" in text and "enableServiceLinks" in text, text[-3000:]


def test_a_bad_kvserve_port_ends_the_server_at_once(demo_model_dir, tmp_path):
    env = {**os.environ, "KVSERVE_PORT": "eighty", "KVSERVE_MODEL": demo_model_dir, "KVSERVE_DEVICE": "cpu"}
    out = subprocess.run([sys.executable, "-m", "kvserve", "serve"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "KVSERVE_PORT='eighty'" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]

"""A benchmark run as a user runs it (outside the repository, stderr not a terminal), and the plain progress."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import pytest

from kvserve.progress import LogProgress, progress

pytest.importorskip("matplotlib")


def bench_env(tmp_path) -> dict[str, str]:
    """A user's environment for `kvserve bench`: models built under tmp_path, nothing downloaded, no
    PYTHONPATH (the installed package), a fixed terminal width."""
    return os.environ | {"KVSERVE_BENCH_MODELS": str(tmp_path / "models"), "HF_HUB_OFFLINE": "1",
                         "PYTHONPATH": "", "COLUMNS": "100"}


def test_memory_benchmark_end_to_end(tmp_path):
    cwd = tmp_path / "work"
    cwd.mkdir()
    env = bench_env(tmp_path)
    cmd = [sys.executable, "-m", "kvserve", "bench", "memory", "--model-shape", "tiny", "--num-requests", "8",
           "--prompt-len", "16:64", "--output-len", "4:24", "--budget-tokens", "256", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = cwd / "bench-results" / "memory"
    payload = json.loads((out / "memory.json").read_text())
    assert payload["benchmark"] == "memory" and payload["occupancy"]
    assert payload["machine"]["cpu_model"] and payload["machine"]["torch"]
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stream in (proc.stdout, proc.stderr):
        assert "\r" not in stream and "\x1b" not in stream
    assert "requests: 8/8 req (100%) done" in proc.stderr       # progress as log lines

    replot = subprocess.run(cmd[:5] + ["--replot", str(out / "memory.json"), "--out-dir", str(cwd / "again")],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert replot.returncode == 0, replot.stderr[-3000:]
    assert (cwd / "again" / "memory.png").exists()


def test_progress_off_a_terminal_logs_plain_lines(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="kvserve.progress"):
        bar = progress(total=50, desc="requests", unit="req", stream=stream)
        assert isinstance(bar, LogProgress)
        for _ in range(50):
            bar.update(1)
        bar.close()
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert stream.getvalue() == ""
    assert len(lines) == 10                        # at 10%, 20%, ... 90%, then once when done
    assert lines[0].startswith("requests: 5/50 req (10%)")
    assert lines[-1].startswith("requests: 50/50 req (100%) done")
    assert not any("\r" in line or "\x1b" in line for line in lines)


def test_progress_logs_every_interval_and_wraps_iterables(caplog):
    now = [0.0]
    with caplog.at_level(logging.INFO, logger="kvserve.progress"):
        bar = LogProgress(total=1000, desc="slow", clock=lambda: now[0])
        for _ in range(3):                         # far below 10%, but 10 s apart
            now[0] += 10.0
            bar.update(1)
        items = list(LogProgress(range(4), desc="list"))
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines[:3]] == ["slow: 1/1000 it (0%)", "slow: 2/1000 it (0%)",
                                                           "slow: 3/1000 it (0%)"]
    assert items == [0, 1, 2, 3]
    assert lines[-1].startswith("list: 4/4 it (100%) done")


# transformers' continuous-batching knobs across versions (the throughput bench's generate_batch peer)

def test_cb_knobs_map_to_each_versions_names():
    from dataclasses import dataclass

    from kvserve.bench.peers import accepted_names, map_knobs

    @dataclass
    class Newer:                                   # transformers after 5.17: page_size, block_size deprecated
        page_size: int = 256
        num_blocks: int | None = None
        max_batch_tokens: int | None = None
        block_size: int | None = None

    @dataclass
    class V517:                                    # transformers 5.5-5.17: block_size
        block_size: int = 256
        num_blocks: int | None = None
        max_batch_tokens: int | None = None

    class Bare:                                    # a version without the knob at all
        def __init__(self, num_blocks=None, **kwargs):
            pass

    wanted = {"num_blocks": 40, "page_size": 32, "max_batch_tokens": 128}
    assert map_knobs(wanted, accepted_names(Newer), "x") == ({"num_blocks": 40, "page_size": 32,
                                                              "max_batch_tokens": 128}, [])
    assert map_knobs(wanted, accepted_names(V517), "x")[0] == {"num_blocks": 40, "block_size": 32,
                                                               "max_batch_tokens": 128}
    kwargs, notes = map_knobs(wanted, accepted_names(Bare), "Bare")
    assert kwargs == {"num_blocks": 40}           # **kwargs does not count as accepting a name
    assert len(notes) == 2 and all("default is used" in n for n in notes)


def test_cb_settings_construct_the_installed_versions_config():
    from kvserve.bench.peers import _cb_config_class, hf_cb_settings

    settings = hf_cb_settings(num_blocks=40, page_size=32, max_batch_tokens=128)
    assert settings["notes"] == []
    cls = _cb_config_class()
    if cls is None:                                # transformers 5.0-5.4: GenerationConfig attributes
        assert settings["generation_kwargs"] == {"num_blocks": 40, "block_size": 32, "max_batch_tokens": 128}
        return
    cfg = cls(**settings["config_kwargs"])         # the crash of issue 18 was a TypeError here
    page = getattr(cfg, "page_size", None) or getattr(cfg, "block_size", None)
    assert (cfg.num_blocks, page, cfg.max_batch_tokens) == (40, 32, 128)


def test_generate_batch_peer_runs_on_the_installed_transformers(tiny_model_factory):
    from kvserve.bench.common import Request
    from kvserve.bench.peers import _cb_config_class, hf_continuous_batching, load_hf_model

    if _cb_config_class() is None:
        pytest.skip("transformers 5.0-5.4's continuous batching cannot size a cache on a CPU (no memory total)")
    model = load_hf_model(tiny_model_factory("llama"), "cpu", "float32")
    reqs = [Request([5 + i, 6, 7, 8, 9, 10], 3 + 2 * i) for i in range(4)]
    try:
        res = hf_continuous_batching(model, reqs, "cpu", num_blocks=16, page_size=16, max_batch_tokens=64)
    except RuntimeError as exc:                    # transformers <= 5.17 sizes its CPU cache with psutil
        if "available memory 0" in str(exc):
            pytest.skip(f"transformers' continuous batching cannot size a CPU cache here: {exc}")
        raise
    assert res.output_tokens == res.computed_tokens == sum(r.max_tokens for r in reqs)


def test_served_benchmark_end_to_end(tmp_path):
    """`kvserve bench served` on the tiny model: offline, the engine client without HTTP, a launched server,
    probes; the JSON has every figure."""
    pytest.importorskip("httpx")
    cwd = tmp_path / "work"
    cwd.mkdir()
    env = bench_env(tmp_path)
    cmd = [sys.executable, "-m", "kvserve", "bench", "served", "--model-shape", "tiny", "--num-requests", "8",
           "--prompt-len", "16:48", "--output-len", "4:12", "--probe-streams", "4", "--probe-seconds", "1",
           "--threads", "1", "--startup-timeout", "120", "--repeats", "2", "--engine-client"]
    if len(os.sched_getaffinity(0)) >= 2:
        first, second = sorted(os.sched_getaffinity(0))[:2]
        cmd += ["--server-cpus", str(first), "--client-cpus", str(second)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = cwd / "bench-results" / "served"
    payload = json.loads((out / "served.json").read_text())
    assert payload["benchmark"] == "served" and payload["machine"]["cpu_model"]
    assert payload["offline"]["output_tokens"] == payload["served"]["output_tokens"] == \
        payload["workload"]["output_tokens"]
    assert payload["served"]["errors"] == payload["served"]["errors_all_runs"] == 0
    client = payload["engine_client"]     # the same workload through kvserve.AsyncEngine, no HTTP
    assert client["output_tokens"] == payload["workload"]["output_tokens"] and len(client["runs"]) == 2
    assert client["elapsed_s"] in client["runs"] and client["over_offline"] > 0
    assert client["cpu_seconds"]["engine_process"] > 0 and client["cpu_seconds"]["client_process"] > 0
    assert "without HTTP (kvserve.AsyncEngine in the bench's process)" in proc.stdout
    assert payload["ratio"]["served_over_offline"] > 0
    assert len(payload["offline"]["runs"]) == len(payload["served"]["runs"]) == 2   # --repeats 2: medians
    assert payload["offline"]["elapsed_s"] in payload["offline"]["runs"]
    assert payload["served"]["duration_s"] in payload["served"]["runs"]
    assert "median of 2 runs each: offline" in proc.stdout
    for key in ("ttft_s", "itl_s"):
        assert payload["served"][key]["p50"] > 0 and payload["served"][key]["p99"] >= payload["served"][key]["p50"]
    for phase in ("idle", "load"):
        for path in ("/health", "/metrics"):
            probe = payload["probes"][phase][path]
            assert probe["n"] > 0 and probe["failures"] == 0
            assert 0 < probe["p50"] <= probe["p99"] <= probe["max"]
    pin = payload["config"]["pinning"]
    if "--server-cpus" in cmd:
        assert pin["server_cpus"] == str(first) and pin["client_cpus"] == str(second)
        assert set(pin["server_processes"].values()) == {str(first)}
    spent = payload["served"]["cpu_seconds"]    # the burst's CPU, split: the API process and the engine's
    assert spent["api_process"] > 0 and spent["engine_processes"] > 0
    assert "served / offline output tok/s:" in proc.stdout and "machine: " in proc.stdout
    assert "CPU seconds during the burst: API process" in proc.stdout
    assert (out / "served.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    replot = subprocess.run(cmd[:5] + ["--replot", str(out / "served.json"), "--out-dir", str(cwd / "again")],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert replot.returncode == 0, replot.stderr[-3000:]
    assert (cwd / "again" / "served.png").exists()
    from kvserve.bench.served import plot     # a run without --engine-client (or from before it) plots too
    assert plot({**payload, "engine_client": None}, cwd / "plain").exists()


def test_served_repeats_rotate_the_prompts_and_report_the_median_run():
    from kvserve.bench.loadgen import TextRequest
    from kvserve.bench.served import median_run, rotated
    reqs = [TextRequest("abcdefghijklmnop", 5), TextRequest("xyz", 2), TextRequest("", 1)]
    assert rotated(reqs, 0) == reqs
    turn1, turn2 = rotated(reqs, 1), rotated(reqs, 2)
    assert [r.prompt for r in turn1] == ["hijklmnopabcdefg", "yzx", ""]
    for turn in (turn1, turn2):    # the same work: lengths and outputs; no shared first block with turn 0
        assert [(sorted(r.prompt), r.max_tokens) for r in turn] == [(sorted(r.prompt), r.max_tokens) for r in reqs]
    assert turn1[0].prompt[0] != reqs[0].prompt[0] != turn2[0].prompt[0] != turn1[0].prompt[0]
    long = TextRequest("abcdefghijklmnopqrstu", 1)          # 21 characters: turn 3's 21 is no rotation
    assert all(rotated([long], turn)[0].prompt != long.prompt for turn in range(1, 9))
    runs = [{"t": 3.0, "x": "c"}, {"t": 1.0, "x": "a"}, {"t": 2.0, "x": "b"}, {"t": 9.0, "x": "d"}]
    assert median_run(runs[:3], "t") == {"t": 2.0, "x": "b", "runs": [3.0, 1.0, 2.0]}
    assert median_run(runs, "t")["x"] == "b"      # an even count: the lower middle one
    assert median_run(runs[:1], "t") == {"t": 3.0, "x": "c", "runs": [3.0]}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_served_pins_the_api_process_apart_from_the_engines_with_api_cpus():
    """`bench served --server-cpus A --api-cpus B`: `kvserve serve` itself (the API process) on B, every
    process it started (the engine's) on A; without --api-cpus all of them on A."""
    from kvserve.bench.served import allowed_cpus, pin_server, process_tree
    first, second = sorted(os.sched_getaffinity(0))[:2]
    # a stand-in for the server: a process that starts a child (the engine) and waits
    api = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen("
                            "[sys.executable, '-c', 'import time; time.sleep(60)']); print(flush=True); time.sleep(60)"],
                           stdout=subprocess.PIPE, text=True)
    try:
        api.stdout.readline()         # the child is started
        (engine,) = [pid for pid in process_tree(api.pid) if pid != api.pid]
        pin_server(api.pid, {first}, {second})
        assert (allowed_cpus(api.pid), allowed_cpus(engine)) == (str(second), str(first))
        pin_server(api.pid, {first})
        assert (allowed_cpus(api.pid), allowed_cpus(engine)) == (str(first), str(first))
    finally:
        for pid in process_tree(api.pid)[::-1]:
            os.kill(pid, 9)
        api.wait()


def test_offload_benchmark_end_to_end(tmp_path):
    """`kvserve bench offload` on the tiny model, 4 short conversations in a pool for one: the tier-on run finds
    turn 2's history in the host tier, and both runs' greedy outputs are the same."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    env = bench_env(tmp_path)
    cmd = [sys.executable, "-m", "kvserve", "bench", "offload", "--model-shape", "tiny", "--conversations", "4",
           "--history", "96", "--answer-len", "4", "--user-len", "16", "--pool-conversations", "1",
           "--threads", "1"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = cwd / "bench-results" / "offload"
    payload = json.loads((out / "offload.json").read_text())
    assert payload["benchmark"] == "offload" and payload["machine"]["cpu_model"]
    assert payload["identical_outputs"] is True
    assert "outputs with and without the tier are identical" in proc.stdout and "machine: " in proc.stdout
    off, on = payload["summary"]["off"]["stats"], payload["summary"]["on"]["stats"]
    assert off["prefix_hit_tokens"] == 0                    # the pool holds one conversation: turn 2 misses
    assert not off["offload_num_blocks"] and not off["offload_blocks_stored"]
    assert on["offload_num_blocks"] > 0 and on["offload_blocks_stored"] > 0 and on["offload_blocks_loaded"] > 0
    assert on["prefix_hit_tokens_host"] >= 4 * 96 // 16 * 16 - 16  # nearly every history block, from the host
    assert payload["summary"]["on"]["turn2_cached_tokens_mean"] >= 80
    assert payload["ratio"]["turn2_ttft_p50"] > 0
    assert (out / "offload.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_throughput_benchmark_reports_its_compute_floor(tmp_path):
    """`kvserve bench throughput` on the tiny model, kvserve alone: the table, the ratios' machine line,
    the compute floor (the workload's matmul FLOPs over a GEMM rate measured on this machine), and with
    --profile where the step time goes."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "kvserve", "bench", "throughput", "--model-shape", "tiny", "--systems", "kvserve",
           "--num-requests", "4", "--prompt-len", "8:16", "--output-len", "4:8", "--threads", "1",
           "--profile", "--profile-requests", "2", "--profile-tokens", "4"]
    proc = subprocess.run(cmd, cwd=cwd, env=bench_env(tmp_path), capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    payload = json.loads((cwd / "bench-results" / "throughput" / "throughput.json").read_text())
    floor = payload["compute_floor"]
    assert floor["flops"] > 0 and floor["matmul_flops_per_s"] > 0 and floor["seconds"] > 0
    assert "compute floor: " in proc.stdout and "kvserve took " in proc.stdout and "machine: " in proc.stdout
    assert payload["profile"]          # --profile ran (it once broke on a changed helper's signature)


def test_host_step_benchmark_end_to_end(tmp_path):
    """`kvserve bench host-step`: the host work of a decode step, per context length, with the machine."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "kvserve", "bench", "host-step", "--batch", "8", "--contexts", "32", "300",
           "--steps", "3"]
    proc = subprocess.run(cmd, cwd=cwd, env=bench_env(tmp_path), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((cwd / "bench-results" / "host-step" / "host-step.json").read_text())
    assert payload["benchmark"] == "host-step" and payload["machine"]["cpu_model"]
    assert [(r["context"], r["blocks_per_sequence"]) for r in payload["results"]] == [(32, 3), (300, 19)]
    assert all(r["schedule_ms"] > 0 and r["pack_ms"] > 0 for r in payload["results"])
    assert "host work per decode step of 8 sequences" in proc.stdout


def test_a_terminated_bench_stops_the_servers_it_launched(tmp_path):
    """SIGTERM (a `timeout` around the bench, as docs/gpu-check.sh has) unwinds the bench like Ctrl-C, so the
    servers it launched in sessions of their own are stopped on the way out instead of holding the GPU."""
    import signal
    import time
    marker = tmp_path / "cleaned"
    script = ("import sys, time\n"
              "from kvserve.bench.cli import _exit_on_sigterm\n"
              "_exit_on_sigterm()\n"
              "try:\n"
              "    print('ready', flush=True)\n"
              "    time.sleep(60)\n"
              "finally:\n"
              f"    open({str(marker)!r}, 'w').close()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=bench_env(tmp_path))
    try:
        assert proc.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 10
    finally:
        proc.kill()
        proc.stdout.close()
    assert marker.exists(), "the bench's cleanup did not run"


def test_kernels_benchmark_counts_a_decode_steps_kernels(tmp_path):
    """`kvserve bench kernels`: one decode step's kernel-launching calls (a proxy on CPU): the tiny Llama's
    7 projections a layer and its lm_head as 15 matmuls, each layer's paged attention as one call."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "kvserve", "bench", "kernels", "--model-shape", "tiny", "--forwards", "eager",
           "--threads", "1"]
    proc = subprocess.run(cmd, cwd=cwd, env=bench_env(tmp_path), capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((cwd / "bench-results" / "kernels" / "kernels.json").read_text())
    eager = payload["results"]["eager"]
    top = dict(eager["top"])
    assert eager["layers"] == 2 and top["attention"] == 2 and top["mm"] == 15
    assert eager["calls"] == sum(n for _, n in eager["top"]) and eager["calls"] > 40
    assert "one decode step at batch 1: tiny" in proc.stdout and payload["machine"]["cpu_model"]

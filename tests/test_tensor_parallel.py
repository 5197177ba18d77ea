"""Tensor parallel (issue 15) on CPU over gloo: a model sharded over 2 ranks gives the single-process
engine's tokens, greedy and seeded, with prefix hits, preemption, the host tier and forks;
`kvserve serve --tensor-parallel-size 2` answers over both APIs as a 1-process server does; a model or a
size that cannot be sharded is refused; a dead worker ends the server non-zero; SIGTERM leaves no worker.

Here this test process is rank 0 of the offline engines (it starts one worker each); the servers run
their ranks in their engine process and its one worker.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kvserve import LLM, SamplingParams
from kvserve.config import EngineConfig
from kvserve.distributed import WorkerGroupError, shards_on_load
from test_engine_process import engine_children, gone
from test_server_api import running_server, start_server, stop_server, wait_until

ARCHS = ["gemma2", "llama", "mistral", "phi3", "qwen3"]
LOGPROB_TOLERANCE = 1e-4    # float32 sums in another order (the shards' all-reduce) move logits by ~1e-6
# what really shards a model: transformers 5.13 and later (an earlier one is refused by name, tested below)
shards = pytest.mark.skipif(not shards_on_load(), reason="this transformers loads no shard per rank (5.13 and later do)")


def prompts(lens=(9, 30, 41), seed: int = 0) -> list[list[int]]:
    return [[(seed * 31 + j * 101 + i * i * 7 + i) % 250 + 3 for i in range(n)] for j, n in enumerate(lens)]


def params() -> list[SamplingParams]:
    """Greedy, seeded sampling, and greedy with top logprobs: each prompt gets each in turn."""
    return [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, top_logprobs=2),
            SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True),
            SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)]


def run_workload(llm: LLM) -> tuple[list, object]:
    """Prefill chunks, preemption in a 14-block pool, then a prefix hit on the first prompt."""
    ps = prompts()
    outs = llm.generate(ps, params()) + llm.generate(ps[:1], params()[:1])
    return outs, llm.engine.stats()


def assert_same(outs: list, ref: list) -> None:
    for out, expected in zip(outs, ref, strict=True):
        assert out.token_ids == expected.token_ids
        for tok, exp in zip(out.new_tokens, expected.new_tokens):
            assert abs(tok.logprob - exp.logprob) < LOGPROB_TOLERANCE
            assert [t for t, _ in tok.top or []] == [t for t, _ in exp.top or []]


def make_llm(path: str, tp: int, **kwargs) -> LLM:
    return LLM(path, device="cpu", tensor_parallel_size=tp, block_size=8, num_kv_blocks=14,
               max_num_batched_tokens=24, **kwargs)


def close(llm: LLM) -> None:
    if llm.engine.tp is not None:
        llm.close()


@shards
@pytest.mark.parametrize("arch", ARCHS)
def test_two_ranks_equal_one_greedy_and_seeded(arch, tiny_model_factory):
    path = tiny_model_factory(arch)
    ref, ref_stats = run_workload(make_llm(path, 1))
    llm = make_llm(path, 2)
    try:
        pool = llm.engine.kv_pool
        assert llm.engine.tp.world_size == 2 and pool.num_blocks == 14
        # each rank holds half the KV heads (Phi-3's plan gathers its fused qkv: every rank holds them all)
        assert pool.spec.num_kv_heads == (2 if arch == "phi3" else 1)
        outs, stats = run_workload(llm)
    finally:
        close(llm)
    assert_same(outs, ref)
    assert stats.num_preemptions > 0 and stats.prefix_hit_tokens > 0
    assert (stats.num_preemptions, stats.prefix_hit_tokens) == (ref_stats.num_preemptions, ref_stats.prefix_hit_tokens)
    assert stats.blocks_used == 0 and stats.num_running == stats.num_waiting == 0


@shards
def test_two_ranks_with_async_scheduling_equal_one(tiny_model_factory):
    """The forward thread drives the collectives of rank 0 (the workers see the same ordered steps)."""
    path = tiny_model_factory("llama")
    ref, _ = run_workload(make_llm(path, 1))
    llm = make_llm(path, 2, async_scheduling=True)
    try:
        outs, stats = run_workload(llm)
    finally:
        close(llm)
    assert_same(outs, ref)
    assert stats.num_preemptions > 0 and stats.blocks_used == 0


@shards
def test_block_moves_run_on_every_rank(tiny_model_factory):
    """The host tier's offloads and reloads and a fork's copy-on-write reach the worker's pool too."""
    path = tiny_model_factory("llama")

    def workload(llm: LLM) -> list[list[int]]:
        long = prompts((50, 50, 50), seed=3)
        out = [llm.generate([p], params()[:1])[0].token_ids for p in long]   # each evicts the one before
        out.append(llm.generate(long[:1], params()[:1])[0].token_ids)       # back from the host tier
        engine = llm.engine
        engine.add_request(long[1][:20], params()[1], request_id="parent")
        engine.add_request(long[1][:20], params()[1], request_id="child", parent_request_id="parent")
        done: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for o in engine.step():
                done.setdefault(o.request_id, []).extend(t.id for t in o.new_tokens)
        return out + [done["parent"], done["child"]]

    kwargs = dict(device="cpu", block_size=8, num_kv_blocks=12, max_num_batched_tokens=32, kv_offload_memory="4MiB")
    ref = workload(LLM(path, **kwargs))
    llm = LLM(path, tensor_parallel_size=2, **kwargs)
    sent = []
    send = llm.engine.tp.send
    llm.engine.tp.send = lambda message: sent.append(message) or send(message)
    try:
        assert workload(llm) == ref
        stats = llm.engine.stats()
    finally:
        close(llm)
    assert stats.prefix_hit_tokens_host > 0 and stats.offload_blocks_loaded > 0, stats
    moves = [m[1:] for m in sent if m[0] == "moves"]
    assert all(any(m[kind] for m in moves) for kind in range(3)), moves   # offloads, reloads, copies


@pytest.mark.parametrize("config_name, kv_heads, expected", [
    ("LlamaConfig", 4, 2), ("Qwen2Config", 2, 1), ("Gemma2Config", 4, 2),   # k_proj sharded by columns
    ("Phi3Config", 4, 4),          # the fused qkv_proj's output is gathered: every rank holds every KV head
    ("LlamaConfig", 3, None),      # 3 KV heads do not split over 2 ranks
])
def test_kv_heads_per_rank_follow_the_installed_transformers_plans(config_name, kv_heads, expected):
    """Read from the plan by kvserve itself: transformers 5.17, the GPU hosts', has no helper for it."""
    import transformers

    from kvserve.distributed import kv_heads_per_rank
    plan = {f"model.{key}": style for key, style in getattr(transformers, config_name)().base_model_tp_plan.items()}
    assert kv_heads_per_rank(plan, kv_heads, 2) == expected
    assert kv_heads_per_rank({}, kv_heads, 2) == kv_heads       # no plan: nothing is sharded


def test_refusals(tiny_model_factory):
    """Refused before any worker starts: no tensor-parallel plan, heads that do not divide, bad sizes."""
    with pytest.raises(ValueError, match="no tensor-parallel plan"):
        LLM(tiny_model_factory("gpt2"), device="cpu", tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"must divide the model's attention heads \(4\) and KV heads \(2\)"):
        LLM(tiny_model_factory("llama"), device="cpu", tensor_parallel_size=4)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
            EngineConfig(model="m", tensor_parallel_size=bad)


def test_a_transformers_that_cannot_shard_on_load_is_refused_by_name(tiny_model_factory, monkeypatch):
    """transformers 5.3-5.12 load no shard per rank (their DistributedConfig takes no tp_size): the check
    launch() runs before any worker starts refuses it, naming the version needed and the one installed
    (with no CUDA device counted, so on any host)."""
    from transformers import AutoConfig
    from transformers import distributed as hf_distributed

    from kvserve import distributed

    class OldDistributedConfig:     # 5.3-5.12's signature
        def __init__(self, enable_expert_parallel: bool = False):
            self.enable_expert_parallel = enable_expert_parallel

    hf_config = AutoConfig.from_pretrained(tiny_model_factory("llama"))
    cfg = EngineConfig(model="m", device="cpu", tensor_parallel_size=2)
    monkeypatch.setattr(hf_distributed, "DistributedConfig", OldDistributedConfig)
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 2 needs transformers 5\.13 or later.*this is "
                                         r"transformers \d"):
        distributed.check(cfg, hf_config, cuda_devices=0)
    monkeypatch.undo()
    if shards_on_load():
        distributed.check(cfg, hf_config, cuda_devices=0)


def test_cuda_device_checks(tiny_model_factory):
    from transformers import AutoConfig

    from kvserve import distributed
    hf_config = AutoConfig.from_pretrained(tiny_model_factory("llama"))
    cfg = EngineConfig(model="m", device="cuda", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="needs 2 CUDA devices; torch sees 1"):
        distributed.check(cfg, hf_config, cuda_devices=1)
    if shards_on_load():
        distributed.check(cfg, hf_config, cuda_devices=2)
    else:       # the devices pass; the transformers cannot shard
        with pytest.raises(ValueError, match="needs transformers 5.13 or later"):
            distributed.check(cfg, hf_config, cuda_devices=2)
    with pytest.raises(ValueError, match="runs rank r on cuda:r"):
        distributed.check(EngineConfig(model="m", device="cuda:1", tensor_parallel_size=2), hf_config, 2)
    with pytest.raises(ValueError, match="no CUDA device"):
        distributed.check(EngineConfig(model="m", device="cpu", tensor_parallel_size=2), hf_config, 2)


@shards
def test_a_dead_worker_fails_the_offline_engine(tiny_model_factory):
    """Offline (no engine process to end) the next step raises instead of waiting on the lost rank."""
    llm = LLM(tiny_model_factory("llama"), device="cpu", tensor_parallel_size=2)
    try:
        group = llm.engine.tp
        group.procs[0].kill()
        assert wait_until(lambda: group.error is not None, 10)
        with pytest.raises(WorkerGroupError, match="worker rank 1 .* exited with status -9"):
            llm.generate(prompts()[:1], params()[:1])
    finally:
        close(llm)


@shards
def test_a_failed_forward_on_rank_0_stops_the_group(tiny_model_factory):
    """Rank 0 broke off a forward the worker may still be inside: the group is stopped, not reused."""
    llm = LLM(tiny_model_factory("llama"), device="cpu", tensor_parallel_size=2)
    try:
        runner = llm.engine.runner

        def interrupted(step):
            raise KeyboardInterrupt

        runner._forward = interrupted
        with pytest.raises(WorkerGroupError, match="forward failed on rank 0: KeyboardInterrupt"):
            llm.generate(prompts()[:1], params()[:1])
        assert all(proc.poll() is not None for proc in llm.engine.tp.procs)
        with pytest.raises(WorkerGroupError):
            llm.generate(prompts()[:1], params()[:1])
    finally:
        close(llm)


@shards
def test_the_ranks_listen_on_loopback_only(tiny_model_factory):
    psutil = pytest.importorskip("psutil")
    llm = LLM(tiny_model_factory("llama"), device="cpu", tensor_parallel_size=2)
    try:
        pids = [os.getpid()] + [proc.pid for proc in llm.engine.tp.procs]
        listening = [c.laddr for pid in pids for c in psutil.Process(pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(addr.ip in ("127.0.0.1", "::1") for addr in listening), listening
    finally:
        close(llm)


def test_one_rank_never_joins_a_collective(tiny_model_factory, monkeypatch):
    """A process that already has a process group (a trainer) builds a 1-rank engine without touching it."""
    from kvserve import distributed

    def collective(num_blocks):
        raise AssertionError("a 1-rank engine ran a collective")

    monkeypatch.setattr(distributed, "agree", collective)
    llm = LLM(tiny_model_factory("llama"), device="cpu", num_kv_blocks=16)
    assert llm.generate(prompts()[:1], params()[:1])[0].token_ids


# the server

def worker_children(server_pid: int) -> list[int]:
    """Pids of the tensor-parallel workers under the server's engine process."""
    [engine] = engine_children(server_pid)
    found = []
    for task in Path(f"/proc/{engine}/task").iterdir():
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return [p for p in found if b"kvserve.distributed" in Path(f"/proc/{p}/cmdline").read_bytes()]


@pytest.fixture(scope="module")
def servers(tiny_model_factory, tmp_path_factory):
    path = tiny_model_factory("llama")
    logs = tmp_path_factory.mktemp("tensor-parallel")
    flags = ("--num-kv-blocks", "64", "--max-num-seqs", "4", "--log-level", "warning")
    with running_server(path, logs / "tp1.log", *flags) as one, \
            running_server(path, logs / "tp2.log", *flags, "--tensor-parallel-size", "2") as two:
        yield one, two


@shards
def test_server_outputs_equal_one_process(servers):
    one, two = servers
    assert len(worker_children(two.proc.pid)) == 1 and worker_children(one.proc.pid) == []
    bodies = [("/generate", {"inputs": "The paged cache " * 3, "parameters": {"max_new_tokens": 12, "details": True,
                                                                                "decoder_input_details": True}}),
              ("/generate", {"inputs": "hello", "parameters": {"max_new_tokens": 12, "do_sample": True, "seed": 5,
                                                                 "temperature": 0.8, "details": True}}),
              ("/v1/completions", {"prompt": "continuous batching", "max_tokens": 12, "temperature": 0,
                                   "logprobs": 2}),
              ("/v1/completions", {"prompt": "sampled", "max_tokens": 12, "temperature": 1.0, "seed": 11, "n": 2}),
              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
                                        "temperature": 0})]
    bodies += [("/generate", {"inputs": "a prompt of more than two KV blocks, asked twice", "parameters": {
        "max_new_tokens": 8, "details": True}})] * 2      # the second one hits the prefix cache
    for route, body in bodies:
        answers = [httpx.post(s.base + route, json=body, timeout=60) for s in (one, two)]
        assert [a.status_code for a in answers] == [200, 200], answers[1].text
        a, b = (strip_volatile(r.json()) for r in answers)
        assert_close(a, b, route)
    # the same blocks were used and cached the same way: the metrics agree
    assert one.stats()["prefix_hit_tokens"] == two.stats()["prefix_hit_tokens"] > 0


def strip_volatile(body):
    if isinstance(body, dict):
        return {k: strip_volatile(v) for k, v in body.items() if k not in ("id", "created", "system_fingerprint")}
    if isinstance(body, list):
        return [strip_volatile(v) for v in body]
    return body


def assert_close(a, b, where: str) -> None:
    """Equal JSON, except logprobs (floats) within LOGPROB_TOLERANCE."""
    if isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) < LOGPROB_TOLERANCE, (where, a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_serve_refuses_a_model_without_a_plan_and_a_bad_size(tiny_model_factory, tmp_path):
    def serve(*flags: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "kvserve", "serve", "--device", "cpu", "--port", "0", *flags]
        return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    r = serve("--model", tiny_model_factory("gpt2"), "--tensor-parallel-size", "2")
    assert r.returncode == 1 and "has no tensor-parallel plan" in r.stderr, r.stderr[-3000:]
    r = serve("--model", tiny_model_factory("llama"), "--tensor-parallel-size", "0")
    assert r.returncode == 2 and "tensor_parallel_size must be an integer >= 1" in r.stderr, r.stderr[-3000:]


@shards
def test_a_killed_worker_ends_the_server_non_zero(tiny_model_factory, tmp_path):
    server = start_server(tiny_model_factory("llama"), tmp_path / "kvserve.log", "--tensor-parallel-size", "2")
    try:
        [worker] = worker_children(server.proc.pid)
        os.kill(worker, signal.SIGKILL)
        assert server.proc.wait(timeout=30) == 1, server.log_tail()
        assert "tensor-parallel worker rank 1" in server.log_tail() and "exiting with status 1" in server.log_tail()
    finally:
        stop_server(server)


@shards
def test_sigterm_drains_and_leaves_no_worker(tiny_model_factory, tmp_path):
    server = start_server(tiny_model_factory("llama"), tmp_path / "kvserve.log", "--tensor-parallel-size", "2")
    try:
        [engine] = engine_children(server.proc.pid)
        [worker] = worker_children(server.proc.pid)
        r = httpx.post(f"{server.base}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 4}},
                       timeout=30)
        assert r.status_code == 200
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0, server.log_tail()
        assert wait_until(lambda: gone(engine) and gone(worker), 10), "a process outlived the server"
    finally:
        stop_server(server)


@shards
def test_tp_benchmark_runs_as_a_user_would(tmp_path):
    """`kvserve bench tp` on the tiny model: sizes 1 and 2, their tokens/s, and the same tokens."""
    pytest.importorskip("matplotlib")
    cmd = [sys.executable, "-m", "kvserve", "bench", "tp", "--model-shape", "tiny", "--num-requests", "4",
           "--prompt-len", "8:16", "--output-len", "4:8"]
    env = os.environ | {"KVSERVE_BENCH_MODELS": str(tmp_path / "models"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "bench-results" / "tp" / "tp.json").read_text())["results"]
    assert set(results) == {"1", "2"} and all(r["outputs_equal_baseline"] for r in results.values())
    assert all(r["output_tokens_per_s"] > 0 for r in results.values()) and "same tokens" in proc.stdout

"""The engine core runs in its own process: it starts and stops with the server, its death ends
the server non-zero, and outputs over HTTP still equal transformers' greedy generate()."""
from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from test_server_api import running_server, sse_events, start_server, stop_server, wait_until

MAX_NEW = 16
TIE_TOLERANCE = 1e-4
PROMPTS = ["The paged cache", "hello, world", "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 3,
           "continuous batching interleaves prefill and decode"]


def engine_children(server_pid: int) -> list[int]:
    """Pids of the server's engine processes (Linux /proc)."""
    children = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():   # each thread lists the children it started
        try:
            children += (task / "children").read_text().split()
        except FileNotFoundError:
            continue
    found = []
    for pid in map(int, children):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"kvserve.engine_proc" in cmdline:
            found.append(pid)
    return found


def gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_the_engine_process_starts_and_stops_with_the_server(demo_model_dir, tmp_path):
    server = start_server(demo_model_dir, tmp_path / "kvserve.log")
    try:
        engines = engine_children(server.proc.pid)
        assert len(engines) == 1, engines
        r = httpx.post(f"{server.base}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 4}},
                       timeout=30)
        assert r.status_code == 200
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0, server.log_tail()
        assert wait_until(lambda: gone(engines[0]), 10), "the engine process outlived the server"
        assert '"POST /generate HTTP/1.1" 200' in server.log.read_text()   # the access log, on by default
    finally:
        stop_server(server)


def test_a_killed_engine_ends_the_server_non_zero(demo_model_dir, tmp_path):
    """The OOM killer takes the engine process: the stream in flight ends with an error, new
    requests are refused, and the server exits 1 so a supervisor restarts it."""
    server = start_server(demo_model_dir, tmp_path / "kvserve.log")
    try:
        [engine] = engine_children(server.proc.pid)

        async def scenario():
            async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
                async with client.stream("POST", "/generate_stream", json={
                        "inputs": "long", "parameters": {"max_new_tokens": 1500, "ignore_eos": True}}) as r:
                    lines = []
                    async for line in r.aiter_lines():
                        lines.append(line)
                        if sum(x.startswith("data:") for x in lines) == 3:
                            os.kill(engine, signal.SIGKILL)
                return sse_events(lines)[0]

        events = asyncio.run(asyncio.wait_for(scenario(), 60))
        assert "error" in events[-1] and len(events) < 1500, events[-1]
        assert server.proc.wait(timeout=30) == 1, server.log_tail()
        assert "exiting with status 1" in server.log_tail()
    finally:
        stop_server(server)


@pytest.fixture(scope="module", params=[("llama",), ("gemma2",), ("llama", "--async-scheduling")],
                ids=["llama", "gemma2", "llama-async-scheduling"])
def arch_server(request, tiny_model_factory, tmp_path_factory):
    path = tiny_model_factory(request.param[0])
    with running_server(path, tmp_path_factory.mktemp("engine-proc") / "kvserve.log", *request.param[1:]) as server:
        yield path, server


def greedy_reference(path: str, prompt_ids: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None     # like ignore_eos
    cfg = GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0, output_logits=True,
                           return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), generation_config=cfg)
    return out.sequences[0, len(prompt_ids):].tolist(), [logits[0] for logits in out.logits]


def test_http_outputs_equal_transformers_streamed_and_not_while_batched(arch_server):
    path, server = arch_server
    tokenizer = AutoTokenizer.from_pretrained(path)
    params = {"max_new_tokens": MAX_NEW, "ignore_eos": True, "details": True}

    async def one(client: httpx.AsyncClient, i: int, prompt: str) -> list[int]:
        if i % 2:
            r = await client.post("/generate", json={"inputs": prompt, "parameters": params})
            assert r.status_code == 200, r.text
            return [t["id"] for t in r.json()["details"]["tokens"]]
        async with client.stream("POST", "/generate_stream", json={"inputs": prompt, "parameters": params}) as r:
            assert r.status_code == 200
            events = sse_events([line async for line in r.aiter_lines()])[0]
        return [e["token"]["id"] for e in events]

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.base, timeout=60) as client:
            return await asyncio.gather(*(one(client, i, p) for i, p in enumerate(PROMPTS)))

    for prompt, ours in zip(PROMPTS, asyncio.run(all_at_once())):
        ref, logits = greedy_reference(path, tokenizer.encode(prompt))
        assert len(ours) == MAX_NEW
        diff = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        if diff is not None:   # an exact float32 tie may flip; anything else is a bug
            gap = abs(float(logits[diff][ours[diff]] - logits[diff][ref[diff]]))
            assert gap <= TIE_TOLERANCE, (prompt, diff, ours, ref, gap)


def test_a_steps_outputs_cross_the_pipe_as_columns_and_come_back_the_same():
    import pickle

    from kvserve.engine import CoreOutput
    from kvserve.engine_proc import pack_outputs, unpack_outputs

    outputs = [CoreOutput("a", 5, -0.25, None, None, 16, 1.5),
               ("refused", ValueError("bad")),
               CoreOutput("b", None, 0.0, "abort", None, 0, None, "boom"),
               CoreOutput("c", 7, -1.0, "stop", "</s>", 3, 2.0, None, [(7, -1.0), (9, -2.0)], [None, (-0.5, None)])]
    back = unpack_outputs(pickle.loads(pickle.dumps(pack_outputs(outputs))))
    assert back[:3] == [outputs[0], outputs[2], outputs[3]] and all(isinstance(o, CoreOutput) for o in back[:3])
    assert back[3][0] == "refused" and isinstance(back[3][1], ValueError)
    assert unpack_outputs(pack_outputs([])) == []

"""Batch-1 decode step time against the memory-bandwidth floor.

At batch 1 a decode step is bound by memory: it must read every weight once (the input embedding
only one row of it) and the sequence's K/V. The floor is those bytes over the copy bandwidth
measured on the same device (bytes read + bytes written by a large device-to-device copy, per
second). The step time is the engine's own step (schedule, forward, sample, detokenize) over the
decode steps of one request; transformers' generate() per output token is shown for scale.
"""
from __future__ import annotations

import argparse
import logging
import random
import statistics
import time

from kvserve.bench import common
from kvserve.bench.common import print_table
from kvserve.bench.models import describe, model_path
from kvserve.bench.peers import free_memory, load_hf_model, make_llm, sampling_params, synchronize

NAME = "decode-floor"
HELP = "batch-1 decode step time of kvserve vs the memory-bandwidth floor (weights + KV bytes / copy bandwidth)"
TARGET = 2.0   # step time within 2x of the floor
log = logging.getLogger("kvserve.bench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common_args(p)
    g = p.add_argument_group("workload")
    g.add_argument("--context", type=int, default=512, metavar="N", help="prompt tokens before decoding")
    g.add_argument("--steps", type=int, default=128, metavar="N", help="decode steps timed")
    g.add_argument("--copy-mib", type=int, default=None, metavar="MIB",
                   help="bandwidth probe buffer (default: 1024 on CUDA, 256 on CPU)")
    g.add_argument("--block-size", type=int, default=16, metavar="N", help="tokens per KV block")
    g.add_argument("--enforce-eager", action="store_true", help="kvserve without CUDA graphs")
    g.add_argument("--async-scheduling", action="store_true",
                   help="kvserve schedules the next step while one runs (the step period is then the figure)")
    g.add_argument("--compile", action="store_true",
                   help="kvserve with torch.compile (on CUDA the decode graphs capture the compiled forward)")
    g.add_argument("--no-generate", action="store_true", help="skip transformers' generate() for scale")


def copy_bandwidth(device: str, nbytes: int, repeats: int = 10) -> float:
    """Bytes moved (read + write) per second by the best of `repeats` device-to-device copies."""
    import torch
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def bytes_per_step(model, hf_config, context: int, block_size: int) -> dict[str, int]:
    """Weights read by one decode step (all parameters; of an untied input embedding one row) and
    the K/V of `context` tokens (whole blocks, as the kernels read them)."""
    params = {id(p): p for p in model.parameters()}
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is embed
    weights = sum(p.numel() * p.element_size() for p in params.values())
    if not tied:
        weights -= (embed.shape[0] - 1) * embed.shape[1] * embed.element_size()
    text = hf_config.get_text_config()
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    tokens = -(-context // block_size) * block_size
    kv = 2 * text.num_hidden_layers * tokens * kv_heads * head_dim * embed.element_size()
    return {"weights": weights, "kv": kv, "total": weights + kv}


def run(args: argparse.Namespace) -> int:
    common.prepare(args, NAME)
    path = model_path(args.model_shape, args.dtype)
    machine = common.machine_info(args.device)
    log.info("machine: %s", common.machine_line(machine))
    copy_bytes = (args.copy_mib or (1024 if args.device.startswith("cuda") else 256)) * 2**20
    bandwidth = copy_bandwidth(args.device, copy_bytes)
    log.info("copy bandwidth: %.1f GB/s (%d MiB buffer)", bandwidth / 1e9, copy_bytes // 2**20)

    max_len = args.context + args.steps + 8
    llm = make_llm(path, args.device, args.dtype, block_size=args.block_size, max_num_seqs=8,
                   max_model_len=max_len, num_kv_blocks=4 * (-(-max_len // args.block_size)) + 4,
                   cuda_graphs=False if args.enforce_eager else None, async_scheduling=args.async_scheduling or None,
                   compile=args.compile or None)
    runner = llm.engine.runner
    durations: list[float] = []
    ends: list[float] = []     # when each decode step's tokens were in: their gaps are the time per token

    def listen(stats) -> None:
        if stats.num_prefill_tokens == 0:
            durations.append(stats.duration)
            ends.append(time.perf_counter())

    llm.engine.add_step_listener(listen)
    rng = random.Random(args.seed)
    vocab = runner.vocab_size
    prompt = [rng.randrange(3, vocab) for _ in range(args.context)]
    llm.generate([prompt[: args.context // 2]], sampling_params(16))          # warm-up (kernels compile)
    durations.clear()
    ends.clear()
    out = llm.generate([prompt], sampling_params(args.steps + 1))[0]
    assert len(out.token_ids) == args.steps + 1, out.finish_reason
    step = statistics.median(durations)
    period = statistics.median(b - a for a, b in zip(ends, ends[1:]))
    # the KV read grows over the run; the middle step reads about the average
    need = bytes_per_step(runner.model, runner.model.config, args.context + args.steps // 2, args.block_size)
    floor = need["total"] / bandwidth
    graphs = runner.graphs is not None and bool(runner.graphs.graphs)
    # the decode steps ran the compiled model (not if the graphs had to capture the eager one instead)
    compiled = runner.compiled is not None and (runner.graphs is None or runner.graphs.compiled is not None)
    del llm, runner
    free_memory()

    gen_ms = None
    if not args.no_generate:
        gen_ms = _generate_per_token(path, args, prompt) * 1e3

    rows = [["kvserve decode step (median)", step * 1e3, step / floor],
            ["kvserve time per token (median gap)", period * 1e3, period / floor],
            ["floor: bytes / copy bandwidth", floor * 1e3, 1.0]]
    if gen_ms is not None:
        rows.append(["transformers generate() per token", gen_ms, gen_ms / 1e3 / floor])
    print()
    print_table(["", "ms", "x floor"], rows,
                title=f"decode at batch 1: {args.model_shape}, {args.dtype} on {args.device}, context "
                      f"{args.context}+{args.steps}, CUDA graphs {'on' if graphs else 'off'}, async scheduling "
                      f"{'on' if args.async_scheduling else 'off'}, compiled {'yes' if compiled else 'no'}")
    print(f"bytes per step: weights {need['weights'] / 2**20:.1f} MiB + KV {need['kv'] / 2**20:.1f} MiB; copy "
          f"bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    # the step's own time, or with async scheduling (steps overlap) the gap between tokens
    figure = period if args.async_scheduling else step
    verdict = "meets" if figure / floor <= TARGET else "misses"
    print(f"kvserve: {figure / floor:.2f}x the floor ({verdict} the {TARGET}x target)")
    print(f"machine: {common.machine_line(machine)}")
    common.write_json(args.out_dir, NAME, {
        "benchmark": NAME, "machine": machine,
        "model": {"shape": args.model_shape, "description": describe(args.model_shape), "dtype": args.dtype},
        "workload": {"context": args.context, "steps": args.steps, "block_size": args.block_size},
        "cuda_graphs": graphs, "async_scheduling": args.async_scheduling, "compiled": compiled,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "bytes_per_step": need, "step_s": {"median": step, **common.summarize(durations)}, "period_s": period,
        "floor_s": floor, "x_floor": figure / floor,
        "target_x_floor": TARGET, "generate_per_token_s": None if gen_ms is None else gen_ms / 1e3,
    })
    return 0


def _generate_per_token(path, args, prompt: list[int]) -> float:
    """(time for steps + 1 new tokens - time for 1) / steps: generate()'s decode cost per token."""
    import torch
    model = load_hf_model(path, args.device, args.dtype)
    ids = torch.tensor([prompt], device=args.device)

    def timed(n: int) -> float:
        synchronize(args.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        synchronize(args.device)
        return time.perf_counter() - t0

    timed(4)
    per_token = (timed(args.steps + 1) - timed(1)) / args.steps
    del model
    free_memory()
    return per_token

"""Offline throughput: one workload through kvserve, transformers generate() and transformers generate_batch()."""
from __future__ import annotations

import argparse
import logging
import time

from kvserve.bench import common
from kvserve.bench.common import Request, make_workload, print_table, ratio
from kvserve.bench.models import describe, model_and_vocab
from kvserve.bench.peers import (RunResult, blocks_for, free_memory, hf_continuous_batching, hf_generate_static,
                         kvserve_generate, load_hf_model, make_llm, synchronize)

NAME = "throughput"
HELP = "output tokens/s of kvserve vs transformers generate() and generate_batch() on one workload"
SYSTEMS = ("kvserve", "kvserve_compiled", "kvserve_async", "generate_batch", "generate")
DEFAULT_SYSTEMS = ("kvserve", "generate_batch", "generate")
TARGETS = {"generate": 3.0, "generate_batch": 1.5}         # CPU (issue 5)
CUDA_TARGETS = {"generate": 15.0}                           # GPU, bf16 (issue 6; vLLM reports 14-24x)
log = logging.getLogger("kvserve.bench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common_args(p)
    g = common.add_workload_args(p)
    g.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), metavar="LIST",
                   help=f"comma-separated systems, of {', '.join(SYSTEMS)} (kvserve_compiled: with compile=True, "
                        "the model compiled at start-up; kvserve_async: with async_scheduling=True)")
    g = p.add_argument_group("systems")
    g.add_argument("--batch-size", type=int, default=8, metavar="N", help="generate()'s static batch size")
    g.add_argument("--max-batch-tokens", type=int, default=2048, metavar="N",
                   help="tokens per step, kvserve and generate_batch")
    g.add_argument("--block-size", type=int, default=16, metavar="N", help="kvserve's tokens per KV block")
    g.add_argument("--kv-blocks", type=int, default=None, metavar="N",
                   help="KV blocks, same slots for generate_batch (default: the whole workload)")
    g.add_argument("--max-num-seqs", type=int, default=256, metavar="N", help="kvserve's max_num_seqs")
    g.add_argument("--hf-page-size", type=int, default=256, metavar="N", help="generate_batch's page size")
    g.add_argument("--warmup", type=int, default=2, metavar="N", help="warm-up requests per system")
    g = p.add_argument_group("profiling")
    g.add_argument("--profile", action="store_true", help="also print where kvserve's step time goes")
    g.add_argument("--profile-requests", type=int, default=16, metavar="N", help="requests profiled")
    g.add_argument("--profile-tokens", type=int, default=32, metavar="N", help="max_tokens while profiling")


def warmup_slice(requests: list[Request], n: int) -> list[Request]:
    """Short requests whose prompts share no prefix with the workload (no prefix-cache head start)."""
    return [Request(r.prompt_token_ids[::-1][:64], min(r.max_tokens, 8)) for r in requests[:n]]


def run(args: argparse.Namespace) -> int:
    common.prepare(args, NAME)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    path, vocab = model_and_vocab(args.model_shape, args.dtype)
    reqs = make_workload(args.num_requests, args.prompt_len, args.output_len, vocab, args.seed)
    kv_blocks = args.kv_blocks or blocks_for(reqs, args.block_size)
    machine = common.machine_info(args.device)
    log.info("machine: %s", common.machine_line(machine))
    log.info("model: %s; %d requests, prompt %s, output %s, %d KV blocks of %d", describe(args.model_shape),
             len(reqs), args.prompt_len, args.output_len, kv_blocks, args.block_size)

    results: dict[str, RunResult] = {}
    for system in systems:
        log.info("running %s", system)
        results[system] = _run_system(system, args, path, reqs, kv_blocks)
        log.info("%s: %.1f output tokens/s (%.1f s)", system, results[system].output_tps, results[system].elapsed)
        free_memory()

    profile = _profile(args, path, reqs, kv_blocks) if args.profile else None
    floor = compute_floor(path, reqs, args.device, args.dtype, args.max_batch_tokens)
    _report(args, machine, reqs, kv_blocks, results, profile, floor)
    return 0


def compute_floor(path, reqs: list[Request], device: str, dtype: str, rows: int) -> dict:
    """The workload's matmul FLOPs over this device's measured matmul rate: no system can run it in
    less time. Every prompt and output token goes through every linear layer once (no prefix hits:
    the prompts are random), the lm_head once per output token, attention over each token's context."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    layer_params = sum(m.weight.numel() for m in linears)
    text = config.get_text_config()
    attn_width = text.num_attention_heads * (getattr(text, "head_dim", None)
                                             or text.hidden_size // text.num_attention_heads)
    prompt = sum(len(r.prompt_token_ids) for r in reqs)
    output = sum(r.max_tokens for r in reqs)
    # QK^T and AV: 4 x context x width per token per layer, context summed over each request's positions
    context = sum((len(r.prompt_token_ids) + r.max_tokens) ** 2 / 2 for r in reqs)
    flops = 2 * layer_params * (prompt + output) + 2 * head.weight.numel() * output \
        + 4 * attn_width * text.num_hidden_layers * context
    # the rate: a GEMM of the model's widest projection at one step's token count, best of 5
    widest = max(linears, key=lambda m: m.weight.numel())
    out_features, in_features = widest.weight.shape
    torch_dtype = getattr(torch, dtype)
    a = torch.randn(rows, in_features, dtype=torch_dtype, device=device)
    b = torch.randn(in_features, out_features, dtype=torch_dtype, device=device)
    best = float("inf")
    for _ in range(6):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    rate = 2 * rows * in_features * out_features / best
    return {"flops": flops, "matmul_flops_per_s": rate, "seconds": flops / rate,
            "gemm": [rows, in_features, out_features]}


def _kvserve(args, path, reqs: list[Request], kv_blocks: int, system: str):
    max_len = max(len(r.prompt_token_ids) + r.max_tokens for r in reqs)
    return make_llm(path, args.device, args.dtype, block_size=args.block_size, num_kv_blocks=kv_blocks,
                    max_num_batched_tokens=args.max_batch_tokens, max_num_seqs=args.max_num_seqs,
                    max_model_len=max_len, seed=args.seed, compile=system == "kvserve_compiled" or None,
                    async_scheduling=system == "kvserve_async" or None)


def _run_system(system: str, args, path, reqs: list[Request], kv_blocks: int) -> RunResult:
    if system.startswith("kvserve"):
        llm = _kvserve(args, path, reqs, kv_blocks, system)
        kvserve_generate(llm, warmup_slice(reqs, args.warmup), args.device, desc=f"{system} warm-up")
        res = kvserve_generate(llm, reqs, args.device, desc=system)
        res.extra["engine_stats"] = _stats_dict(llm)
        del llm
        return res
    model = load_hf_model(path, args.device, args.dtype)
    if system == "generate":
        hf_generate_static(model, warmup_slice(reqs, args.warmup), args.batch_size, args.device, desc="warm-up")
        return hf_generate_static(model, reqs, args.batch_size, args.device, desc="generate")
    page = args.hf_page_size
    num_blocks = -(-kv_blocks * args.block_size // page) + len(reqs)  # same token slots, plus per-request rounding
    kw = dict(num_blocks=num_blocks, page_size=page, max_batch_tokens=args.max_batch_tokens)
    hf_continuous_batching(model, warmup_slice(reqs, args.warmup), args.device, desc="warm-up", **kw)
    return hf_continuous_batching(model, reqs, args.device, desc="generate_batch", **kw)


def _stats_dict(llm) -> dict | None:
    try:
        from dataclasses import asdict
        return asdict(llm.engine.stats())
    except Exception as exc:  # the stats are a bonus, not the measurement
        log.warning("could not read engine stats: %s", exc)
        return None


def _profile(args, path, reqs, kv_blocks) -> dict:
    from kvserve.bench.profiling import profile_kvserve
    llm = _kvserve(args, path, reqs, kv_blocks, "kvserve")
    sl = [Request(r.prompt_token_ids, min(r.max_tokens, args.profile_tokens)) for r in reqs[:args.profile_requests]]
    kvserve_generate(llm, warmup_slice(reqs, args.warmup), args.device, desc="kvserve warm-up")
    return profile_kvserve(llm, sl, args.device)


def _report(args, machine, reqs, kv_blocks, results: dict[str, RunResult], profile, floor: dict) -> None:
    base = results.get("kvserve")
    rows = []
    for name, r in results.items():
        rows.append([name, r.num_requests, r.output_tokens, r.computed_tokens, r.elapsed, r.output_tps,
                     r.request_rate, ratio(base.output_tps, r.output_tps) if base else None])
    print()
    print_table(["system", "requests", "output tok", "computed tok", "time s", "output tok/s", "req/s",
                 "kvserve x"], rows,
                title=f"throughput: {len(reqs)} requests, prompt {args.prompt_len[0]}-{args.prompt_len[1]}, output "
                      f"{args.output_len[0]}-{args.output_len[1]} tokens, ignore_eos, greedy, {args.dtype} on "
                      f"{args.device}; model {args.model_shape}")
    ratios = {}
    if base:
        targets = CUDA_TARGETS if args.device.startswith("cuda") else TARGETS
        for name, target in targets.items():
            if name in results:
                ratios[f"kvserve/{name}"] = {"ratio": ratio(base.output_tps, results[name].output_tps),
                                             "target": target}
        for key, v in ratios.items():
            ok = "meets" if v["ratio"] >= v["target"] else "below"
            print(f"{key}: {v['ratio']:.2f}x ({ok} the {v['target']}x target)")
    if "generate" in results:
        g = results["generate"]
        print(f"generate() computed {g.computed_tokens} output tokens for {g.output_tokens} useful ones: static "
              f"batches of {args.batch_size} run to each batch's longest output; only each request's own tokens count.")
    print(f"compute floor: {floor['flops'] / 1e12:.2f} TFLOP of matmuls at {floor['matmul_flops_per_s'] / 1e9:.0f} "
          f"GFLOP/s (a {' x '.join(map(str, floor['gemm']))} GEMM measured here) = {floor['seconds']:.2f} s"
          + (f"; kvserve took {base.elapsed / floor['seconds']:.1f}x that" if base else ""))
    print(f"machine: {common.machine_line(machine)}")
    if profile:
        from kvserve.bench.profiling import print_profile
        print_profile(profile)
    payload = {
        "benchmark": NAME, "machine": machine,
        "model": {"shape": args.model_shape, "description": describe(args.model_shape), "dtype": args.dtype},
        "workload": {"num_requests": len(reqs), "prompt_len": args.prompt_len, "output_len": args.output_len,
                     "prompt_tokens": sum(len(r.prompt_token_ids) for r in reqs),
                     "output_tokens": sum(r.max_tokens for r in reqs), "seed": args.seed, "ignore_eos": True,
                     "temperature": 0},
        "config": {"batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens,
                   "block_size": args.block_size, "kv_blocks": kv_blocks, "max_num_seqs": args.max_num_seqs,
                   "hf_page_size": args.hf_page_size, "warmup_requests": args.warmup},
        "results": {k: v.as_dict() for k, v in results.items()}, "ratios": ratios, "profile": profile,
        "compute_floor": floor,
    }
    common.write_json(args.out_dir, NAME, payload)
    plot(payload, args.out_dir)


BAR_LABELS = {"kvserve": "kvserve (paged KV, continuous batching)",
              "generate_batch": "transformers generate_batch() (continuous batching)",
              "generate": "transformers generate() (static batches)"}


def plot(payload: dict, out_dir) -> object:
    """Output tokens/s per system, each bar labelled with its value and kvserve's ratio over it."""
    fig, (ax,) = common.new_figure(width=7.6, height=4.8)
    results, w = payload["results"], payload["workload"]
    names = list(results)
    base = results.get("kvserve", {}).get("output_tokens_per_s")
    colors = {"kvserve": "tab:green", "generate_batch": "tab:blue", "generate": "tab:gray"}
    for i, n in enumerate(names):
        tps = results[n]["output_tokens_per_s"]
        label = BAR_LABELS.get(n, n)
        if n == "generate":
            label = label.replace("static batches", f"static batches of {payload['config']['batch_size']}")
        bar = ax.bar(i, tps, color=colors.get(n, "tab:orange"), hatch="" if n == "kvserve" else "//",
                     edgecolor="white", label=label)[0]
        text = f"{tps:.0f} tok/s"
        if base and n != "kvserve":
            text += f"\nkvserve = {ratio(base, tps):.2f}x"
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel("system")
    ax.set_ylabel("output tokens per second (higher is better)")
    ax.margins(y=0.25)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    model = payload["model"]
    ax.set_title(f"{w['num_requests']} requests, prompts {w['prompt_len'][0]}-{w['prompt_len'][1]} tokens, outputs "
                 f"{w['output_len'][0]}-{w['output_len'][1]}, greedy", fontsize=10)
    title = f"Offline throughput: kvserve vs transformers ({model['shape']}, {model['dtype']})"
    return common.save_figure(fig, out_dir, NAME, title, payload["machine"])

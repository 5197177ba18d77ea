"""Tensor parallel: kvserve's offline throughput at each tensor-parallel size, on one workload, outputs compared."""
from __future__ import annotations

import argparse
import logging
import time

from kvserve.bench import common
from kvserve.bench.common import make_workload, print_table, ratio
from kvserve.bench.models import describe, model_and_vocab
from kvserve.bench.peers import blocks_for, free_memory, make_llm, sampling_params, synchronize
from kvserve.bench.throughput import warmup_slice

NAME = "tp"
HELP = ("output tokens/s of kvserve at tensor-parallel sizes 1 and N on one workload (on CPU the ranks are gloo "
        "processes sharing the host's cores)")
log = logging.getLogger("kvserve.bench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common_args(p, shape="llama-256x6")   # 4 heads, 2 KV heads: splits over 2 ranks (llama-small's 9 do not)
    common.add_workload_args(p, num_requests=16, prompt_len=(32, 256), output_len=(16, 64))
    g = p.add_argument_group("tensor parallel")
    g.add_argument("--sizes", type=common.int_list, default=[1, 2], metavar="LIST",
                   help="tensor-parallel sizes, comma-separated (the first is the baseline)")
    g.add_argument("--max-batch-tokens", type=int, default=2048, metavar="N", help="tokens per step")
    g.add_argument("--warmup", type=int, default=2, metavar="N", help="warm-up requests per size")


def run(args: argparse.Namespace) -> int:
    common.prepare(args, NAME)
    path, vocab = model_and_vocab(args.model_shape, args.dtype)
    reqs = make_workload(args.num_requests, args.prompt_len, args.output_len, vocab, args.seed)
    kv_blocks = blocks_for(reqs, 16)
    machine = common.machine_info(args.device)
    log.info("machine: %s", common.machine_line(machine))
    results, outputs = {}, {}
    for size in args.sizes:
        log.info("tensor-parallel size %d", size)
        llm = make_llm(path, args.device, args.dtype, num_kv_blocks=kv_blocks, seed=args.seed,
                       max_num_batched_tokens=args.max_batch_tokens, tensor_parallel_size=size,
                       max_model_len=max(len(r.prompt_token_ids) + r.max_tokens for r in reqs))
        try:
            _generate(llm, warmup_slice(reqs, args.warmup), args.device)
            elapsed, outputs[size] = _generate(llm, reqs, args.device)
        finally:
            llm.close()
        del llm
        free_memory()
        tokens = sum(len(ids) for ids in outputs[size])
        results[size] = {"elapsed_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
                         "outputs_equal_baseline": outputs[size] == outputs[args.sizes[0]]}
        log.info("size %d: %.1f output tokens/s (%.1f s)", size, tokens / elapsed, elapsed)
    base = results[args.sizes[0]]["output_tokens_per_s"]
    print()
    print_table(["tp size", "time s", "output tok", "output tok/s", f"x size {args.sizes[0]}", "same tokens"],
                [[size, r["elapsed_s"], r["output_tokens"], r["output_tokens_per_s"],
                  ratio(r["output_tokens_per_s"], base), "yes" if r["outputs_equal_baseline"] else "NO"]
                 for size, r in results.items()],
                title=f"tensor parallel: {len(reqs)} requests, prompt {args.prompt_len[0]}-{args.prompt_len[1]}, "
                      f"output {args.output_len[0]}-{args.output_len[1]} tokens, greedy, {args.dtype} on "
                      f"{args.device}; model {args.model_shape}")
    print(f"machine: {common.machine_line(machine)}")
    common.write_json(args.out_dir, NAME, {
        "benchmark": NAME, "machine": machine,
        "model": {"shape": args.model_shape, "description": describe(args.model_shape), "dtype": args.dtype},
        "workload": {"num_requests": len(reqs), "prompt_len": args.prompt_len, "output_len": args.output_len,
                     "seed": args.seed, "ignore_eos": True, "temperature": 0},
        "config": {"max_batch_tokens": args.max_batch_tokens, "kv_blocks": kv_blocks, "warmup_requests": args.warmup},
        "results": {str(size): r for size, r in results.items()}})
    return 0


def _generate(llm, requests, device: str) -> tuple[float, list[list[int]]]:
    synchronize(device)
    start = time.perf_counter()
    outs = llm.generate([r.prompt_token_ids for r in requests], [sampling_params(r.max_tokens) for r in requests])
    synchronize(device)
    return time.perf_counter() - start, [o.token_ids for o in outs]

"""The engine's host work per decode step, without a model: what runs between two forwards.

A batch of sequences is prefilled once, then stepped as decodes: each step schedules (block
allocation, the step's lists), advances, publishes full blocks to the prefix cache and appends a
token, as the engine does around a forward; then the step's block tables are packed into the int32
tensor the Triton kernels and the CUDA graphs read. On a GPU this time is spent while the GPU
waits (unless async scheduling overlaps it), so it must not grow with the context.
"""
from __future__ import annotations

import argparse
import logging
import time

from kvserve.bench import common
from kvserve.bench.common import print_table

NAME = "host-step"
HELP = "host time per decode step (scheduling, prefix-cache publishing, block-table packing) vs context length"
log = logging.getLogger("kvserve.bench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--batch", type=int, default=256, metavar="N", help="sequences decoding together")
    g.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096, 16384], metavar="TOKENS",
                   help="prompt lengths to measure at")
    g.add_argument("--block-size", type=int, default=16, metavar="N", help="tokens per KV block")
    g.add_argument("--steps", type=int, default=20, metavar="N", help="timed decode steps per context length")
    g.add_argument("--out-dir", default=None, metavar="DIR", help=f"default: ./{common.RESULTS_DIR}/{NAME}/")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path
    args.out_dir = Path(args.out_dir) if args.out_dir else Path(common.RESULTS_DIR) / NAME
    args.out_dir.mkdir(parents=True, exist_ok=True)
    machine = common.machine_info("cpu")
    log.info("machine: %s", common.machine_line(machine))
    rows = [measure(args.batch, context, args.block_size, args.steps) for context in args.contexts]
    table = print_table(["context tokens", "blocks per sequence", "scheduling ms", "packing ms", "total ms"],
                        [(f"{r['context']:,}", r["blocks_per_sequence"], f"{r['schedule_ms']:.2f}",
                          f"{r['pack_ms']:.2f}", f"{r['schedule_ms'] + r['pack_ms']:.2f}") for r in rows],
                        title=f"host work per decode step of {args.batch} sequences (median of {args.steps} steps)")
    print(f"machine: {common.machine_line(machine)}")
    config = {k: v for k, v in vars(args).items() if not k.startswith("_")} | {"out_dir": str(args.out_dir)}
    common.write_json(args.out_dir, NAME, {"benchmark": NAME, "machine": machine, "config": config, "results": rows,
                                           "table": table})
    return 0


def measure(batch: int, context: int, block_size: int, steps: int) -> dict:
    """Median host time of one decode step of `batch` sequences of `context` prompt tokens."""
    import statistics

    import torch

    from kvserve.cache.kv_cache_manager import KVCacheManager
    from kvserve.cache.kv_pool import pack_tables
    from kvserve.scheduler.sampling_params import SamplingParams
    from kvserve.scheduler.scheduler import Scheduler
    from kvserve.scheduler.sequence import Sequence

    blocks_per_seq = -(-(context + steps + 8) // block_size)
    kv = KVCacheManager(batch * blocks_per_seq + 1, block_size)
    scheduler = Scheduler(kv, batch, 1 << 30, context + steps + 8)
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):     # distinct prompts: no prefix hits
        scheduler.add(Sequence(f"s{i}", [(i * 7919 + j) % 32000 for j in range(context)], params))

    def step():
        out = scheduler.schedule()
        scheduler.advance(out)
        scheduler.publish(out)
        for row in out.sample_rows:     # the engine appends each sampled token
            seq = out.seqs[row]
            seq.num_pending -= 1
            seq.token_ids.append(5)
        return out

    step()                    # the prefill
    sched_ms, pack_ms = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = step()
        t1 = time.perf_counter()
        width = max(len(table) for table in out.block_tables)
        pack_tables(out.block_tables, torch.empty(len(out.block_tables), width, dtype=torch.int32))
        t2 = time.perf_counter()
        assert out.num_decodes == batch
        sched_ms.append((t1 - t0) * 1e3)
        pack_ms.append((t2 - t1) * 1e3)
    return {"context": context, "batch": batch, "blocks_per_sequence": len(out.block_tables[0]),
            "schedule_ms": statistics.median(sched_ms), "pack_ms": statistics.median(pack_ms)}

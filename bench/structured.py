"""Structured outputs' cost: 16 requests constrained by a JSON schema against the same 16 free, one engine."""
from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time

from kvserve.bench import common
from kvserve.bench.common import print_table, random_prompt, ratio
from kvserve.bench.models import describe, model_and_vocab
from kvserve.bench.peers import make_llm, synchronize

NAME = "structured"
HELP = ("output tokens/s of N requests constrained by a JSON schema vs the same N free (sampled, ignore_eos), "
        "one engine, rounds alternated")
GOAL = 0.8   # constrained throughput >= 0.8x free
# a schema longer than max_tokens (24 items of about 25 tokens): every request runs to max_tokens in both
# modes, so both produce the same tokens in batches of the same size
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 24},
    "kind": {"enum": ["note", "task", "event"]},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "text": {"type": "string", "maxLength": 32}, "score": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["text", "score"], "additionalProperties": False}, "minItems": 24}},
    "required": ["title", "kind", "items"], "additionalProperties": False}
log = logging.getLogger("kvserve.bench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common_args(p)
    g = p.add_argument_group("workload")
    g.add_argument("--num-requests", type=int, default=16, metavar="N", help="requests per round (the batch)")
    g.add_argument("--prompt-len", type=int, default=64, metavar="N", help="prompt tokens per request")
    g.add_argument("--output-len", type=int, default=128, metavar="N", help="max_tokens per request")
    g.add_argument("--rounds", type=int, default=3, metavar="N", help="rounds of each mode, alternated")


def run(args: argparse.Namespace) -> int:
    from kvserve import SamplingParams, StructuredOutput
    common.prepare(args, NAME)
    path, vocab = model_and_vocab(args.model_shape, args.dtype)
    machine = common.machine_info(args.device)
    log.info("machine: %s", common.machine_line(machine))
    rng = random.Random(args.seed)
    prompts = [random_prompt(rng, args.prompt_len, vocab) for _ in range(args.num_requests)]
    blocks = args.num_requests * (-(-(args.prompt_len + args.output_len) // 16) + 1)
    llm = make_llm(path, args.device, args.dtype, num_kv_blocks=blocks, enable_prefix_caching=False,
                   max_num_seqs=args.num_requests, seed=args.seed)
    spec = StructuredOutput.json_schema(SCHEMA)
    grammars = llm.engine.grammars
    mask_times: list[float] = []
    fill = grammars.fill_bitmask

    def timed_fill(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fill(*a, **kw)
        finally:
            mask_times.append(time.perf_counter() - t0)

    grammars.fill_bitmask = timed_fill

    def params(mode: str, r: int) -> list:
        return [SamplingParams(max_tokens=args.output_len, temperature=1.0, seed=1000 * r + i, ignore_eos=True,
                               logprobs=False, structured=spec if mode == "constrained" else None)
                for i in range(args.num_requests)]

    llm.generate(prompts, params("constrained", -1))     # warm-up: compiles the schema, warms both paths
    llm.generate(prompts, params("free", -1))
    runs: dict[str, list[dict]] = {"free": [], "constrained": []}
    for r in range(args.rounds):
        for mode in ("free", "constrained") if r % 2 == 0 else ("constrained", "free"):
            mask_times.clear()
            synchronize(args.device)
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params(mode, r))
            synchronize(args.device)
            elapsed = time.perf_counter() - t0
            tokens = sum(len(o.token_ids) for o in outs)
            run_stats = {"elapsed": elapsed, "tokens": tokens, "tps": tokens / elapsed,
                         "finished_by_grammar": sum(o.finish_reason == "grammar" for o in outs)}
            if mode == "constrained":
                bad = sum(not _json_prefix_ok(o.text) for o in outs)
                run_stats |= {"mask_ms_median": 1e3 * statistics.median(mask_times),
                              "mask_ms_p90": 1e3 * common.percentile(mask_times, 90),
                              "mask_share": sum(mask_times) / elapsed, "invalid_outputs": bad}
            runs[mode].append(run_stats)
            log.info("%s round %d: %.1f tok/s", mode, r, run_stats["tps"])
    free_tps = statistics.median(x["tps"] for x in runs["free"])
    con_tps = statistics.median(x["tps"] for x in runs["constrained"])
    rows = [[m, len(v), statistics.median(x["tokens"] for x in v), statistics.median(x["elapsed"] for x in v),
             statistics.median(x["tps"] for x in v)] for m, v in runs.items()]
    print()
    print_table(["mode", "rounds", "output tok", "time s", "output tok/s"], rows,
                title=f"structured outputs: {args.num_requests} requests x {args.output_len} tokens, prompt "
                      f"{args.prompt_len}, temperature 1, ignore_eos, {args.dtype} on {args.device}; "
                      f"model {args.model_shape}")
    con = runs["constrained"]
    print(f"constrained / free: {ratio(con_tps, free_tps):.2f}x ({'meets' if con_tps >= GOAL * free_tps else 'below'}"
          f" the {GOAL}x goal); batch mask fill median {statistics.median(x['mask_ms_median'] for x in con):.2f} ms,"
          f" p90 {statistics.median(x['mask_ms_p90'] for x in con):.2f} ms, "
          f"{100 * statistics.median(x['mask_share'] for x in con):.1f}% of the time; "
          f"outputs not a JSON prefix: {sum(x['invalid_outputs'] for x in con)}")
    print(f"machine: {common.machine_line(machine)}")
    common.write_json(args.out_dir, NAME, {
        "benchmark": NAME, "machine": machine, "model": {"shape": args.model_shape,
                                                          "description": describe(args.model_shape)},
        "workload": {"num_requests": args.num_requests, "prompt_len": args.prompt_len,
                     "output_len": args.output_len, "rounds": args.rounds, "schema": SCHEMA},
        "runs": runs, "ratio": ratio(con_tps, free_tps), "goal": GOAL})
    return 0


def _json_prefix_ok(text: str) -> bool:
    """The text is valid JSON or a prefix of it (max_tokens may cut it): close it and parse."""
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        pass
    closers, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            closers.append("}" if ch == "{" else "]")
        elif ch in "}]":
            closers.pop()
    tail = text + ('"' if in_string else "")
    for candidate in (tail, tail + "0", tail + '"x":0', tail + ':0', tail.rstrip(", :")):
        try:
            json.loads(candidate + "".join(reversed(closers)))
            return True
        except json.JSONDecodeError:
            continue
    return False

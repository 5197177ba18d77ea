"""Multi-turn chat whose history outgrows the device KV pool: turn-2 TTFT with the host-memory tier off and on."""
from __future__ import annotations

import argparse
import logging
import math
import random
import time

from kvserve.bench import common
from kvserve.bench.common import print_table, random_prompt, ratio, summarize
from kvserve.bench.models import describe, model_and_vocab
from kvserve.bench.peers import free_memory, make_llm, sampling_params, synchronize

NAME = "offload"
HELP = ("multi-turn chat, 20 conversations in a device pool sized for 3: turn-2 TTFT with the host-memory KV tier "
        "(--kv-offload-memory) off vs on")
GOAL = 0.3  # turn-2 TTFT p50 with the tier <= 0.3x without
MODES = ("off", "on")
STATS = ("num_blocks", "prefix_query_tokens", "prefix_hit_tokens", "prefix_hit_tokens_host", "offload_num_blocks",
         "offload_blocks_cached", "offload_blocks_stored", "offload_blocks_loaded", "num_preemptions",
         "prompt_tokens")
log = logging.getLogger("kvserve.bench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common_args(p)
    g = p.add_argument_group("workload")
    g.add_argument("--conversations", type=int, default=20, metavar="N", help="conversations (distinct histories)")
    g.add_argument("--history", type=int, default=1500, metavar="N",
                   help="turn-1 prompt tokens (system + user), unique per conversation")
    g.add_argument("--answer-len", type=int, default=24, metavar="N",
                   help="tokens generated per turn (greedy, ignore_eos)")
    g.add_argument("--user-len", type=int, default=100, metavar="N", help="new user tokens in turn 2")
    g.add_argument("--pool-conversations", type=float, default=3, metavar="N",
                   help="device KV pool sized for this many whole conversations")
    g.add_argument("--offload-memory", default="auto", metavar="SIZE",
                   help="host tier size for the tier-on run, e.g. 1GiB; auto = every conversation's blocks + 25%")
    g.add_argument("--block-size", type=int, default=16, metavar="N", help="tokens per KV block")
    g.add_argument("--max-batch-tokens", type=int, default=2048, metavar="N", help="tokens per engine step")
    g.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="runs of the whole workload, each with fresh engines (medians reported)")


def run(args: argparse.Namespace) -> int:
    common.prepare(args, NAME)
    if args.conversations < 1 or args.history < 2 or args.answer_len < 1 or args.user_len < 1:
        raise SystemExit("--conversations, --answer-len and --user-len must be >= 1, --history >= 2")
    path, vocab = model_and_vocab(args.model_shape, args.dtype)
    machine = common.machine_info(args.device)
    log.info("machine: %s", common.machine_line(machine))
    log.info("model: %s", describe(args.model_shape))
    rng = random.Random(args.seed)
    convs = [{"turn1": random_prompt(rng, args.history, vocab), "user2": random_prompt(rng, args.user_len, vocab)}
             for _ in range(args.conversations)]
    per_conv = args.history + 2 * args.answer_len + args.user_len
    pool_blocks = math.ceil(args.pool_conversations * per_conv / args.block_size) + 4
    engine = dict(enable_prefix_caching=True, num_kv_blocks=pool_blocks, block_size=args.block_size,
                  max_model_len=per_conv + 8, max_num_batched_tokens=args.max_batch_tokens, seed=args.seed)
    warm = random_prompt(rng, min(64, args.history), vocab)

    runs: list[dict] = []
    offload_memory = None if args.offload_memory == "auto" else args.offload_memory
    bytes_per_block = None
    for rep in range(args.repeats):
        llms = {}
        for mode in MODES:                                  # "off" first: its pool gives the bytes per block
            if mode == "on" and offload_memory is None:
                blocks = args.conversations * math.ceil(per_conv / args.block_size) + pool_blocks
                offload_memory = int(math.ceil(1.25 * blocks * bytes_per_block))
            llms[mode] = make_llm(path, args.device, args.dtype, **engine,
                                  kv_offload_memory=offload_memory if mode == "on" else None)
            info = llms[mode].engine.kv_info
            bytes_per_block = bytes_per_block or info["bytes"] / info["num_blocks"]
            llms[mode].generate([warm], sampling_params(2), use_tqdm=False)
        runs += _workload(llms, convs, args, rep)
        del llms
        free_memory()
    identical = _check(runs, args)
    _report(args, machine, runs, identical, pool_blocks, offload_memory, bytes_per_block)
    if not identical:
        raise SystemExit("offload: the greedy outputs differ with and without the host tier (see above)")
    return 0


def _turn(llm, prompt: list[int], max_tokens: int, device: str) -> dict:
    """One request alone: its TTFT (engine arrival -> first token), wall time, output ids and prefix-hit tokens."""
    synchronize(device)
    t0 = time.perf_counter()
    out = llm.generate([prompt], sampling_params(max_tokens), use_tqdm=False)[0]
    synchronize(device)
    wall = time.perf_counter() - t0
    if out.error:
        raise RuntimeError(f"offload: request failed: {out.error}")
    m = out.metrics
    ttft = m.first_token_time - m.arrival_time if m is not None and m.first_token_time is not None else wall
    return {"ttft_s": ttft, "wall_s": wall, "token_ids": list(out.token_ids), "cached_tokens": out.num_cached_tokens}


def _stats(llm) -> dict:
    s = llm.engine.stats()
    return {k: getattr(s, k, None) for k in STATS}


def _workload(llms: dict, convs: list[dict], args, rep: int) -> list[dict]:
    """Every conversation's turn 1, one at a time; then every turn 2 (history + answer + new user message).

    Both engines (tier off and on) run the same workload interleaved request by request, the one going first
    alternating, so that a busy machine slows both alike. A mode's times are the sums of its requests' wall times.
    """
    bar = common.progress(total=2 * len(convs) * len(llms), desc=f"run {rep + 1}", unit="turn")
    res = {m: {"mode": m, "repeat": rep, "turn1": [], "turn2": []} for m in llms}

    def both(i: int, turn: str, prompt) -> None:
        order = list(llms) if (i + rep) % 2 == 0 else list(llms)[::-1]
        for m in order:
            res[m][turn].append(_turn(llms[m], prompt(m), args.answer_len, args.device))
            bar.update(1)

    for i, conv in enumerate(convs):
        both(i, "turn1", lambda m: conv["turn1"])
    for m in llms:
        res[m]["stats_after_turn1"] = _stats(llms[m])
    for i, conv in enumerate(convs):
        both(i, "turn2", lambda m: conv["turn1"] + res[m]["turn1"][i]["token_ids"] + conv["user2"])
    bar.close()
    for m, r in res.items():
        r["stats"] = _stats(llms[m])
        r["turn1_s"] = sum(t["wall_s"] for t in r["turn1"])
        r["turn2_s"] = sum(t["wall_s"] for t in r["turn2"])
        r["total_s"] = r["turn1_s"] + r["turn2_s"]
        log.info("tier %s: turn-2 TTFT p50 %.3f s, total %.1f s, stats %s", m,
                 summarize([t["ttft_s"] for t in r["turn2"]])["p50"], r["total_s"], r["stats"])
    return list(res.values())


def _check(runs: list[dict], args) -> bool:
    """Every run's turn-1 and turn-2 greedy outputs equal the first tier-off run's."""
    ref = next(r for r in runs if r["mode"] == "off")
    ok = True
    for r in runs:
        for turn in ("turn1", "turn2"):
            bad = [i for i, (a, b) in enumerate(zip(ref[turn], r[turn])) if a["token_ids"] != b["token_ids"]]
            if bad:
                ok = False
                print(f"MISMATCH: tier {r['mode']} (run {r['repeat'] + 1}) {turn} outputs differ from tier off in "
                      f"conversations {bad}", flush=True)
    return ok


def _summary(runs: list[dict], mode: str) -> dict:
    rs = [r for r in runs if r["mode"] == mode]
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"turn2_ttft_s": summarize([t["ttft_s"] for r in rs for t in r["turn2"]]),
            "turn1_ttft_s": summarize([t["ttft_s"] for r in rs for t in r["turn1"]]),
            "turn1_s": med([r["turn1_s"] for r in rs]), "turn2_s": med([r["turn2_s"] for r in rs]),
            "total_s": med([r["total_s"] for r in rs]),
            "turn2_cached_tokens_mean": summarize([t["cached_tokens"] for r in rs for t in r["turn2"]])["mean"],
            "stats": rs[-1]["stats"], "stats_after_turn1": rs[-1]["stats_after_turn1"]}


def _report(args, machine, runs, identical: bool, pool_blocks: int, offload_memory, bytes_per_block) -> None:
    summ = {m: _summary(runs, m) for m in MODES}
    off, on = summ["off"], summ["on"]
    headers = ["host tier", "turn-2 TTFT p50 s", "mean s", "p90 s", "turn-1 TTFT p50 s", "turn 1 s", "turn 2 s",
               "total s", "turn-2 cached tok", "host hit tok", "offloaded blk", "reloaded blk"]
    rows = []
    for m in MODES:
        s, st = summ[m], summ[m]["stats"]
        ttft = [f"{x:.3f}" for x in (s["turn2_ttft_s"]["p50"], s["turn2_ttft_s"]["mean"], s["turn2_ttft_s"]["p90"],
                                     s["turn1_ttft_s"]["p50"])]
        rows.append([m, *ttft, s["turn1_s"], s["turn2_s"], s["total_s"],
                     s["turn2_cached_tokens_mean"], st["prefix_hit_tokens_host"], st["offload_blocks_stored"],
                     st["offload_blocks_loaded"]])
    host_blocks = on["stats"]["offload_num_blocks"]
    host = f"host tier {host_blocks} blocks" if host_blocks is not None else f"host tier {offload_memory} bytes"
    print()
    print_table(headers, rows, title=(
        f"offload: {args.conversations} conversations x {args.history}-token history + {args.answer_len}-token "
        f"answers, turn 2 adds {args.user_len} user tokens; device pool {pool_blocks} blocks x {args.block_size} "
        f"(~{args.pool_conversations:g} conversations), {host}; {args.dtype} on "
        f"{args.device}, model {args.model_shape}; requests of both modes interleaved"
        + (f"; times are medians of {args.repeats} runs" if args.repeats > 1 else "")))
    p50 = ratio(on["turn2_ttft_s"]["p50"], off["turn2_ttft_s"]["p50"])
    mean = ratio(on["turn2_ttft_s"]["mean"], off["turn2_ttft_s"]["mean"])
    total = ratio(on["total_s"], off["total_s"])
    print(f"turn-2 TTFT with / without the host tier: p50 {p50:.2f}x, mean {mean:.2f}x "
          f"(goal: p50 <= {GOAL}x, {'met' if p50 <= GOAL else 'NOT met'}); total time {total:.2f}x "
          f"({on['total_s']:.1f} s vs {off['total_s']:.1f} s)")
    n_tok = sum(len(t["token_ids"]) for t in runs[0]["turn2"])
    print(f"correctness: turn-1 and turn-2 greedy outputs with and without the tier are "
          f"{'identical' if identical else 'DIFFERENT'} ({args.conversations} conversations, {n_tok} turn-2 tokens "
          f"per run, {args.repeats} run{'s' if args.repeats > 1 else ''} of each)")
    print(f"machine: {common.machine_line(machine)}")
    config = {k: getattr(args, k) for k in ("conversations", "history", "answer_len", "user_len", "pool_conversations",
                                            "block_size", "max_batch_tokens", "repeats")}
    config |= {"num_kv_blocks": pool_blocks, "kv_offload_memory": offload_memory, "bytes_per_block": bytes_per_block}
    payload = {"benchmark": NAME, "machine": machine,
               "model": {"shape": args.model_shape, "description": describe(args.model_shape), "dtype": args.dtype},
               "config": config,
               "ttft_definition": "engine arrival -> first token (RequestOutput.metrics); each turn runs alone",
               "timing": "both engines run the workload interleaved request by request (the first alternating); "
                         "turn 1 / turn 2 / total s = the sums of one mode's request wall times",
               "summary": summ, "ratio": {"turn2_ttft_p50": p50, "turn2_ttft_mean": mean, "total": total},
               "goal": {"goal": GOAL, "turn2_ttft_p50_ratio": p50, "met": p50 <= GOAL},
               "identical_outputs": identical,
               "runs": [{k: v for k, v in r.items() if k not in ("turn1", "turn2")}
                        | {"turn1_ttft_s": [t["ttft_s"] for t in r["turn1"]],
                           "turn2_ttft_s": [t["ttft_s"] for t in r["turn2"]],
                           "turn2_cached_tokens": [t["cached_tokens"] for t in r["turn2"]]} for r in runs]}
    common.write_json(args.out_dir, NAME, payload)
    plot(payload, args.out_dir)


STYLES = {"off": dict(color="tab:orange", marker="x", ls="--", ms=7), "on": dict(color="tab:green", marker="o")}


def plot(payload: dict, out_dir) -> object:
    """Turn-2 TTFT per conversation, tier off and on (left); wall time of turn 1 and turn 2 (right)."""
    fig, (ax1, ax2) = common.new_figure(2, width=6.0, height=4.8)
    cfg, summ = payload["config"], payload["summary"]
    for mode in MODES:
        runs = [r for r in payload["runs"] if r["mode"] == mode]
        per_conv = [sorted(xs)[len(xs) // 2] for xs in zip(*(r["turn2_ttft_s"] for r in runs))]
        ax1.plot(range(1, len(per_conv) + 1), per_conv, label=f"host tier {mode}", **STYLES[mode])
    from matplotlib.ticker import MaxNLocator
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set_ylim(bottom=0)
    ax1.set_xlabel("conversation (turn 2 in the order of turn 1)")
    ax1.set_ylabel("turn-2 time to first token, s")
    ax1.set_title("Turn-2 TTFT (lower is better)", fontsize=10)
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    x = range(len(MODES))
    t1 = [summ[m]["turn1_s"] for m in MODES]
    t2 = [summ[m]["turn2_s"] for m in MODES]
    ax2.bar(x, t1, color="0.7", label="turn 1 (all conversations)")
    bars = ax2.bar(x, t2, bottom=t1, color=[STYLES[m]["color"] for m in MODES], label="turn 2 (all conversations)")
    ax2.bar_label(bars, labels=[f"{a + b:.3g} s" for a, b in zip(t1, t2)], fontsize=8)
    ax2.set_xticks(list(x), [f"host tier {m}" for m in MODES])
    ax2.set_ylabel("wall time, s")
    r = payload["ratio"]
    ax2.set_title(f"Whole workload (lower is better); turn-2 TTFT p50 on/off {r['turn2_ttft_p50']:.2f}x",
                  fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, axis="y")
    title = (f"{cfg['conversations']} chats x {cfg['history']:,} tokens, device pool for "
             f"~{cfg['pool_conversations']:g}: host-memory KV tier off vs on ({payload['model']['shape']}, "
             f"{payload['model']['dtype']})")
    return common.save_figure(fig, out_dir, NAME, title, payload["machine"])

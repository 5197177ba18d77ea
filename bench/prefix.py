"""Multi-turn chat: time to first token of each turn with kvserve's prefix cache on and off."""
from __future__ import annotations

import argparse
import logging
import math
import random
import time

from kvserve.bench import common
from kvserve.bench.common import int_list, print_table, random_prompt, ratio
from kvserve.bench.models import describe, model_and_vocab
from kvserve.bench.peers import free_memory, make_llm, sampling_params, synchronize

NAME = "prefix"
HELP = "multi-turn chat TTFT per turn with prefix caching on vs off, histories 256..4096 tokens"
GOAL = 0.15  # turn-2 TTFT <= 15% of turn-1 at a 2,000-token history
GOAL_HISTORY = 2000
log = logging.getLogger("kvserve.bench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common_args(p)
    g = p.add_argument_group("workload")
    g.add_argument("--histories", type=int_list, default=[256, 512, 1024, 2000, 4096], metavar="LIST",
                   help="turn-1 prompt tokens, comma separated")
    g.add_argument("--turns", type=int, default=3, metavar="N", help="turns per conversation")
    g.add_argument("--answer-len", type=int, default=32, metavar="N", help="answer tokens appended per turn")
    g.add_argument("--user-len", type=int, default=32, metavar="N", help="user tokens added in each later turn")
    g.add_argument("--max-batch-tokens", type=int, default=2048, metavar="N", help="tokens per engine step")
    g.add_argument("--repeats", type=int, default=1, metavar="N", help="conversations per history (median)")


def run(args: argparse.Namespace) -> int:
    common.prepare(args, NAME)
    if args.turns < 2:
        raise SystemExit("--turns must be >= 2")
    path, vocab = model_and_vocab(args.model_shape, args.dtype)
    machine = common.machine_info(args.device)
    log.info("machine: %s", common.machine_line(machine))
    log.info("model: %s", describe(args.model_shape))
    rng = random.Random(args.seed)
    convs = {h: [_conversation(rng, h, args, vocab) for _ in range(args.repeats)] for h in args.histories}
    longest = max(len(c[-1]) for cs in convs.values() for c in cs) + 1
    tokens = sum(len(c[-1]) for cs in convs.values() for c in cs)
    blocks = math.ceil(tokens / 16) + len(convs) * args.repeats * (args.turns + 1) + 16

    results = {}
    for caching in (True, False):
        llm = make_llm(path, args.device, args.dtype, enable_prefix_caching=caching, num_kv_blocks=blocks,
                       max_model_len=longest, max_num_batched_tokens=args.max_batch_tokens, seed=args.seed)
        _ttft(llm, [random_prompt(rng, 64, vocab)], args.device)  # warm-up
        label = "on" if caching else "off"
        results[label] = {}
        bar = common.progress(total=len(args.histories) * args.repeats, desc=f"prefix caching {label}", unit="conv")
        for h in args.histories:
            per_turn = [[] for _ in range(args.turns)]
            cached = [[] for _ in range(args.turns)]
            for conv in convs[h]:
                for t, prompt in enumerate(conv):
                    ttft, hit = _ttft(llm, [prompt], args.device)
                    per_turn[t].append(ttft)
                    cached[t].append(hit)
                bar.update(1)
            results[label][h] = {"ttft_s": [sorted(x)[len(x) // 2] for x in per_turn],
                                 "prompt_tokens": [len(p) for p in convs[h][0]],
                                 "cached_tokens": [max(c) if c[0] is not None else None for c in cached]}
        bar.close()
        del llm
        free_memory()
    _report(args, machine, results)
    return 0


def _conversation(rng: random.Random, history: int, args, vocab: int) -> list[list[int]]:
    """Turn prompts: the first is `history` tokens; each later one appends an answer and a user message."""
    prompts = [random_prompt(rng, history, vocab)]
    for _ in range(args.turns - 1):
        prompts.append(prompts[-1] + random_prompt(rng, args.answer_len + args.user_len, vocab))
    return prompts


def _ttft(llm, prompts: list[list[int]], device: str) -> tuple[float, int | None]:
    """Offline TTFT: generate one token; prefer the engine's own arrival -> first-token timing."""
    synchronize(device)
    t0 = time.perf_counter()
    out = llm.generate(prompts, sampling_params(1), use_tqdm=False)[0]
    synchronize(device)
    wall = time.perf_counter() - t0
    m = getattr(out, "metrics", None)
    if m is not None and m.first_token_time is not None:
        return m.first_token_time - m.arrival_time, getattr(out, "num_cached_tokens", None)
    return wall, getattr(out, "num_cached_tokens", None)


def _report(args, machine, results: dict) -> None:
    turns = range(args.turns)
    headers = ["history tokens"]
    for t in turns:
        headers += [f"turn {t + 1} on s", f"turn {t + 1} off s"]
    headers += ["turn 2 / turn 1 (on)", "turn 2 on vs off", "turn 2 cached tok"]
    rows = []
    for h in args.histories:
        on, off = results["on"][h], results["off"][h]
        row = [h]
        for t in turns:
            row += [on["ttft_s"][t], off["ttft_s"][t]]
        row += [f"{100 * ratio(on['ttft_s'][1], on['ttft_s'][0]):.1f}%",
                f"{ratio(off['ttft_s'][1], on['ttft_s'][1]):.1f}x faster", on["cached_tokens"][1]]
        rows.append(row)
    print()
    print_table(headers, rows, title=f"prefix: TTFT per chat turn, prefix caching on vs off (turn k+1 = turn k + "
                                     f"{args.answer_len} answer + {args.user_len} user tokens), {args.dtype} on "
                                     f"{args.device}, model {args.model_shape}")
    goal = None
    h_goal = min(args.histories, key=lambda h: abs(h - GOAL_HISTORY))
    if abs(h_goal - GOAL_HISTORY) <= GOAL_HISTORY * 0.1:
        share = ratio(results["on"][h_goal]["ttft_s"][1], results["on"][h_goal]["ttft_s"][0])
        goal = {"history": h_goal, "turn2_over_turn1": share, "goal": GOAL, "met": share <= GOAL}
        print(f"goal: turn-2 TTFT <= {GOAL:.0%} of turn-1 at {GOAL_HISTORY} tokens: {share:.1%} at {h_goal} tokens "
              f"({'met' if share <= GOAL else 'not met'})")
    print(f"machine: {common.machine_line(machine)}")
    payload = {"benchmark": NAME, "machine": machine,
               "model": {"shape": args.model_shape, "description": describe(args.model_shape), "dtype": args.dtype},
               "config": {k: getattr(args, k) for k in ("histories", "turns", "answer_len", "user_len",
                                                         "max_batch_tokens", "repeats")},
               "ttft_definition": "engine arrival -> first token (RequestOutput.metrics) with max_tokens=1; "
                                  "wall time of LLM.generate when metrics are missing",
               "results": {k: {str(h): v for h, v in r.items()} for k, r in results.items()}, "goal": goal}
    common.write_json(args.out_dir, NAME, payload)
    plot(payload, args.out_dir)


def plot(payload: dict, out_dir) -> object:
    """TTFT per turn against history length, caching on and off (left); turn 2 as a share of turn 1 (right)."""
    fig, (ax1, ax2) = common.new_figure(2, width=6.0, height=4.8)
    res, cfg = payload["results"], payload["config"]
    hs = [int(h) for h in res["on"]]

    def ttft(label: str, turn: int) -> list[float]:
        return [res[label][str(h)]["ttft_s"][turn] for h in hs]

    ax1.plot(hs, ttft("on", 0), color="black", marker="o", lw=2, label="turn 1 (nothing cached)")
    greens, oranges = ("tab:green", "darkgreen", "olive"), ("tab:orange", "tab:red", "tab:brown")
    for t in range(1, cfg["turns"]):
        ax1.plot(hs, ttft("off", t), color=oranges[(t - 1) % 3], marker="x", ls="--", ms=7,
                 label=f"turn {t + 1}, caching off")
        ax1.plot(hs, ttft("on", t), color=greens[(t - 1) % 3], marker="os^"[(t - 1) % 3], ls="-",
                 mfc="none", ms=6 + 2 * (t - 1), label=f"turn {t + 1}, caching on")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xticks(hs, [f"{h:,}" for h in hs])
    ax1.set_xlabel("history tokens (turn-1 prompt)")
    ax1.set_ylabel("time to first token, s (log scale)")
    ax1.set_title("TTFT per turn (lower is better)", fontsize=10)
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3, which="both")
    for label, style in (("on", dict(color="tab:green", marker="o", ls="-")),
                         ("off", dict(color="tab:orange", marker="x", ls="--", ms=7))):
        ax2.plot(hs, [100 * ratio(b, a) for a, b in zip(ttft(label, 0), ttft(label, 1))],
                 label=f"caching {label}", **style)
    goal = (payload.get("goal") or {}).get("goal", GOAL)
    ax2.axhline(100 * goal, color="tab:red", lw=0.8, ls="-.", label=f"goal <= {goal:.0%} at {GOAL_HISTORY:,} tokens")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(hs, [f"{h:,}" for h in hs])
    ax2.set_ylim(bottom=0)
    ax2.set_xlabel("history tokens (turn-1 prompt)")
    ax2.set_ylabel("turn-2 TTFT as % of turn-1 TTFT")
    ax2.set_title("Turn 2 relative to turn 1 (lower is better)", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    title = (f"Multi-turn chat, prefix caching on vs off: each turn adds {cfg['answer_len']} + {cfg['user_len']} "
             f"tokens ({payload['model']['shape']}, {payload['model']['dtype']})")
    return common.save_figure(fig, out_dir, NAME, title, payload["machine"])

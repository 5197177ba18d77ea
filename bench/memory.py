"""KV memory efficiency: share of allocated KV slots holding real tokens, paged vs contiguous reservation."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from kvserve.bench import common
from kvserve.bench.common import make_workload, print_table, ratio
from kvserve.bench.models import describe, model_and_vocab
from kvserve.bench.peers import blocks_for, free_memory, kvserve_generate, make_llm

NAME = "memory"
HELP = "KV slot occupancy per step (paged vs max-length contiguous) and sequences that fit one KV budget"
GOAL = 0.96
log = logging.getLogger("kvserve.bench")


@dataclass(slots=True)
class Sample:
    step: int
    running: int
    waiting: int
    kv_tokens: int          # tokens whose K/V are stored, summed over running sequences
    paged_slots: int        # blocks_used * block_size
    request_slots: int      # contiguous, each running sequence reserves prompt + max_tokens
    max_len_slots: int      # contiguous, each running sequence reserves the workload's maximum length


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common_args(p, shape="tiny")
    g = common.add_workload_args(p)
    g.add_argument("--block-size", type=int, default=16, metavar="N", help="tokens per KV block")
    g.add_argument("--max-batch-tokens", type=int, default=2048, metavar="N", help="tokens per engine step")
    g.add_argument("--budget-tokens", type=int, default=8192, metavar="N",
                   help="KV budget of the sequences-that-fit run, tokens")


def run(args: argparse.Namespace) -> int:
    common.prepare(args, NAME)
    path, vocab = model_and_vocab(args.model_shape, args.dtype)
    reqs = make_workload(args.num_requests, args.prompt_len, args.output_len, vocab, args.seed)
    max_len = args.prompt_len[1] + args.output_len[1]
    machine = common.machine_info(args.device)
    log.info("machine: %s", common.machine_line(machine))
    log.info("model: %s (occupancy does not depend on the model's size)", describe(args.model_shape))

    full_blocks = blocks_for(reqs, args.block_size)
    budget_blocks = args.budget_tokens // args.block_size
    runs = {}
    for label, blocks in (("full pool", full_blocks), ("fixed budget", budget_blocks)):
        llm = make_llm(path, args.device, args.dtype, block_size=args.block_size, num_kv_blocks=blocks,
                       max_num_batched_tokens=args.max_batch_tokens, enable_prefix_caching=False,
                       max_model_len=max_len, seed=args.seed)
        samples: list[Sample] = []
        _listen(llm.engine, samples, max_len)
        log.info("%s: %d KV blocks of %d", label, blocks, args.block_size)
        kvserve_generate(llm, reqs, args.device, desc=f"kvserve ({label})")
        runs[label] = {"blocks": blocks, "samples": samples, "preemptions": llm.engine.stats().num_preemptions}
        del llm
        free_memory()
    _report(args, machine, reqs, max_len, runs)
    return 0


def _listen(engine, samples: list[Sample], max_len: int) -> None:
    """After every step: KV slots allocated vs tokens stored, from the engine's stats and running sequences."""
    def on_step(_step_stats) -> None:
        st = engine.stats()
        running = engine.scheduler.running
        samples.append(Sample(
            step=st.num_steps, running=len(running), waiting=st.num_waiting,
            kv_tokens=sum(s.num_computed_tokens for s in running),
            paged_slots=st.blocks_used * st.block_size,
            request_slots=sum(s.num_prompt_tokens + s.params.max_tokens for s in running),
            max_len_slots=len(running) * max_len))
    add = getattr(engine, "add_step_listener", None)
    if add is not None:
        add(on_step)
    else:
        engine.step_listeners.append(on_step)


def _occupancy(samples: list[Sample], slots: str) -> dict:
    live = [s for s in samples if s.running]
    per_step = [ratio(s.kv_tokens, getattr(s, slots)) for s in live]
    return {"slot_weighted": ratio(sum(s.kv_tokens for s in live), sum(getattr(s, slots) for s in live)),
            "step_mean": sum(per_step) / len(per_step) if per_step else None,
            "min": min(per_step, default=None)}


def _contiguous_fit(reqs, budget: int, max_len: int) -> tuple[int, int]:
    """Sequences admitted in arrival order before a contiguous reservation overflows the budget."""
    used = n = 0
    for r in reqs:
        need = len(r.prompt_token_ids) + r.max_tokens
        if used + need > budget:
            break
        used, n = used + need, n + 1
    return n, budget // max_len


def _report(args, machine, reqs, max_len: int, runs: dict) -> None:
    full = runs["full pool"]["samples"]
    occ = {name: _occupancy(full, key) for name, key in (("paged (kvserve)", "paged_slots"),
                                                         ("contiguous, prompt+max_tokens", "request_slots"),
                                                         (f"contiguous, max length {max_len}", "max_len_slots"))}
    print()
    print_table(["KV layout", "occupancy (slot-weighted)", "mean over steps", "worst step"],
                [[k, f"{100 * v['slot_weighted']:.1f}%", f"{100 * v['step_mean']:.1f}%", f"{100 * v['min']:.1f}%"]
                 for k, v in occ.items()],
                title=f"memory: share of allocated KV slots holding real tokens, {len(reqs)} requests, prompt "
                      f"{args.prompt_len[0]}-{args.prompt_len[1]}, output {args.output_len[0]}-{args.output_len[1]}, "
                      f"block size {args.block_size}, sampled after each of {len(full)} steps")
    paged = occ["paged (kvserve)"]["slot_weighted"]
    print(f"goal: paged occupancy >= {GOAL:.0%}: {paged:.1%} ({'met' if paged >= GOAL else 'not met'})")

    budget = runs["fixed budget"]
    peak = max((s.running for s in budget["samples"]), default=0)
    fit_req, fit_max = _contiguous_fit(reqs, args.budget_tokens, max_len)
    cap_rows = [["paged (kvserve, measured peak running)", peak, ratio(peak, peak)],
                ["contiguous, prompt+max_tokens (arrival order)", fit_req, ratio(peak, fit_req)],
                [f"contiguous, max length {max_len}", fit_max, ratio(peak, fit_max)]]
    print_table(["KV layout", "sequences that fit", "paged x"], cap_rows,
                title=f"sequences held at once in a {args.budget_tokens}-token KV budget "
                      f"({budget['preemptions']} preemptions in the paged run)")
    print(f"machine: {common.machine_line(machine)}")
    payload = {"benchmark": NAME, "machine": machine,
               "model": {"shape": args.model_shape, "description": describe(args.model_shape), "dtype": args.dtype},
               "workload": {"num_requests": len(reqs), "prompt_len": args.prompt_len, "output_len": args.output_len,
                            "seed": args.seed, "max_len": max_len},
               "definitions": {"kv_tokens": "sum over running sequences of num_computed_tokens (K/V stored)",
                               "paged_slots": "blocks_used * block_size (EngineStats)",
                               "slot_weighted": "sum of kv_tokens over steps / sum of slots over steps"},
               "occupancy": occ, "goal": GOAL,
               "capacity": {"budget_tokens": args.budget_tokens, "paged_peak_running": peak,
                            "contiguous_request_len": fit_req, "contiguous_max_len": fit_max,
                            "preemptions": budget["preemptions"]},
               "samples": {k: [[getattr(s, f) for f in Sample.__slots__] for s in v["samples"]]
                           for k, v in runs.items()},
               "sample_fields": list(Sample.__slots__)}
    common.write_json(args.out_dir, NAME, payload)
    plot(payload, args.out_dir)


def plot(payload: dict, out_dir) -> object:
    """KV occupancy per step for each layout (left) and the sequences one budget holds (right)."""
    fig, (ax, ax2) = common.new_figure(2, width=6.0, height=4.8)
    fields = payload["sample_fields"]
    full = [dict(zip(fields, row)) for row in payload["samples"]["full pool"]]
    full = [s for s in full if s["running"]]
    max_len, cap = payload["workload"]["max_len"], payload["capacity"]
    xs = [s["step"] for s in full]
    twin = ax.twinx()
    twin.fill_between(xs, [s["running"] for s in full], color="0.85", step="mid", label="running sequences")
    twin.set_ylabel("running sequences (grey area)", color="0.4")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    series = (("paged_slots", "paged (kvserve)", dict(color="tab:green", lw=2.0)),
              ("request_slots", "contiguous, prompt + max_tokens", dict(color="tab:blue", ls="--", lw=1.5)),
              ("max_len_slots", f"contiguous, {max_len} tokens each", dict(color="tab:gray", ls=":", lw=1.8)))
    for key, label, style in series:
        ax.plot(xs, [100 * ratio(s["kv_tokens"], s[key]) for s in full], label=label, **style)
    goal = payload["goal"]
    ax.axhline(100 * goal, color="tab:red", lw=0.8, ls="-.", label=f"goal {goal:.0%}")
    ax.set_xlabel("engine step")
    ax.set_ylabel("allocated KV slots holding tokens, %")
    ax.set_ylim(0, 105)
    ax.set_title("KV occupancy at each step (higher is better)", fontsize=10)
    handles = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="lower center")
    names = ["paged\n(kvserve, measured)", "contiguous\nprompt + max_tokens", f"contiguous\n{max_len} each"]
    values = [cap["paged_peak_running"], cap["contiguous_request_len"], cap["contiguous_max_len"]]
    bars = ax2.bar(names, values, color=["tab:green", "tab:blue", "tab:gray"], hatch=["", "//", ".."],
                   edgecolor="white", label=["paged", "contiguous, prompt + max_tokens", "contiguous, max length"])
    for b in bars:
        ax2.annotate(f"{b.get_height():.0f}", (b.get_x() + b.get_width() / 2, b.get_height()), xytext=(0, 3),
                     textcoords="offset points", ha="center", va="bottom")
    ax2.set_xlabel("KV layout")
    ax2.set_ylabel("sequences held at once")
    ax2.set_title(f"Sequences in one {cap['budget_tokens']:,}-token KV budget", fontsize=10)
    ax2.margins(y=0.15)
    ax2.legend(fontsize=8)
    w = payload["workload"]
    title = (f"KV memory, paged vs contiguous: {w['num_requests']} requests, prompts "
             f"{w['prompt_len'][0]}-{w['prompt_len'][1]}, outputs {w['output_len'][0]}-{w['output_len'][1]} tokens")
    return common.save_figure(fig, out_dir, NAME, title, payload["machine"])

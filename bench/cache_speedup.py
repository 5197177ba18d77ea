"""KV cache speedup on one stream: kvserve vs transformers generate() with and without its KV cache."""
from __future__ import annotations

import argparse
import logging
import random
import time

from kvserve.bench import common
from kvserve.bench.common import Request, int_list, print_table, random_prompt, ratio
from kvserve.bench.models import describe, model_path
from kvserve.bench.peers import free_memory, kvserve_generate, load_hf_model, make_llm, synchronize

NAME = "cache-speedup"
HELP = "one stream, short prompt, growing outputs: kvserve vs generate(use_cache=True) vs generate(use_cache=False)"
SYSTEMS = ("kvserve", "kvserve_compiled", "generate_cache", "generate_no_cache")
DEFAULT_SYSTEMS = ("kvserve", "generate_cache", "generate_no_cache")
LABELS = {"kvserve": "kvserve", "kvserve_compiled": "kvserve compile=True",
          "generate_cache": "generate(use_cache=True)", "generate_no_cache": "generate(use_cache=False)"}
SHORT = {"kvserve": "kvserve", "kvserve_compiled": "compiled", "generate_cache": "cache",
         "generate_no_cache": "no-cache"}
log = logging.getLogger("kvserve.bench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common_args(p)
    g = p.add_argument_group("workload")
    g.add_argument("--prompt-len", type=int, default=32, metavar="N", help="prompt tokens")
    g.add_argument("--lengths", type=int_list, default=[50, 100, 200, 300, 500], metavar="LIST",
                   help="new tokens per run, comma separated")
    g.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), metavar="LIST",
                   help=f"comma-separated systems, of {', '.join(SYSTEMS)} (kvserve_compiled: with compile=True, "
                        "the model compiled at start-up)")
    g.add_argument("--repeats", type=int, default=1, metavar="N", help="runs per point, median reported")


def run(args: argparse.Namespace) -> int:
    common.prepare(args, NAME)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if set(systems) - set(SYSTEMS):
        raise SystemExit(f"unknown systems {sorted(set(systems) - set(SYSTEMS))}; choose from {', '.join(SYSTEMS)}")
    path = model_path(args.model_shape, args.dtype)
    from transformers import AutoConfig
    prompt = random_prompt(random.Random(args.seed), args.prompt_len, AutoConfig.from_pretrained(path).vocab_size)
    machine = common.machine_info(args.device)
    log.info("machine: %s", common.machine_line(machine))
    log.info("model: %s", describe(args.model_shape))

    times: dict[str, dict[int, float]] = {}
    for system in systems:
        times[system] = _time_system(system, args, path, prompt)
        free_memory()
    _report(args, machine, times)
    return 0


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _time_system(system: str, args, path, prompt: list[int]) -> dict[int, float]:
    if system in ("kvserve", "kvserve_compiled"):
        llm = make_llm(path, args.device, args.dtype, seed=args.seed, enable_prefix_caching=False,
                       max_model_len=args.prompt_len + max(args.lengths) + 16, compile=system == "kvserve_compiled")

        def once(n: int) -> float:
            return kvserve_generate(llm, [Request(prompt, n)], args.device, desc=f"kvserve {n}").elapsed
    else:
        import torch
        model = load_hf_model(path, args.device, args.dtype)
        ids = torch.tensor([prompt], device=args.device)
        use_cache = system == "generate_cache"

        def once(n: int) -> float:
            synchronize(args.device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, use_cache=use_cache, pad_token_id=0)
            synchronize(args.device)
            return time.perf_counter() - t0
    once(4)  # warm-up
    out = {}
    bar = common.progress(total=len(args.lengths) * args.repeats, desc=LABELS[system], unit="run")
    for n in args.lengths:
        samples = []
        for _ in range(args.repeats):
            samples.append(once(n))
            bar.update(1)
        out[n] = _median(samples)
        log.info("%s, %d new tokens: %.2f s", LABELS[system], n, out[n])
    bar.close()
    return out


def _report(args, machine, times: dict[str, dict[int, float]]) -> None:
    headers = ["new tokens"] + [f"{SHORT[s]} s" for s in times]
    speedups = [("generate_no_cache", "generate_cache"), ("generate_no_cache", "kvserve"),
                ("generate_cache", "kvserve"), ("generate_no_cache", "kvserve_compiled"),
                ("generate_cache", "kvserve_compiled"), ("kvserve", "kvserve_compiled")]
    speedups = [(a, b) for a, b in speedups if a in times and b in times]
    headers += [f"{SHORT[b]} vs {SHORT[a]}" for a, b in speedups]
    rows = []
    for n in args.lengths:
        rows.append([n] + [times[s][n] for s in times] + [f"{ratio(times[a][n], times[b][n]):.2f}x"
                                                          for a, b in speedups])
    print()
    print_table(headers, rows, title=f"cache-speedup: one stream, {args.prompt_len}-token prompt, greedy, "
                                     f"{args.dtype} on {args.device}, model {args.model_shape}; cache = "
                                     f"generate(use_cache=True), no-cache = generate(use_cache=False); seconds, "
                                     f"and speedup = time of the second / time of the first")
    print(f"machine: {common.machine_line(machine)}")
    payload = {"benchmark": NAME, "machine": machine,
               "model": {"shape": args.model_shape, "description": describe(args.model_shape), "dtype": args.dtype},
               "config": {"prompt_len": args.prompt_len, "lengths": args.lengths, "repeats": args.repeats},
               "seconds": {s: {str(n): t for n, t in v.items()} for s, v in times.items()},
               "speedup": {f"{b}/{a}": {str(n): ratio(times[a][n], times[b][n]) for n in args.lengths}
                           for a, b in speedups}}
    common.write_json(args.out_dir, NAME, payload)
    plot(payload, args.out_dir)


STYLES = {"kvserve": dict(color="tab:green", marker="o", ls="-", lw=3.5, alpha=0.55, ms=9),
          "generate_cache": dict(color="tab:blue", marker="s", ls="--", lw=1.5, ms=5),
          "generate_no_cache": dict(color="tab:gray", marker="^", ls=":", lw=1.5, ms=6)}


def plot(payload: dict, out_dir) -> object:
    """Seconds against new tokens per system (left) and the speedups at each length (right)."""
    fig, (ax, ax2) = common.new_figure(2, width=5.6, height=4.6)
    seconds, cfg = payload["seconds"], payload["config"]
    for s, v in seconds.items():
        ax.plot([int(n) for n in v], list(v.values()), label=LABELS.get(s, s), **STYLES.get(s, {}))
    ax.set_xlabel("new tokens generated (one stream)")
    ax.set_ylabel("wall time, s (lower is better)")
    ax.set_title("Time to generate n tokens")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    pairs = {"kvserve/generate_no_cache": ("kvserve vs generate(use_cache=False)", STYLES["generate_no_cache"]),
             "kvserve/generate_cache": ("kvserve vs generate(use_cache=True)", STYLES["generate_cache"])}
    for key, (label, style) in pairs.items():
        v = payload["speedup"].get(key)
        if v:
            ax2.plot([int(n) for n in v], list(v.values()), label=label, **style)
    ax2.axhline(1.0, color="0.3", lw=0.8, label="1x = same time")
    ax2.set_xlabel("new tokens generated (one stream)")
    ax2.set_ylabel("kvserve speedup, x (time of the other / kvserve's)")
    ax2.set_title("kvserve's speedup")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    repeats = f", median of {cfg['repeats']} runs" if cfg.get("repeats", 1) > 1 else ""
    title = (f"KV cache on one stream: {cfg['prompt_len']}-token prompt, greedy{repeats} "
             f"({payload['model']['shape']}, {payload['model']['dtype']})")
    return common.save_figure(fig, out_dir, NAME, title, payload["machine"])

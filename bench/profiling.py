"""Where kvserve's step time goes: torch.profiler by op category, and cProfile by Python package."""
from __future__ import annotations

import contextlib
import cProfile
import functools
import logging
import pstats
import time
from collections import defaultdict

from kvserve.bench.common import print_table

log = logging.getLogger("kvserve.bench")

ATTN_RANGE = "bench::attention"
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::_mkldnn", "aten::mkldnn_", "aten::_addmm_activation")
ATTN_WORDS = ("attention", "sdpa", "flash", "paged")
PACKAGES = ("kvserve", "scheduler", "cache", "server", "transformers", "torch")


@contextlib.contextmanager
def _marked_attention():
    """Wrap every registered transformers attention function in a record_function range."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
    saved = dict(mapping)

    def mark(fn):
        @functools.wraps(fn)
        def wrapped(*a, **kw):
            with torch.profiler.record_function(ATTN_RANGE):
                return fn(*a, **kw)
        return wrapped

    for name, fn in saved.items():
        mapping[name] = mark(fn)
    try:
        yield
    finally:
        mapping.clear()
        mapping.update(saved)


def _under_attention(ev) -> bool:
    while ev is not None:
        if ev.name == ATTN_RANGE or any(w in ev.name.lower() for w in ATTN_WORDS):
            return True
        ev = ev.cpu_parent
    return False


def _category(ev) -> str:
    if _under_attention(ev):
        return "attention"
    if ev.name.startswith(MATMUL_OPS):
        return "matmul"
    if ev.name.startswith("aten::") or ev.name.startswith("cuda"):
        return "other torch ops"
    return "annotated ranges (self time)"


def _steps(llm) -> int | None:
    try:
        return llm.engine.stats().num_steps
    except Exception:
        return None


def profile_kvserve(llm, requests, device: str) -> dict:
    """Run `requests` through kvserve twice (torch.profiler, then cProfile) and summarize."""
    import torch
    from kvserve.bench.peers import kvserve_generate
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    steps0 = _steps(llm)
    with _marked_attention(), profile(activities=acts) as prof:
        t0 = time.perf_counter()
        kvserve_generate(llm, requests, device, desc="kvserve (torch.profiler)")
        wall = time.perf_counter() - t0
    steps = (_steps(llm) - steps0) if steps0 is not None else None
    by_cat: dict[str, float] = defaultdict(float)
    dev_by_cat: dict[str, float] = defaultdict(float)
    top_level = 0.0
    for ev in prof.events():
        if ev.cpu_parent is None:
            top_level += ev.cpu_time_total
        by_cat[_category(ev)] += ev.self_cpu_time_total
        dev_by_cat[_category(ev)] += getattr(ev, "self_device_time_total", 0.0) or 0.0
    wall_us = wall * 1e6
    op_total = sum(by_cat.values())
    cats = {k: v / 1e6 for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])}
    # The engine may run ops on more than one thread; only a one-thread engine leaves a meaningful remainder.
    cats["outside torch ops (Python, scheduling)"] = max(wall_us - min(top_level, op_total), 0.0) / 1e6
    top_ops = [(e.key, e.count, e.self_cpu_time_total / 1e6) for e in
               sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]]

    # fresh prompts for the second pass, so the prefix cache does not skip its prefills
    again = [r.__class__(r.prompt_token_ids[::-1], r.max_tokens) for r in requests]
    cprof = cProfile.Profile()
    t0 = time.perf_counter()
    cprof.enable()
    kvserve_generate(llm, again, device, desc="kvserve (cProfile)")
    cprof.disable()
    cwall = time.perf_counter() - t0
    return {"wall_s": wall, "num_steps": steps, "num_requests": len(requests),
            "output_tokens": sum(r.max_tokens for r in requests),
            "max_tokens": max(r.max_tokens for r in requests),
            "categories_s": cats, "device_categories_s": {k: v / 1e6 for k, v in dev_by_cat.items() if v},
            "top_ops": top_ops, "cprofile_wall_s": cwall, **_cprofile_summary(cprof)}


def _package(filename: str) -> str:
    parts = filename.replace("\\", "/").split("/")
    for pkg in PACKAGES:
        if pkg in parts:
            return pkg
    if filename.startswith("~") or filename == "<built-in>":
        return "builtins / C calls"
    return "other Python"


def _cprofile_summary(cprof: cProfile.Profile) -> dict:
    st = pstats.Stats(cprof)
    by_pkg: dict[str, float] = defaultdict(float)
    funcs = []
    for (filename, line, func), (cc, nc, tt, ct, callers) in st.stats.items():
        by_pkg[_package(filename)] += tt
        funcs.append((f"{_package(filename)}:{filename.rsplit('/', 1)[-1]}:{line}({func})", nc, tt, ct))
    funcs.sort(key=lambda f: -f[2])
    return {"python_by_package_s": dict(sorted(by_pkg.items(), key=lambda kv: -kv[1])),
            "python_top_functions": funcs[:15]}


def print_profile(p: dict) -> None:
    steps = p.get("num_steps")
    per_step = f", {p['wall_s'] / steps * 1e3:.1f} ms/step over {steps} steps" if steps else ""
    print(f"\nprofile: kvserve, {p['num_requests']} requests of <= {p['max_tokens']} output tokens "
          f"({p['output_tokens']} in all), {p['wall_s']:.2f} s under torch.profiler{per_step}")
    wall = p["wall_s"]
    print_table(["where", "seconds", "share of wall"],
                [[k, v, f"{100 * v / wall:.1f}%"] for k, v in p["categories_s"].items()],
                title="torch.profiler (self CPU time; attention = everything inside the attention function)")
    if p.get("device_categories_s"):
        print_table(["where", "device seconds"], list(p["device_categories_s"].items()), title="device time")
    print_table(["op", "calls", "self s"], p["top_ops"], title="top torch ops by self CPU time")
    cw = p["cprofile_wall_s"]
    print_table(["package", "Python self s", "share of wall"],
                [[k, v, f"{100 * v / cw:.1f}%"] for k, v in p["python_by_package_s"].items()],
                title=f"cProfile, {cw:.2f} s wall (self time per package; C ops count as builtins)")
    print_table(["function", "calls", "self s", "cumulative s"], p["python_top_functions"],
                title="top Python functions by self time")

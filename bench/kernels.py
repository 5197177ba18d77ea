"""Kernels per batch-1 decode step: the eager forward against the torch.compile'd one.

A CUDA graph replays a decode step's kernels back to back, a few microseconds each however little work
each does, so at batch 1 a small model's graphed step is bound by how many kernels it has rather than
by the bytes it reads; a step no graph runs (a prefill chunk, a mixed step) pays Python and a launch for
each of them. This counts them for one decode step of one request (CUDA graphs off, so that every launch
is seen):

* on CUDA: the kernels (and copies) the profiler records on the device during the step;
* on CPU, as a proxy: the operator calls that would each be a kernel on a GPU (view and shape operators
  and casts that copy nothing left out; an operator counted once, not its inner calls), and inductor's
  fused C++ kernels. The paged attention counts as one call there: on CUDA it is the Triton decode kernel
  and its split reduction.

The weight layout is the one CUDA gets (`cpu_weight_layout="row"`: no CPU projection fusion) unless
`--weight-layout auto` asks for this CPU's.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import logging

from kvserve.bench import common
from kvserve.bench.common import print_table
from kvserve.bench.models import describe, model_path
from kvserve.bench.peers import free_memory, make_llm, sampling_params

NAME = "kernels"
HELP = "kernels per batch-1 decode step, eager vs torch.compile'd (profiler counts; on CPU a proxy for CUDA's)"
FORWARDS = ("eager", "compiled")
log = logging.getLogger("kvserve.bench")

# operators that launch nothing: views, shape queries, allocation, host reads
NO_KERNEL = frozenset(f"aten::{name}" for name in (
    "view", "slice", "t", "reshape", "as_strided", "expand", "unsqueeze", "select", "transpose", "empty",
    "_unsafe_view", "squeeze", "detach", "detach_", "alias", "lift_fresh", "empty_strided", "resolve_conj",
    "resolve_neg", "_reshape_alias", "split", "split_with_sizes", "chunk", "unbind", "narrow", "permute",
    "result_type", "item", "_local_scalar_dense", "set_", "size", "stride", "numel", "dim", "flatten",
    "expand_as", "view_as", "empty_like", "is_nonzero", "contiguous", "to", "_to_copy", "linear", "matmul"))
ATTENTION = "kvserve::paged_attention"


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common_args(p, shape="qwen2.5-0.5b")
    g = p.add_argument_group("workload")
    g.add_argument("--forwards", default=",".join(FORWARDS), metavar="LIST",
                   help=f"comma-separated, of {', '.join(FORWARDS)}")
    g.add_argument("--context", type=int, default=64, metavar="N", help="prompt tokens before the decode step")
    g.add_argument("--weight-layout", choices=["row", "auto"], default="row", metavar="LAYOUT",
                   help="row (default): weights as stored, as on CUDA; auto: this CPU's plan (fused projections)")


def run(args: argparse.Namespace) -> int:
    forwards = [f.strip() for f in args.forwards.split(",") if f.strip()]
    if not forwards or set(forwards) - set(FORWARDS):
        raise SystemExit(f"--forwards takes {', '.join(FORWARDS)}, got {args.forwards!r}")
    common.prepare(args, NAME)
    machine = common.machine_info(args.device)
    log.info("machine: %s", common.machine_line(machine))
    results = {forward: count(args, forward == "compiled") for forward in forwards}
    layers = results[forwards[0]]["layers"]
    rows = [[forward, r["calls"], f"{r['calls'] / layers:.1f}",
             ", ".join(f"{name} {n}" for name, n in r["top"][:6])] for forward, r in results.items()]
    print()
    print_table(["forward", "kernels per step", "per layer", "most frequent"], rows,
                title=f"one decode step at batch 1: {args.model_shape}, {args.dtype} on {args.device}, {layers} "
                      f"layers, context {args.context}, weight layout {args.weight_layout}, CUDA graphs off")
    if not args.device.startswith("cuda"):
        print("on CPU: operator calls that would each launch a kernel on a GPU (the paged attention as one)")
    print(f"machine: {common.machine_line(machine)}")
    common.write_json(args.out_dir, NAME, {
        "benchmark": NAME, "machine": machine,
        "model": {"shape": args.model_shape, "description": describe(args.model_shape), "dtype": args.dtype},
        "workload": {"context": args.context, "weight_layout": args.weight_layout}, "results": results})
    return 0


def count(args: argparse.Namespace, compiled: bool) -> dict:
    """Profile one decode step of one request; count its kernels (see the module's docstring)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    cuda = args.device.startswith("cuda")
    if compiled and not cuda:   # inductor's C++ kernels show in the profile only when built to
        import torch._inductor.config as inductor_config
        inductor_config.cpp.enable_kernel_profile = True
    llm = make_llm(model_path(args.model_shape, args.dtype), args.device, args.dtype, cuda_graphs=False,
                   compile=compiled or None, cpu_weight_layout=args.weight_layout, max_num_seqs=1,
                   max_model_len=args.context + 16)
    engine = llm.engine
    layers = engine.model_config.get_text_config().num_hidden_layers
    prompt = [3 + i % (engine.runner.vocab_size - 3) for i in range(args.context)]
    engine.add_request(prompt, sampling_params(8))
    engine.step()          # the prefill
    engine.step()          # a first decode (anything lazy happens here)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _attention_marked(), profile(activities=activities) as prof:
        engine.step()
        if cuda:
            torch.cuda.synchronize()
    while engine.has_unfinished():
        engine.step()
    events = prof.events()
    names = _device_kernels(events) if cuda else _cpu_kernels(events)
    del llm, engine
    free_memory()
    counts = collections.Counter(names)
    log.info("%s: %d kernels per decode step", "compiled" if compiled else "eager", len(names))
    return {"calls": len(names), "layers": layers, "top": counts.most_common(25)}


def _device_kernels(events) -> list[str]:
    """The device's activities (kernels, copies, fills): as events of their own, or, where this torch lists
    them only under the CPU calls that launched them, from there."""
    from torch.autograd import DeviceType
    names = [e.name for e in events if e.device_type == DeviceType.CUDA]
    return names or [k.name for e in events for k in getattr(e, "kernels", ())]


def _cpu_kernels(events) -> list[str]:
    """Top-level operator calls under the step's forward that would launch a kernel, fused C++ kernels,
    and the paged attention as one call."""
    names = []
    for e in events:
        chain = []
        parent = e.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if "kvserve::execute" not in chain or ATTENTION in chain:
            continue
        inside_a_kernel = any((n.startswith("aten::") and n not in NO_KERNEL) or "cpp_fused" in n for n in chain)
        if e.name == ATTENTION:
            names.append("attention")
        elif "cpp_fused" in e.name:
            names.append("fused")
        elif inside_a_kernel:
            continue                 # counted as the operator that called it
        elif e.name == "aten::copy_" and ("aten::to" in chain or "aten::_to_copy" in chain):
            names.append("cast")     # a cast that copies (one that returns its input launches nothing)
        elif e.name.startswith("aten::") and e.name not in NO_KERNEL:
            names.append(e.name.removeprefix("aten::"))
    return names


@contextlib.contextmanager
def _attention_marked():
    """Each layer's paged attention under one profiler range, so that its inner calls count as one."""
    from torch.profiler import record_function

    from kvserve.cache import attention
    paged = attention._paged

    def marked(*args, **kwargs):
        with record_function(ATTENTION):
            return paged(*args, **kwargs)

    attention._paged = marked
    try:
        yield
    finally:
        attention._paged = paged

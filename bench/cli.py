"""`kvserve bench <name> [flags]` / `python -m kvserve.bench <name> [flags]`: run one benchmark, print its table."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCHMARKS = {
    "throughput": "kvserve.bench.throughput",
    "cache-speedup": "kvserve.bench.cache_speedup",
    "memory": "kvserve.bench.memory",
    "prefix": "kvserve.bench.prefix",
    "offload": "kvserve.bench.offload",
    "serve": "kvserve.bench.serve",
    "served": "kvserve.bench.served",
    "decode-floor": "kvserve.bench.decode_floor",
    "structured": "kvserve.bench.structured",
    "tp": "kvserve.bench.tp",
    "host-step": "kvserve.bench.host_step",
    "kernels": "kvserve.bench.kernels",
}


def build_parser(prog: str = "kvserve bench") -> argparse.ArgumentParser:
    from kvserve.bench.common import HelpFormatter
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split(":", 1)[1].strip(),
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", metavar="<name>")
    sub.required = True
    for name, module in BENCHMARKS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP, formatter_class=HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _plot=getattr(mod, "plot", None), _name=mod.NAME)
    sub.add_parser("models", help="list the named random-weight model shapes").set_defaults(_run=_list_models)
    return parser


def _list_models(args: argparse.Namespace) -> int:
    from kvserve.bench.models import CACHE_DIR, SHAPES
    for shape in SHAPES.values():
        print(f"{shape.name:14s} {shape.description}")
    print(f"(built on first use into {CACHE_DIR})")
    return 0


def _replot(args: argparse.Namespace) -> int:
    from kvserve.bench.common import read_json
    if args._plot is None:
        raise SystemExit(f"{args._name} draws no plot")
    path = Path(args.replot)
    args._plot(read_json(path), Path(args.out_dir) if args.out_dir else path.parent)
    return 0


def _prog() -> str:
    first = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    parent = Path(sys.argv[0]).parent.name if sys.argv and sys.argv[0] else ""
    return "python -m kvserve.bench" if (first == "__main__.py" and parent == "bench") else "kvserve bench"


def main(argv: list[str] | None = None) -> int:
    from kvserve.bench.common import setup_logging
    args = build_parser(_prog()).parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(getattr(args, "verbose", False))
    if getattr(args, "replot", None):
        return _replot(args)
    _exit_on_sigterm()
    return int(args._run(args) or 0)


def _exit_on_sigterm() -> None:
    """SIGTERM (a `timeout` around the bench, a CI job cancelled) unwinds like Ctrl-C: the servers a bench
    launched (in sessions of their own, out of the signal's reach) are stopped on the way out, instead of
    being left holding their port and the GPU's memory. Exit status 143, as if killed by it."""
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

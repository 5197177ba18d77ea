"""`python -m bench <name> [flags]` / `kvserve bench <name> [flags]`: run one benchmark, print its table."""
from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "throughput": "kvserve.bench.throughput",
    "cache-speedup": "kvserve.bench.cache_speedup",
    "memory": "kvserve.bench.memory",
    "prefix": "kvserve.bench.prefix",
    "serve": "kvserve.bench.serve",
    "decode-floor": "kvserve.bench.decode_floor",
}


def build_parser(prog: str = "python -m bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split(":", 1)[1].strip())
    sub = parser.add_subparsers(dest="benchmark", metavar="<name>")
    sub.required = True
    for name, module in BENCHMARKS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    sub.add_parser("models", help="list the named random-weight model shapes").set_defaults(_run=_list_models)
    return parser


def _list_models(args: argparse.Namespace) -> int:
    from kvserve.bench.models import CACHE_DIR, SHAPES
    for shape in SHAPES.values():
        print(f"{shape.name:14s} {shape.description}")
    print(f"(built on first use into {CACHE_DIR})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from kvserve.bench.common import setup_logging
    prog = "kvserve bench" if sys.argv and sys.argv[0].endswith("kvserve") else "python -m bench"
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(getattr(args, "verbose", False))
    return int(args._run(args) or 0)

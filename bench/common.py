"""Shared benchmark plumbing: flags, workloads, machine info, tables, JSON and PNG output, progress."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

log = logging.getLogger("kvserve.bench")
RESULTS_DIR = "bench-results"   # under the current directory: ./bench-results/<name>/


@dataclass(slots=True)
class Request:
    prompt_token_ids: list[int]
    max_tokens: int


def setup_logging(verbose: bool = False) -> None:
    if not sys.stderr.isatty():
        # transformers' and huggingface_hub's own bars (e.g. "Loading weights") write \r into logs
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "urllib3", "matplotlib", "PIL", "ContinuousBatchingLogger"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # transformers' continuous batching logs an ERROR on CPU hosts without psutil; it is harmless here
    logging.getLogger("ContinuousBatchingLogger").addFilter(lambda r: "psutil" not in r.getMessage())


class HelpFormatter(argparse.HelpFormatter):
    """One line per flag where the terminal allows; the default appended once, unless the help names it."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default in (None, "") or isinstance(default, bool)
                or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: {show_default(default)})".replace("%", "%%")


def show_default(value: Any) -> str:
    """A default as it is typed on the command line: 32:512 for a range, 0.5,1,2 for a list."""
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]}:{value[1]}"
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_common_args(p: argparse.ArgumentParser, *, shape: str = "llama-small") -> None:
    g = p.add_argument_group("common")
    g.add_argument("--model-shape", default=shape, metavar="SHAPE",
                   help="`kvserve bench models` name or a model folder")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda if available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], metavar="DTYPE",
                   help="float32, bfloat16, float16; auto (default) = bfloat16 on CUDA")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the workload and the sampler")
    g.add_argument("--out-dir", type=Path, default=None, metavar="DIR",
                   help=f"where <name>.json and <name>.png go (default: ./{RESULTS_DIR}/<name>/)")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: torch's choice)")
    g.add_argument("--replot", type=Path, default=None, metavar="JSON",
                   help="only redraw the plot from a JSON this benchmark wrote")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_workload_args(p: argparse.ArgumentParser, num_requests: int = 64, prompt_len: tuple[int, int] = (32, 512),
                      output_len: tuple[int, int] = (16, 256), requests_help: str = "requests in the workload",
                      prompt_help: str = "prompt tokens, uniform in [LO, HI]",
                      output_help: str = "output tokens, uniform in [LO, HI]") -> argparse._ArgumentGroup:
    """The mixed workload's flags (request count, prompt and output lengths); returns the group."""
    g = p.add_argument_group("workload")
    g.add_argument("--num-requests", type=int, default=num_requests, metavar="N", help=requests_help)
    g.add_argument("--prompt-len", type=parse_range, default=prompt_len, metavar="LO:HI", help=prompt_help)
    g.add_argument("--output-len", type=parse_range, default=output_len, metavar="LO:HI", help=output_help)
    return g


def resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "float32" if device == "cpu" else "bfloat16"


def prepare(args: argparse.Namespace, name: str) -> None:
    """Resolve device, dtype, output folder and threads in place; seed everything."""
    import torch
    args.device = resolve_device(args.device)
    args.dtype = resolve_dtype(args.dtype, args.device)
    args.out_dir = default_out_dir(args, name)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_all(args.seed)


def default_out_dir(args: argparse.Namespace, name: str) -> Path:
    return Path(args.out_dir) if args.out_dir else Path.cwd() / RESULTS_DIR / name


def seed_all(seed: int) -> None:
    import torch
    random.seed(seed)
    torch.manual_seed(seed)


# workloads

def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    """Token ids away from the special ids at the low end of the vocabulary."""
    hi = min(vocab_size, 32000) - 1
    return [rng.randint(3, hi) for _ in range(length)]


def make_workload(num_requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int],
                  vocab_size: int, seed: int) -> list[Request]:
    """Requests with prompt and output lengths drawn uniformly from the inclusive ranges."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(num_requests):
        plen, olen = rng.randint(*prompt_len), rng.randint(*output_len)
        reqs.append(Request(random_prompt(rng, plen, vocab_size), olen))
    return reqs


def parse_range(text: str) -> tuple[int, int]:
    """'32:512' or '32-512' -> (32, 512); '128' -> (128, 128)."""
    for sep in (":", "-", ","):
        if sep in text:
            lo, hi = (int(x) for x in text.split(sep, 1))
            if lo > hi or lo < 1:
                raise argparse.ArgumentTypeError(f"bad range {text!r}: need 1 <= lo <= hi")
            return lo, hi
    return int(text), int(text)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


# machine

def machine_info(device: str | None = None) -> dict[str, Any]:
    import torch
    import transformers
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvserve_version": _kvserve_version(),
        "kvserve_commit": _git_commit(),
        "device": device,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device and device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(idx).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _kvserve_version() -> str | None:
    import kvserve
    return getattr(kvserve, "__version__", None)


def _git_commit() -> str | None:
    """The checkout's commit when kvserve runs from one (an editable install); None when installed."""
    import kvserve
    root = Path(kvserve.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_line(info: dict) -> str:
    dev = info.get("gpu") or info.get("device")
    load = info.get("load_average")
    load_s = f", load {load[0]:.1f}" if load else ""
    commit = info.get("kvserve_commit") or info.get("kvserve_version")
    commit_s = f", kvserve {commit}" if commit else ""
    threads = f", {info['torch_threads']} torch thread{'s' if info.get('torch_threads') != 1 else ''}" \
        if info.get("torch_threads") and not info.get("gpu") else ""
    return (f"{info['cpu_model']}, {info['cpu_cores']} cores{load_s}; device {dev}{threads}; "
            f"torch {info['torch']}, transformers {info['transformers']}{commit_s}")


# statistics

def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; nan for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(values: Sequence[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    mean = sum(vals) / len(vals) if vals else math.nan
    return {"mean": mean, "p50": percentile(vals, 50), "p90": percentile(vals, 90),
            "p99": percentile(vals, 99), "n": len(vals)}


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


# output

def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = [title] if title else []
    out.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    out.append(line)
    for r in cells:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    text = format_table(headers, list(rows), title)
    print(text, flush=True)
    return text


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and math.isnan(obj):
        return None
    raise TypeError(f"not JSON serializable: {type(obj)}")


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(out_dir: Path, name: str, payload: dict) -> Path:
    path = Path(out_dir) / f"{name}.json"
    path.write_text(json.dumps(_clean(payload), indent=2, default=_jsonable) + "\n")
    log.info("wrote %s", path)
    return path


def new_figure(ncols: int = 1, width: float = 6.4, height: float = 4.4):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, out_dir: Path, name: str, title: str, machine: dict) -> Path:
    """Title on top, the machine that ran it as a subtitle under it; PNG at out_dir/<name>.png."""
    import matplotlib.pyplot as plt
    height = fig.get_figheight()
    fig.text(0.5, 1 - 0.08 / height, title, ha="center", va="top", fontsize=12)
    fig.text(0.5, 1 - 0.34 / height, machine_line(machine), ha="center", va="top", fontsize=8, color="0.3")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.52 / height))
    path = Path(out_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info("wrote %s", path)
    return path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def progress(iterable=None, **kw):
    """A bar on a terminal, log lines elsewhere (kvserve.progress)."""
    from kvserve.progress import progress as _progress
    return _progress(iterable, **kw)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.start

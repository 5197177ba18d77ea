"""Served vs offline: one workload through `LLM.generate` and through a launched `kvserve serve`, same engine flags.

Three phases, each timed on its own:
1. offline: `kvserve.LLM(...).generate(prompts, params)` in this process (pinned like the server);
   with `--engine-client`, then the same through `kvserve.AsyncEngine` in this process (the engine's own
   process, a stream per request, detokenizing; no HTTP), pinned like the server: what HTTP adds;
2. burst: every request sent at once to a launched `kvserve serve` over streaming `POST /v1/completions`
   (served tok/s, TTFT, inter-token latency);
3. probes: `GET /health` and `GET /metrics` every `--probe-interval` from a separate process, at idle and
   while `--probe-streams` streams stay in flight for `--probe-seconds`.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import multiprocessing
import os
import time
from pathlib import Path

from kvserve.bench import common
from kvserve.bench.common import print_table, ratio, summarize
from kvserve.bench.loadgen import Client, TextRequest, run_concurrency, run_poisson, summarize_point, text_workload
from kvserve.bench.models import describe, model_path
from kvserve.bench.serve import Server

NAME = "served"
HELP = "one workload offline (LLM.generate) and served (kvserve serve, all at once): tok/s ratio, TTFT, ITL, probes"
GOALS = {"ratio_cuda": 0.9, "ratio_cpu": 0.8, "probe_p99_ms": 50.0}
log = logging.getLogger("kvserve.bench")

# EngineConfig field -> `kvserve serve` flag; offline and served get the same values
ENGINE_FLAGS = {"block_size": "--block-size", "num_kv_blocks": "--num-kv-blocks",
                "max_num_batched_tokens": "--max-num-batched-tokens", "max_num_seqs": "--max-num-seqs",
                "max_model_len": "--max-model-len"}


def parse_cpus(text: str) -> set[int]:
    """'0', '0,2', '0-3' or '0-1,4' -> a set of CPU ids this process may use."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    if not cpus:
        raise argparse.ArgumentTypeError(f"no CPUs in {text!r}")
    return cpus


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common_args(p)
    g = common.add_workload_args(
        p, 256, (16, 256), (16, 128), requests_help="requests (the burst sends all at once)",
        prompt_help="prompt characters (one token each with the bench models' byte tokenizer), uniform",
        output_help="new tokens per request (ignore_eos), uniform")
    g.add_argument("--warmup", choices=["auto", "short", "full"], default="auto", metavar="HOW",
                   help="untimed pass before each timed one: short (4 short requests), full (the whole workload) "
                        "or auto (full on CUDA, where new batch shapes compile kernels; short on CPU)")
    g.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="timed offline runs and bursts, each with its own rotation of the prompts (no prefix-cache "
                        "hits); the figures are the median run's (for noisy machines: 3)")
    g = p.add_argument_group("engine (the same for offline and served)")
    g.add_argument("--kv-blocks", type=int, default=None, metavar="N",
                   help="KV blocks (default: the whole workload at once, counting one token per character)")
    g.add_argument("--block-size", type=int, default=16, metavar="N", help="tokens per KV block")
    g.add_argument("--max-batch-tokens", type=int, default=2048, metavar="N", help="tokens per engine step")
    g.add_argument("--max-num-seqs", type=int, default=256, metavar="N", help="sequences per step")
    g.add_argument("--max-model-len", type=int, default=None, metavar="N", help="default: the engine's")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (both)")
    g.add_argument("--async-scheduling", action="store_true", help="schedule the next step while one runs (both)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model at start-up (both)")
    g.add_argument("--engine-client", action="store_true",
                   help="after the offline runs, run the workload through kvserve.AsyncEngine in this process too: "
                        "the engine process, its pipes and a stream per request with detokenizing, but no HTTP, "
                        "pinned like the server (this process on --api-cpus if given): the served path's cost "
                        "apart from HTTP")
    g = p.add_argument_group("server and client")
    g.add_argument("--server-cpus", type=parse_cpus, default=None, metavar="LIST",
                   help="pin the server, and the offline run, to these CPUs, e.g. 0 (default: no pinning)")
    g.add_argument("--client-cpus", type=parse_cpus, default=None, metavar="LIST",
                   help="pin this process (the load client and the prober) to these CPUs while serving, e.g. 1")
    g.add_argument("--api-cpus", type=parse_cpus, default=None, metavar="LIST",
                   help="pin the server's API process (HTTP, tokenizing, detokenizing) to these CPUs instead, and "
                        "leave --server-cpus to the engine's, e.g. --server-cpus 0 --api-cpus 1: a core each "
                        "(default: the API process shares --server-cpus)")
    g.add_argument("--probe-streams", type=int, default=128, metavar="N", help="streams in flight while probing")
    g.add_argument("--probe-seconds", type=float, default=10.0, metavar="S",
                   help="how long the probe phase keeps --probe-streams streams in flight")
    g.add_argument("--probe-interval", type=float, default=0.05, metavar="S",
                   help="seconds between probe rounds (GET /health, then GET /metrics)")
    g.add_argument("--kvserve-args", default="", metavar="ARGS", help="extra flags for `kvserve serve` only")
    g.add_argument("--startup-timeout", type=float, default=600.0, metavar="S", help="seconds to wait for /health")
    g.add_argument("--request-timeout", type=float, default=600.0, metavar="S", help="seconds per request")


# engine flags

def engine_args(args, kv_blocks: int) -> dict:
    """EngineConfig keywords shared by LLM(...) and `kvserve serve` (device and dtype apart)."""
    out = {"block_size": args.block_size, "num_kv_blocks": kv_blocks, "max_num_batched_tokens": args.max_batch_tokens,
           "max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len}
    out = {k: v for k, v in out.items() if v is not None}
    if args.enforce_eager:
        out["cuda_graphs"] = False
    if args.async_scheduling:
        out["async_scheduling"] = True
    if args.compile:
        out["compile"] = True
    return out


def serve_flags(engine: dict) -> list[str]:
    flags = []
    for key, value in engine.items():
        if key == "cuda_graphs":
            flags += ["--enforce-eager"] if value is False else []
        elif key in ("async_scheduling", "compile"):
            flags += ["--" + key.replace("_", "-")] if value else []
        else:
            flags += [ENGINE_FLAGS[key], str(value)]
    return flags


def kv_blocks_for(reqs: list[TextRequest], block_size: int) -> int:
    """Blocks for every request at once: one token per character, plus one for a BOS, plus max_tokens."""
    return sum(math.ceil((len(r.prompt) + 1 + r.max_tokens) / block_size) for r in reqs)


class KvserveServer(Server):
    """`python -m kvserve serve` with exactly the offline engine's flags."""

    def __init__(self, path: Path, args, engine: dict, **kw):
        super().__init__("kvserve", path, args, **kw)
        self.engine = engine

    def command(self) -> list[str]:
        import shlex
        import sys
        a = self.args
        return ([sys.executable, "-m", "kvserve", "serve", "--model", str(self.path), "--host", "127.0.0.1",
                 "--port", str(self.port), "--device", a.device, "--dtype", a.dtype] + serve_flags(self.engine)
                + shlex.split(a.kvserve_args))


# pinning

def pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (os.sched_setaffinity(pid) alone moves one thread)."""
    tasks = Path(f"/proc/{pid}/task")
    tids = [int(t.name) for t in tasks.iterdir()] if tasks.exists() else [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, PermissionError):
            pass


def pin_server(api_pid: int, cpus: set[int], api_cpus: set[int] | None = None) -> None:
    """The server's processes onto `cpus`: the API process (`kvserve serve` itself) onto `api_cpus`
    instead when given, its descendants (the engine's processes) onto `cpus`."""
    for pid in process_tree(api_pid):
        pin_process(pid, api_cpus if pid == api_pid and api_cpus else cpus)


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def allowed_cpus(pid: int) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of these processes so far: the nanoseconds each of their threads has run
    (/proc/<pid>/task/<tid>/schedstat), else user + system clock ticks (/proc/<pid>/stat, 10 ms steps:
    too coarse for a short burst, where a process's share could read 0). A thread that exits drops out
    of the first sum; the server's threads live as long as it does."""
    total = 0.0
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/schedstat").exists():
                total += sum(_thread_cpu_ns(task) for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9
            else:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):    # the process is gone
            continue
    return total


def _thread_cpu_ns(task: Path) -> int:
    try:
        return int((task / "schedstat").read_text().split()[0])
    except FileNotFoundError:      # the thread ended between the listing and the read
        return 0


def server_cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds so far of the server's own process (the API) and of every process it started (the engine)."""
    return cpu_seconds([pid]), cpu_seconds([p for p in process_tree(pid) if p != pid])


def cpu_list(cpus: set[int] | None) -> str | None:
    return ",".join(str(c) for c in sorted(cpus)) if cpus else None


# the run

def run(args: argparse.Namespace) -> int:
    try:
        import aiohttp  # noqa: F401 - the load's client
        import httpx  # noqa: F401 - the probes and the start-up checks
    except ImportError:
        raise SystemExit("`kvserve bench served` needs aiohttp and httpx: pip install 'kvserve[bench]'") from None
    usable = os.sched_getaffinity(0)
    if args.api_cpus and not args.server_cpus:
        raise SystemExit("--api-cpus needs --server-cpus (the engine's CPUs)")
    for flag, cpus in (("--server-cpus", args.server_cpus), ("--client-cpus", args.client_cpus),
                       ("--api-cpus", args.api_cpus)):
        if cpus and not cpus <= usable:
            raise SystemExit(f"{flag} {cpu_list(cpus)}: this process may only use CPUs {cpu_list(usable)}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    threads = args.threads or (len(args.server_cpus) if args.server_cpus else None)
    args.threads = threads
    common.prepare(args, NAME)
    warmup = args.warmup if args.warmup != "auto" else ("full" if args.device.startswith("cuda") else "short")
    reqs = text_workload(args.num_requests, args.prompt_len, args.output_len, args.seed)
    kv_blocks = args.kv_blocks or kv_blocks_for(reqs, args.block_size)
    engine = engine_args(args, kv_blocks)
    path = model_path(args.model_shape, args.dtype)
    machine = common.machine_info(args.device)
    log.info("machine: %s", common.machine_line(machine))
    log.info("model %s; %d requests, prompts %s chars, outputs %s tokens; engine %s", describe(args.model_shape),
             len(reqs), args.prompt_len, args.output_len, engine)

    if args.server_cpus:
        pin_process(os.getpid(), args.server_cpus)
    offline = _offline(args, path, engine, reqs, warmup)
    client_side = _engine_client(args, path, engine, reqs, warmup, threads) if args.engine_client else None
    if args.client_cpus:
        pin_process(os.getpid(), args.client_cpus)
    elif args.server_cpus:
        pin_process(os.getpid(), usable)
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    with KvserveServer(path, args, engine, cpus=args.server_cpus, env=env) as server:
        pinning = {"server_cpus": cpu_list(args.server_cpus), "client_cpus": cpu_list(args.client_cpus),
                   "api_cpus": cpu_list(args.api_cpus), "threads": threads}
        if args.server_cpus:    # whatever the server started meanwhile (an engine process, threads) too
            pin_server(server.proc.pid, args.server_cpus, args.api_cpus)
        pinning["server_processes"] = {str(pid): allowed_cpus(pid) for pid in process_tree(server.proc.pid)}
        pinning["client_process"] = allowed_cpus(os.getpid())
        served, probes = asyncio.run(_served(args, server.url, str(path), reqs, warmup,
                                             lambda: server_cpu_seconds(server.proc.pid)))
    _report(args, machine, reqs, engine, warmup, pinning, offline, served, probes, client_side)
    return 0


def rotated(reqs: list[TextRequest], turn: int) -> list[TextRequest]:
    """The workload with each prompt rotated by 7 characters a turn: the same work, and (from turn 1 on)
    prompts that share no prefix with an earlier turn's, so the prefix cache turns none of it into hits."""
    out = []
    for r in reqs:
        shift = 1 + (turn * 7 - 1) % (len(r.prompt) - 1) if turn and len(r.prompt) > 1 else 0   # 0 only at turn 0
        out.append(TextRequest(r.prompt[shift:] + r.prompt[:shift], r.max_tokens))
    return out


def median_run(runs: list[dict], key: str) -> dict:
    """The run with the median `key` (the lower middle one for an even count), with every run's `key` in `runs`."""
    ordered = sorted(runs, key=lambda run: run[key])
    return {**ordered[(len(ordered) - 1) // 2], "runs": [run[key] for run in runs]}


def _warm_slice(reqs: list[TextRequest], how: str) -> list[TextRequest]:
    """The untimed pass: the workload's shapes with the prompts reversed, so that no timed run finds its
    prompts in the prefix cache."""
    if how == "full":
        return [TextRequest(r.prompt[::-1], r.max_tokens) for r in reqs]
    return [TextRequest(r.prompt[::-1][:32], min(8, r.max_tokens)) for r in reqs[:4]]


def _offline(args, path, engine: dict, reqs: list[TextRequest], warmup: str) -> dict:
    from kvserve import LLM, SamplingParams
    from kvserve.bench.peers import free_memory, synchronize
    llm = LLM(str(path), device=args.device, dtype=args.dtype, **engine)

    def go(batch: list[TextRequest]) -> tuple[float, int]:
        params = [SamplingParams(max_tokens=r.max_tokens, ignore_eos=True, temperature=0.0) for r in batch]
        synchronize(args.device)
        start = time.perf_counter()
        outs = llm.generate([r.prompt for r in batch], params, use_tqdm=True)
        synchronize(args.device)
        return time.perf_counter() - start, sum(len(o.token_ids) for o in outs)

    log.info("offline warm-up (%s)", warmup)
    go(_warm_slice(reqs, warmup))
    runs = []
    for turn in range(args.repeats):
        log.info("offline: %d requests (run %d of %d)", len(reqs), turn + 1, args.repeats)
        elapsed, tokens = go(rotated(reqs, turn))
        runs.append({"elapsed_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed})
        log.info("offline: %.1f output tokens/s (%.2f s)", tokens / elapsed, elapsed)
    llm = None   # free the engine (and its GPU memory) before the server starts
    free_memory()
    return {**median_run(runs, "elapsed_s"), "requests": len(reqs),
            "expected_output_tokens": sum(r.max_tokens for r in reqs)}


def _engine_client(args, path, engine: dict, reqs: list[TextRequest], warmup: str, threads: int | None) -> dict:
    """The workload through kvserve.AsyncEngine in this process, every request at once, each output read as
    the server reads it: the engine's own process, the pipes, the reader thread that detokenizes and a
    stream per request, without HTTP. The engine process is pinned and threaded like the server's (it
    inherits this process's CPUs, and OMP_NUM_THREADS); this process moves to --api-cpus if given."""
    from kvserve import AsyncEngine, EngineConfig, SamplingParams
    from kvserve.bench.peers import free_memory
    saved = os.environ.get("OMP_NUM_THREADS")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        client = AsyncEngine(EngineConfig(model=str(path), device=args.device, dtype=args.dtype, **engine))
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    if args.api_cpus:
        pin_process(os.getpid(), args.api_cpus)

    async def one(r: TextRequest) -> int:
        tokens = 0
        params = SamplingParams(max_tokens=r.max_tokens, ignore_eos=True, temperature=0.0)
        async for out in client.generate(r.prompt, params):
            tokens += len(out.new_tokens)
            out.new_text     # noqa: B018 - read as the server reads it (merged pieces are joined here)
        return tokens

    async def go(batch: list[TextRequest]) -> dict:
        cpu0, own0, start = cpu_seconds([client.pid]), time.process_time(), time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(r) for r in batch)))
        elapsed = time.perf_counter() - start
        return {"elapsed_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
                "cpu_seconds": {"engine_process": cpu_seconds([client.pid]) - cpu0,
                                "client_process": time.process_time() - own0}}

    async def main() -> list[dict]:
        log.info("engine client warm-up (%s)", warmup)
        await go(_warm_slice(reqs, warmup))
        runs = []
        for turn in range(args.repeats):
            log.info("engine client: %d requests at once, no HTTP (run %d of %d)", len(reqs), turn + 1, args.repeats)
            runs.append(await go(rotated(reqs, turn)))
            log.info("engine client: %.1f output tokens/s (%.2f s)", runs[-1]["output_tokens_per_s"],
                     runs[-1]["elapsed_s"])
        return runs

    client.start()
    try:
        runs = asyncio.run(main())
    finally:
        client.shutdown()
        client = None
        free_memory()
    if args.server_cpus:
        pin_process(os.getpid(), args.server_cpus)
    middle = median_run(runs, "elapsed_s")
    middle["run_cpu_seconds"] = [run["cpu_seconds"] for run in runs]
    return {**middle, "requests": len(reqs)}


async def _served(args, url: str, model: str, reqs: list[TextRequest], warmup: str,
                  server_cpu) -> tuple[dict, dict]:
    client = Client(url, "openai", model, True, args.request_timeout)
    try:
        log.info("served warm-up (%s)", warmup)
        warm = _warm_slice(reqs, warmup)
        await run_concurrency(client, warm, len(warm))
        bursts = []
        for turn in range(args.repeats):
            log.info("burst: %d requests at once (run %d of %d)", len(reqs), turn + 1, args.repeats)
            bursts.append(await _burst(args, client, rotated(reqs, turn), server_cpu))
        probes = await _probe_phase(args, client, url, reqs)
    finally:
        await client.close()
    burst = median_run(bursts, "duration_s")
    burst["run_cpu_seconds"] = [run["cpu_seconds"] for run in bursts]
    burst["errors_all_runs"] = sum(run["errors"] for run in bursts)   # reported whichever run is the median
    return burst, probes


async def _burst(args, client: Client, reqs: list[TextRequest], server_cpu) -> dict:
    bar = common.progress(total=len(reqs), desc="burst", unit="req")
    cpu0, own0 = server_cpu(), time.process_time()
    outcomes, duration = await run_poisson(client, reqs, math.inf, args.seed, bar)
    cpu1, own1 = server_cpu(), time.process_time()
    bar.close()
    burst = summarize_point(outcomes, duration)
    api, engine = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    # CPU seconds per wall second during the burst: near the number of CPUs given = that side is saturated
    burst["cpu_busy"] = {"server": (api + engine) / duration, "client": (own1 - own0) / duration}
    # where the server's share went: the API process (HTTP, tokenizing, detokenizing, SSE) and the
    # engine's process(es); on one shared core the burst takes about their sum
    burst["cpu_seconds"] = {"api_process": api, "engine_processes": engine}
    log.info("served: %.1f output tokens/s (%.2f s), %d errors", burst["output_tokens_per_s"], duration,
             burst["errors"])
    return burst


async def _probe_phase(args, client: Client, url: str, reqs: list[TextRequest]) -> dict:
    """Idle probes for a second, then probes while `probe_streams` streams stay in flight for `probe_seconds`."""
    ctx = multiprocessing.get_context("spawn")
    stop, (recv, send) = ctx.Event(), ctx.Pipe(duplex=False)
    prober = ctx.Process(target=probe_loop, args=(url, args.probe_interval, stop, send, args.client_cpus),
                         daemon=True)
    prober.start()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, recv.recv)         # "ready"
    idle_start = time.monotonic()
    await asyncio.sleep(max(1.0, 20 * args.probe_interval))
    load_start = time.monotonic()
    outcomes, marks = await _steady_streams(client, reqs, args.probe_streams, args.probe_seconds, args.repeats)
    load_end = marks["last_dispatch"]
    stop.set()
    samples = await loop.run_in_executor(None, recv.recv)
    prober.join(timeout=10)
    streams = summarize_point(outcomes, time.monotonic() - load_start)
    out = {"interval_s": args.probe_interval, "streams": args.probe_streams, "seconds": args.probe_seconds,
           "window_s": load_end - load_start, "stream_errors": streams["errors"],
           "stream_output_tokens_per_s": streams["output_tokens_per_s"], "stream_requests": streams["requests"]}
    for phase, lo, hi in (("idle", idle_start, load_start), ("load", load_start, load_end)):
        for path in ("/health", "/metrics"):
            picked = [s for s in samples if s[0] == path and lo <= s[1] < hi]
            lat = [s[2] * 1e3 for s in picked if s[3] == 200]
            out.setdefault(phase, {})[path] = {**summarize(lat), "max": max(lat, default=math.nan),
                                               "failures": sum(s[3] != 200 for s in picked)}
    return out


async def _steady_streams(client: Client, reqs: list[TextRequest], streams: int, seconds: float,
                         first_turn: int = 0):
    """Keep `streams` requests in flight for `seconds`, cycling through the workload (each round's prompts
    rotated, from turn `first_turn` on, so the prefix cache does not turn them into cache hits); then let the
    last ones finish."""
    outcomes, marks = [], {}
    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def worker():
        for i in counter:
            if time.monotonic() >= deadline:
                marks.setdefault("last_dispatch", time.monotonic())
                return
            req = reqs[i % len(reqs)]
            outcomes.append(await client.send(rotated([req], first_turn + i // len(reqs))[0]))

    await asyncio.gather(*(worker() for _ in range(streams)))
    marks.setdefault("last_dispatch", time.monotonic())
    return outcomes, marks


def probe_loop(url: str, interval: float, stop, conn, cpus: set[int] | None) -> None:
    """In its own process: GET /health then GET /metrics every `interval` s over one keep-alive connection, until
    `stop`; sends back [(path, sent at (time.monotonic), seconds, status)]."""
    import httpx
    if cpus:
        os.sched_setaffinity(0, cpus)
    samples = []
    with httpx.Client(timeout=10.0) as http:
        http.get(f"{url}/health")                        # open the connection
        conn.send("ready")
        tick = time.monotonic()
        while not stop.is_set():
            for path in ("/health", "/metrics"):
                t0 = time.monotonic()
                try:
                    status = http.get(f"{url}{path}").status_code
                except httpx.HTTPError:
                    status = 0
                samples.append((path, t0, time.monotonic() - t0, status))
            tick += interval
            time.sleep(max(0.0, tick - time.monotonic()))
    conn.send(samples)


# report

def _report(args, machine, reqs, engine, warmup, pinning, offline, served, probes, client_side=None) -> None:
    cuda = args.device.startswith("cuda")
    goal = GOALS["ratio_cuda"] if cuda else GOALS["ratio_cpu"]
    r = ratio(served["output_tokens_per_s"], offline["output_tokens_per_s"])
    if client_side:
        client_side["over_offline"] = ratio(client_side["output_tokens_per_s"], offline["output_tokens_per_s"])
    rows = [["offline LLM.generate", offline["requests"], 0, offline["output_tokens"], offline["elapsed_s"],
             offline["output_tokens_per_s"], None, None, None, None]]
    if client_side:
        rows.append(["AsyncEngine, no HTTP", client_side["requests"], 0, client_side["output_tokens"],
                     client_side["elapsed_s"], client_side["output_tokens_per_s"], None, None, None, None])
    rows.append(["served, all at once", served["requests"], served["errors_all_runs"], served["output_tokens"],
                 served["duration_s"], served["output_tokens_per_s"], served["ttft_s"]["p50"],
                 served["ttft_s"]["p99"], served["itl_s"]["p50"] * 1e3, served["itl_s"]["p99"] * 1e3])
    print()
    print_table(["run", "requests", "errors", "output tok", "time s", "output tok/s", "TTFT p50 s", "TTFT p99 s",
                 "ITL p50 ms", "ITL p99 ms"], rows,
                title=f"served vs offline: {len(reqs)} requests, prompts {args.prompt_len[0]}-{args.prompt_len[1]} "
                      f"chars, outputs {args.output_len[0]}-{args.output_len[1]} tokens, ignore_eos, greedy, "
                      f"streaming /v1/completions; model {args.model_shape}, {args.dtype} on {args.device}; "
                      f"warm-up {warmup}")
    busy, spent = served["cpu_busy"], served["cpu_seconds"]
    if args.repeats > 1:
        listed = {name: " / ".join(f"{value:.2f}" for value in values) for name, values in (
            ("offline", offline["runs"]), ("bursts", served["runs"]),
            ("api", [c["api_process"] for c in served["run_cpu_seconds"]]))}
        print(f"median of {args.repeats} runs each: offline {listed['offline']} s, bursts {listed['bursts']} s "
              f"(API process CPU {listed['api']} s)")
    print(f"CPU seconds per second during the burst: server {busy['server']:.2f}, client {busy['client']:.2f}")
    print(f"CPU seconds during the burst: API process {spent['api_process']:.2f}, engine process(es) "
          f"{spent['engine_processes']:.2f} (offline took {offline['elapsed_s']:.2f} s)")
    apart = (f"; the goal is for a server on one core, and the API process ran apart on CPUs {pinning['api_cpus']}"
             if pinning.get("api_cpus") and not cuda else "")
    print(f"served / offline output tok/s: {r:.3f} ({'meets' if r >= goal else 'below'} the >= {goal} goal on "
          f"{'CUDA' if cuda else 'CPU'}{apart})")
    if client_side:
        spent_c = client_side["cpu_seconds"]
        runs = " / ".join(f"{value:.2f}" for value in client_side["runs"])
        print(f"without HTTP (kvserve.AsyncEngine in the bench's process): {client_side['over_offline']:.3f} of "
              f"offline ({runs} s); CPU seconds: engine process {spent_c['engine_process']:.2f}, the client's "
              f"process (reader thread, streams) {spent_c['client_process']:.2f}")
    rows = []
    for phase, label in (("idle", "idle"), ("load", f"{probes['streams']} streams")):
        for path in ("/health", "/metrics"):
            s = probes[phase][path]
            rows.append([f"GET {path}, {label}", s["n"], s["failures"], s["p50"], s["p99"], s["max"]])
    print()
    print_table(["probe", "n", "failed", "p50 ms", "p99 ms", "max ms"], rows,
                title=f"probes every {probes['interval_s'] * 1e3:.0f} ms from a separate process; "
                      f"{probes['streams']} streams kept in flight for {probes['window_s']:.1f} s "
                      f"({probes['stream_output_tokens_per_s']:.0f} tok/s, {probes['stream_errors']} errors)")
    worst = max(probes["load"][p]["p99"] for p in ("/health", "/metrics"))
    print(f"probe p99 under load: {worst:.1f} ms ({'meets' if worst <= GOALS['probe_p99_ms'] else 'above'} the "
          f"<= {GOALS['probe_p99_ms']:.0f} ms goal)")
    api = f", API process CPUs {pinning['api_cpus']}" if pinning.get("api_cpus") else ""
    print(f"pinning: server CPUs {pinning['server_cpus'] or 'any'}{api}, "
          f"client CPUs {pinning['client_cpus'] or 'any'}, torch threads {pinning['threads'] or 'default'}")
    print(f"machine: {common.machine_line(machine)}")
    payload = {
        "benchmark": NAME, "machine": machine,
        "model": {"shape": args.model_shape, "description": describe(args.model_shape), "dtype": args.dtype,
                  "device": args.device},
        "workload": {"num_requests": len(reqs), "prompt_len_chars": args.prompt_len, "output_len": args.output_len,
                     "output_tokens": sum(q.max_tokens for q in reqs), "seed": args.seed, "ignore_eos": True,
                     "temperature": 0},
        "config": {"engine": engine, "api": "POST /v1/completions, stream=true, all requests sent at once",
                   "warmup": warmup, "repeats": args.repeats, "pinning": pinning, "kvserve_args": args.kvserve_args},
        "offline": offline, "engine_client": client_side, "served": served, "probes": probes,
        "ratio": {"served_over_offline": r, "goal": goal, "met": r >= goal},
        "probe_goal": {"p99_ms": GOALS["probe_p99_ms"], "worst_p99_ms": worst, "met": worst <= GOALS["probe_p99_ms"]},
        "definitions": {"output_tokens_per_s": "output tokens / wall time of the whole workload (offline: "
                                               "LLM.generate; served: first request sent -> last response done)",
                        "runs": "with --repeats N: each timed run's seconds (offline: elapsed_s, served: "
                                "duration_s); the other figures are the median run's, except errors_all_runs",
                        "engine_client": "with --engine-client: the workload through kvserve.AsyncEngine in the "
                                         "bench's process (no HTTP), pinned like the server; null without it",
                        "ttft": "request sent -> first streamed token", "cpu_busy": "CPU seconds (user + "
                        "system) per wall second during the burst: the server's processes, and this client", "cpu_seconds":
                        "CPU seconds during the burst of the server's API process and of the processes it "
                        "started (the engine; tensor-parallel workers)", "itl": "gap between successive streamed "
                        "chunks carrying text", "probe": "one GET over a keep-alive connection, from a separate "
                        "process; 'load' counts probes sent while the streams were being kept in flight"},
    }
    common.write_json(args.out_dir, NAME, payload)
    plot(payload, args.out_dir)


def plot(payload: dict, out_dir) -> object:
    """Output tok/s offline vs served, and probe latencies (p50, p99, max) idle and under load."""
    fig, (ax1, ax2) = common.new_figure(2, width=5.6, height=4.6)
    r = payload["ratio"]
    bars = [("offline\nLLM.generate", payload["offline"]["output_tokens_per_s"], "tab:gray")]
    if payload.get("engine_client"):
        bars.append(("AsyncEngine\nno HTTP", payload["engine_client"]["output_tokens_per_s"], "tab:olive"))
    bars.append(("served\nall at once", payload["served"]["output_tokens_per_s"], "tab:green"))
    for i, (label, value, color) in enumerate(bars):
        bar = ax1.bar(i, value or 0, color=color)[0]
        ax1.annotate(f"{value or 0:.0f} tok/s", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                     xytext=(0, 3), textcoords="offset points", ha="center", fontsize=9)
    ax1.set_xticks(range(len(bars)), [label for label, _, _ in bars])
    ax1.set_ylabel("output tokens per second (higher is better)")
    ax1.set_title(f"served / offline = {r['served_over_offline'] or 0:.2f} (goal >= {r['goal']})", fontsize=10)
    ax1.margins(y=0.2)
    ax1.grid(axis="y", alpha=0.3)
    probes = payload["probes"]
    labels, width = [], 0.25
    for j, (phase, path) in enumerate((p, q) for p in ("idle", "load") for q in ("/health", "/metrics")):
        s = probes[phase][path]
        labels.append(f"{path}\n{'idle' if phase == 'idle' else str(probes['streams']) + ' streams'}")
        for k, (stat, color) in enumerate((("p50", "tab:blue"), ("p99", "tab:orange"), ("max", "tab:red"))):
            ax2.bar(j + (k - 1) * width, s[stat] or 0, width, color=color, label=stat if j == 0 else None)
    ax2.axhline(payload["probe_goal"]["p99_ms"], color="0.3", ls="--", lw=0.8, label="p99 goal")
    ax2.set_xticks(range(len(labels)), labels, fontsize=8)
    ax2.set_ylabel("latency, ms (lower is better)")
    ax2.set_title(f"GET every {probes['interval_s'] * 1e3:.0f} ms from a separate process", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(axis="y", alpha=0.3)
    model, w = payload["model"], payload["workload"]
    pin = payload["config"]["pinning"]
    pin_s = (f"; server CPUs {pin['server_cpus']}" + (f", API {pin['api_cpus']}" if pin.get("api_cpus") else "")
             + f", client CPUs {pin['client_cpus']}") if pin.get("server_cpus") else ""
    title = (f"Served vs offline: {w['num_requests']} requests, prompts {w['prompt_len_chars'][0]}-"
             f"{w['prompt_len_chars'][1]} chars, outputs {w['output_len'][0]}-{w['output_len'][1]} tokens "
             f"({model['shape']}, {model['dtype']}{pin_s})")
    return common.save_figure(fig, out_dir, NAME, title, payload["machine"])

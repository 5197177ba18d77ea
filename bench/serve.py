"""Online serving: Poisson or fixed-concurrency load against kvserve and/or `transformers serve` on loopback."""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from kvserve.bench import common
from kvserve.bench.common import float_list, int_list, parse_range, print_table, ratio
from kvserve.bench.loadgen import Client, check_loopback, run_concurrency, run_poisson, summarize_point, text_workload
from kvserve.bench.models import describe, model_path

NAME = "serve"
HELP = "online load (Poisson rates or fixed concurrency) against kvserve / transformers serve: TTFT, TPOT, ITL"
GOAL = 2.0  # kvserve sustains >= 2x transformers serve's request rate at the same p99 TTFT
log = logging.getLogger("kvserve.bench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_common_args(p)
    g = p.add_argument_group("target")
    g.add_argument("--launch", choices=["kvserve", "transformers", "both"], default=None, metavar="WHICH",
                   help="start kvserve, transformers or both (default: both, unless --url)")
    g.add_argument("--url", default=None, help="load a running server on loopback instead, e.g. http://127.0.0.1:8000")
    g.add_argument("--api", choices=["openai", "tgi"], default="openai", metavar="API",
                   help="openai (/v1/completions) or tgi (/generate_stream)")
    g.add_argument("--served-model", default=None, metavar="NAME",
                   help="OpenAI `model` field (default: the model path, or GET /v1/models)")
    g.add_argument("--ignore-eos", choices=["auto", "yes", "no"], default="auto", metavar="WHEN",
                   help="send ignore_eos: yes, no, or auto (default: to kvserve only)")
    g.add_argument("--kvserve-args", default="", metavar="ARGS", help="extra flags for `kvserve serve`")
    g.add_argument("--transformers-args", default="", metavar="ARGS", help="extra flags for `transformers serve`")
    g.add_argument("--startup-timeout", type=float, default=600.0, metavar="S", help="seconds to wait for /health")
    g = p.add_argument_group("load")
    g.add_argument("--rates", type=float_list, default=[0.5, 1.0, 2.0, 4.0, 8.0], metavar="LIST",
                   help="Poisson rates, req/s (inf = all at once)")
    g.add_argument("--concurrency", type=int_list, default=None, metavar="LIST",
                   help="fixed concurrency levels instead of --rates")
    g.add_argument("--num-requests", type=int, default=16, metavar="N", help="requests per load point")
    g.add_argument("--prompt-len", type=parse_range, default=(64, 256), metavar="LO:HI",
                   help="prompt characters (= tokens), uniform in [LO, HI]")
    g.add_argument("--output-len", type=parse_range, default=(32, 128), metavar="LO:HI",
                   help="output tokens, uniform in [LO, HI]")
    g.add_argument("--ttft-slo", type=float, default=None, metavar="S",
                   help="p99 TTFT bound (default: 3x the lower lightest-load p99, >= 1 s)")
    g.add_argument("--request-timeout", type=float, default=600.0, metavar="S", help="seconds per request")
    g = p.add_argument_group("server sizing (same for both launched servers)")
    g.add_argument("--kv-blocks", type=int, default=2048, metavar="N", help="KV blocks of 16 tokens")
    g.add_argument("--max-batch-tokens", type=int, default=2048, metavar="N", help="tokens per engine step")
    g.add_argument("--hf-page-size", type=int, default=256, metavar="N", help="transformers serve --cb-block-size")


def run(args: argparse.Namespace) -> int:
    try:
        import aiohttp  # noqa: F401 - the load's client
        import httpx  # noqa: F401 - the probes and the start-up checks
    except ImportError:
        raise SystemExit("`kvserve bench serve` needs aiohttp and httpx: pip install 'kvserve[bench]'") from None
    common.prepare(args, NAME)
    if args.url and args.launch:
        raise SystemExit("give either --url or --launch, not both")
    targets = [args.launch or "both"] if not args.url else []
    systems = ["kvserve", "transformers"] if targets == ["both"] else targets
    machine = common.machine_info(args.device)
    log.info("machine: %s", common.machine_line(machine))
    reqs = text_workload(args.num_requests, args.prompt_len, args.output_len, args.seed)
    loads = [("concurrency", c) for c in args.concurrency] if args.concurrency else [("rate", r) for r in args.rates]
    path = model_path(args.model_shape, args.dtype) if systems else None
    results: dict[str, list[dict]] = {}
    if args.url:
        url = check_loopback(args.url)
        results[url] = _sweep(args, url, _served_model(args, url), args.ignore_eos == "yes", reqs, loads)
    for system in systems:
        with Server(system, path, args) as server:
            ignore = args.ignore_eos == "yes" or (args.ignore_eos == "auto" and system == "kvserve")
            results[system] = _sweep(args, server.url, args.served_model or str(path), ignore, reqs, loads)
    _report(args, machine, reqs, loads, results)
    return 0


def _served_model(args, url: str) -> str:
    if args.served_model:
        return args.served_model
    import httpx
    try:
        return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    except Exception:
        return "default"


def _sweep(args, url: str, model: str, ignore_eos: bool, reqs, loads) -> list[dict]:
    async def go() -> list[dict]:
        client = Client(url, args.api, model, ignore_eos, args.request_timeout)
        try:
            warm = [r.__class__(r.prompt[:32], 4) for r in reqs[:2]]
            await run_concurrency(client, warm, 2)
            points = []
            for kind, value in loads:
                bar = common.progress(total=len(reqs), desc=f"{url} {kind} {value:g}", unit="req")
                if kind == "rate":
                    outcomes, duration = await run_poisson(client, reqs, value, args.seed, bar)
                else:
                    outcomes, duration = await run_concurrency(client, reqs, int(value), bar)
                bar.close()
                point = {"load": kind, "value": value, **summarize_point(outcomes, duration)}
                log.info("%s %s=%g: %.2f req/s, %.1f tok/s, TTFT p99 %.2f s, %d errors", url, kind, value,
                         point["request_throughput"], point["output_tokens_per_s"], point["ttft_s"]["p99"],
                         point["errors"])
                points.append(point)
            return points
        finally:
            await client.close()
    return asyncio.run(go())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on a free loopback port, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, system: str, path: Path, args, *, cpus: set[int] | None = None, env: dict | None = None):
        self.system, self.path, self.args = system, path, args
        self.cpus, self.extra_env = cpus, env or {}   # CPUs the server (and what it starts) may run on
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(args.out_dir) / f"{system}-server.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        a = self.args
        if self.system == "kvserve":
            cmd = [sys.executable, "-m", "kvserve", "serve", "--model", str(self.path), "--host", "127.0.0.1", "--port", str(self.port),
                   "--device", a.device, "--dtype", a.dtype, "--num-kv-blocks", str(a.kv_blocks),
                   "--max-num-batched-tokens", str(a.max_batch_tokens)]
            return cmd + shlex.split(a.kvserve_args)
        hf_blocks = math.ceil(a.kv_blocks * 16 / a.hf_page_size) + 64
        cmd = [_transformers_cli(), "serve", str(self.path), "--continuous-batching", "--host", "127.0.0.1",
               "--port", str(self.port), "--device", a.device, "--dtype", a.dtype, "--cb-block-size",
               str(a.hf_page_size), "--cb-num-blocks", str(hf_blocks), "--cb-max-batch-tokens",
               str(a.max_batch_tokens), "--log-level", "warning"]
        return cmd + shlex.split(a.transformers_args)

    def __enter__(self) -> "Server":
        cmd = self.command()
        log.info("starting %s: %s (log %s)", self.system, shlex.join(cmd), self.log_path)
        env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"} | self.extra_env
        self._log = open(self.log_path, "w")
        mine = os.sched_getaffinity(0) if self.cpus else None
        if self.cpus:   # the child inherits the forking thread's CPU mask, before it starts any thread
            os.sched_setaffinity(0, self.cpus)
        try:
            self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        finally:
            if mine:
                os.sched_setaffinity(0, mine)
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_healthy(self) -> None:
        import httpx
        deadline = time.monotonic() + self.args.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text()[-2000:]
                raise SystemExit(f"{self.system} exited with {self.proc.returncode} during start-up:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    log.info("%s is up at %s", self.system, self.url)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit(f"{self.system} did not become healthy within {self.args.startup_timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def _transformers_cli() -> str:
    """The `transformers` command of this Python's environment, else the one on PATH."""
    beside = Path(sys.executable).with_name("transformers")
    return str(beside) if beside.exists() else "transformers"


def _sustained(points: list[dict], slo: float) -> float:
    """The highest offered rate whose p99 TTFT meets the SLO with no errors (0 when none does)."""
    ok = [p["value"] for p in points if p["errors"] == 0 and p["ttft_s"]["p99"] <= slo]
    return max(ok, default=0.0)


def _report(args, machine, reqs, loads, results: dict[str, list[dict]]) -> None:
    kind = loads[0][0]
    rows = []
    for system, points in results.items():
        for p in points:
            rows.append([system, f"{p['value']:g}", p["completed"], p["errors"], p["request_throughput"],
                         p["output_tokens_per_s"], p["ttft_s"]["mean"], p["ttft_s"]["p50"], p["ttft_s"]["p99"],
                         p["tpot_s"]["mean"] * 1e3, p["tpot_s"]["p50"] * 1e3, p["tpot_s"]["p99"] * 1e3,
                         p["itl_s"]["mean"] * 1e3, p["itl_s"]["p50"] * 1e3, p["itl_s"]["p99"] * 1e3])
    print()
    print_table([ "server", kind, "ok", "err", "req/s", "out tok/s", "TTFT mean s", "TTFT p50", "TTFT p99",
                 "TPOT mean ms", "TPOT p50", "TPOT p99", "ITL mean ms", "ITL p50", "ITL p99"], rows,
                title=f"serve: {len(reqs)} requests per point, prompt {args.prompt_len[0]}-{args.prompt_len[1]} "
                      f"tokens, output {args.output_len[0]}-{args.output_len[1]}, greedy, streaming {args.api} "
                      f"API, " + (f"model {args.model_shape}, {args.dtype} on {args.device}" if not args.url
                                   else f"the model served at {args.url}"))
    comparison = None
    if {"kvserve", "transformers"} <= set(results) and kind == "rate":
        slo = args.ttft_slo or max(1.0, 3 * min(results[s][0]["ttft_s"]["p99"] for s in ("kvserve", "transformers")))
        kv, tf = _sustained(results["kvserve"], slo), _sustained(results["transformers"], slo)
        comparison = {"ttft_p99_slo_s": slo, "kvserve_req_per_s": kv, "transformers_req_per_s": tf,
                      "ratio": ratio(kv, tf), "goal": GOAL}
        verdict = (f"{ratio(kv, tf):.2f}x (goal >= {GOAL}x; bounded by the rates tested)" if kv and tf else
                   "no ratio: add lower --rates until both servers hold the bound at one of them")
        print(f"sustained request rate at p99 TTFT <= {slo:.2f} s (no errors): kvserve {kv:g} req/s, transformers "
              f"serve {tf:g} req/s -> {verdict}")
    print(f"machine: {common.machine_line(machine)}")
    payload = {"benchmark": NAME, "machine": machine,
               "model": {"shape": args.model_shape, "description": describe(args.model_shape), "dtype": args.dtype},
               "config": {"api": args.api, "loads": loads, "num_requests": args.num_requests,
                          "prompt_len": args.prompt_len, "output_len": args.output_len, "kv_blocks": args.kv_blocks,
                          "max_batch_tokens": args.max_batch_tokens, "hf_page_size": args.hf_page_size,
                          "ignore_eos": args.ignore_eos},
               "definitions": {"ttft": "request sent -> first streamed token", "tpot": "(e2e - ttft) / (tokens - 1)",
                               "itl": "gap between successive streamed chunks carrying text"},
               "results": results, "comparison": comparison}
    common.write_json(args.out_dir, NAME, payload)
    plot(payload, args.out_dir)


COLORS = {"kvserve": "tab:green", "transformers": "tab:orange"}
NAMES = {"transformers": "transformers serve"}


def plot(payload: dict, out_dir) -> object:
    """Per server against the load: TTFT (p50, p99), TPOT p50 / ITL p99, and completed requests/s."""
    fig, (ax1, ax2, ax3) = common.new_figure(3, width=5.0, height=4.8)
    cfg, results = payload["config"], payload["results"]
    kind = cfg["loads"][0][0]
    for i, (system, points) in enumerate(results.items()):
        xs = [p["value"] for p in points]
        color, name = COLORS.get(system, f"C{i + 2}"), NAMES.get(system, system)
        marker = "os^D"[i % 4]
        ax1.plot(xs, [p["ttft_s"]["p99"] for p in points], color=color, marker=marker, label=f"{name} p99")
        ax1.plot(xs, [p["ttft_s"]["p50"] for p in points], color=color, marker=marker, mfc="none", ls="--",
                 label=f"{name} p50")
        ax2.plot(xs, [p["tpot_s"]["p50"] * 1e3 for p in points], color=color, marker=marker,
                 label=f"{name} TPOT p50")
        ax2.plot(xs, [p["itl_s"]["p99"] * 1e3 for p in points], color=color, marker=marker, mfc="none", ls="--",
                 label=f"{name} ITL p99")
        ax3.plot(xs, [p["request_throughput"] for p in points], color=color, marker=marker, label=name)
    xs = [v for _, v in cfg["loads"]]
    if kind == "rate":
        finite = [x for x in xs if x != float("inf")]
        ax3.plot(finite, finite, color="0.5", lw=0.8, ls=":", label="offered rate (all served)")
    slo = (payload.get("comparison") or {}).get("ttft_p99_slo_s")
    if slo:
        ax1.axhline(slo, color="tab:red", lw=0.8, ls="-.", label=f"p99 bound {slo:.2f} s")
    xl = "offered request rate, req/s (Poisson)" if kind == "rate" else "concurrent requests"
    panels = ((ax1, "time to first token, s (log scale)", "TTFT (lower is better)"),
              (ax2, "ms per token (log scale)", "TPOT p50 and ITL p99 (lower is better)"),
              (ax3, "completed requests per second", "Throughput (higher is better)"))
    for ax, yl, title in panels:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both" if ax is not ax3 else "major")
        ax.legend(fontsize=7.5)
    ax1.set_yscale("log")
    ax2.set_yscale("log")
    ax3.set_ylim(bottom=0)
    model = payload["model"]
    title = (f"Online serving, streaming {cfg['api']} API: {cfg['num_requests']} requests per point, prompts "
             f"{cfg['prompt_len'][0]}-{cfg['prompt_len'][1]}, outputs {cfg['output_len'][0]}-{cfg['output_len'][1]} "
             f"tokens ({model['shape']}, {model['dtype']})")
    return common.save_figure(fig, out_dir, NAME, title, payload["machine"])

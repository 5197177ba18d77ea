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
    g.add_argument("--launch", choices=["kvserve", "transformers", "both"], default=None,
                   help="start the server(s) on loopback with the same model (default: both, unless --url)")
    g.add_argument("--url", default=None, help="an already running server on loopback, e.g. http://127.0.0.1:8000")
    g.add_argument("--api", choices=["openai", "tgi"], default="openai",
                   help="openai: POST /v1/completions; tgi: POST /generate_stream (transformers serve: openai only)")
    g.add_argument("--served-model", default=None, help="`model` field for OpenAI requests (default: the model "
                                                       "path when launching, else the first of GET /v1/models)")
    g.add_argument("--ignore-eos", choices=["auto", "yes", "no"], default="auto",
                   help="send vLLM's ignore_eos extension (auto: to kvserve only; transformers serve rejects it)")
    g.add_argument("--kvserve-args", default="", help="extra flags for `kvserve serve`")
    g.add_argument("--transformers-args", default="", help="extra flags for `transformers serve`")
    g.add_argument("--startup-timeout", type=float, default=600.0)
    g = p.add_argument_group("load")
    g.add_argument("--rates", type=float_list, default=[0.5, 1.0, 2.0, 4.0, 8.0],
                   help="Poisson request rates per second, comma separated (inf = all at once)")
    g.add_argument("--concurrency", type=int_list, default=None,
                   help="fixed concurrency levels instead of rates, comma separated")
    g.add_argument("--num-requests", type=int, default=16, help="requests per load point")
    g.add_argument("--prompt-len", type=parse_range, default=(64, 256), help="prompt characters (= tokens), lo:hi")
    g.add_argument("--output-len", type=parse_range, default=(32, 128), help="output tokens, lo:hi")
    g.add_argument("--ttft-slo", type=float, default=None,
                   help="p99 TTFT bound (s) for the sustained-rate comparison (default: 3x the lower of the two "
                        "servers' p99 TTFT at the lightest load, at least 1 s)")
    g.add_argument("--request-timeout", type=float, default=600.0)
    g = p.add_argument_group("server sizing (same for both launched servers)")
    g.add_argument("--kv-blocks", type=int, default=2048, help="KV blocks of 16 tokens")
    g.add_argument("--max-batch-tokens", type=int, default=2048)
    g.add_argument("--hf-page-size", type=int, default=256, help="transformers serve --cb-block-size")


def run(args: argparse.Namespace) -> int:
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

    def __init__(self, system: str, path: Path, args):
        self.system, self.path, self.args = system, path, args
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(args.out_dir) / f"{system}-server.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        a = self.args
        if self.system == "kvserve":
            cmd = [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())", "serve",
                   "--model", str(self.path), "--host", "127.0.0.1", "--port", str(self.port),
                   "--device", a.device, "--dtype", a.dtype, "--num-kv-blocks", str(a.kv_blocks),
                   "--max-num-batched-tokens", str(a.max_batch_tokens)]
            return cmd + shlex.split(a.kvserve_args)
        hf_blocks = math.ceil(a.kv_blocks * 16 / a.hf_page_size) + 64
        cmd = ["transformers", "serve", str(self.path), "--continuous-batching", "--host", "127.0.0.1",
               "--port", str(self.port), "--device", a.device, "--dtype", a.dtype, "--cb-block-size",
               str(a.hf_page_size), "--cb-num-blocks", str(hf_blocks), "--cb-max-batch-tokens",
               str(a.max_batch_tokens), "--log-level", "warning"]
        return cmd + shlex.split(a.transformers_args)

    def __enter__(self) -> "Server":
        cmd = self.command()
        log.info("starting %s: %s (log %s)", self.system, shlex.join(cmd), self.log_path)
        env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=common.REPO_ROOT,
                                     env=env, start_new_session=True)
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
        print(f"sustained request rate at p99 TTFT <= {slo:.2f} s (no errors): kvserve {kv:.2f} req/s, transformers "
              f"serve {tf:.2f} req/s -> {ratio(kv, tf):.2f}x (goal >= {GOAL}x; bounded by the rates tested)")
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
    _plot(args, machine, kind, results)


def _plot(args, machine, kind: str, results: dict[str, list[dict]]) -> None:
    fig, (ax1, ax2, ax3) = common.new_figure(3, width=5.0)
    for system, points in results.items():
        xs = [p["value"] for p in points]
        line, = ax1.plot(xs, [p["ttft_s"]["p99"] for p in points], marker="o", label=f"{system} p99")
        ax1.plot(xs, [p["ttft_s"]["p50"] for p in points], marker=".", ls="--", color=line.get_color(),
                 label=f"{system} p50")
        ax2.plot(xs, [p["tpot_s"]["p99"] * 1e3 for p in points], marker="o", color=line.get_color(),
                 label=f"{system} p99")
        ax2.plot(xs, [p["itl_s"]["p50"] * 1e3 for p in points], marker=".", ls="--", color=line.get_color(),
                 label=f"{system} ITL p50")
        ax3.plot(xs, [p["output_tokens_per_s"] for p in points], marker="o", color=line.get_color(), label=system)
    xl = "offered request rate (req/s)" if kind == "rate" else "concurrent requests"
    for ax, yl, title in ((ax1, "TTFT, s", "Time to first token"), (ax2, "ms", "TPOT p99 / ITL p50"),
                          (ax3, "output tokens / s", "Throughput")):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    common.save_figure(fig, args.out_dir, NAME, common.machine_line(machine))

"""`kvserve` command line: `kvserve serve` runs the HTTP server; other subcommands plug in by name.

Every `serve` flag can also be set with an environment variable, KVSERVE_<FLAG> (e.g. KVSERVE_PORT).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn

from kvserve.config import parse_size
from kvserve.server.serving import DEFAULT_MAX_REQUEST_BYTES, ServerSettings, ServerState, drain

logger = logging.getLogger("kvserve.server")

DEMO_SERVED_NAME = "kvserve-demo"
TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Subcommand:
    """A subcommand implemented elsewhere: `module.main(argv) -> int | None`, imported only when run.
    `needs` are the modules its extra (`pip install 'kvserve[extra]'`) installs."""
    module: str
    help: str
    extra: str | None = None
    needs: tuple[str, ...] = ()


SUBCOMMANDS: dict[str, Subcommand] = {
    "bench": Subcommand("kvserve.bench.cli", "run a benchmark: throughput, cache-speedup, memory, prefix, serve, "
                        "decode-floor (needs the bench extra)", extra="bench",
                        needs=("matplotlib", "httpx", "aiohttp", "tqdm")),
}


def register_subcommand(name: str, module: str, help: str, extra: str | None = None,
                        needs: tuple[str, ...] = ()) -> None:
    """Add `kvserve <name> ...`, which calls `<module>.main(argv)` with the remaining arguments."""
    SUBCOMMANDS[name] = Subcommand(module, help, extra, needs)


def env_name(flag: str) -> str:
    return "KVSERVE_" + flag.lstrip("-").upper().replace("-", "_")


def add_flag(parser: argparse.ArgumentParser, flag: str, help: str, type: Callable[[str], Any] = str,
             default: Any = None, unset: str | None = None, **kwargs: Any) -> None:
    """A flag whose default comes from KVSERVE_<FLAG> when set. --help names the variable and the default,
    once: the value, or `unset` (what a default of None means)."""
    env = env_name(flag)
    if env in os.environ:
        default = type(os.environ[env])
    shown = unset if default is None else f"{default:g}" if isinstance(default, float) else default
    assert "default" not in help.lower(), f"{flag}: the default is shown from `default` or `unset`"
    parser.add_argument(flag, type=type, default=default, help=f"{help} [env: {env}; default: {shown}]", **kwargs)


def at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# Kubernetes gives every pod `<SERVICE>_PORT=tcp://<cluster ip>:<port>` for each Service of its namespace
# (Docker's links did the same): a Service named `kvserve` sets KVSERVE_PORT, which is not a port for us.
SERVICE_LINK = re.compile(r"(?:tcp|udp|sctp)://(?:\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):[0-9]+")
DEFAULT_PORT = 8000


class FromEnvironment(str):
    """A flag's value read from its environment variable; argparse converts a string default with the
    flag's type only when the flag is not given, so a bad variable never stops `--flag VALUE`."""
    variable = ""


def port_number(value: str) -> int:
    """--port's type: a TCP port number, 0-65535 (KVSERVE_PORT's too, naming the variable when it is wrong)."""
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        if isinstance(value, FromEnvironment):
            raise argparse.ArgumentTypeError(f"{value.variable}={str(value)!r} is not a port number (0-65535): "
                                             "fix or unset it, or pass --port")
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0-65535)")
    return int(text)


def add_port_flag(parser: argparse.ArgumentParser) -> None:
    """--port, from KVSERVE_PORT unless that holds a Kubernetes service link: then the variable is ignored
    (`serve` logs it) and the port is 8000, the port kvserve's image and manifests expose."""
    env = env_name("--port")
    value = os.environ.get(env)
    default: int | str = DEFAULT_PORT
    if value is not None and SERVICE_LINK.fullmatch(value.strip()):
        parser.set_defaults(ignored_port_env=value)
    elif value is not None:
        default = FromEnvironment(value)
        default.variable = env
    parser.add_argument("--port", type=port_number, default=default,
                        help="port to bind; a KVSERVE_PORT of the form tcp://HOST:PORT (what Kubernetes sets for "
                             f"a Service named kvserve) is ignored [env: {env}; default: {str(default).strip()}]")


def add_switch(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    env = env_name(flag)
    default = os.environ.get(env, "").strip().lower() in TRUE
    parser.add_argument(flag, action="store_true", default=default,
                        help=f"{help} [env: {env}=1; default: {'on' if default else 'off'}]")


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    add_flag(p, "--model", "local folder or Hugging Face hub id", metavar="PATH_OR_ID",
             unset="the built-in demo model (random weights, created offline on first use)")
    add_flag(p, "--host", "address to bind", default="127.0.0.1")
    add_port_flag(p)
    env = env_name("--served-model-name")
    names = os.environ[env].replace(",", " ").split() if os.environ.get(env) else None
    p.add_argument("--served-model-name", nargs="+", default=names, metavar="NAME",
                   help="model names the APIs accept (aliases); the first is the one reported "
                        f"[env: {env}, comma-separated; default: --model, or kvserve-demo for the demo model]")
    add_flag(p, "--dtype", "weights and KV cache dtype; auto is bfloat16 on CUDA, float32 on CPU", default="auto",
             choices=["auto", "float32", "bfloat16", "float16"])
    add_flag(p, "--device", "auto, cpu, cuda or cuda:N", default="auto")
    add_flag(p, "--tensor-parallel-size", "shard the model over N ranks with its tensor-parallel plan: N GPUs "
             "(NCCL) or N processes on CPU (gloo); the server starts the N-1 worker processes itself", type=int,
             default=1, metavar="N")
    add_flag(p, "--block-size", "tokens per KV block (a power of two)", type=int, default=16, metavar="N")
    add_flag(p, "--num-kv-blocks", "KV pool size in blocks (wins over the memory options)", type=int, metavar="N",
             unset="sized from memory")
    add_flag(p, "--kv-cache-memory", "KV pool size in bytes, e.g. 4GiB or 512MB", metavar="SIZE",
             unset="at most 2 GiB on CPU; on CUDA from --gpu-memory-utilization")
    add_flag(p, "--kv-offload-memory", "host memory for a second KV tier: cached prefix blocks evicted from the "
             "pool are kept there and copied back on a prefix hit, e.g. 16GiB", metavar="SIZE", unset="off")
    add_flag(p, "--gpu-memory-utilization", "fraction of GPU memory for weights + KV (CUDA)", type=float,
             metavar="FRACTION", unset="0.9 when no pool size is given")
    add_flag(p, "--max-num-seqs", "most sequences in one batch", type=int, default=256, metavar="N")
    add_flag(p, "--max-num-batched-tokens", "token budget of one engine step", type=int, default=2048, metavar="N")
    add_flag(p, "--max-model-len", "maximum prompt + output length", type=int, metavar="N",
             unset="the model's (lowered to what the KV pool holds)")
    add_switch(p, "--no-prefix-caching", "disable automatic prefix caching")
    add_flag(p, "--logprobs-mode", "what logprobs report: raw, the log-softmax of the model's logits; processed, "
             "of the distribution each token was drawn from (after penalties, logit_bias, a grammar, temperature, "
             "top-k/p, min-p)", default="raw", choices=["raw", "processed"])
    add_flag(p, "--attention-backend", "paged attention: auto is the Triton kernels on CUDA, PyTorch on CPU",
             default="auto", choices=["auto", "torch", "triton"])
    add_switch(p, "--enforce-eager", "run decode steps eagerly, without the CUDA graphs captured at start-up")
    add_switch(p, "--compile", "torch.compile the model at start-up (inductor; on CPU it needs a C++ compiler; "
               "on CUDA the decode graphs capture the compiled forward); falls back to eager if compiling fails")
    add_switch(p, "--async-scheduling", "schedule the next step while the forward of one runs (on a forward "
               "thread); the outputs are the same, meant for GPUs")
    add_flag(p, "--max-waiting-requests", "requests allowed to wait for a slot; more get 429", type=int,
             default=1024, metavar="N")
    add_flag(p, "--shutdown-timeout", "seconds in-flight requests get to finish after SIGTERM (Docker kills "
             "after 10 s unless told otherwise)", type=float, default=6.0, metavar="SECONDS")
    add_flag(p, "--sse-keepalive", "seconds between SSE `: keep-alive` comments while a stream is quiet",
             type=float, default=5.0, metavar="SECONDS")
    add_flag(p, "--stream-interval", "tokens a stream gathers before each write (the first token and the end "
             "go at once): fewer, larger SSE chunks, less server CPU per token, burstier streams", type=at_least_one,
             default=1, metavar="N")
    add_flag(p, "--log-level", "logging threshold", default="info",
             choices=["debug", "info", "warning", "error", "critical"])
    add_switch(p, "--disable-access-log", "no log line per HTTP request (uvicorn's access log, at info level)")
    env = env_name("--api-key")
    p.add_argument("--api-key", default=os.environ.get(env) or None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` on every API route (/health and /metrics stay open) "
                        f"[env: {env}; default: {'set from the environment' if os.environ.get(env) else 'none'}]")
    add_flag(p, "--max-request-bytes", "largest request body; larger ones get 413 before they are read, e.g. "
             "8MiB", type=parse_size, default=f"{DEFAULT_MAX_REQUEST_BYTES // 2**20}MiB", metavar="SIZE")
    add_switch(p, "--trust-request-chat-template", "let clients send their own chat_template (Jinja run in "
               "transformers' sandbox); refused otherwise")
    add_flag(p, "--tool-call-parser", "the model's tool-call format, parsed from its replies for tool_choice "
             "\"auto\" (hermes covers Qwen2.5, Qwen3 and Hermes)", unset="recognised from the chat template",
             choices=["hermes", "llama3_json", "mistral"])


def build_parser() -> argparse.ArgumentParser:
    from kvserve import __version__
    parser = argparse.ArgumentParser(prog="kvserve", description="LLM serving with a paged KV cache. "
                                     "`kvserve COMMAND --help` lists a command's flags.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the HTTP server (TGI and OpenAI-compatible APIs)",
                           description="Run the kvserve HTTP server. Every flag can also be set with the "
                           "environment variable named in its help.")
    add_serve_flags(serve)
    for name, command in SUBCOMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False)
    return parser


def configure_logging(level: str) -> None:
    """Log to stderr with timestamps; uvicorn and the engine log through the root logger."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)


def resolve_model(args: argparse.Namespace) -> tuple[str, tuple[str, ...], bool]:
    """(model path or id, served names, is_demo); creates the demo model offline when no --model."""
    if args.model:
        return args.model, tuple(args.served_model_name or [args.model]), False
    from kvserve.demo import ensure_demo_model
    path = ensure_demo_model()
    logger.warning("no --model given: using the built-in demo model at %s (RANDOM weights, output is "
                   "gibberish; pass --model to serve a real model)", path)
    return path, tuple(args.served_model_name or [DEMO_SERVED_NAME]), True


def listen(host: str, port: int) -> socket.socket:
    """Bind the server's socket now, before the (possibly minutes-long) model load: a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and without it every
    # response on a kept-alive connection waits ~40 ms for the client's delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; is another server running there? "
                      "choose another --port") from exc
    sock.set_inheritable(True)
    return sock


def engine_config(args: argparse.Namespace, model: str) -> Any:
    """The EngineConfig for these flags; raises ValueError on inconsistent values (before any loading)."""
    from kvserve.config import EngineConfig
    return EngineConfig(
        model=model, dtype=args.dtype, device=args.device, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory=args.kv_cache_memory,
        kv_offload_memory=args.kv_offload_memory,
        gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching, attention_backend=args.attention_backend,
        cuda_graphs=False if args.enforce_eager else None, logprobs_mode=args.logprobs_mode, compile=args.compile,
        tensor_parallel_size=args.tensor_parallel_size, async_scheduling=args.async_scheduling)


def engine_loader(config: Any, max_waiting_requests: int) -> Callable[[], Any]:
    """A function that builds the AsyncEngine (the slow part: loading weights, sizing the KV pool)."""
    def load() -> Any:
        logger.info("loading model %s (dtype %s, device %s): importing torch and transformers", config.model,
                    config.dtype, config.device)
        from kvserve import AsyncEngine
        return AsyncEngine(config, max_waiting_requests=max_waiting_requests)
    return load


def limits(args: argparse.Namespace) -> dict:
    return {"limits": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                       "max_waiting_requests": args.max_waiting_requests, "block_size": args.block_size,
                       "max_stop_sequences": 4, "prefix_caching": not args.no_prefix_caching,
                       "shutdown_timeout_s": args.shutdown_timeout},
            "model_dtype": args.dtype, "model_device_type": args.device}


def make_server(args: argparse.Namespace, config: Any, served_names: tuple[str, ...], demo: bool) -> DrainingServer:
    from kvserve.server.app import create_app
    server: DrainingServer | None = None

    def cannot_serve(exc: BaseException) -> None:
        """The model failed to load or the engine died: exit non-zero, so a supervisor restarts us."""
        assert server is not None
        logger.error("the engine cannot serve (%s: %s): exiting with status 1", type(exc).__name__, exc)
        server.exit_code = 1
        server.should_exit = True

    settings = ServerSettings(served_model_names=served_names, api_key=args.api_key,
                              max_request_bytes=args.max_request_bytes,
                              trust_request_chat_template=args.trust_request_chat_template,
                              tool_call_parser=args.tool_call_parser)
    app = create_app(None, loader=engine_loader(config, args.max_waiting_requests),
                     keepalive_interval=args.sse_keepalive, stream_interval=args.stream_interval, info_extra={**limits(args), "demo": demo},
                     on_load_error=cannot_serve, on_engine_death=cannot_serve, settings=settings)
    uvicorn_config = uvicorn.Config(app, host=args.host, port=args.port, log_config=None, log_level=args.log_level,
                                    access_log=not args.disable_access_log, timeout_graceful_shutdown=3, lifespan="on")
    server = DrainingServer(uvicorn_config, app.state.kvserve, args.shutdown_timeout)
    return server


def serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    if getattr(args, "ignored_port_env", None) is not None:
        logger.warning("ignoring KVSERVE_PORT=%r: Kubernetes sets <SERVICE>_PORT=tcp://HOST:PORT for each Service, "
                       "here one named kvserve; binding port %d (set enableServiceLinks: false in the pod spec, "
                       "or pass --port)", args.ignored_port_env, args.port)
    began = time.monotonic()
    try:
        sock = listen(args.host, args.port)
    except OSError as exc:
        print(f"kvserve serve: error: {exc}", file=sys.stderr)
        return 2
    model, served_names, demo = resolve_model(args)
    try:
        config = engine_config(args, model)
    except ValueError as exc:
        print(f"kvserve serve: error: {exc}", file=sys.stderr)
        return 2
    server = make_server(args, config, served_names, demo)
    logger.info("listening on http://%s:%d%s", args.host, args.port, " (API key required)" if args.api_key else "")
    server.run(sockets=[sock])
    logger.info("kvserve stopped after %.1f s", time.monotonic() - began)
    return server.exit_code


class DrainingServer(uvicorn.Server):
    """uvicorn, except SIGTERM/SIGINT first drain (503 for new requests), then exit with status 0."""

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float):
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_task: asyncio.Future | None = None

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: drain in the background. A second one: exit now (SIGINT: without waiting)."""
        if self.state.draining or self.loop is None:
            self.force_exit = self.should_exit and sig == signal.SIGINT
            self.should_exit = True
            return
        logger.info("received %s: draining, then exiting", signal.Signals(sig).name)
        self.state.draining = True
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self.drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await drain(self.state, self.shutdown_timeout)
        self.should_exit = True


def run_subcommand(name: str, argv: list[str]) -> int:
    command = SUBCOMMANDS[name]
    if importlib.util.find_spec(command.module.split(".")[0]) is None or \
            importlib.util.find_spec(command.module) is None:
        print(f"kvserve {name} is not available: module {command.module} is not installed", file=sys.stderr)
        return 2
    missing = [m for m in command.needs if importlib.util.find_spec(m) is None]
    if missing:
        print(f"kvserve {name} needs the {command.extra} extra ({', '.join(missing)} not installed): "
              f"pip install 'kvserve[{command.extra}]'", file=sys.stderr)
        return 2
    result = importlib.import_module(command.module).main(argv)
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return run_subcommand(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())

"""The FastAPI application: both API families, /health, /info, /metrics, engine start and stop."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import importlib.resources
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

import kvserve
from kvserve.server import routes_openai, routes_tgi, routes_tokenize
from kvserve.server.edge import APIKeyMiddleware, BodySizeMiddleware
from kvserve.server.errors import install_error_handlers
from kvserve.server.serving import ServerSettings, ServerState
from kvserve.server.sse import AppSendMiddleware

if TYPE_CHECKING:  # the engine module imports torch; the app loads it only with the engine
    from kvserve import AsyncEngine

logger = logging.getLogger("kvserve.server")

DEMO_NOTE = "built-in demo model with RANDOM weights: its output is gibberish; pass --model to serve a real model"
LOAD_HEARTBEAT_S = 5.0
GC_YOUNG_THRESHOLD = 10_000   # allocations between young-generation collections while serving (default 700)


def version() -> str:
    return kvserve.__version__


def is_demo(engine: AsyncEngine) -> bool:
    return bool(getattr(getattr(engine, "model_config", None), "kvserve_demo", False))


def start_engine(state: ServerState, engine: AsyncEngine,
                 on_death: Callable[[BaseException], None] | None = None) -> None:
    """Open the engine to requests and publish it to the routes. `on_death` runs (on the engine's
    reader thread) if the engine dies, after every request in flight was failed."""
    if on_death is not None:
        engine.add_death_listener(on_death)
    # Everything loaded so far (torch, transformers, the tokenizer: ~380k objects) lives as long as
    # the process: frozen, the collector's full passes skip it. Unfrozen, each full pass took
    # ~180 ms, which was the 350 ms tail of /health under load.
    gc.collect()
    gc.freeze()
    # Each streamed token allocates a few dozen short-lived containers here (outputs, token records,
    # chunks, futures); most die young by reference counting. At the default young-generation threshold
    # (700) the collector ran ~190 times per 256-request burst and took 12% of this process's CPU; at
    # GC_YOUNG_THRESHOLD it takes about 1%, each pass under 2 ms (docs/benchmarks.md).
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    engine.start()
    state.set_engine(engine)
    if state.metrics is not None:
        state.metrics.start_log_loop()
    logger.info("engine started: model %s served as %r, max_model_len %d, KV pool %s", engine.model_id,
                state.served_model_name, engine.max_model_len, engine.kv_info)
    if is_demo(engine):
        logger.warning("serving the %s", DEMO_NOTE)


async def load_engine(state: ServerState, loader: Callable[[], AsyncEngine],
                      on_error: Callable[[BaseException], None] | None,
                      on_death: Callable[[BaseException], None] | None) -> None:
    """Build the engine in a worker thread, logging progress, then start it."""
    began = time.monotonic()
    future = asyncio.ensure_future(asyncio.to_thread(loader))
    while True:
        done, _ = await asyncio.wait({future}, timeout=LOAD_HEARTBEAT_S)
        if done:
            break
        logger.info("still loading the model (%.0f s elapsed)", time.monotonic() - began)
    try:
        engine = future.result()
        logger.info("model loaded in %.1f s", time.monotonic() - began)
        start_engine(state, engine, on_death)
    except Exception as exc:
        state.load_error = f"{type(exc).__name__}: {exc}"
        logger.exception("loading the model failed")
        if on_error is not None:
            on_error(exc)


def make_lifespan(state: ServerState, engine: AsyncEngine | None, loader: Callable[[], AsyncEngine] | None,
                  on_load_error: Callable[[BaseException], None] | None,
                  on_engine_death: Callable[[BaseException], None] | None):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None
        thresholds = gc.get_threshold()     # start_engine raises the first; put back at shutdown
        if engine is not None:
            start_engine(state, engine, on_engine_death)
        elif loader is not None:
            task = asyncio.create_task(load_engine(state, loader, on_load_error, on_engine_death))
        yield
        if task is not None and not task.done():
            task.cancel()
        if state.metrics is not None:
            state.metrics.stop_log_loop()
        if state.engine is not None:
            await asyncio.to_thread(state.engine.shutdown)
        gc.unfreeze()     # let the last collection see everything (extension modules check for leaks at exit)
        gc.set_threshold(*thresholds)
    return lifespan


def info(state: ServerState) -> dict:
    """What /info reports: model, demo label, limits, KV pool, live engine stats."""
    ok, status = state.health()
    result: dict[str, Any] = {"served_model_name": state.served_model_name, "status": status, "healthy": ok,
                              "version": version(), "router": "kvserve", **state.info}
    engine = state.engine
    if engine is None:
        return result
    stats = engine.stats()
    kv_info = dict(engine.kv_info)
    result.update({
        "model_id": str(engine.model_id), "demo": is_demo(engine),
        "model_dtype": str(kv_info.get("dtype", result.get("model_dtype"))),
        "model_device_type": str(kv_info.get("device", result.get("model_device_type"))),
        "max_model_len": engine.max_model_len, "max_input_tokens": engine.max_model_len - 1,
        "max_total_tokens": engine.max_model_len, "kv_cache": kv_info,
        "stats": {**dataclasses.asdict(stats), "usage": stats.usage, "requests_in_flight": len(state.inflight)},
    })
    if result["demo"]:
        result["note"] = DEMO_NOTE
    return result


def add_system_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", tags=["system"], responses={503: {"description": "loading, shutting down or dead"}})
    async def health() -> Response:
        """200 while the engine runs; 503 while loading, shutting down, or after the engine died."""
        ok, status = state.health()
        return JSONResponse({"status": status}, status_code=200 if ok else 503)

    @app.get("/info", tags=["system"])
    async def get_info() -> dict:
        """Model, served name, demo label, dtype, device, limits, KV pool, engine stats, version."""
        return info(state)

    @app.get("/version", tags=["system"])
    async def get_version() -> dict:
        """kvserve's version, as vLLM's GET /version answers it; open, as /health is."""
        return {"version": version()}

    @app.get("/metrics", tags=["system"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus exposition of the engine and server metrics."""
        if state.metrics is None:
            return PlainTextResponse("metrics are not available yet\n", status_code=503)
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/kv", tags=["system"], responses={503: {"description": "loading, shutting down or dead"}})
    async def kv_map() -> Response:
        """The KV cache right now: both tiers block by block (state, reference count, age, owners) and
        every unfinished request's block table. Ids and counts only, never text (docs/kv-map.md)."""
        engine = state.engine
        if engine is None or not engine.is_running:
            return JSONResponse({"error": "the engine is not running", "error_type": "unavailable"}, 503)
        try:
            body = await engine.kv_snapshot_json()
        except (kvserve.EngineDeadError, TimeoutError, asyncio.TimeoutError, RuntimeError) as exc:
            return JSONResponse({"error": f"no KV map: {exc or type(exc).__name__}", "error_type": "unavailable"},
                                503)
        return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})

    @app.get("/kv/view", include_in_schema=False)
    async def kv_view() -> Response:
        """A page that polls /kv and draws the cache (self-contained: no CDN)."""
        return HTMLResponse(kv_view_page(), headers={"Cache-Control": "no-cache"})


@functools.cache
def kv_view_page() -> str:
    return importlib.resources.files("kvserve.server").joinpath("kv_view.html").read_text(encoding="utf-8")


def create_app(engine: AsyncEngine | None = None, served_model_name: str = "kvserve", *,
               loader: Callable[[], AsyncEngine] | None = None,
               keepalive_interval: float = 5.0, stream_interval: int = 1, info_extra: dict | None = None,
               on_load_error: Callable[[BaseException], None] | None = None,
               on_engine_death: Callable[[BaseException], None] | None = None,
               settings: ServerSettings | None = None) -> FastAPI:
    """Build the app around an AsyncEngine that is not started yet (started at app startup, shut down
    at app shutdown), or around `loader`, which builds one in a worker thread while /health says 503.
    `settings` (names, API key, body limit, template trust) default to served_model_name alone.
    on_load_error / on_engine_death: what the process does when the engine cannot serve (the CLI exits
    non-zero so a supervisor restarts it)."""
    settings = settings or ServerSettings(served_model_names=(served_model_name,))
    state = ServerState(served_model_name=settings.served_model_names[0], settings=settings,
                        keepalive_interval=keepalive_interval, stream_interval=stream_interval,
                        info={"started": int(time.time()), **(info_extra or {})})
    app = FastAPI(title="kvserve", version=version(), lifespan=make_lifespan(state, engine, loader, on_load_error, on_engine_death),
                  description="LLM serving with a paged KV cache: TGI and OpenAI-compatible APIs.")
    app.state.kvserve = state
    app.add_middleware(AppSendMiddleware)      # innermost of ours (see AppSendMiddleware)
    app.add_middleware(BodySizeMiddleware, limit=settings.max_request_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)   # outermost: no key, no body read
    install_error_handlers(app)
    add_system_routes(app, state)
    app.include_router(routes_tgi.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_tokenize.tokenize_router)
    app.include_router(routes_tokenize.router)
    return app

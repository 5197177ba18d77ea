"""kvserve: an LLM serving engine around a paged KV cache.

This module is the facade: the HTTP server, the benchmarks and users' scripts import what they
need from `kvserve` itself, never from the engine's inner modules. The engine classes (which
import torch and transformers) load on first use.
"""
from kvserve.config import EngineConfig
from kvserve.errors import EngineDeadError, EngineOverloadedError, InvalidRequestError, KVServeError, PromptTooLongError
from kvserve.outputs import EngineStats, RequestMetrics, RequestOutput, StepStats, TokenInfo
try:
    from kvserve.scheduler.sampling_params import SamplingParams, StructuredOutput
except ModuleNotFoundError as exc:   # the repository's bare kvserve/ folder shadows the installed package
    if exc.name != "kvserve.scheduler":
        raise
    raise ImportError(f"kvserve was imported from its source folder {__path__[0]}, which holds only part of the "
                      "package (server/, cache/, scheduler/ and bench/ install as its subpackages): run from "
                      "another directory, or install it editable with `pip install -e .`") from exc

__version__ = "0.1.0"
__all__ = ["AsyncEngine", "EngineConfig", "EngineDeadError", "EngineOverloadedError", "EngineStats",
           "InvalidRequestError", "KVServeError", "LLM", "LLMEngine", "PromptTooLongError", "RequestMetrics",
           "RequestOutput", "RequestStream", "SamplingParams", "StepStats", "StructuredOutput", "TokenInfo", "__version__",
           "check_structured"]


def check_structured(spec: StructuredOutput) -> str | None:
    """Why a structured output's grammar cannot be compiled, or None (cached by spec; it can take a
    while for a large schema: call it off the event loop)."""
    from kvserve.structured import check
    return check(spec)


def __getattr__(name: str):
    if name == "LLM":
        from kvserve.llm import LLM
        return LLM
    if name == "AsyncEngine":
        from kvserve.async_engine import AsyncEngine
        return AsyncEngine
    if name == "RequestStream":
        from kvserve.async_engine import RequestStream
        return RequestStream
    if name == "LLMEngine":
        from kvserve.engine import LLMEngine
        return LLMEngine
    raise AttributeError(f"module 'kvserve' has no attribute {name!r}")

"""kvserve: an LLM serving engine around a paged KV cache."""
from kvserve.config import EngineConfig
from scheduler.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["AsyncEngine", "EngineConfig", "LLM", "LLMEngine", "SamplingParams", "__version__"]


def __getattr__(name):  # heavy imports (torch, transformers) only when used
    if name == "LLM":
        from kvserve.llm import LLM
        return LLM
    if name == "AsyncEngine":
        from kvserve.async_engine import AsyncEngine
        return AsyncEngine
    if name == "LLMEngine":
        from kvserve.engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)

"""The offline API: LLM(model=...).generate(prompts, SamplingParams(...))."""
from __future__ import annotations

import logging
from typing import Sequence

from kvserve.config import EngineConfig
from kvserve.engine import LLMEngine
from kvserve.outputs import RequestOutput
from kvserve.scheduler.sampling_params import SamplingParams

log = logging.getLogger("kvserve")


class LLM:
    """Run a batch of prompts to completion through the continuous-batching engine."""

    def __init__(self, model: str, **engine_args):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Finished outputs in the order of the prompts (a string, a token-id list, or a list of them)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        done: dict[str, RequestOutput] = {}
        bar = _progress(len(ids)) if use_tqdm else None
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        return [done[i] for i in ids]


def _progress(total: int):
    from kvserve.progress import progress
    return progress(total=total, desc="requests", unit="req")

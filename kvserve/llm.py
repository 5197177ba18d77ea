"""The offline API: LLM(model=...).generate(prompts, SamplingParams(...)) and LLM.chat(messages)."""
from __future__ import annotations

import logging
from typing import Any, Sequence

from kvserve.config import EngineConfig
from kvserve.engine import LLMEngine
from kvserve.outputs import RequestOutput
from kvserve.scheduler.sampling_params import SamplingParams

log = logging.getLogger("kvserve")

Message = dict[str, Any]


class LLM:
    """Run a batch of prompts to completion through the continuous-batching engine.

    Without a model, the built-in demo model (random weights, created offline on first use) runs.
    Each returned RequestOutput holds the whole request: `new_tokens` lists every generated token
    with its log-probability, `new_text` and `text` the whole output text.
    """

    def __init__(self, model: str | None = None, **engine_args):
        if model is None:
            from kvserve.demo import ensure_demo_model
            model = ensure_demo_model()
            log.warning("LLM() without a model: using the built-in demo model at %s (RANDOM weights, its output "
                        "is gibberish)", model)
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer

    def close(self) -> None:
        """Stop the engine's forward thread (async scheduling) and tensor-parallel worker processes, if
        any (done at exit anyway)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Finished outputs in the order of the prompts (a string, a token-id list, or a list of them)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        outputs: dict[str, RequestOutput] = {}   # each request's updates merged into one
        done = 0
        bar = _progress(len(ids)) if use_tqdm else None
        while done < len(ids):
            for out in self.engine.step():
                if out.request_id in outputs:
                    outputs[out.request_id].merge(out)
                else:
                    outputs[out.request_id] = out
                if out.finished:
                    done += 1
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        return [outputs[i] for i in ids]

    def chat(self, messages: Sequence[Message] | Sequence[Sequence[Message]],
             params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = False,
             add_generation_prompt: bool = True, **chat_template_kwargs) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} messages) or to a list
        of them, each rendered through the tokenizer's chat template. One output per conversation."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.render_chat(c, add_generation_prompt, **chat_template_kwargs) for c in conversations]
        return self.generate(prompts, params, use_tqdm)

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    **chat_template_kwargs) -> list[int]:
        """A conversation's prompt token ids, through the tokenizer's chat template."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template: use generate() with a prompt")
        ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, **chat_template_kwargs)
        if isinstance(ids, dict) or hasattr(ids, "keys"):   # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)


def _progress(total: int):
    from kvserve.progress import progress
    return progress(total=total, desc="requests", unit="req")

"""The systems under test: kvserve's LLM and transformers' generate() / continuous batching on one workload."""
from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvserve.bench.common import Request, progress

log = logging.getLogger("kvserve.bench")


@dataclass
class RunResult:
    system: str
    elapsed: float                  # wall seconds for the whole workload
    output_tokens: int              # useful output tokens (each request's own max_tokens)
    computed_tokens: int            # output tokens the system actually generated (>= useful for static batches)
    prompt_tokens: int
    num_requests: int
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.elapsed if self.elapsed else math.nan

    @property
    def request_rate(self) -> float:
        return self.num_requests / self.elapsed if self.elapsed else math.nan

    def as_dict(self) -> dict:
        return {"system": self.system, "elapsed_s": self.elapsed, "output_tokens": self.output_tokens,
                "computed_output_tokens": self.computed_tokens, "prompt_tokens": self.prompt_tokens,
                "num_requests": self.num_requests, "output_tokens_per_s": self.output_tps,
                "requests_per_s": self.request_rate, "notes": self.notes, **self.extra}


def free_memory() -> None:
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# transformers

def load_hf_model(path: Path, device: str, dtype: str, attn: str = "sdpa"):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation=attn)
    return model.to(device).eval()


def hf_generate_static(model, requests: list[Request], batch_size: int, device: str, *,
                       use_cache: bool = True, desc: str = "generate()") -> RunResult:
    """Static batches in arrival order, left-padded; each batch runs to its longest request's max_tokens."""
    import torch
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    computed = 0
    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in progress(batches, desc=desc, unit="batch"):
            width = max(len(r.prompt_token_ids) for r in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, r in enumerate(batch):
                n = len(r.prompt_token_ids)
                ids[row, width - n:] = torch.tensor(r.prompt_token_ids)
                mask[row, width - n:] = 1
            new = max(r.max_tokens for r in batch)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, use_cache=use_cache, pad_token_id=pad_id)
            computed += (out.shape[1] - width) * len(batch)
    synchronize(device)
    elapsed = time.perf_counter() - start
    return RunResult(desc, elapsed, sum(r.max_tokens for r in requests), computed,
                     sum(len(r.prompt_token_ids) for r in requests), len(requests),
                     notes=f"static batches of {batch_size}, each run to its longest output; only each request's "
                           f"own max_tokens count as output")


# transformers' continuous-batching knobs by version. The config class and its field names moved:
#   5.0-5.4   no ContinuousBatchingConfig; num_blocks / block_size / max_batch_tokens are GenerationConfig
#             attributes, and continuous_batching_context_manager takes neither the config nor `warmup`
#   5.5-5.17  ContinuousBatchingConfig(block_size=, num_blocks=, max_batch_tokens=)
#   later     ContinuousBatchingConfig(page_size=, ...), block_size kept only as a deprecated field
# Each knob maps to the first name the installed version accepts; one it lacks keeps transformers' default.
CB_KNOB_NAMES = {"page_size": ("page_size", "block_size"), "num_blocks": ("num_blocks",),
                 "max_batch_tokens": ("max_batch_tokens",)}
LEGACY_GENERATION_CONFIG_KNOBS = frozenset({"num_blocks", "block_size", "max_batch_tokens"})  # 5.0-5.4


def accepted_names(target) -> set[str]:
    """Keyword names a class or callable accepts: a dataclass's init fields, else its signature's named
    parameters (a **kwargs catch-all is not counted: what it does with unknown names varies)."""
    import dataclasses
    import inspect
    if isinstance(target, type) and dataclasses.is_dataclass(target):
        return {f.name for f in dataclasses.fields(target) if f.init}
    params = inspect.signature(target).parameters.values()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def map_knobs(wanted: dict, accepted: set[str], where: str) -> tuple[dict, list[str]]:
    """`wanted` under the names in `accepted` (CB_KNOB_NAMES gives the aliases), and a note per knob dropped."""
    kwargs, notes = {}, []
    for knob, value in wanted.items():
        name = next((n for n in CB_KNOB_NAMES.get(knob, (knob,)) if n in accepted), None)
        if name is None:
            notes.append(f"{where} has no {knob} (nor an alias of it); transformers' default is used")
        else:
            kwargs[name] = value
    return kwargs, notes


def hf_cb_settings(num_blocks: int, page_size: int, max_batch_tokens: int) -> dict:
    """How to pass the knobs to the installed transformers' continuous batching.

    Returns {"config_kwargs": kwargs for ContinuousBatchingConfig, or None when the version has none;
    "generation_kwargs": extra GenerationConfig attributes (the 5.0-5.4 way); "notes": knobs dropped}.
    """
    import transformers
    wanted = {"num_blocks": num_blocks, "page_size": page_size, "max_batch_tokens": max_batch_tokens}
    cls = _cb_config_class()
    if cls is not None:
        kwargs, notes = map_knobs(wanted, accepted_names(cls), f"ContinuousBatchingConfig "
                                                               f"(transformers {transformers.__version__})")
        return {"config_kwargs": kwargs, "generation_kwargs": {}, "notes": notes}
    kwargs, notes = map_knobs(wanted, set(LEGACY_GENERATION_CONFIG_KNOBS),
                              f"GenerationConfig (transformers {transformers.__version__})")
    return {"config_kwargs": None, "generation_kwargs": kwargs, "notes": notes}


def _cb_config_class():
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:
        return None
    return ContinuousBatchingConfig


def call_accepting(fn, **kwargs):
    """fn(**kwargs) without the keywords fn's signature does not name (logged at debug level)."""
    names = accepted_names(fn)
    dropped = sorted(set(kwargs) - names)
    if dropped:
        log.debug("%s does not take %s; left out", getattr(fn, "__qualname__", fn), ", ".join(dropped))
    return fn(**{k: v for k, v in kwargs.items() if k in names})


def hf_continuous_batching(model, requests: list[Request], device: str, *, num_blocks: int, page_size: int,
                           max_batch_tokens: int, desc: str = "generate_batch()") -> RunResult:
    """transformers' continuous batching: the manager behind generate_batch(), one max_new_tokens per request.

    Works on every transformers 5.x: the knobs go under the names the installed version uses
    (`hf_cb_settings`), and the context manager and add_request get only the keywords they accept.
    """
    import torch
    from transformers import GenerationConfig
    settings = hf_cb_settings(num_blocks, page_size, max_batch_tokens)
    for note in settings["notes"]:
        log.warning("%s: %s", desc, note)
    gen_cfg = GenerationConfig(max_new_tokens=max(r.max_tokens for r in requests), do_sample=False,
                               eos_token_id=-1, pad_token_id=model.config.pad_token_id or 0,
                               **settings["generation_kwargs"])
    cm_kwargs = dict(generation_config=gen_cfg, block=True, timeout=30, warmup=device != "cpu")
    if settings["config_kwargs"] is not None:
        cm_kwargs["continuous_batching_config"] = _cb_config_class()(**settings["config_kwargs"])
    knobs = settings["config_kwargs"] if settings["config_kwargs"] is not None else settings["generation_kwargs"]
    results, computed = {}, 0
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), call_accepting(model.continuous_batching_context_manager, **cm_kwargs) as manager:
        ids = [call_accepting(manager.add_request, input_ids=r.prompt_token_ids, request_id=f"r{i}",
                              max_new_tokens=r.max_tokens, eos_token_id=-1) for i, r in enumerate(requests)]
        bar = progress(total=len(requests), desc=desc, unit="req")
        while len(results) < len(ids):
            res = manager.get_result(timeout=1)
            if res is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped early")
                continue
            if res.is_finished():
                if res.error:
                    raise RuntimeError(f"transformers' continuous batching failed {res.request_id}: {res.error}")
                results[res.request_id] = res
                computed += len(res.generated_tokens)
                bar.update(1)
        synchronize(device)
        elapsed = time.perf_counter() - start  # before the manager's shutdown
        bar.close()
    short = [i for i, r in zip(ids, requests) if len(results[i].generated_tokens) != r.max_tokens]
    if short:
        log.warning("%s: %d requests did not produce exactly max_tokens", desc, len(short))
    useful = sum(min(len(results[i].generated_tokens), r.max_tokens) for i, r in zip(ids, requests))
    return RunResult(desc, elapsed, useful, computed, sum(len(r.prompt_token_ids) for r in requests),
                     len(requests), notes="continuous batching, " + ", ".join(f"{k} {v}" for k, v in knobs.items())
                     + "".join(f"; {n}" for n in settings["notes"]))


# kvserve

def make_llm(path: Path, device: str, dtype: str, **engine_kwargs):
    from kvserve import LLM
    kwargs = {k: v for k, v in engine_kwargs.items() if v is not None}
    return LLM(model=str(path), device=device, dtype=dtype, **kwargs)


def sampling_params(max_tokens: int):
    from kvserve import SamplingParams
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, logprobs=False)


def kvserve_generate(llm, requests: list[Request], device: str, desc: str = "kvserve") -> RunResult:
    prompts = [r.prompt_token_ids for r in requests]
    params = [sampling_params(r.max_tokens) for r in requests]
    synchronize(device)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    synchronize(device)
    elapsed = time.perf_counter() - start
    produced = [len(o.token_ids) for o in outs]
    short = sum(p != r.max_tokens for p, r in zip(produced, requests))
    if short:
        log.warning("%s: %d requests did not produce exactly max_tokens", desc, short)
    return RunResult(desc, elapsed, sum(min(p, r.max_tokens) for p, r in zip(produced, requests)), sum(produced),
                     sum(len(r.prompt_token_ids) for r in requests), len(requests),
                     notes="continuous batching over a paged KV cache")


def blocks_for(requests: list[Request], block_size: int) -> int:
    """KV blocks that hold every request of the workload at once."""
    return sum(math.ceil((len(r.prompt_token_ids) + r.max_tokens) / block_size) for r in requests)

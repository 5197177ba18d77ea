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


def hf_continuous_batching(model, requests: list[Request], device: str, *, num_blocks: int, page_size: int,
                           max_batch_tokens: int, desc: str = "generate_batch()") -> RunResult:
    """transformers' continuous batching: the manager behind generate_batch(), one max_new_tokens per request."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    gen_cfg = GenerationConfig(max_new_tokens=max(r.max_tokens for r in requests), do_sample=False,
                               eos_token_id=-1, pad_token_id=model.config.pad_token_id or 0)
    cb_cfg = ContinuousBatchingConfig(num_blocks=num_blocks, page_size=page_size, max_batch_tokens=max_batch_tokens)
    results, computed = {}, 0
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), model.continuous_batching_context_manager(
            generation_config=gen_cfg, continuous_batching_config=cb_cfg, block=True, timeout=30,
            warmup=device != "cpu") as manager:
        ids = [manager.add_request(r.prompt_token_ids, request_id=f"r{i}", max_new_tokens=r.max_tokens,
                                   eos_token_id=-1) for i, r in enumerate(requests)]
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
                     len(requests), notes=f"continuous batching, page_size {page_size}, num_blocks {num_blocks}, "
                                          f"max_batch_tokens {max_batch_tokens}")


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

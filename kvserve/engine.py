"""LLMEngine: one step = schedule, run one packed forward, sample, detokenize, check stops."""
from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from torch.profiler import record_function

from kvserve import isolation, kv_sizing, loader
from kvserve.cache.backends import select_backend
from kvserve.cache.kv_cache_manager import KVCacheManager
from kvserve.cache.kv_pool import KVPool, KVSpec
from kvserve.config import EngineConfig
from kvserve.cuda_graphs import graphs_wanted
from kvserve.detokenizer import IncrementalDetokenizer, StopStringMatcher
from kvserve.errors import InvalidRequestError, PromptTooLongError
from kvserve.outputs import EngineStats, RequestMetrics, RequestOutput, StepStats, TokenInfo
from kvserve.runner import ModelRunner
from kvserve.sampler import Sampler
from kvserve.scheduler.sampling_params import SamplingParams
from kvserve.scheduler.scheduler import Scheduler
from kvserve.scheduler.sequence import Sequence

log = logging.getLogger("kvserve")


@dataclass
class RequestState:
    seq: Sequence
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    metrics: RequestMetrics
    text: str = ""          # output text so far (cut at a stop string)
    sent: int = 0           # characters of text already released
    new_tokens: list[TokenInfo] = field(default_factory=list)


class LLMEngine:
    """Builds the pieces (model, KV pool, runner, sampler, cache manager, scheduler) and steps them."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        model, self.tokenizer, self.model_config, device, dtype = loader.load(cfg)
        backend = select_backend(cfg.attention_backend, device)
        if cfg.cuda_graphs and backend.name != "triton":
            raise ValueError("cuda_graphs needs the Triton attention backend")
        capture = graphs_wanted(cfg.cuda_graphs, backend.name, device)
        spec = KVSpec.for_model(self.model_config, cfg.block_size, dtype, device)
        self.kv_pool = KVPool(spec, kv_sizing.num_kv_blocks(cfg, spec, model, capture))
        log.info("KV pool: %d blocks x %d tokens = %d tokens, %.1f MiB (%s, %s)", self.kv_pool.num_blocks,
                 spec.block_size, self.kv_pool.num_blocks * spec.block_size, self.kv_pool.num_bytes / 2**20,
                 str(dtype).removeprefix("torch."), device)
        self.runner = ModelRunner(model, self.kv_pool, backend)
        self.sampler = Sampler(device)
        self.eos_token_ids = loader.eos_token_ids(model, self.tokenizer)
        self.max_model_len = self._max_model_len()
        if cfg.cuda_graphs or capture:
            self.runner.init_decode_graphs(self.max_model_len, min(cfg.max_num_seqs, cfg.cuda_graph_max_batch),
                                           capture)
        identity = f"{cfg.model}|{cfg.revision}|{dtype}".encode()
        self.kv = KVCacheManager(self.kv_pool.num_blocks, cfg.block_size, cfg.enable_prefix_caching,
                                 hash_seed=hashlib.blake2b(identity, digest_size=16).digest())
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len)
        self.requests: dict[str, RequestState] = {}
        self.special_ids = set(self.tokenizer.all_special_ids)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.num_steps = 0
        self.step_listeners: list[Callable[[StepStats], None]] = []
        self.finish_listeners: list[Callable[[RequestOutput], None]] = []

    def add_step_listener(self, fn: Callable[[StepStats], None]) -> None:
        """fn(StepStats) after every step (from the thread that runs the engine)."""
        self.step_listeners.append(fn)

    def add_finish_listener(self, fn: Callable[[RequestOutput], None]) -> None:
        self.finish_listeners.append(fn)

    def _max_model_len(self) -> int:
        model_max = loader.model_max_length(self.model_config)
        wanted = self.cfg.max_model_len or model_max or 4096
        if model_max and wanted > model_max:
            raise ValueError(f"max_model_len {wanted} is larger than the model's maximum length {model_max}")
        capacity = self.kv_pool.num_blocks * self.cfg.block_size
        if wanted > capacity:
            log.warning("max_model_len lowered from %d to %d: the KV pool holds only %d tokens",
                        wanted, capacity, capacity)
            wanted = capacity
        return wanted

    @property
    def kv_info(self) -> dict:
        return {**self.kv_pool.describe(), "prefix_caching": self.cfg.enable_prefix_caching}

    # requests
    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: at least one token is needed", param="prompt")
        n = len(prompt_ids)
        if n >= self.max_model_len:
            raise PromptTooLongError(n, self.max_model_len)
        if n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens and {params.max_tokens} new tokens were asked for, "
                f"{n + params.max_tokens} in all, but max_model_len is {self.max_model_len}; "
                f"ask for at most {self.max_model_len - n} new tokens", param="max_tokens")
        vocab = self.runner.vocab_size
        bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias)):
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequestError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab})",
                                          param=name)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    arrival_time: float | None = None) -> str:
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate(prompt_ids, params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        seq = Sequence(request_id, prompt_ids, params, self.eos_token_ids, arrival_time)
        self.requests[request_id] = RequestState(
            seq, IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens),
            StopStringMatcher(params.stop, params.include_stop_str_in_output), RequestMetrics(seq.arrival_time))
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        state = self.requests.get(request_id)
        if state is None:
            return None
        self.scheduler.finish(state.seq, "abort")
        return self._finish(state)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # the step
    def step(self) -> list[RequestOutput]:
        """Schedule, run the forward, sample, detokenize. A request whose rows break the forward or
        the sampling fails alone (its output carries the error); the others are not disturbed."""
        t0 = time.perf_counter()
        with record_function("kvserve::schedule"):
            sched = self.scheduler.schedule()
        if not sched:
            return []
        outputs = []
        with record_function("kvserve::execute"):
            logits, rows, failed_rows = isolation.execute(self.runner, sched)
            for row, exc in failed_rows.items():
                outputs.append(self._fail(sched.seqs[row], exc))
            sampled = [sched.seqs[row] for row in rows]
            results = isolation.sample(self.sampler, logits, sampled) if rows else []
        for seq, result in zip(sampled, results):
            if isinstance(result, Exception):
                outputs.append(self._fail(seq, result))
        self.scheduler.update_computed(sched)
        now = time.monotonic()
        num_prefill_tokens = sched.total_tokens - sched.num_decodes
        self.prompt_tokens += num_prefill_tokens
        self.num_steps += 1
        with record_function("kvserve::detokenize"):
            for seq, result in zip(sampled, results):
                if isinstance(result, Exception):
                    continue
                self.generation_tokens += 1
                state = self.requests[seq.request_id]
                self._append(state, *result, now)
                outputs.append(self._finish(state) if state.seq.is_finished else self._output(state))
        if self.step_listeners:
            stats = StepStats(num_prefill_tokens, sched.num_decodes, len(sched.seqs), time.perf_counter() - t0)
            for fn in self.step_listeners:
                fn(stats)
        return outputs

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        """End one request with an error that names what broke; its blocks are freed at once."""
        log.warning("request %s failed alone: %s: %s", seq.request_id, type(exc).__name__, exc)
        self.scheduler.finish(seq, "error")
        return self._finish(self.requests[seq.request_id], error=f"{type(exc).__name__}: {exc}")

    def _append(self, state: RequestState, token: int, logprob: float, now: float) -> None:
        seq, params = state.seq, state.seq.params
        seq.token_ids.append(token)
        seq.output_logprobs.append(logprob)
        m = state.metrics
        m.first_token_time = m.first_token_time or now
        m.token_times.append(now)
        piece = state.detok.add(token)
        state.new_tokens.append(TokenInfo(token, piece, logprob, token in self.special_ids))
        state.text += piece
        n_out = seq.num_output_tokens
        if token in params.stop_token_ids and n_out >= params.min_tokens:
            return self.scheduler.finish(seq, "stop_token", token)
        if not params.ignore_eos and token in seq.eos_token_ids and n_out >= params.min_tokens:
            return self.scheduler.finish(seq, "eos", token)
        hit = state.stops.check(state.text, len(piece))
        if hit is not None and n_out >= params.min_tokens:
            state.text = state.text[:hit[0]]
            return self.scheduler.finish(seq, "stop", hit[1])
        if n_out >= params.max_tokens or len(seq) >= self.max_model_len:
            self.scheduler.finish(seq, "length")

    def _output(self, state: RequestState, finished: bool = False) -> RequestOutput:
        seq = state.seq
        state.metrics.first_scheduled_time = seq.first_scheduled_time
        upto = len(state.text) if finished else max(state.sent, state.stops.releasable(state.text))
        new_text, state.sent = state.text[state.sent:upto], upto
        new_tokens, state.new_tokens = state.new_tokens, []
        return RequestOutput(seq.request_id, seq.prompt_token_ids, new_tokens, new_text, state.text[:upto],
                             seq.output_token_ids, finished, seq.finish_reason, seq.stop_reason,
                             seq.num_cached_tokens, state.metrics)

    def _finish(self, state: RequestState, error: str | None = None) -> RequestOutput:
        if state.seq.finish_reason != "stop":
            tail = state.detok.flush()
            state.text += tail
            if tail and state.new_tokens:
                state.new_tokens[-1].text += tail
        state.metrics.finished_time = time.monotonic()
        del self.requests[state.seq.request_id]
        out = self._output(state, finished=True)
        out.error = error
        for fn in self.finish_listeners:
            fn(out)
        return out

    def stats(self) -> EngineStats:
        return EngineStats(
            **self.kv.usage(), num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions, prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens, num_steps=self.num_steps)

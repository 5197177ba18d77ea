"""The engine in two halves, as vLLM v1 splits it.

EngineCore works in token ids: schedule, run one packed forward, sample, and end requests on their
own tokens (EOS, stop token ids, max_tokens, max_model_len). It is what the engine process runs.
OutputProcessor turns its per-step CoreOutputs into RequestOutputs: incremental detokenization,
stop strings (a hit asks the core to stop the request), timings. It runs where the callers are.

LLMEngine is both in one process (the offline LLM class): a stop string ends its request in the
same step, exactly as a one-piece engine would.
"""
from __future__ import annotations

import hashlib
import logging
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch.profiler import record_function

from kvserve import distributed, isolation, kv_sizing, loader
from kvserve.cache.backends import select_backend
from kvserve.cache.kv_cache_manager import KVCacheManager
from kvserve.cache.kv_pool import KVPool, KVSpec, upload
from kvserve.config import EngineConfig
from kvserve.cuda_graphs import graphs_wanted
from kvserve.detokenizer import IncrementalDetokenizer, StopStringMatcher, TokenBytes
from kvserve.errors import InvalidRequestError, PromptTooLongError
from kvserve.outputs import EngineStats, Prefix, RequestMetrics, RequestOutput, StepStats, TokenInfo
from kvserve.runner import ModelRunner
from kvserve.sampler import Sampler
from kvserve.scheduler.sampling_params import SamplingParams
from kvserve.scheduler.scheduler import Scheduler, SchedulerOutput
from kvserve.scheduler.sequence import Sequence, SequenceStatus
from kvserve.structured import GrammarCompiler, GrammarError

log = logging.getLogger("kvserve")


class CoreOutput(NamedTuple):
    """One request's news from one core step (a tuple on the wire between the processes)."""
    request_id: str
    token: int | None               # the token sampled this step; None when it ended without one
    logprob: float
    finish_reason: str | None       # eos, stop_token, length, abort, error, or None while running
    stop_reason: str | int | None
    num_cached_tokens: int
    first_scheduled_time: float | None
    error: str | None = None
    top_logprobs: list[tuple[int, float]] | None = None   # the most likely tokens, when asked for
    # with the first token, when asked for: per prompt position (logprob, top pairs), None for the first
    prompt_logprobs: list[tuple[float, list | None] | None] | None = None


class StepResult(NamedTuple):
    """What a step's forward and sampling hand back to the engine thread (host values only)."""
    rows: list[int]                     # the sampling rows that ran, in step order
    samples: list                       # per such row: (token, logprob, top logprobs), or its own error
    failed_rows: dict[int, Exception]   # rows whose forward failed alone
    duration: float                     # seconds it took


def _init_forward_thread(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)     # an indexed device (see _forward_device)


def _log_abandoned(future: Future) -> None:
    """A step left running by a rollback: its error has no caller left, so it is logged."""
    if not future.cancelled() and future.exception() is not None:
        log.error("a step abandoned by a rollback failed: %r", future.exception())


def _forward_device(device: torch.device) -> torch.device:
    """The device the forward thread makes current: CUDA's needs an index (auto and cuda have none)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _compile_counter(backend_name: str, compiled: bool) -> Callable[[], int]:
    """Compiles so far in this process: the Triton attention kernels' (with that backend), plus the
    graphs torch.compile made (with a compiled model: a new one while serving is a stall of seconds).
    Both counts are the process's: a server runs one engine, but an offline process that compiles
    something else between two steps (another engine, its own torch.compile) has it counted here too."""
    counts = []
    if backend_name == "triton":
        from kvserve.cache import triton_attention
        counts.append(triton_attention.num_compiles)
    if compiled:
        from torch._dynamo.utils import counters
        counts.append(lambda: counters["stats"]["unique_graphs"])
    return lambda: sum(count() for count in counts)


def validate_request(prompt_ids: list[int], params: SamplingParams, max_model_len: int, vocab_size: int) -> None:
    """What a request must satisfy against this model: length and vocabulary."""
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty: at least one token is needed", param="prompt")
    n = len(prompt_ids)
    if n >= max_model_len:
        raise PromptTooLongError(n, max_model_len)
    if n + params.max_tokens > max_model_len:
        raise InvalidRequestError(
            f"the prompt has {n} tokens and {params.max_tokens} new tokens were asked for, "
            f"{n + params.max_tokens} in all, but max_model_len is {max_model_len}; "
            f"ask for at most {max_model_len - n} new tokens", param="max_tokens")
    # the common case in C loops (a prompt can be 100k ids); the Python loop only to name the bad one
    if not (set(map(type, prompt_ids)) == {int} and min(prompt_ids) >= 0 and max(prompt_ids) < vocab_size):
        bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {vocab_size})", param="prompt")
    for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias)):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})",
                                      param=name)


class EngineCore:
    """Builds the pieces (model, KV pool, runner, sampler, cache manager, scheduler) and steps them."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.tp = distributed.launch(cfg)   # tensor parallel: the worker processes, None with one process
        try:
            self._build(cfg)
        except BaseException:
            self.close()      # no worker outlives a failed start
            raise

    def _build(self, cfg: EngineConfig) -> None:
        model, self.tokenizer, self.model_config, device, dtype = loader.load(cfg)
        backend = select_backend(cfg.attention_backend, device)
        if cfg.cuda_graphs and backend.name != "triton":
            raise ValueError("cuda_graphs needs the Triton attention backend")
        capture = graphs_wanted(cfg.cuda_graphs, backend.name, device)
        spec = distributed.local_kv_spec(KVSpec.for_model(self.model_config, cfg.block_size, dtype, device), model)
        num_blocks = kv_sizing.num_kv_blocks(cfg, spec, model, capture)
        if self.tp is not None:      # the smallest pool any rank holds (never a collective without tensor parallel)
            num_blocks = distributed.agree(num_blocks)
        self.kv_pool = KVPool(spec, num_blocks, kv_sizing.num_host_blocks(cfg, spec))
        log.info("KV pool: %d blocks x %d tokens = %d tokens, %.1f MiB (%s, %s)", self.kv_pool.num_blocks,
                 spec.block_size, self.kv_pool.num_blocks * spec.block_size, self.kv_pool.num_bytes / 2**20,
                 str(dtype).removeprefix("torch."), device)
        if self.kv_pool.num_host_blocks:
            log.info("KV host tier: %d blocks = %d tokens, %.1f MiB of %s host memory",
                     self.kv_pool.num_host_blocks, self.kv_pool.num_host_blocks * spec.block_size,
                     self.kv_pool.num_host_bytes / 2**20, "pinned" if device.type == "cuda" else "plain")
        self.runner = ModelRunner(model, self.kv_pool, backend) if self.tp is None else \
            self.tp.runner(model, self.kv_pool, backend)
        if cfg.compile:
            self.runner.compile()
        self.eos_token_ids = loader.eos_token_ids(model, self.tokenizer)
        self.grammars = GrammarCompiler(self.tokenizer, self.runner.vocab_size, self.eos_token_ids)
        self.sampler = Sampler(device, self.grammars, processed_logprobs=cfg.logprobs_mode == "processed")
        self.max_model_len = self._max_model_len()
        if cfg.cuda_graphs or capture:
            self.runner.init_decode_graphs(self.max_model_len, min(cfg.max_num_seqs, cfg.cuda_graph_max_batch),
                                           capture)
        self.runner.warmup()
        self._count_compiles = _compile_counter(backend.name, self.runner.compiled is not None)
        self._compiles = self._count_compiles()   # what start-up compiled; any more is a late compile
        self.late_compiles = 0
        identity = f"{cfg.model}|{cfg.revision}|{dtype}".encode()
        self.kv = KVCacheManager(self.kv_pool.num_blocks, cfg.block_size, cfg.enable_prefix_caching,
                                 hash_seed=hashlib.blake2b(identity, digest_size=16).digest(),
                                 num_host_blocks=self.kv_pool.num_host_blocks)
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len,
                                   confirmed_tokens=self._confirmed_tokens)
        self.requests: dict[str, Sequence] = {}
        self.compiling: dict[Sequence, Future] = {}   # structured requests whose grammar compiles, in order
        self.forks: dict[Sequence, list[Sequence]] = {}   # parent -> requests waiting to share its prompt
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.num_steps = 0
        self.step_listeners: list[Callable[[StepStats], None]] = []
        self._unconfirmed: list[SchedulerOutput] = []   # steps scheduled (and advanced), not applied yet
        self._outputs: list[CoreOutput] = []            # made by the step under way (see step)
        self._inflight: tuple[SchedulerOutput, Future] | None = None   # launched, not applied yet
        # (its initializer must not hold self: the thread would keep the engine, and its model, alive)
        self._forward_thread = ThreadPoolExecutor(1, "kvserve-forward", _init_forward_thread,
                                                  (_forward_device(self.runner.device),)) \
            if cfg.async_scheduling else None
        if cfg.async_scheduling and device.type == "cpu":
            log.warning("async scheduling on CPU: the forward holds the GIL for much of a step, so scheduling "
                        "beside it gains nothing here (it was 0.9x on 2 cores); it is meant for GPUs")

    def close(self) -> None:
        """Stop the forward thread and the tensor-parallel workers, if any (also done at interpreter exit)."""
        if getattr(self, "_forward_thread", None) is not None:
            self._forward_thread.shutdown(wait=True, cancel_futures=True)
        if self.tp is not None:
            self.tp.close()

    def add_step_listener(self, fn: Callable[[StepStats], None]) -> None:
        """fn(StepStats) after every step (from the thread that runs the engine)."""
        self.step_listeners.append(fn)

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
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_ids, params, self.max_model_len, self.runner.vocab_size)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    arrival_time: float | None = None, parent_request_id: str | None = None) -> str:
        """Queue a request. With parent_request_id (an unfinished request with the same prompt, e.g. the
        first of a request's n outputs), it waits for the parent's prompt to be prefilled, then shares
        its KV blocks copy-on-write and computes only the last prompt token itself."""
        self.validate(prompt_ids, params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        seq = Sequence(request_id, prompt_ids, params, self.eos_token_ids, arrival_time)
        self.requests[request_id] = seq
        parent = self.requests.get(parent_request_id) if parent_request_id is not None else None
        try:
            if (parent is not None and parent is not seq and not parent.is_finished and len(prompt_ids) > 1
                    and parent.prompt_token_ids == seq.prompt_token_ids and params.prompt_logprobs is None):
                self.forks.setdefault(parent, []).append(seq)
            else:
                self._queue(seq)
        except BaseException:
            del self.requests[request_id]
            raise
        return request_id

    def _queue(self, seq: Sequence, fork_parent: Sequence | None = None) -> None:
        """To the scheduler, once its grammar (if any) is compiled: off this thread, unless cached (a
        compile's failure is reported by the next step). With fork_parent, to share its prompt."""
        future = self.grammars.matcher(seq.params.structured) if seq.params.structured is not None else None
        if future is not None and not (future.done() and future.exception() is None):
            self.compiling[seq] = future
            return
        if future is not None:
            seq.matcher = future.result()
        if fork_parent is not None:
            self.scheduler.add_forked(seq, fork_parent)
        else:
            self.scheduler.add(seq)

    def _fork_ready(self) -> None:
        """Queue the sequences waiting for a parent whose prompt (all but its last token) is computed,
        to share its blocks when admitted; a parent gone first leaves them to run alone."""
        for parent, children in list(self.forks.items()):
            alive = not parent.is_finished
            if alive and (parent.status is not SequenceStatus.RUNNING
                          or self._confirmed_tokens(parent) < parent.num_prompt_tokens - 1):
                continue
            del self.forks[parent]
            for child in children:
                self._queue(child, parent if alive else None)

    def _confirmed_tokens(self, seq: Sequence) -> int:
        """Its tokens whose K/V a finished forward wrote (num_computed_tokens also counts the steps
        scheduled but not applied yet)."""
        n = seq.num_computed_tokens
        for sched in self._unconfirmed:
            for s, count in zip(sched.seqs, sched.num_tokens):
                if s is seq:
                    n -= count
        return n

    def _admit_compiled(self) -> list[CoreOutput]:
        """Schedule the structured requests whose grammar is ready, in arrival order; a grammar that
        did not compile fails its request."""
        failed = []
        for seq, future in list(self.compiling.items()):
            if not future.done():
                continue
            del self.compiling[seq]
            exc = future.exception()
            if exc is not None:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "error"
                failed.append(self._ended(seq, f"{type(exc).__name__}: {exc}"))
                continue
            seq.matcher = future.result()
            self.scheduler.add(seq)
        return failed

    def wait_for_grammars(self, timeout: float) -> None:
        """Block up to timeout while only grammar compiles are pending (nothing to step meanwhile)."""
        if self.compiling and not self.scheduler.has_unfinished():
            futures_wait(list(self.compiling.values()), timeout, return_when=FIRST_COMPLETED)

    def abort(self, request_id: str) -> CoreOutput | None:
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        parent = next((p for p, children in self.forks.items() if seq in children), None)
        if parent is not None:
            self.forks[parent].remove(seq)
            if not self.forks[parent]:
                del self.forks[parent]
        if parent is not None or self.compiling.pop(seq, None) is not None:
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
        else:
            self.scheduler.finish(seq, "abort")
        return self._ended(seq)

    def has_unfinished(self) -> bool:
        return (self.scheduler.has_unfinished() or bool(self.compiling) or bool(self.forks)
                or self._inflight is not None)

    # the step
    def step(self) -> list[CoreOutput]:
        """Schedule, run the forward, sample. A request whose rows break the forward or the sampling
        fails alone (its output carries the error); the others are not disturbed.

        With async scheduling the forward runs on the forward thread: this schedules the next step
        while the previous one runs, then waits for that one, applies its tokens, launches the next
        and returns the outputs of the one it applied (the same outputs, one call later).

        A step that breaks off (a fault of the engine, Ctrl-C) is undone before the error goes up:
        the sequences of every step scheduled and not applied are preempted (they recompute), so a
        caller that goes on stepping finds the engine consistent."""
        try:
            self._step()
        except BaseException:
            self._roll_back()
            raise     # the outputs made before it come with the next step
        outputs, self._outputs = self._outputs, []
        return outputs

    def _roll_back(self) -> None:
        """Preempt the sequences of every step scheduled and not (wholly) applied, last admitted first
        as the scheduler does, so each recomputes from its appended tokens. A step still running on the
        forward thread ends there, before any later one. Block copies a step never ran were already
        counted in the prefix cache's books: then its cached prefixes, in both tiers, are dropped."""
        undone = {seq for sched in self._unconfirmed for seq in sched.seqs}
        lost_moves = any(bool(sched.kv_moves) for sched in self._unconfirmed
                         if self._inflight is None or sched is not self._inflight[0])
        if self._inflight is not None and not self._inflight[1].done():   # (a done one's error is the one raised)
            self._inflight[1].add_done_callback(_log_abandoned)
        self._unconfirmed.clear()
        self._inflight = None
        for seq in undone:
            seq.num_pending = 0
            if seq.status is SequenceStatus.WAITING:
                seq.num_computed_tokens = 0
        for seq in reversed([s for s in self.scheduler.running if s in undone]):
            self.scheduler.preempt(seq)
        if lost_moves:
            log.warning("a step broke off before its KV block copies ran: the prefix cache is reset")
            self.kv.reset_prefix_cache()

    def _step(self) -> None:
        """One step; its outputs go to self._outputs as they are made (none is lost if it breaks off)."""
        t0 = time.perf_counter()
        if self.forks:
            self._fork_ready()
        if self.compiling:
            self.wait_for_grammars(0.005)    # blocks only while nothing else has work to step
            self._outputs += self._admit_compiled()
        with record_function("kvserve::schedule"):
            sched = self.scheduler.schedule()
            self._unconfirmed.append(sched)
            self.scheduler.advance(sched)
        if self._forward_thread is not None:
            return self._overlap(sched)
        if not sched and not sched.kv_moves:
            self._unconfirmed.remove(sched)
            return
        # queued copies run even if nothing was scheduled: none may be lost
        self._apply(sched, self._run(sched), t0)

    def _overlap(self, sched: SchedulerOutput) -> None:
        """Async scheduling: `sched` was scheduled while the step in flight ran. Wait for that one,
        apply its tokens (the outputs of this call), fill them into `sched` and launch it."""
        if self._inflight is not None:
            prev, future = self._inflight
            with record_function("kvserve::wait"):
                result = future.result()     # a fault of the engine (isolation.is_fatal) raises here
            self._inflight = None
            self._apply(prev, result)
        sched = self._resolve(sched)
        if not sched and not sched.kv_moves:
            self._unconfirmed.remove(sched)
            return
        self._inflight = (sched, self._forward_thread.submit(self._run, sched))

    def _resolve(self, sched: SchedulerOutput) -> SchedulerOutput:
        """Fill in the pending tokens the step feeds, now appended, and leave out the rows of
        sequences that ended meanwhile (EOS, a failure, an abort: their blocks are already freed)."""
        for i, row in sched.pending_inputs:
            seq = sched.seqs[row]
            if not seq.is_finished:      # an unfinished row's token was appended: never feed a made-up one
                sched.input_ids[i] = seq.token_ids[sched.positions[i]]
        keep = [row for row, seq in enumerate(sched.seqs) if not seq.is_finished]
        if len(keep) == len(sched.seqs):
            return sched
        kept = sched.select(keep)
        kept.kv_moves = sched.kv_moves
        self._unconfirmed[self._unconfirmed.index(sched)] = kept
        return kept

    def _run(self, sched: SchedulerOutput) -> StepResult:
        """The device's part of a step, reading nothing the engine thread changes meanwhile: block
        copies, the forward, prompt logprobs, sampling. Returns host values only."""
        t0 = time.perf_counter()
        if sched.kv_moves:
            with record_function("kvserve::move_blocks"):
                self.runner.move_blocks(sched)
        if not sched:
            return StepResult([], [], {}, time.perf_counter() - t0)
        with record_function("kvserve::execute"):
            logits, rows, failed_rows, prompt_logits = isolation.execute(self.runner, sched)
            if prompt_logits:
                failed_here = self._record_prompt_logprobs(sched, prompt_logits)
                if failed_here:
                    failed_rows.update(failed_here)
                    keep = [i for i, row in enumerate(rows) if row not in failed_here]
                    rows = [rows[i] for i in keep]
                    logits = logits[keep] if keep else None
            results = isolation.sample(self.sampler, logits, [sched.seqs[row] for row in rows]) if rows else []
        return StepResult(rows, results, failed_rows, time.perf_counter() - t0)

    def _apply(self, sched: SchedulerOutput, result: StepResult, t0: float | None = None) -> None:
        """The step's results into the requests (outputs to self._outputs): failures, the prefix cache,
        the sampled tokens. It stays unconfirmed until all are in (undone whole if this breaks off).
        Its StepStats duration: the whole step since t0, or (async) its forward thread's part."""
        if not sched:       # block copies only
            self._unconfirmed.remove(sched)
            return
        outputs = self._outputs
        for row, exc in result.failed_rows.items():
            if not sched.seqs[row].is_finished:     # not aborted while the step ran
                outputs.append(self._fail(sched.seqs[row], exc))
        sampled = [sched.seqs[row] for row in result.rows]
        for seq, token in zip(sampled, result.samples):
            if isinstance(token, Exception) and not seq.is_finished:
                outputs.append(self._fail(seq, token))
        self.scheduler.publish(sched)
        self._check_compiles(sched)
        num_prefill_tokens = sched.total_tokens - sched.num_decodes
        self.prompt_tokens += num_prefill_tokens
        self.num_steps += 1
        for seq, sample in zip(sampled, result.samples):
            seq.num_pending -= 1
            if isinstance(sample, Exception) or seq.is_finished:   # failed, or aborted / stopped meanwhile
                continue
            self.generation_tokens += 1
            token, logprob, top = sample
            try:
                self._append(seq, token, logprob)
            except GrammarError as exc:
                outputs.append(self._fail(seq, exc))
                continue
            if seq.is_finished:
                del self.requests[seq.request_id]
            prompt = None
            if seq.params.prompt_logprobs is not None and seq.num_output_tokens == 1:
                prompt = [None] + [seq.prompt_logprobs.get(p) for p in range(1, seq.num_prompt_tokens)]
                seq.prompt_logprobs = {}     # sent: not kept for the request's life
            outputs.append(CoreOutput(seq.request_id, token, logprob, seq.finish_reason, seq.stop_reason,
                                      seq.num_cached_tokens, seq.first_scheduled_time, None, top, prompt))
        self._unconfirmed.remove(sched)
        if self.forks:
            self._fork_ready()
        if self.step_listeners:
            duration = result.duration if t0 is None else time.perf_counter() - t0
            stats = StepStats(num_prefill_tokens, sched.num_decodes, len(sched.seqs), duration)
            for fn in self.step_listeners:
                fn(stats)

    def _record_prompt_logprobs(self, sched, prompt_logits: dict) -> dict[int, Exception]:
        """Each prompt position's logprob under the model's unprocessed distribution (and its most
        likely tokens), from the logits of the position before it, row by row (no copy of them all),
        then one device-to-host read. Returns the rows that failed here (they fail alone)."""
        spans, parts, failed = [], [], {}
        for row, logits in prompt_logits.items():
            seq, n = sched.seqs[row], sched.num_tokens[row]
            start = sched.context_lens[row] - n
            count = min(n, seq.num_prompt_tokens - 1 - start)   # position p's logits predict token p + 1
            k = min(seq.params.prompt_logprobs, logits.shape[-1])
            try:
                logprobs = torch.log_softmax(logits[:count].float(), dim=-1)
                targets = upload(seq.token_ids[start + 1:start + 1 + count], logprobs.device)
                row_parts = [logprobs.gather(1, targets[:, None])[:, 0].double()]
                if k:
                    top_values, top_ids = logprobs.topk(k, dim=-1)
                    row_parts += [top_ids.flatten().double(), top_values.flatten().double()]
            except Exception as exc:  # noqa: BLE001 - isolation.is_fatal decides below
                if isolation.is_fatal(exc):
                    raise
                failed[row] = exc
                continue
            spans.append((seq, start, count, k))
            parts += row_parts
        if not spans:
            return failed
        packed = torch.cat(parts).tolist()
        i = 0
        for seq, start, count, k in spans:
            values, ids, tops = packed[i:i + count], packed[i + count:i + count + count * k], \
                packed[i + count + count * k:i + count + 2 * count * k]
            i += count + 2 * count * k
            for j in range(count):
                top = [(int(ids[j * k + x]), tops[j * k + x]) for x in range(k)] or None
                seq.prompt_logprobs[start + 1 + j] = (values[j], top)
        return failed

    def _check_compiles(self, sched) -> None:
        compiles = self._count_compiles()
        if compiles != self._compiles:
            log.warning("a kernel compiled while serving (%d so far; Triton, or a torch.compile graph): every "
                        "request waited for it. Step shape: %d rows, %d decodes, %d tokens, longest context %d; "
                        "start-up warm-up did not cover it", self.late_compiles + compiles - self._compiles,
                        len(sched.seqs), sched.num_decodes, sched.total_tokens, max(sched.context_lens))
            self.late_compiles += compiles - self._compiles
            self._compiles = compiles

    def _fail(self, seq: Sequence, exc: Exception) -> CoreOutput:
        """End one request with an error that names what broke; its blocks are freed at once."""
        log.warning("request %s failed alone: %s: %s", seq.request_id, type(exc).__name__, exc)
        self.scheduler.finish(seq, "error")
        return self._ended(seq, f"{type(exc).__name__}: {exc}")

    def _ended(self, seq: Sequence, error: str | None = None) -> CoreOutput:
        del self.requests[seq.request_id]
        return CoreOutput(seq.request_id, None, 0.0, seq.finish_reason, seq.stop_reason, seq.num_cached_tokens,
                          seq.first_scheduled_time, error)

    def _append(self, seq: Sequence, token: int, logprob: float) -> None:
        """The endings a token decides by itself; stop strings are the output processor's."""
        params = seq.params
        seq.token_ids.append(token)
        seq.output_logprobs.append(logprob)
        n_out = seq.num_output_tokens
        if token in params.stop_token_ids and n_out >= params.min_tokens:
            return self.scheduler.finish(seq, "stop_token", token)
        if not params.ignore_eos and token in seq.eos_token_ids and n_out >= params.min_tokens:
            return self.scheduler.finish(seq, "eos", token)
        if n_out >= params.max_tokens or len(seq) >= self.max_model_len:
            return self.scheduler.finish(seq, "length")
        if seq.matcher is not None:
            if not seq.matcher.consume_token(token):
                raise GrammarError(f"token {token} broke the grammar: {seq.matcher.get_error()}")
            if seq.matcher.is_stopped():      # the grammar is complete and allows nothing more
                self.scheduler.finish(seq, "grammar")

    def stop(self, request_id: str) -> None:
        """End a request the output processor found a stop string in (no output: it has its own)."""
        seq = self.requests.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq, "stop")

    def kv_snapshot(self) -> dict:
        """Both KV tiers block by block and every unfinished request's blocks (GET /kv): built
        between two steps, ids and counts only (never a token or a text)."""
        snap = {"time": time.time(), "step": self.num_steps, **self.kv.snapshot()}
        if snap["host"] is not None:
            snap["host"]["bytes"] = self.kv_pool.num_host_bytes
        requests = []
        for seq in self.scheduler.running + list(self.scheduler.waiting):
            requests.append({"id": seq.request_id, "status": seq.status.value, "num_tokens": len(seq),
                             "num_prompt_tokens": seq.num_prompt_tokens,
                             "num_computed_tokens": seq.num_computed_tokens,
                             "num_cached_tokens": seq.num_cached_tokens,
                             "block_table": self.kv.block_ids(seq.request_id)})
        snap["requests"] = requests
        return snap

    def stats(self) -> EngineStats:
        return EngineStats(
            **self.kv.usage(), num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions, prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens, num_steps=self.num_steps, late_compiles=self.late_compiles)


@dataclass
class RequestState:
    prompt_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)
    released: list[str] = field(default_factory=list)   # the text handed out so far, one piece per output
    pending: str = ""       # text not yet handed out (cut at a stop string); what stop strings are sought in
    new_tokens: list[TokenInfo] = field(default_factory=list)
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: list | None = None


class OutputProcessor:
    """CoreOutputs in, RequestOutputs out: detokenization, stop strings and timings, per request."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special_ids = set(tokenizer.all_special_ids)
        self.token_bytes = TokenBytes(tokenizer)   # a token id's exact bytes (logprobs' `bytes`)
        self.states: dict[str, RequestState] = {}
        self.finish_listeners: list[Callable[[RequestOutput], None]] = []

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, arrival_time: float) -> None:
        self.states[request_id] = RequestState(
            prompt_ids, params, IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens),
            StopStringMatcher(params.stop, params.include_stop_str_in_output), RequestMetrics(arrival_time))

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request here at once (the caller tells the core)."""
        state = self.states.get(request_id)
        if state is None:
            return None
        state.finish_reason = "abort"
        return self._finish(request_id, state)

    def process(self, outputs: list[CoreOutput], now: float) -> tuple[list[RequestOutput], list[str]]:
        """The step's RequestOutputs, and the ids of requests a stop string ended (the core must stop them)."""
        results, stopped = [], []
        for out in outputs:
            state = self.states.get(out.request_id)
            if state is None:        # ended here already (aborted, or a stop string one step earlier)
                continue
            state.num_cached_tokens = out.num_cached_tokens
            if out.prompt_logprobs is not None:
                state.prompt_logprobs = out.prompt_logprobs
            state.metrics.first_scheduled_time = out.first_scheduled_time
            reason = out.finish_reason
            if out.token is not None and self._append(state, out.token, out.logprob, out.top_logprobs, reason, now):
                reason = "stop"
                if out.finish_reason is None:
                    stopped.append(out.request_id)
            if reason is None:
                results.append(self._output(out.request_id, state))
                continue
            if reason != "stop" or state.finish_reason is None:
                state.finish_reason, state.stop_reason = reason, out.stop_reason
            results.append(self._finish(out.request_id, state, out.error))
        return results, stopped

    def _append(self, state: RequestState, token: int, logprob: float, top: list | None, core_reason: str | None,
                now: float) -> bool:
        """Add a token; True when a stop string ends the request here (it takes precedence over
        max_tokens, not over EOS or a stop token id, which ended it before any text check)."""
        state.token_ids.append(token)
        m = state.metrics
        m.first_token_time = m.first_token_time or now
        m.token_times.append(now)
        piece = state.detok.add(token)
        state.new_tokens.append(TokenInfo(token, piece, logprob, token in self.special_ids, top))
        if core_reason != "eos":    # the EOS that ended it is not text, even with skip_special_tokens off
            state.pending += piece
        if core_reason in ("eos", "stop_token", "abort", "error"):
            return False
        # pending holds at least the text's last `hold` characters before this piece (see _output):
        # all that a stop string ending in this piece can span
        hit = state.stops.check(state.pending, len(piece))
        if hit is None or len(state.token_ids) < state.params.min_tokens:
            return False
        state.pending = state.pending[:hit[0]]
        state.finish_reason, state.stop_reason = "stop", hit[1]
        return True

    def _output(self, request_id: str, state: RequestState, finished: bool = False) -> RequestOutput:
        """The update since the previous one. The cumulative text and token ids are Prefixes of the
        state's growing lists: O(1) per update, however long the output already is."""
        pending = state.pending
        upto = len(pending) if finished else max(0, state.stops.releasable(pending))
        new_text, state.pending = pending[:upto], pending[upto:]
        if new_text:
            state.released.append(new_text)
        new_tokens, state.new_tokens = state.new_tokens, []
        return RequestOutput(request_id, state.prompt_ids, new_tokens, new_text,
                             Prefix(state.released, len(state.released)),
                             Prefix(state.token_ids, len(state.token_ids)), finished, state.finish_reason,
                             state.stop_reason, state.num_cached_tokens, state.metrics,
                             prompt_logprobs=state.prompt_logprobs)

    def _finish(self, request_id: str, state: RequestState, error: str | None = None) -> RequestOutput:
        if state.finish_reason != "stop":
            tail = state.detok.flush()
            state.pending += tail
            if tail and state.new_tokens:
                state.new_tokens[-1].text += tail
        state.metrics.finished_time = time.monotonic()
        del self.states[request_id]
        out = self._output(request_id, state, finished=True)
        out.error = error
        for fn in self.finish_listeners:
            fn(out)
        return out


class LLMEngine(EngineCore):
    """The core and its output processor in one process: what the offline LLM class steps."""

    def __init__(self, cfg: EngineConfig):
        super().__init__(cfg)
        self.output_processor = OutputProcessor(self.tokenizer)

    def add_finish_listener(self, fn: Callable[[RequestOutput], None]) -> None:
        self.output_processor.finish_listeners.append(fn)

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def token_bytes(self, token_id: int) -> bytes:
        """A token's exact bytes (b"" for an id with no vocabulary entry)."""
        return self.output_processor.token_bytes(token_id)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    arrival_time: float | None = None, parent_request_id: str | None = None) -> str:
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        request_id = super().add_request(prompt_ids, params, request_id, arrival_time, parent_request_id)
        self.output_processor.add(request_id, prompt_ids, params, self.requests[request_id].arrival_time)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        if super().abort(request_id) is None:
            return None
        return self.output_processor.abort(request_id)

    def step(self) -> list[RequestOutput]:
        core_outputs = super().step()
        with record_function("kvserve::detokenize"):
            outputs, stopped = self.output_processor.process(core_outputs, time.monotonic())
        for request_id in stopped:
            super().stop(request_id)
        return outputs

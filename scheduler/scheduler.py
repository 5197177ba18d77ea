"""FCFS continuous batching: decodes first, then chunked prefill within the token budget."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvserve.cache.kv_cache_manager import KVCacheManager, KVMoves, slot_mapping
from kvserve.scheduler.sequence import Sequence, SequenceStatus


@dataclass(slots=True, eq=False)
class SchedulerOutput:
    """One step's work: everything the model runner learns about it.

    Rows are the scheduled sequences, decodes first (`Sequence.is_decoding`): row i computes
    num_tokens[i] tokens of its sequence, ending at context_lens[i]. The runner reads the per-row
    and per-token lists; `seqs` is for the engine (sampling and outputs), never for the runner.
    """
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)        # per row: tokens computed this step
    context_lens: list[int] = field(default_factory=list)      # per row: tokens with K/V after the step
    block_tables: list = field(default_factory=list)   # per row: the sequence's KV blocks, an array("i")
    num_decodes: int = 0                                        # rows [0, num_decodes) decode one token
    sample_rows: list[int] = field(default_factory=list)       # rows that reach their sequence's end
    prompt_logprob_rows: list[int] = field(default_factory=list)  # rows whose every token's logits are kept
    input_ids: list[int] = field(default_factory=list)         # per token
    positions: list[int] = field(default_factory=list)         # per token
    slot_mapping: list[int] = field(default_factory=list)      # per token: its K/V slot in the pool
    kv_moves: KVMoves = field(default_factory=lambda: KVMoves([], [], []))   # block copies, before the forward
    # (input_ids index, row) of each row's pending token (sampled by the step still running): 0 here,
    # set by the engine once that token is known (async scheduling), before the runner sees the step
    pending_inputs: list[tuple[int, int]] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return len(self.input_ids)

    def select(self, rows: list[int]) -> SchedulerOutput:
        """The same step restricted to some of its rows, kept in order (so decodes stay first); its
        block copies are not repeated (they ran once, before the first forward of the step)."""
        starts = [0]
        for n in self.num_tokens:
            starts.append(starts[-1] + n)
        out = SchedulerOutput()
        sampling, prompt_rows = set(self.sample_rows), set(self.prompt_logprob_rows)
        for row in rows:
            tokens = slice(starts[row], starts[row + 1])
            if row in sampling:
                out.sample_rows.append(len(out.seqs))
            if row in prompt_rows:
                out.prompt_logprob_rows.append(len(out.seqs))
            out.seqs.append(self.seqs[row])
            out.num_tokens.append(self.num_tokens[row])
            out.context_lens.append(self.context_lens[row])
            out.block_tables.append(self.block_tables[row])
            out.num_decodes += row < self.num_decodes
            out.input_ids.extend(self.input_ids[tokens])
            out.positions.extend(self.positions[tokens])
            out.slot_mapping.extend(self.slot_mapping[tokens])
        return out

    def __bool__(self) -> bool:
        return bool(self.seqs)


def needs_prompt_logits(seq: Sequence) -> bool:
    """Whether the next chunk of this sequence keeps its tokens' logits (for prompt logprobs): asked
    for, not sent yet (a recompute after its first token skips them), and a prompt token is left
    whose logprob comes from a position still to compute."""
    return (seq.params.prompt_logprobs is not None and seq.num_output_tokens == 0
            and seq.num_computed_tokens < seq.num_prompt_tokens - 1)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, confirmed_tokens: Callable[[Sequence], int] | None = None):
        self.kv = kv
        # a sequence's tokens whose K/V a finished forward wrote (num_computed_tokens also counts the
        # steps scheduled and not done yet, see advance): what a fork may share
        self.confirmed_tokens = confirmed_tokens or (lambda seq: seq.num_computed_tokens)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # prompt tokens whose logits a step keeps for prompt logprobs (one row each), at most: half the
        # logits rows the KV sizing profiled for, so that such requests cannot take the memory it left
        self.prompt_logit_budget = max(1, min(max_num_batched_tokens, max_num_seqs) // 2)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_forked(self, seq: Sequence, parent: Sequence) -> None:
        """Queue a sequence with the same prompt as `parent`, whose prompt (all but its last token) is
        computed: when admitted, it shares those KV blocks instead of computing them (one of a
        request's n outputs: the prompt is prefilled once). It goes to the front of the queue, to
        run beside its parent; while it waits it holds no block."""
        seq.fork_parent = parent
        self.waiting.appendleft(seq)

    def _fork_point(self, seq: Sequence) -> int:
        """Prompt tokens a waiting sequence can take from its fork parent now (0: none). The parent
        must be running with those tokens computed: it holds their blocks, so the first write into
        the shared partial block copies it."""
        parent, shared = seq.fork_parent, seq.num_prompt_tokens - 1
        if (parent is None or parent.status is not SequenceStatus.RUNNING or self.confirmed_tokens(parent) < shared
                or shared < 1):
            return 0     # finished, or preempted: it computes its own prompt (prefix-cache hits help)
        self.kv.fork(parent.request_id, seq.request_id, shared)
        return shared

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        scheduled: dict[Sequence, int] = {}   # sequence -> tokens to compute, in scheduling order
        budget = self.max_num_batched_tokens
        logit_budget = self.prompt_logit_budget
        # decodes before prefill chunks, so a long prompt never holds up running sequences
        ordered = sorted(self.running, key=lambda s: not s.is_decoding)
        for seq in ordered:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            if seq.num_pending and self._pending_is_last(seq):
                continue  # the token still being sampled ends it (by length): nothing more to compute
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n == 0:
                continue
            if needs_prompt_logits(seq):
                n = min(n, logit_budget)
                if n == 0:
                    continue
            while not self.kv.allocate_slots(seq.request_id, seq.num_computed_tokens, n):
                victim = self.running[-1]
                self.preempt(victim)
                budget += scheduled.pop(victim, 0)
                if victim is seq:
                    break
            else:
                scheduled[seq] = n
                budget -= n
                if needs_prompt_logits(seq):
                    logit_budget -= n
        preempted_now = any(s.status is SequenceStatus.WAITING for s in ordered)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted_now:
            seq = self.waiting[0]
            if seq.num_pending:
                break     # preempted while its token was being sampled: admitted once that token is in
            # prompt logprobs need every prompt position's logits: no prefix hit for such a request
            logits_wanted = needs_prompt_logits(seq)
            shared = self._fork_point(seq) if seq.fork_parent is not None else 0   # its prompt's blocks, shared
            hits = [] if logits_wanted or shared else self.kv.find_cached_prefix(seq.request_id, seq.token_ids)
            num_hit = shared or len(hits) * self.kv.block_size
            n = min(len(seq) - num_hit, budget, logit_budget if logits_wanted else budget)
            if n == 0 or not self.kv.allocate_slots(seq.request_id, num_hit, n, hits):
                if shared:     # waiting sequences hold no blocks: it forks again when admitted, if it still can
                    self.kv.free(seq.request_id)
                break
            seq.fork_parent = None
            if logits_wanted:
                logit_budget -= n
            elif not shared:      # a request that cannot look the cache up is not counted as a miss
                self.kv.record_prefix_query(len(seq), hits)
            self.waiting.popleft()
            seq.num_computed_tokens = num_hit
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_hit
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled[seq] = n
            budget -= n
        return self._output(scheduled)

    def _pending_is_last(self, seq: Sequence) -> bool:
        return (seq.num_output_tokens + seq.num_pending >= seq.params.max_tokens
                or seq.num_tokens >= self.max_model_len)

    def _output(self, scheduled: dict[Sequence, int]) -> SchedulerOutput:
        """Lay the step out for the runner: decodes first, then per-row and per-token lists."""
        out = SchedulerOutput(kv_moves=self.kv.take_moves())
        decodes, others = [], []
        for seq in scheduled:
            (decodes if seq.is_decoding else others).append(seq)
        out.num_decodes = len(decodes)
        rows = decodes + others
        block_size = self.kv.block_size
        for row, seq in enumerate(rows):
            n = scheduled[seq]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            block_ids = self.kv.block_table(seq.request_id)
            out.seqs.append(seq)
            out.num_tokens.append(n)
            out.context_lens.append(end)
            out.block_tables.append(block_ids)
            if end == seq.num_tokens:
                out.sample_rows.append(row)
            if needs_prompt_logits(seq):
                out.prompt_logprob_rows.append(row)
            ids = seq.token_ids[start:end]
            if len(ids) < n:      # the pending token, last: the engine fills it in
                out.pending_inputs.append((len(out.input_ids) + len(ids), row))
                ids.append(0)
            out.input_ids.extend(ids)
            out.positions.extend(range(start, end))
            out.slot_mapping.extend(slot_mapping(block_ids, block_size, start, end))
        return out

    def preempt(self, seq: Sequence) -> None:
        """Recompute later: free its blocks, put it back at the head of the queue."""
        self.running.remove(seq)
        self.kv.free(seq.request_id)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def advance(self, out: SchedulerOutput) -> None:
        """Once a step is scheduled: its tokens count as computed (the next schedule starts after
        them), and each sampling row's sequence has one more token pending until the engine appends
        it (two at most: one step in flight, the next scheduled)."""
        for seq, n in zip(out.seqs, out.num_tokens):
            seq.num_computed_tokens += n
        for row in out.sample_rows:
            out.seqs[row].num_pending += 1

    def publish(self, out: SchedulerOutput) -> None:
        """After the step's forward: its sequences' full blocks go to the prefix cache (not those of
        a sequence that failed, ended or was preempted meanwhile: it holds no blocks now)."""
        for seq, context_len in zip(out.seqs, out.context_lens):
            if seq.status is SequenceStatus.RUNNING:
                self.kv.cache_full_blocks(seq.request_id, seq.token_ids, context_len)

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        if seq.is_finished:
            return
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.kv.free(seq.request_id)

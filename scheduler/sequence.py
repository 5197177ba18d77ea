"""A request's state while the engine works on it."""
from __future__ import annotations

import enum
import time

from kvserve.scheduler.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Prompt and output tokens, and how many of them already have K/V in the cache.

    Chunked prefill, prefix hits and recompute after preemption all reduce to one rule:
    `num_computed_tokens` catches up with `len(token_ids)` a chunk at a time.

    num_computed_tokens counts the tokens of every step scheduled so far, whether or not its forward
    has finished; `num_pending` counts the tokens that scheduled steps sample and the engine has not
    appended yet. With async scheduling the next step is scheduled before the last one's token is
    known: its row feeds that pending token, filled in once it is appended (`num_tokens` counts it).
    """

    __slots__ = ("request_id", "token_ids", "num_prompt_tokens", "params", "status",
                 "num_computed_tokens", "num_cached_tokens", "finish_reason", "stop_reason",
                 "arrival_time", "first_scheduled_time", "output_logprobs", "eos_token_ids",
                 "generator", "num_preemptions", "prompt_logprobs", "matcher", "fork_parent", "num_pending")

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: frozenset[int] = frozenset(), arrival_time: float | None = None):
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.output_logprobs: list[float] = []
        self.eos_token_ids = eos_token_ids
        self.generator = None
        self.num_preemptions = 0
        # with params.prompt_logprobs: prompt position -> (logprob of its token, top (id, logprob) pairs)
        self.prompt_logprobs: dict[int, tuple[float, list | None]] = {}
        self.matcher = None      # with params.structured: its grammar's state (kvserve.structured)
        self.fork_parent: Sequence | None = None   # shares this sequence's prompt blocks when admitted
        self.num_pending = 0     # to be sampled by scheduled steps, not appended yet (at most 2)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens including the pending one: where the work to schedule ends."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_decoding(self) -> bool:
        """Only the last token, a generated one, is left to compute: the next step decodes it.

        The one test of "is this a decode" in kvserve: the scheduler puts these rows first, the
        attention backends run them as single-token decodes, and the engine counts them as
        generation rather than prefill work.
        """
        num_tokens = len(self.token_ids) + self.num_pending
        return self.num_computed_tokens == num_tokens - 1 and num_tokens > self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={len(self)}, computed={self.num_computed_tokens}, "
                f"{self.status.value})")

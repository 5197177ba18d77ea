"""What the engine hands back: incremental request outputs, per-request timings, engine stats."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenInfo:
    id: int
    text: str            # this token's piece of the incrementally decoded text ("" for unknown ids)
    logprob: float       # log-probability under the model's (unprocessed) distribution
    special: bool
    top: list[tuple[int, float]] | None = None   # SamplingParams.top_logprobs most likely (id, logprob), best first


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float                    # time.monotonic() at add_request
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    """One update for one request. `new_*` fields hold what arrived since the previous update.

    finish_reason: "eos" (the model's EOS), "stop_token" (a stop_token_ids entry), "stop" (a stop
    string), "length" (max_tokens or the model's maximum length), "grammar" (a structured output is
    complete), "abort", "error", or None while running.
    """
    request_id: str
    prompt_token_ids: list[int]
    new_tokens: list[TokenInfo]
    new_text: str                   # stop-string-aware text delta (text held back while it may start a stop string)
    text: str                       # all output text so far (same rules)
    token_ids: list[int]            # all output token ids so far
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None   # the stop string or stop token id that ended it
    num_cached_tokens: int = 0      # prompt tokens served from the prefix cache
    metrics: RequestMetrics | None = None
    error: str | None = None        # set when the engine failed this request
    # with SamplingParams.prompt_logprobs, from the first token on: per prompt token (its logprob, the
    # most likely (id, logprob) pairs or None), None for the first token (nothing precedes it)
    prompt_logprobs: list[tuple[float, list | None] | None] | None = None

    def merge(self, newer: RequestOutput) -> None:
        """Become the delta of this update and a newer one of the same request (for a reader that
        did not take this one yet): new tokens and text add up, the rest is taken from `newer`."""
        self.new_tokens = self.new_tokens + newer.new_tokens
        self.new_text += newer.new_text
        for name in ("text", "token_ids", "finished", "finish_reason", "stop_reason", "num_cached_tokens",
                     "metrics", "error", "prompt_logprobs"):
            setattr(self, name, getattr(newer, name))


@dataclass(slots=True)
class EngineStats:
    """A snapshot of cumulative counters and current gauges."""
    num_blocks: int
    block_size: int
    blocks_used: int
    blocks_cached: int              # reference count 0, still holding a cached prefix
    blocks_free: int                # reference count 0, no cached content
    prefix_query_tokens: int
    prefix_hit_tokens: int
    num_running: int
    num_waiting: int
    num_preemptions: int
    prompt_tokens: int              # prompt tokens computed (prefill work), cumulative
    generation_tokens: int          # tokens generated, cumulative
    num_steps: int
    late_compiles: int = 0          # kernels compiled after start-up (each one stalled every request)
    prefix_hit_tokens_host: int = 0  # of prefix_hit_tokens, those found in the host tier
    offload_num_blocks: int = 0     # host tier capacity (0: no host tier)
    offload_blocks_cached: int = 0  # host blocks holding a cached prefix block
    offload_blocks_stored: int = 0  # device -> host block copies, cumulative
    offload_blocks_loaded: int = 0  # host -> device block copies, cumulative

    @property
    def usage(self) -> float:
        return self.blocks_used / self.num_blocks if self.num_blocks else 0.0

    @property
    def offload_usage(self) -> float:
        return self.offload_blocks_cached / self.offload_num_blocks if self.offload_num_blocks else 0.0


@dataclass(slots=True)
class StepStats:
    """Reported to step listeners after every engine step (measured in the engine process)."""
    num_prefill_tokens: int
    num_decode_tokens: int
    num_seqs: int
    duration: float

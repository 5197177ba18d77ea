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


class Prefix:
    """The first n items of a list that only grows (a request's token ids or its released text
    pieces): what an output's cumulative fields point at until someone reads them. Handing each
    output a copy instead costs O(tokens so far) per token, quadratic over a long generation."""
    __slots__ = ("items", "n")

    def __init__(self, items: list, n: int):
        self.items = items
        self.n = n


class RequestOutput:
    """One update for one request. `new_*` fields hold what arrived since the previous update;
    `text` and `token_ids` hold everything so far, built when first read (an update that is never
    read in full costs no copy of the whole output).

    finish_reason: "eos" (the model's EOS), "stop_token" (a stop_token_ids entry), "stop" (a stop
    string), "length" (max_tokens or the model's maximum length), "grammar" (a structured output is
    complete), "abort", "error", or None while running.
    """
    __slots__ = ("request_id", "prompt_token_ids", "new_tokens", "_new_text", "_text", "_token_ids", "finished",
                 "finish_reason", "stop_reason", "num_cached_tokens", "metrics", "error", "prompt_logprobs")

    def __init__(self, request_id: str, prompt_token_ids: list[int], new_tokens: list[TokenInfo],
                 new_text: str | list[str], text: str | Prefix, token_ids: list[int] | Prefix,
                 finished: bool = False, finish_reason: str | None = None, stop_reason: str | int | None = None,
                 num_cached_tokens: int = 0, metrics: RequestMetrics | None = None, error: str | None = None,
                 prompt_logprobs: list[tuple[float, list | None] | None] | None = None):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.new_tokens = new_tokens           # the tokens since the previous update
        self._new_text = new_text              # str, or pieces still to join (merged updates)
        self._text = text                      # str, or a Prefix of the released text pieces
        self._token_ids = token_ids            # list, or a Prefix of the request's token ids
        self.finished = finished
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason         # the stop string or stop token id that ended it
        self.num_cached_tokens = num_cached_tokens   # prompt tokens served from the prefix cache
        self.metrics = metrics
        self.error = error                     # set when the engine failed this request
        # with SamplingParams.prompt_logprobs, from the first token on: per prompt token (its logprob, the
        # most likely (id, logprob) pairs or None), None for the first token (nothing precedes it)
        self.prompt_logprobs = prompt_logprobs

    @property
    def new_text(self) -> str:
        """The stop-string-aware text delta (text that may still start a stop string is held back)."""
        text = self._new_text       # read once: another thread may be building it too
        if not isinstance(text, str):
            text = self._new_text = "".join(text)
        return text

    @new_text.setter
    def new_text(self, value: str) -> None:
        self._new_text = value

    @property
    def text(self) -> str:
        """All output text so far (same rules as new_text)."""
        text = self._text
        if isinstance(text, Prefix):
            text = self._text = "".join(text.items[:text.n])
        return text

    @text.setter
    def text(self, value: str) -> None:
        self._text = value

    @property
    def token_ids(self) -> list[int]:
        """All output token ids so far."""
        ids = self._token_ids
        if isinstance(ids, Prefix):
            ids = self._token_ids = ids.items[:ids.n]
        return ids

    @token_ids.setter
    def token_ids(self, value: list[int]) -> None:
        self._token_ids = value

    @property
    def num_output_tokens(self) -> int:
        """len(token_ids), without building the list."""
        ids = self._token_ids
        return ids.n if isinstance(ids, Prefix) else len(ids)

    def merge(self, newer: RequestOutput) -> None:
        """Become the delta of this update and a newer one of the same request (for a reader that
        did not take this one yet): new tokens and text add up, the rest is taken from `newer`.
        Amortized O(1) per merge: a reader far behind (a client that stopped reading) costs no
        quadratic copying. This output's new_tokens list grows in place (`newer` is only read)."""
        self.new_tokens.extend(newer.new_tokens)
        if isinstance(self._new_text, str):
            self._new_text = [self._new_text]
        if isinstance(newer._new_text, str):
            self._new_text.append(newer._new_text)
        else:
            self._new_text.extend(newer._new_text)
        self._text, self._token_ids = newer._text, newer._token_ids
        for name in ("finished", "finish_reason", "stop_reason", "num_cached_tokens", "metrics", "error",
                     "prompt_logprobs"):
            setattr(self, name, getattr(newer, name))

    def _fields(self) -> tuple:
        return (self.request_id, self.prompt_token_ids, self.new_tokens, self.new_text, self.text, self.token_ids,
                self.finished, self.finish_reason, self.stop_reason, self.num_cached_tokens, self.metrics, self.error,
                self.prompt_logprobs)

    def __eq__(self, other: object) -> bool:
        """Field by field, as when this was a dataclass (the lazy fields compare by value)."""
        if not isinstance(other, RequestOutput):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None     # mutable, like the dataclass it was

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, new_tokens={len(self.new_tokens)}, "
                f"new_text={self.new_text!r}, num_output_tokens={self.num_output_tokens}, "
                f"finished={self.finished}, finish_reason={self.finish_reason!r}, error={self.error!r})")


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
    late_compiles: int = 0          # kernels (or compiled graphs) made after start-up (each stalled every request)
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

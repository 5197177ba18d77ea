"""Turn the logits of the sampling rows into tokens, per request's SamplingParams."""
from __future__ import annotations

from collections import Counter

import torch

from kvserve.cache.kv_pool import upload
from kvserve.scheduler.sampling_params import SamplingParams
from kvserve.scheduler.sequence import Sequence


class Sampler:
    """Samples one token for each sequence whose logits row it is given, per its SamplingParams.

    A seeded request keeps its own generator (on the sampling device) for its whole life, so its
    draws do not depend on what else shares the batch.
    """

    def __init__(self, device: torch.device, grammars=None, processed_logprobs: bool = False):
        self.device = device
        self.grammars = grammars    # kvserve.structured.GrammarCompiler: the masks of constrained rows
        self.processed_logprobs = processed_logprobs

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float], list]:
        banned = [banned_tokens(s) for s in seqs]
        allowed = None
        if self.grammars is not None and any(s.matcher is not None for s in seqs):
            from kvserve.structured import unpack_bitmask
            mask = self.grammars.fill_bitmask([s.matcher for s in seqs], banned)
            allowed = unpack_bitmask(mask, logits.shape[1], logits.device)
            banned = [[] if s.matcher is not None else b for s, b in zip(seqs, banned)]   # folded into the mask
        return sample(logits, [s.params for s in seqs], [s.token_ids for s in seqs],
                      [s.num_prompt_tokens for s in seqs], [self._generator(s) for s in seqs], banned, allowed,
                      self.processed_logprobs)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None or seq.params.greedy:
            return None
        if seq.generator is None:
            seq.generator = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        return seq.generator


def banned_tokens(seq: Sequence) -> list[int]:
    """Before min_tokens, EOS (unless ignored) and the stop token ids cannot be sampled."""
    params = seq.params
    if seq.num_output_tokens >= params.min_tokens:
        return []
    return list(params.stop_token_ids) + ([] if params.ignore_eos else sorted(seq.eos_token_ids))


def sample(logits: torch.Tensor, params: list[SamplingParams], token_ids: list[list[int]],
           num_prompt: list[int], generators: list[torch.Generator | None],
           banned: list[list[int]] | None = None,
           allowed: torch.Tensor | None = None, processed: bool = False) -> tuple[list[int], list[float], list]:
    """logits [S, V]. Returns chosen token ids, their log-probabilities under the model's
    unprocessed distribution, and per row its params.top_logprobs most likely (token id, logprob)
    pairs under that distribution, most likely first (None for a row that asked for none).
    banned[i]: token ids row i may not produce (EOS and stop tokens while min_tokens is not reached).
    allowed: [S, V] bool, the tokens each row's grammar allows (applied after every other change).
    processed: the logprobs are instead those of the distribution each token was drawn from: after
    penalties, logit_bias, bans and the grammar, then temperature, top-k, top-p and min-p for a
    sampled row (a greedy row's is the log-softmax of its adjusted logits)."""
    logits = logits.float()
    logprobs_all = torch.log_softmax(logits, dim=-1)
    banned = banned or [[] for _ in params]
    if (all(p.greedy and not _has_penalty(p) and not p.logit_bias for p in params) and not any(banned)
            and allowed is None):
        chosen = logits.argmax(dim=-1)
    else:
        chosen = torch.empty(len(params), dtype=torch.long, device=logits.device)
        logits = logits.clone()
        if allowed is not None:
            logits.masked_fill_(~allowed, float("-inf"))
        for i, p in enumerate(params):
            if p.logit_bias:
                logits[i, upload(list(p.logit_bias), logits.device)] += upload(list(p.logit_bias.values()),
                                                                             logits.device, torch.float32)
            if _has_penalty(p):
                _apply_penalties(logits[i], p, token_ids[i], num_prompt[i])
            ids = [t for t in banned[i] if t < logits.shape[1]]
            if ids:
                logits[i, upload(ids, logits.device)] = float("-inf")
        if processed:
            logprobs_all = torch.log_softmax(logits, dim=-1)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if greedy:
            rows = upload(greedy, logits.device)
            chosen[rows] = logits[rows].argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            rows = upload(sampled, logits.device)
            probs = _warp(logits[rows], [params[i] for i in sampled])
            chosen[rows] = _draw(probs, [generators[i] for i in sampled])
            if processed:
                logprobs_all[rows] = probs.log()
    # the step's one device -> host read: ids, logprobs and top logprobs together (float64 holds any token id)
    n = len(params)
    parts = [chosen.to(torch.float64), logprobs_all.gather(1, chosen[:, None])[:, 0].double()]
    k = min(max((p.top_logprobs for p in params), default=0), logprobs_all.shape[1])
    if k:
        top_values, top_ids = logprobs_all.topk(k, dim=-1)
        parts += [top_ids.flatten().to(torch.float64), top_values.flatten().double()]
    packed = torch.cat(parts)
    if packed.is_cuda:   # wait for the step's kernels without the GIL (the engine thread works meanwhile)
        torch.cuda.current_stream(packed.device).synchronize()
    packed = packed.tolist()
    tops: list = [None] * n
    if k:
        ids, values = packed[2 * n:2 * n + n * k], packed[2 * n + n * k:]
        for i, p in enumerate(params):
            if p.top_logprobs:
                row = slice(i * k, i * k + min(p.top_logprobs, k))
                tops[i] = [(int(t), v) for t, v in zip(ids[row], values[row])]
    return [int(t) for t in packed[:n]], packed[n:2 * n], tops


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _apply_penalties(row: torch.Tensor, p: SamplingParams, tokens: list[int], num_prompt: int) -> None:
    vocab = row.shape[0]
    if p.repetition_penalty != 1.0:
        seen = upload(sorted({t for t in tokens if t < vocab}), row.device)
        if seen.numel():
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    output = Counter(t for t in tokens[num_prompt:] if t < vocab)
    if output and (p.presence_penalty or p.frequency_penalty):
        # counted on the host (torch.bincount on CUDA reads its input's range back: a sync)
        ids = upload(list(output), row.device)
        counts = upload(list(output.values()), row.device, torch.float32)
        row.index_add_(0, ids, -(p.frequency_penalty * counts + p.presence_penalty))


def _warp(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p -> probabilities [S, V]. Which warps apply is decided from
    the params on the host, never by reading a device value.

    Extreme but valid parameters (a tiny temperature or repetition penalty) can push logits to
    infinity: they are clamped to the largest finite float, and a row left with no finite
    distribution falls back to its most likely token rather than failing the step."""
    device, vocab_size = logits.device, logits.shape[1]
    fallback = logits.argmax(dim=-1)
    logits = logits / upload([p.temperature for p in params], device, torch.float32)[:, None]
    logits = logits.nan_to_num(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
    top_k = [min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params]
    if min(top_k) < vocab_size:
        k = upload(top_k, device)[:, None]
        kth = logits.sort(dim=-1, descending=True).values.gather(1, k - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if any(p.top_p < 1 for p in params):
        top_p = upload([p.top_p for p in params], device, torch.float32)[:, None]
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = (cum - sorted_logits.softmax(dim=-1)) >= top_p   # keep the smallest set reaching top_p
        drop[:, 0] = False                                      # and always the most likely token
        logits = logits.scatter(1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0 for p in params):
        min_p = upload([p.min_p for p in params], device, torch.float32)[:, None]
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    usable = probs.isfinite().all(dim=-1) & (probs.sum(dim=-1) > 0)
    one_hot = torch.nn.functional.one_hot(fallback, vocab_size).to(probs.dtype)
    return torch.where(usable[:, None], probs, one_hot)


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row; a row with its own generator draws independently of the others."""
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        rows = upload(shared, probs.device)
        out[rows] = torch.multinomial(probs[rows], 1)[:, 0]
    for i, g in enumerate(generators):
        if g is not None:
            out[i] = torch.multinomial(probs[i], 1, generator=g)[0]
    return out

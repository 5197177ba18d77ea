"""A request that breaks a step fails alone: the step is retried without it, and everyone else
gets the tokens they would have got anyway.

The forward pass is retried by halves until the rows that fail on their own are found (a row's
logits do not depend on which other rows share the batch). Sampling is retried row by row, with
each seeded request's generator put back to where it was before the failed attempt. A fault that
belongs to no request (the device is lost, memory cannot be had) is re-raised: the engine dies.
"""
from __future__ import annotations

import logging

import torch

from kvserve.runner import ModelRunner, is_fatal
from kvserve.sampler import Sampler
from kvserve.scheduler.scheduler import SchedulerOutput
from kvserve.scheduler.sequence import Sequence

log = logging.getLogger("kvserve")

def execute(runner: ModelRunner, step: SchedulerOutput) -> tuple[torch.Tensor | None, list[int], dict[int, Exception],
                                                                dict[int, torch.Tensor]]:
    """Run the step. Returns the logits of the sampling rows that ran, those rows (in step order), the
    rows that failed alone, and the logits of every token of each prompt-logprob row that ran. Without
    a failure this is runner.execute() and nothing more."""
    try:
        logits, prompt_logits = split(step, runner.execute(step))
        return logits, step.sample_rows, {}, prompt_logits
    except Exception as exc:
        if is_fatal(exc):
            raise
        log.warning("a step of %d rows failed (%s: %s); retrying it by halves to find the rows that break it",
                    len(step.seqs), type(exc).__name__, exc)
    logits_by_row: dict[int, torch.Tensor] = {}
    prompt_by_row: dict[int, torch.Tensor] = {}
    failed: dict[int, Exception] = {}
    _bisect(runner, step, list(range(len(step.seqs))), logits_by_row, prompt_by_row, failed)
    if len(failed) == len(step.seqs) > 1:
        raise next(iter(failed.values()))   # every row fails on its own: the engine is at fault
    rows = [row for row in step.sample_rows if row in logits_by_row]
    return (torch.stack([logits_by_row[row] for row in rows]) if rows else None), rows, failed, prompt_by_row


def split(step: SchedulerOutput, logits: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """runner.execute()'s logits as the sampling rows' and, per prompt-logprob row, its tokens'."""
    n = len(step.sample_rows)
    prompt, start = {}, n
    for row in step.prompt_logprob_rows:
        prompt[row] = logits[start:start + step.num_tokens[row]]
        start += step.num_tokens[row]
    return logits[:n], prompt


def _bisect(runner: ModelRunner, step: SchedulerOutput, rows: list[int], logits_by_row: dict[int, torch.Tensor],
            prompt_by_row: dict[int, torch.Tensor], failed: dict[int, Exception]) -> None:
    part = step.select(rows)
    try:
        logits = runner.execute(part)
    except Exception as exc:
        if is_fatal(exc):
            raise
        if len(rows) == 1:
            failed[rows[0]] = exc
            return
        half = len(rows) // 2
        _bisect(runner, step, rows[:half], logits_by_row, prompt_by_row, failed)
        _bisect(runner, step, rows[half:], logits_by_row, prompt_by_row, failed)
        return
    logits, prompt = split(part, logits)
    # copies: a decode-only part replays a CUDA graph, whose logits live in a buffer the next replay overwrites
    for i, part_row in enumerate(part.sample_rows):
        logits_by_row[rows[part_row]] = logits[i].clone()
    for part_row, tokens in prompt.items():     # prompt rows never run as a graph
        prompt_by_row[rows[part_row]] = tokens


def sample(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple | Exception]:
    """A (token, logprob, top logprobs) for each sequence, or the error that its row alone raised."""
    generators = {id(s): s.generator.get_state() for s in seqs if s.generator is not None}
    try:
        return list(zip(*sampler(logits, seqs)))
    except Exception as exc:
        if is_fatal(exc):
            raise
        log.warning("sampling %d rows failed (%s: %s); sampling them one by one", len(seqs), type(exc).__name__, exc)
    results: list[tuple | Exception] = []
    for i, seq in enumerate(seqs):
        if id(seq) in generators:
            seq.generator.set_state(generators[id(seq)])
        try:
            tokens, logprobs, tops = sampler(logits[i:i + 1], [seq])
            results.append((tokens[0], logprobs[0], tops[0]))
        except Exception as exc:
            if is_fatal(exc):
                raise
            results.append(exc)
    return results

"""Fault injection shared by the isolation tests: a forward pass that breaks on one token."""
from __future__ import annotations


def poison_forward(llm, monkeypatch, used: set[int]) -> int:
    """Make the model raise on any step that holds a token id none of `used` has; returns that id.
    The request holding it fails, batched or alone; no other request has it."""
    poison = next(t for t in range(3, 250) if t not in used)
    model = llm.engine.runner.model
    forward = model.forward

    def poisoned_forward(*args, input_ids=None, **kwargs):
        if bool((input_ids == poison).any()):
            raise RuntimeError("the forward cannot take this request")
        return forward(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model, "forward", poisoned_forward)
    return poison

"""Checks shared by both API families: unsupported fields, lengths, finite numbers."""
from __future__ import annotations

import math
import secrets
from typing import Any

from pydantic import BaseModel, model_validator

from kvserve.server.errors import APIError


class NullAsDefault(BaseModel):
    """A body where an explicit null means "use the default" (many clients send every field)."""

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {name: value for name, value in data.items() if value is not None}
        return data


def reject_unsupported(checks: list[tuple[str, Any, bool]]) -> None:
    """Raise a validation APIError for the first (field, value, unsupported) that is unsupported."""
    for name, value, unsupported in checks:
        if unsupported:
            raise APIError("validation", f"{name}={value!r} is not supported by kvserve; leave it unset "
                           "or at its default", param=name)


def reject_unknown(body: BaseModel, prefix: str = "") -> None:
    """Reject fields the schema does not know, unless they are null (clients send nulls freely)."""
    for name, value in (body.model_extra or {}).items():
        if value is not None:
            raise APIError("validation", f"unknown field {prefix}{name}; kvserve does not support it",
                           param=f"{prefix}{name}")


def resolve_max_tokens(prompt_len: int, max_model_len: int, requested: int | None, default: int | None,
                       name: str, prompt_param: str) -> int:
    """The output budget: `requested` if it fits, else a 4xx naming the lengths; default capped to fit."""
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError("validation", f"the prompt has {prompt_len} tokens but this model accepts at most "
                       f"{max_model_len - 1} prompt tokens (max_model_len={max_model_len} including at least "
                       "one generated token)", param=prompt_param, code="context_length_exceeded")
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise APIError("validation", f"the prompt has {prompt_len} tokens and {name}={requested}, but this "
                       f"model accepts at most {max_model_len} tokens in total (max_model_len); set {name} "
                       f"to at most {room}", param=name, code="context_length_exceeded")
    return requested


def finite(value: float | None) -> float | None:
    """JSON has no inf or NaN: map them to null."""
    return value if value is not None and math.isfinite(value) else None


def random_seed() -> int:
    """A seed to report back when the client asked for sampling without one."""
    return secrets.randbits(31)
